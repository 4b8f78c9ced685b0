"""Build the DeepSpeed engine: process group, model (partitioned under ZeRO-3), adapters,
optimizer, learning-rate schedule.

The adapters are created with the same seed on every rank, before ``deepspeed.initialize``
partitions them, so every rank holds the same initial adapter whatever the world size.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch

from rosa_ds.adapters.inject import inject_adapters, place_adapters
from rosa_ds.adapters.io import apply_adapter_state
from rosa_ds.adapters.masks import attach_masks, check_masks
from rosa_ds.config import RunConfig
from rosa_ds.dist import Placement, init_distributed
from rosa_ds.ds_config import build_ds_config, zero_stage
from rosa_ds.kernels.csr import SparseStructure
from rosa_ds.model import load_model
from rosa_ds.schedule import build_scheduler


@dataclass
class Built:
    engine: Any  # deepspeed.DeepSpeedEngine
    tokenizer: Any
    placement: Placement
    ds_config: dict[str, Any]
    adapted: list[str]
    model_path: str
    rewarm: ReWarm | None = None

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.ds_config)

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module


class ReWarm:
    """A linear learning-rate re-warm-up after each resample, on top of the schedule (ReLoRA)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.since = -(10**9)  # the step of the last resample

    def factor(self, step: int) -> float:
        """1/steps at the resample, then 2/steps, ... up to 1 after ``steps`` steps."""
        if self.steps <= 0 or step - self.since >= self.steps:
            return 1.0
        return (max(step - self.since, 0) + 1) / self.steps


def param_groups(
    model: torch.nn.Module, lr: float, sparse_lr: float | None = None
) -> list[dict[str, Any]]:
    """Group 0: the low-rank factors (reset together at every resample: Adam's step count is
    per group) at ``lr``; group 1: the sparse values, which keep their optimizer state, at
    ``sparse_lr`` (default ``lr``). A sparse-only run has the sparse group alone."""
    lowrank = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    other = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    groups = [{"params": lowrank, "lr": lr}, {"params": other, "lr": sparse_lr or lr}]
    return [g for g in groups if g["params"]]


def torch_dtype(precision: str) -> torch.dtype:
    """bf16 or fp32; ``auto`` must have been resolved (``rosa_ds.precision.resolve``) first."""
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if precision not in dtypes:
        raise ValueError(f"precision {precision!r} is not resolved to bf16 or fp32")
    return dtypes[precision]


def build_engine(
    cfg: RunConfig,
    model_path: str,
    tokenizer: Any,
    hidden_size: int,
    *,
    training: bool,
    adapter_state: dict[str, torch.Tensor] | None = None,
    masks: dict[str, SparseStructure] | None = None,
    rank: int | None = None,
    start_step: int = 0,
    schedule_steps: int | None = None,
) -> Built:
    """The engine for one training pass (or evaluation).

    ``masks`` attach the sparse part; ``rank`` overrides the LoRA rank (the warm-up pass of a
    sparse-only run trains a throw-away LoRA); ``start_step`` puts the learning-rate schedule
    where a previous pass left it; ``schedule_steps`` is the schedule's length (default
    ``train.max_steps``).
    """
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from rosa_ds.kernels.sparse_linear import set_backend, set_path

    set_backend(cfg.adapter.sparse_kernel)
    set_path(cfg.adapter.sparse_path)
    placement = init_distributed(cfg.deepspeed.backend, cfg.deepspeed.comm_timeout_minutes)
    ds_config = build_ds_config(cfg, placement.world_size, hidden_size)
    if not training and zero_stage(ds_config) in (1, 2):
        # ZeRO-1/2 shard optimizer state only; with no optimizer DeepSpeed wants stage 0.
        ds_config["zero_optimization"] = {"stage": 0}
    dtype = torch_dtype(cfg.train.precision)
    # Keeping this object alive makes from_pretrained build the model partitioned (zero.Init).
    hf_ds = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None  # noqa: F841
    adapter_cfg = cfg.adapter if rank is None else replace(cfg.adapter, rank=rank)
    model = load_model(model_path, cfg.model, dtype, quant=cfg.quant, adapter=adapter_cfg)
    torch.manual_seed(cfg.adapter.init_seed if cfg.adapter.init_seed is not None else cfg.seed)
    adapted = inject_adapters(model, adapter_cfg)
    if masks is not None:
        check_masks(masks, model, cfg.adapter)
        attach_masks(model, masks)
        if zero_stage(ds_config) == 3:
            # the sparse-add path reads the frozen weight in the adapter's own forward
            from rosa_ds.adapters.inject import adapted_modules

            for module in adapted_modules(model).values():
                if module.sparse_values is not None:
                    for p in module.base.parameters(recurse=False):
                        deepspeed.zero.register_external_parameter(module, p)
    if adapter_state is not None:
        apply_adapter_state(model, adapter_state, allow_missing_sparse=True)
    if zero_stage(ds_config) == 3:
        from deepspeed.accelerator import get_accelerator

        place_adapters(model, get_accelerator().current_device_name(), dtype)
    optimizer = scheduler = rewarm = None
    if training:
        optimizer = torch.optim.AdamW(
            param_groups(model, cfg.train.lr, cfg.adapter.robust.sparse_lr),
            lr=cfg.train.lr,
            betas=tuple(cfg.train.betas),
            weight_decay=cfg.train.weight_decay,
        )
        if cfg.adapter.resampling and cfg.adapter.subspace.rewarm_steps:
            rewarm = ReWarm(cfg.adapter.subspace.rewarm_steps)
        scheduler = build_scheduler(
            optimizer,
            cfg.train.scheduler,
            cfg.train.warmup_steps,
            schedule_steps or cfg.train.max_steps,
            extra=rewarm.factor if rewarm is not None else None,
        )
        with warnings.catch_warnings():  # stepping the schedule before any optimizer step
            warnings.simplefilter("ignore")
            for _ in range(start_step):
                scheduler.step()
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    # Dropout differs per rank; model and adapter initialization above did not.
    torch.manual_seed(cfg.seed + 1000 * (placement.rank + 1))
    return Built(engine, tokenizer, placement, ds_config, adapted, model_path, rewarm)
