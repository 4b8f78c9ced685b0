"""Evaluation: held-out loss and perplexity, and the task metric scored on generated answers.

Both split the held-out set across ranks and sum the results. Every rank runs the same number of
forward passes (padding with a repeated batch whose result is dropped), because under ZeRO-3
each forward is a collective.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rosa_ds.data.batching import collate, shard_evenly
from rosa_ds.data.metrics import score
from rosa_ds.data.tokenize import IGNORE, prompt_ids
from rosa_ds.dist import all_reduce_sum


def _forward_count(n_items: int, per_batch: int, world: int) -> int:
    per_rank = math.ceil(n_items / world)
    return math.ceil(per_rank / per_batch)


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module,
    examples: list[dict[str, list[int]]],
    micro_batch: int,
    pad_id: int,
    rank: int,
    world: int,
    max_examples: int = 0,
) -> dict[str, float]:
    """Token-weighted mean loss over the held-out examples, and its perplexity."""
    was_training = model.training
    model.eval()
    if max_examples:
        examples = examples[:max_examples]
    mine = [examples[i] for i in shard_evenly(len(examples), rank, world)]
    n_batches = _forward_count(len(examples), micro_batch, world)
    total, tokens = 0.0, 0.0
    device = next(model.parameters()).device
    for b in range(n_batches):
        chunk = mine[b * micro_batch : (b + 1) * micro_batch]
        real = bool(chunk)
        batch = collate(chunk or examples[:1], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        n = float((batch["labels"][:, 1:] != IGNORE).sum())
        if real:
            total += float(out.loss) * n
            tokens += n
    total, tokens = all_reduce_sum([total, tokens])
    model.train(was_training)
    loss = total / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


@torch.no_grad()
def task_metric(
    model: torch.nn.Module,
    tokenizer: Any,
    records: list[dict[str, str]],
    metric: str,
    *,
    num: int,
    batch_size: int,
    max_new_tokens: int,
    use_chat_template: bool,
    rank: int,
    world: int,
    synced: bool,
) -> tuple[float, list[dict[str, Any]]]:
    """Fraction of ``num`` held-out records answered correctly by greedy generation.

    Returns the score and this rank's scored samples (prompt, prediction, correct).
    """
    if metric == "none" or num == 0 or not records:
        return float("nan"), []
    was_training = model.training
    model.eval()
    records = records[:num]
    mine = [records[i] for i in shard_evenly(len(records), rank, world)]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    samples = []
    correct = 0.0
    for b in range(_forward_count(len(records), batch_size, world)):
        chunk = mine[b * batch_size : (b + 1) * batch_size]
        real = bool(chunk)
        chunk = chunk or records[:1]
        prompts = [prompt_ids(tokenizer, r["prompt"], use_chat_template) for r in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            use_cache=True,
            synced_gpus=synced,
        )
        if not real:
            continue
        for rec, seq in zip(chunk, out[:, width:], strict=True):
            text = tokenizer.decode(seq, skip_special_tokens=True)
            ok = score(metric, text, rec)
            correct += ok
            samples.append({"prompt": rec["prompt"], "prediction": text, "correct": bool(ok)})
    correct, count = all_reduce_sum([correct, float(len(samples))])
    model.train(was_training)
    return correct / max(count, 1.0), samples
