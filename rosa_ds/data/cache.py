"""Tokenize once: the tokenized (and packed) splits, kept under a content hash and memory-mapped.

A run's records become token sequences through ``datasets``' ``map`` (batched, in several
processes for large data), and the result is saved as Arrow files under
``<cache>/<key>/{train,eval}``. The key hashes everything that decides the sequences: the
records themselves, the tokenizer (its vocabulary and merges, special tokens and chat template),
the settings (``max_length``, chat template use, ``train_on_inputs``, packing) and
``CACHE_VERSION``. Whichever process takes the entry's file lock first tokenizes; every other
rank, a resumed run and later runs wait for it and then map the same files, so a node's ranks
share one copy in the page cache instead of each holding Python lists of every token.

``rosa-ds prepare`` fills the cache ahead of a job. With ``data.cache=false`` the same ``map``
runs in memory on every start.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from filelock import FileLock

from rosa_ds.config import DataConfig
from rosa_ds.data.tokenize import IGNORE, pack, tokenize_records, uses_template
from rosa_ds.model import cache_dir

CACHE_VERSION = 1  # bump when tokenization or packing changes what an entry holds
EMPTY = "empty"
RECORDS_PER_PROCESS = 2000  # below this, another tokenizing process costs more than it saves


class TokenizedSplit(Sequence):
    """A tokenized split as the trainer reads it (``split[i]`` is one example's lists of ids,
    slices are lists of examples), over an Arrow table that may be memory-mapped."""

    def __init__(self, table: Any) -> None:
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    def token_counts(self) -> tuple[int, int]:
        """All tokens and label tokens (labels other than -100) of the split."""
        if not len(self):
            return 0, 0
        ids, labels = self.table.data.column("input_ids"), self.table.data.column("labels")
        flat = pc.list_flatten(labels)
        return int(pc.sum(pc.list_value_length(ids)).as_py()), int(
            pc.sum(pc.not_equal(flat, IGNORE)).as_py() or 0
        )

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = self.table[index]
        return {k: v for k, v in row.items() if v is not None}


@dataclass
class Tokenized:
    """Both splits, and where they came from (for the log and ``rosa-ds prepare``)."""

    train: TokenizedSplit
    eval: TokenizedSplit
    folder: Path | None  # the cache entry, None when tokenized in memory
    from_cache: bool
    seconds: float

    def describe(self) -> str:
        counts = f"{len(self.train)} training and {len(self.eval)} held-out sequences"
        if self.folder is None:
            return f"tokenized {counts} in memory ({self.seconds:.1f} s)"
        if self.from_cache:
            return f"tokenized data from the cache: {counts} in {self.folder}"
        return f"tokenized {counts} into {self.folder} ({self.seconds:.1f} s)"


def cache_root(data: DataConfig) -> Path | None:
    """Where entries live: ``data.cache_dir``, else the tokenized/ folder of rosa-ds' cache
    (``$ROSA_DS_CACHE``, else ~/.cache/rosa-ds), which holds the built-in models too."""
    if not data.cache:
        return None
    return Path(data.cache_dir).expanduser() if data.cache_dir else cache_dir() / "tokenized"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what the tokenizer maps text to: its model, special tokens and template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    facts = [
        type(tokenizer).__name__,
        tokenizer.chat_template,
        tokenizer.eos_token_id,
        tokenizer.bos_token_id,
        tokenizer.pad_token_id,
        getattr(tokenizer, "add_bos_token", None),
        getattr(tokenizer, "add_eos_token", None),
    ]
    h.update(json.dumps(facts, default=str).encode())
    return h.hexdigest()


def settings(data: DataConfig, tokenizer: Any) -> dict[str, Any]:
    """The settings that decide the sequences, as the key records them."""
    return {
        "version": CACHE_VERSION,
        "max_length": data.max_length,
        "chat_template": uses_template(tokenizer, data.chat_template),
        "train_on_inputs": data.train_on_inputs,
        "packing": data.packing,
    }


def content_key(
    train: list[dict[str, Any]], held_out: list[dict[str, Any]], tokenizer: Any, data: DataConfig
) -> str:
    h = hashlib.sha256()
    for part in (train, held_out, settings(data, tokenizer)):
        h.update(json.dumps(part, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\0")
    h.update(tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()[:32]


def _tokenize_batch(batch: dict[str, list[str]], tokenizer: Any, data: DataConfig) -> dict:
    """``map``'s function: JSON records in (a mix's records differ in fields, which one Arrow
    schema cannot hold), ``input_ids`` and ``labels`` out; records with nothing left to train
    after truncation drop out."""
    records = [json.loads(r) for r in batch["record"]]
    examples = tokenize_records(
        records, tokenizer, data.max_length, data.chat_template, data.train_on_inputs
    )
    return {k: [e[k] for e in examples] for k in ("input_ids", "labels")}


def _processes(data: DataConfig, records: int) -> int | None:
    wanted = data.num_proc or min(8, os.cpu_count() or 1, records // RECORDS_PER_PROCESS)
    return wanted if wanted > 1 else None


def _tokenize(records: list[dict[str, Any]], tokenizer: Any, data: DataConfig, packed: bool):
    import datasets

    table = datasets.Dataset.from_dict({"record": [json.dumps(r) for r in records]})
    procs = _processes(data, len(records))
    if procs:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers
    table = table.map(
        _tokenize_batch,
        batched=True,
        batch_size=256,
        num_proc=procs,
        remove_columns=["record"],
        fn_kwargs={"tokenizer": tokenizer, "data": data},
        new_fingerprint=hashlib.sha256(str(time.time_ns()).encode()).hexdigest()[:16],
        desc="tokenizing" if procs else None,
    )
    if packed:
        rows = pack(list(table), data.max_length)
        table = datasets.Dataset.from_list(rows) if rows else table
    return table


def _save(table: Any, folder: Path) -> None:
    """Arrow files; an empty split (every record cut to nothing) is a marker, as ``datasets``
    writes no shard for it and cannot read the folder back."""
    if len(table):
        table.save_to_disk(str(folder))
    else:
        folder.mkdir(parents=True)
        (folder / EMPTY).write_text("")


def _load(folder: Path) -> TokenizedSplit:
    import datasets

    if (folder / EMPTY).is_file():
        return TokenizedSplit(datasets.Dataset.from_dict({"input_ids": [], "labels": []}))
    return TokenizedSplit(datasets.load_from_disk(str(folder)))


def tokenized_splits(
    train: list[dict[str, Any]],
    held_out: list[dict[str, Any]],
    tokenizer: Any,
    data: DataConfig,
) -> Tokenized:
    """The run's tokenized splits, from the cache when an entry for this content exists (built
    under its lock when not)."""
    import datasets

    datasets.disable_progress_bars()
    start = time.time()
    root = cache_root(data)
    if root is None:
        return Tokenized(
            TokenizedSplit(_tokenize(train, tokenizer, data, data.packing)),
            TokenizedSplit(_tokenize(held_out, tokenizer, data, False)),
            None,
            False,
            time.time() - start,
        )
    root.mkdir(parents=True, exist_ok=True)
    folder = root / content_key(train, held_out, tokenizer, data)
    with FileLock(str(folder) + ".lock"):
        built = not (folder / "done").is_file()
        if built:
            tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            _save(_tokenize(train, tokenizer, data, data.packing), tmp / "train")
            _save(_tokenize(held_out, tokenizer, data, False), tmp / "eval")
            (tmp / "settings.json").write_text(json.dumps(settings(data, tokenizer)))
            (tmp / "done").write_text("")
            shutil.rmtree(folder, ignore_errors=True)  # a crash's partial entry
            os.replace(tmp, folder)
    return Tokenized(
        _load(folder / "train"), _load(folder / "eval"), folder, not built, time.time() - start
    )
