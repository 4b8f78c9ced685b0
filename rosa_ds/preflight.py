"""Checks that run before any process group, model weights or output exist.

A mistyped config must cost seconds, not a queue slot: everything that can be checked without
loading weights is checked here, each failure a :class:`UserError`, and nothing is written to the
output directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from rosa_ds.adapters.inject import adapted_modules, inject_adapters
from rosa_ds.adapters.masks import check_masks, load_masks, module_density
from rosa_ds.adapters.subspace_io import frozen_files
from rosa_ds.adapters.trained_modules import trained_params
from rosa_ds.checkpoint import (
    MASK_FILE,
    checkpoint_root,
    incomplete_checkpoints,
    latest_checkpoint,
    read_state,
)
from rosa_ds.config import RunConfig, validate
from rosa_ds.data.cache import Tokenized, TokenizedSplit, tokenized_splits
from rosa_ds.data.loading import TaskData
from rosa_ds.data.mixing import load_data
from rosa_ds.data.tokenize import apply_template_choice
from rosa_ds.dist import detect_placement
from rosa_ds.ds_config import read_ds_config
from rosa_ds.errors import UserError
from rosa_ds.model import check_model, load_tokenizer
from rosa_ds.quant.files import frozen_file_shapes
from rosa_ds.schedule import steps_for_epochs
from rosa_ds.tracking import check_trackers
from rosa_ds.weight_files import has_safetensors


@dataclass
class Prepared:
    """What pre-flight found and built: model path and config, tokenizer, tokenized data."""

    model_path: str
    hf_config: Any
    tokenizer: Any
    data: TaskData
    train_examples: TokenizedSplit
    eval_examples: TokenizedSplit
    resume_from: Path | None
    world_size: int
    tokenized: str = ""  # where the tokenized splits came from, for the run's log

    @property
    def hidden_size(self) -> int:
        return int(getattr(self.hf_config, "hidden_size", 0) or 1024)


def check_output_dir(output_dir: str, resume: bool) -> None:
    """The output directory can be created and written, and holds no other run unless resuming."""
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(
            f"output_dir {output_dir} exists and is not a directory; "
            "set output_dir to a folder path"
        )
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(
            f"output_dir {output_dir} cannot be created: {probe} is a file; "
            "set output_dir to a folder path"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(
            f"output_dir {output_dir} is not writable ({probe} denies writing); "
            "choose a folder you can write to"
        )
    if not resume and checkpoint_root(path).is_dir() and any(checkpoint_root(path).iterdir()):
        raise UserError(
            f"output_dir {output_dir} already holds a run; pass --resume to continue "
            "it or choose another output_dir"
        )


def auto_resume(cfg: RunConfig, resume: str | None) -> str | None:
    """``--resume`` as given, or, with ``train.auto_resume``, ``""`` (output_dir's latest
    checkpoint) when output_dir holds a complete one: a requeued job continues by itself."""
    if resume is not None or not cfg.train.auto_resume:
        return resume
    found = latest_checkpoint(cfg.output_dir)
    if found is None:
        return None
    if detect_placement().rank == 0:
        print(f"rosa-ds: train.auto_resume: continuing from {found}", file=sys.stderr)
    return ""


def find_resume(output_dir: str, resume: str | None) -> Path | None:
    if resume is None:
        return None
    where = Path(resume) if resume else Path(output_dir)
    if (where / "trainer_state.json").is_file():
        return where
    found = latest_checkpoint(where)
    broken = incomplete_checkpoints(where)
    if found is None:
        only = f" (only incomplete ones: {', '.join(b.name for b in broken)})" if broken else ""
        raise UserError(
            f"no complete checkpoint in {where} to resume from{only}; drop --resume to "
            "start a new run or point --resume at a checkpoint"
        )
    if broken and detect_placement().rank == 0:
        names = ", ".join(b.name for b in broken)
        print(
            f"rosa-ds: warning: ignoring incomplete checkpoint(s) {names} (an interrupted "
            f"save); resuming from {found.name}",
            file=sys.stderr,
        )
    return found


def check_adapters(
    cfg: RunConfig, hf_config: Any, resume_from: Path | None = None, training: bool = False
) -> list[str]:
    """Match adapter targets (a mask file, a checkpoint to resume) on a weightless copy of the
    model; for training, check the output directory has room for a checkpoint."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(
            hf_config, trust_remote_code=cfg.model.trust_remote_code
        )
        names = inject_adapters(skeleton, cfg.adapter)
    if cfg.adapter.resampling:
        for name, m in adapted_modules(skeleton).items():
            if cfg.adapter.rank > min(m.out_features, m.in_features):
                raise UserError(
                    f"adapter.rank {cfg.adapter.rank} is above min(out, in) = "
                    f"{min(m.out_features, m.in_features)} of {name}, so resampling cannot "
                    "choose that many singular vectors; lower adapter.rank or adapter.targets"
                )
    mask_file = cfg.adapter.robust.mask_file
    if cfg.adapter.sparse and mask_file:
        if not Path(mask_file).is_file():
            raise UserError(
                f"adapter.robust.mask_file {mask_file} does not exist; give a "
                "masks.safetensors written by an earlier run"
            )
        check_masks(load_masks(mask_file), skeleton, cfg.adapter)
    if resume_from is not None:
        check_checkpoint_fits(resume_from, skeleton, cfg)
    if training:
        check_disk_room(cfg.output_dir, checkpoint_bytes(skeleton, cfg))
    return names


