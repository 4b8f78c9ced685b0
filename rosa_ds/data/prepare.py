"""``rosa-ds prepare``: tokenize (and pack) a run's data into the cache before the job starts.

A job's ranks then map the cached splits at start instead of tokenizing, and the report says
what one epoch is, so ``train.max_steps`` or ``train.num_epochs`` can be chosen from it.
"""

from __future__ import annotations

from rosa_ds.config import RunConfig
from rosa_ds.model import check_model
from rosa_ds.preflight import tokenized_data


def run_prepare(cfg: RunConfig) -> int:
    model_path, _ = check_model(cfg.model)
    _, data, tokens = tokenized_data(cfg, model_path)
    if data.describe():
        print(data.describe())
    print(tokens.describe())
    for name, split in (("train", tokens.train), ("held out", tokens.eval)):
        total, labels = split.token_counts()
        print(f"{name:<9} {len(split)} sequences, {total} tokens, {labels} label tokens")
    batch = cfg.train.global_batch_size
    print(f"one epoch {len(tokens.train) // batch} optimizer steps at global batch {batch}")
    return 0
