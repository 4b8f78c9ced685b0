"""Checks that run before any process group, model weights or output exist.

A mistyped config must cost seconds, not a queue slot: everything that can be checked without
loading weights is checked here, each failure a :class:`UserError`, and nothing is written to the
output directory.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rosa_ds.checkpoint import checkpoint_root, incomplete_checkpoints, latest_checkpoint
from rosa_ds.config import RunConfig
from rosa_ds.data.loading import TaskData, load_task_data
from rosa_ds.data.tokenize import pack, tokenize_records
from rosa_ds.dist import detect_placement
from rosa_ds.errors import UserError


@dataclass
class Prepared:
    model_path: str
    hf_config: Any
    tokenizer: Any
    data: TaskData
    train_examples: list[dict[str, list[int]]]
    eval_examples: list[dict[str, list[int]]]
    resume_from: Path | None
    world_size: int

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


def check_adapters(cfg: RunConfig, hf_config: Any) -> list[str]:
    """Match adapter targets (and a mask file, if given) on a weightless copy of the model."""
    import torch
    from transformers import AutoModelForCausalLM

    from rosa_ds.adapters.inject import inject_adapters
    from rosa_ds.adapters.masks import check_masks, load_masks

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(
            hf_config, trust_remote_code=cfg.model.trust_remote_code
        )
        names = inject_adapters(skeleton, cfg.adapter)
    if cfg.adapter.resampling:
        from rosa_ds.adapters.inject import adapted_modules

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
    return names


def prepare(cfg: RunConfig, *, resume: str | None, training: bool) -> Prepared:
    from rosa_ds.model import check_model, load_tokenizer

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
        check_output_dir(cfg.output_dir, resume is not None)
        resume_from = find_resume(cfg.output_dir, resume)
    from rosa_ds.ds_config import read_ds_config

    read_ds_config(cfg.deepspeed.config)
    model_path, hf_config = check_model(cfg.model)
    check_adapters(cfg, hf_config)
    data = load_task_data(cfg.data)
    tokenizer = load_tokenizer(model_path, cfg.model)
    train_examples = tokenize_records(
        data.train, tokenizer, cfg.data.max_length, cfg.data.chat_template
    )
    eval_examples = tokenize_records(
        data.eval, tokenizer, cfg.data.max_length, cfg.data.chat_template
    )
    if cfg.data.packing:
        train_examples = pack(train_examples, cfg.data.max_length)
    if training and len(train_examples) < t.global_batch_size:
        raise UserError(
            f"dataset {cfg.data.dataset} gives {len(train_examples)} training "
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
    )