def checkpoint_bytes(skeleton: Any, cfg: RunConfig) -> int:
    """A generous size of one checkpoint: per trainable element the fp32 master weight, Adam's
    two moments, the model copy and the adapter file (20 bytes); the sparse values at their
    density; after resamples, the rewritten frozen weights in the training dtype."""
    elements = frozen = 0
    for name, m in adapted_modules(skeleton).items():
        numel = m.out_features * m.in_features
        elements += sum(p.numel() for p in m.adapter_params().values())
        elements += int(module_density(name, cfg.adapter) * numel)
        frozen += numel
    elements += sum(p.numel() for p in trained_params(skeleton).values())
    size = 20 * elements
    if cfg.adapter.resampling:
        size += frozen * (2 if cfg.train.precision == "bf16" else 4)
    return size


def check_disk_room(output_dir: str, needed: int) -> None:
    probe = Path(output_dir).expanduser()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise UserError(
            f"output_dir {output_dir} has {free / 2**30:.2f} GiB free but one checkpoint needs "
            f"about {needed / 2**30:.2f} GiB; free some space or choose another output_dir"
        )


def _safetensors_shapes(path: Path, what: str, fix: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header; a truncated or foreign file is a UserError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{what} {path} cannot be read ({first}); it is truncated or not a safetensors "
            f"file: {fix}"
        ) from None


def check_checkpoint_fits(folder: Path, skeleton: Any, cfg: RunConfig) -> None:
    """The checkpoint was written for this model and adapter config, and its files are whole:
    checked on every rank before any collective, so a mismatch is one line, not a hang."""
    modules = adapted_modules(skeleton)
    fix = f"resume with the run's own config ({Path(cfg.output_dir) / 'config.yaml'})"
    broken = "resume from an earlier checkpoint with --resume DIR"
    phase = read_state(folder).get("phase", "train")
    meta_file = folder / "adapter" / "adapter.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        rank = 0 if cfg.adapter.method_name == "full" else cfg.adapter.rank
        if phase == "warmup" and rank == 0:
            rank = cfg.adapter.robust.warmup_rank
        if sorted(meta.get("modules", [])) != sorted(modules):
            raise UserError(
                f"checkpoint {folder} adapts other modules than adapter.targets selects "
                f"({len(meta.get('modules', []))} vs {len(modules)}); {fix}"
            )
        if meta.get("rank") != rank:
            raise UserError(
                f"checkpoint {folder} was written with adapter rank {meta.get('rank')}, the "
                f"config gives {rank}; {fix}"
            )
        shapes = _safetensors_shapes(
            folder / "adapter" / "adapter.safetensors", "adapter file", broken
        )
        for name, m in modules.items():
            key, want = f"{name}.lora_A", (rank, m.in_features)
            if rank and shapes.get(key) != want:
                raise UserError(
                    f"checkpoint {folder}: {key} has shape {shapes.get(key)}, the model "
                    f"needs {want}; the checkpoint belongs to another model: {fix}"
                )
    if phase == "train" and (folder / MASK_FILE).is_file():
        check_masks(load_masks(folder / MASK_FILE), skeleton, cfg.adapter)
    frozen = frozen_files(folder)
    if frozen:
        shapes = {}
        for path in frozen:
            shapes.update(_safetensors_shapes(path, "frozen-weight file", broken))
            shapes.update(frozen_file_shapes(path))  # 4-bit records: their matrix's shape
        for name, m in modules.items():
            if shapes.get(name) != (m.out_features, m.in_features):
                raise UserError(
                    f"checkpoint {folder}: the frozen weight of {name} has shape "
                    f"{shapes.get(name)}, the model {(m.out_features, m.in_features)}; {fix}"
                )


