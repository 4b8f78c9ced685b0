"""Evaluation: held-out loss and perplexity, and the task metric scored on generated answers.

Both split the held-out set across ranks and sum the results; ``evaluate_all`` runs them on a
built engine, ``evaluate`` is the ``rosa-ds eval`` command. Every rank runs the same number of
forward passes (padding with a repeated batch whose result is dropped), because under ZeRO-3
each forward is a collective.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from rosa_ds import precision
from rosa_ds.adapted_model import load_adapted_model
from rosa_ds.adapters.io import is_delta, load_adapter, masks_from_state
from rosa_ds.config import RunConfig
from rosa_ds.data.batching import collate, shard_evenly
from rosa_ds.data.metrics import score
from rosa_ds.data.tokenize import IGNORE, prompt_ids
from rosa_ds.dist import all_reduce_sum, init_distributed
from rosa_ds.engine import Built, EngineOptions, build_engine, torch_dtype
from rosa_ds.kernels.csr import SparseStructure
from rosa_ds.preflight import Prepared, prepare
from rosa_ds.tracking import quiet_libraries


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


def evaluate_all(
    cfg: RunConfig, built: Built, prep: Prepared, with_metric: bool
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Held-out loss and (``with_metric``) the task metric of a built engine's model."""
    p = built.placement
    synced = built.zero_stage == 3 and p.world_size > 1
    return evaluate_model(cfg, prep, built.model, p.rank, p.world_size, synced, with_metric)


def evaluate_model(
    cfg: RunConfig,
    prep: Prepared,
    model: torch.nn.Module,
    rank: int,
    world: int,
    synced: bool,
    with_metric: bool,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """``synced``: every forward is a collective (ZeRO-3), so ranks generate in lockstep."""
    tokenizer = prep.tokenizer
    results = heldout_loss(
        model,
        prep.eval_examples,
        cfg.train.micro_batch_size,
        tokenizer.pad_token_id,
        rank,
        world,
        cfg.eval.max_loss_examples,
    )
    samples: list[dict[str, Any]] = []
    if with_metric and prep.data.metric != "none" and cfg.eval.num_generate:
        value, samples = task_metric(
            model,
            tokenizer,
            prep.data.eval,
            prep.data.metric,
            num=cfg.eval.num_generate,
            batch_size=cfg.eval.batch_size,
            max_new_tokens=cfg.eval.max_new_tokens,
            use_chat_template=cfg.data.chat_template,
            rank=rank,
            world=world,
            synced=synced,
        )
        results[prep.data.metric] = value
    return results, samples


def evaluate(cfg: RunConfig, adapter_dir: str | None) -> dict[str, Any]:
    """Held-out loss, perplexity and task metric of the base model plus an adapter (if given).

    An accumulated update (a resampled run's final adapter) is merged into the base weights in
    memory and evaluated in each process without DeepSpeed; any other adapter is evaluated on
    a DeepSpeed engine as it was trained."""
    cfg, choice = precision.resolve(cfg)
    prep = prepare(cfg, resume=None, training=False)
    quiet_libraries()
    state = masks = None
    if adapter_dir is None and (Path(cfg.output_dir) / "adapter").is_dir():
        adapter_dir = str(Path(cfg.output_dir) / "adapter")
    merged = None  # an accumulated update, merged into the base weights in memory
    if adapter_dir is not None:
        state, meta = load_adapter(adapter_dir)
        if is_delta(meta):  # before any collective: a foreign adapter is one line
            dtype = torch_dtype(cfg.train.precision)
            merged, _, _ = load_adapted_model(adapter_dir, prep.model_path, dtype)
        else:
            cfg, masks = adapter_as_trained(cfg, prep.hf_config, state, meta, adapter_dir)
    placement = init_distributed(cfg.deepspeed.backend, cfg.deepspeed.comm_timeout_minutes)
    if placement.rank == 0:
        precision.announce(choice, cfg)
    with torch.no_grad():
        if merged is not None:
            rank, world = placement.rank, placement.world_size
            results, samples = evaluate_model(cfg, prep, merged, rank, world, False, True)
        else:
            built = build_engine(
                cfg,
                prep.model_path,
                prep.tokenizer,
                prep.hidden_size,
                training=False,
                options=EngineOptions(masks=masks, adapter_state=state),
            )
            results, samples = evaluate_all(cfg, built, prep, with_metric=True)
    return {"adapter": adapter_dir, **results, "samples": samples[:3]}


def adapter_as_trained(
    cfg: RunConfig,
    hf_config: Any,
    state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    adapter_dir: str,
) -> tuple[RunConfig, dict[str, SparseStructure] | None]:
    """The adapter settings an adapter folder was trained with (its ``adapter.json`` wins over
    the config) and its masks, so any method's adapter evaluates as it was trained."""
    sparse = meta.get("sparse_modules", [])
    masks = None
    if sparse:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(hf_config)
        masks = masks_from_state(
            state, sparse, lambda n: skeleton.get_submodule(n).weight.shape, adapter_dir
        )
    exact = [re.escape(n) for n in meta["modules"]]  # matched at the end of the full name
    adapter = replace(
        cfg.adapter,
        method="full" if meta.get("method") == "full" else "auto",
        rank=meta["rank"],
        alpha=meta["alpha"],
        dropout=0.0,
        targets=exact,
        exclude=[],
        density=0.0,
        resample_every=None,
        robust=replace(cfg.adapter.robust, density_patterns={}),
    )
    if sparse:  # any density > 0 marks the module sparse; the mask itself comes from the file
        patterns = dict.fromkeys((re.escape(n) for n in sparse), 0.5)
        adapter = replace(adapter, robust=replace(adapter.robust, density_patterns=patterns))
    return replace(cfg, adapter=adapter), masks