def check_weight_files(model_path: str, need_safetensors: bool) -> None:
    """The model's safetensors files open (a truncated download fails here, in seconds); and
    subspace adaptation, which re-reads base weights by name, finds them in safetensors."""
    folder = Path(model_path)
    if not folder.is_dir():
        if need_safetensors:
            raise UserError(
                f"subspace adaptation reads base weights from a local folder, and model "
                f"{model_path} is not one; download it (huggingface-cli download) and set "
                "model.name_or_path to the folder"
            )
        return
    files = sorted(folder.glob("*.safetensors"))
    for file in files:
        _safetensors_shapes(file, "model weights", "download or convert the model again")
    if need_safetensors and not has_safetensors(folder):
        raise UserError(
            f"subspace adaptation reads base weights from model.safetensors (or its index), "
            f"and {folder} has none; save the model with save_pretrained(safe_serialization="
            "True) and point model.name_or_path at it"
        )


def check_attention(kind: str) -> None:
    """flash_attention_2 needs its package and a CUDA GPU: say so before loading anything."""
    if kind != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise UserError(
            "model.attn_implementation=flash_attention_2 needs the flash-attn package "
            "(pip install flash-attn --no-build-isolation); or use sdpa"
        )
    if not torch.cuda.is_available():
        raise UserError(
            "model.attn_implementation=flash_attention_2 runs on CUDA GPUs only; use sdpa here"
        )


def resolve_epochs(cfg: RunConfig, sequences: int) -> str | None:
    """``train.num_epochs`` becomes ``train.max_steps`` (in place, so the methods, the schedule
    and config.yaml see the count), checked again as a given ``max_steps`` would be; returns
    the line the run logs, or None when no epochs are set."""
    t = cfg.train
    if t.num_epochs is None:
        return None
    t.max_steps = steps_for_epochs(t.num_epochs, sequences, t.global_batch_size)
    validate(cfg)
    per_epoch = sequences // t.global_batch_size
    return (
        f"train.num_epochs={t.num_epochs:g}: {t.max_steps} optimizer steps ({per_epoch} per "
        f"epoch of {sequences} sequences at global batch {t.global_batch_size})"
    )


def tokenized_data(cfg: RunConfig, model_path: str) -> tuple[Any, TaskData, Tokenized]:
    """The tokenizer (with ``data.chat_template`` applied), the records and their tokenized
    splits, from the cache when this content was tokenized before (``rosa-ds prepare``)."""
    data = load_data(cfg.data)
    tokenizer = load_tokenizer(model_path, cfg.model)
    apply_template_choice(tokenizer, cfg.data.chat_template)
    tokens = tokenized_splits(data.train, data.eval, tokenizer, cfg.data)
    return tokenizer, data, tokens


def prepare(cfg: RunConfig, *, resume: str | None, training: bool) -> Prepared:
    placement = detect_placement()
    t = cfg.train
    per_step = t.micro_batch_size * placement.world_size
    if t.global_batch_size % per_step:
        raise UserError(
            f"train.global_batch_size ({t.global_batch_size}) is not divisible by "
            f"train.micro_batch_size x ranks ({t.micro_batch_size} x {placement.world_size}); "
            f"set train.global_batch_size to a multiple of {per_step}"
        )
    resume_from = None
    if training:
        check_trackers(cfg.train.trackers)
        check_output_dir(cfg.output_dir, resume is not None)
        resume_from = find_resume(cfg.output_dir, resume)
    read_ds_config(cfg.deepspeed.config)
    check_attention(cfg.model.attn_implementation)
    model_path, hf_config = check_model(cfg.model)
    check_weight_files(model_path, need_safetensors=cfg.adapter.resampling)
    check_adapters(cfg, hf_config, resume_from, training=training)
    tokenizer, data, tokens = tokenized_data(cfg, model_path)
    train_examples, eval_examples = tokens.train, tokens.eval
    if training and len(train_examples) < t.global_batch_size:
        source = "data.datasets" if cfg.data.datasets else f"dataset {cfg.data.dataset}"
        raise UserError(
            f"{source} gives {len(train_examples)} training "
            f"sequences, fewer than one global batch ({t.global_batch_size}); add "
            "data or lower train.global_batch_size"
        )
    return Prepared(
        model_path,
        hf_config,
        tokenizer,
        data,
        train_examples,
        eval_examples,
        resume_from,
        placement.world_size,
        tokens.describe(),
    )
