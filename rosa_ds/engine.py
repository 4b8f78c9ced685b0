"""Build the DeepSpeed engine: process group, model (partitioned under ZeRO-3), adapters,
optimizer, learning-rate schedule.

The adapters are created with the same seed on every rank, before ``deepspeed.initialize``
partitions them, so every rank holds the same initial adapter whatever the world size.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from transformers.integrations import HfDeepSpeedConfig

from rosa_ds.adapters.inject import (
    adapted_modules,
    inject_adapters,
    place_adapters,
    register_frozen_reads,
)
from rosa_ds.adapters.io import apply_adapter_state
from rosa_ds.adapters.layer import ROLES
from rosa_ds.adapters.masks import attach_masks, check_masks
from rosa_ds.adapters.trained_modules import grow_vocabulary, trained_params
from rosa_ds.config import SPARSE_LR_RATIO, RunConfig
from rosa_ds.dist import Placement, init_distributed
from rosa_ds.ds_config import build_ds_config, zero_stage
from rosa_ds.kernels import cpu_native
from rosa_ds.kernels.csr import SparseStructure
from rosa_ds.kernels.sparse_linear import forget_merge, prepare, set_backend, set_path
from rosa_ds.model import load_model
from rosa_ds.schedule import build_scheduler, warmup_steps

GROUP_ORDER = ("lowrank", "sparse", "full", "modules")


@dataclass
class EngineOptions:
    """What a method asks of the engine for one pass: the sparse masks to attach, a low-rank
    rank other than ``adapter.rank``, the schedule's length (default ``train.max_steps``) and a
    factor on top of it (a re-warm-up), and adapter values to start from."""

    masks: dict[str, SparseStructure] | None = None
    rank: int | None = None
    schedule_steps: int | None = None
    lr_factor: Callable[[int], float] | None = None
    adapter_state: dict[str, torch.Tensor] | None = None
    start_step: int = 0


@dataclass
class Built:
    """A built engine and what the loop needs beside it (tokenizer, placement, groups)."""

    engine: Any  # deepspeed.DeepSpeedEngine
    tokenizer: Any
    placement: Placement
    ds_config: dict[str, Any]
    adapted: list[str]
    model_path: str
    group_names: list[str] = field(default_factory=list)  # the optimizer's groups, in order

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.ds_config)

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    def release(self) -> None:
        """Destroy the engine and free the tensors it held, before the next pass builds another.

        Under ZeRO-3, DeepSpeed 0.19's ``destroy`` removes its hooks, but something outside
        Python's reach (it has no Python root) keeps the old model and optimizer alive, and with
        them the frozen partitions and the optimizer's flat buffers: a RoSA run held its warm-up
        model beside the main pass's (DeepSpeed issue 7204). So the storages are emptied here,
        whoever still holds the objects. Nothing may use the engine afterwards."""
        engine, model = self.engine, self.engine.module
        engine.destroy()
        with torch.no_grad():
            for p in model.parameters():
                if hasattr(p, "ds_tensor"):
                    p.ds_tensor = None
                forget_merge(p)  # a held merge's W0 and S go with the storage
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
                p.grad = None
            for holder in (engine.optimizer, getattr(engine.optimizer, "optimizer", None)):
                if holder is None:
                    continue
                if isinstance(getattr(holder, "state", None), dict):
                    holder.state.clear()
                for name, value in list(vars(holder).items()):
                    if isinstance(value, torch.Tensor) or (
                        isinstance(value, list)
                        and value
                        and all(isinstance(v, torch.Tensor | list) for v in value)
                    ):
                        setattr(holder, name, None)
                    elif isinstance(value, dict) and any(
                        isinstance(v, torch.Tensor | list | dict) for v in value.values()
                    ):  # e.g. gradient partitions by parameter id: views of the flat buffers
                        value.clear()

    def group_index(self, role: str) -> int | None:
        """The optimizer group of a role (``lowrank``, ``sparse``, ``full``), if the run has it."""
        return self.group_names.index(role) if role in self.group_names else None


def param_groups(
    model: torch.nn.Module, lrs: dict[str, float]
) -> tuple[list[dict[str, Any]], list[str]]:
    """One optimizer group per role that the adapters' trainable tensors have (``ROLES``), in
    ``GROUP_ORDER``, each at its learning rate; and the groups' role names."""
    by_role: dict[str, list[torch.nn.Parameter]] = {role: [] for role in GROUP_ORDER}
    for module in adapted_modules(model).values():
        for attr, param in module.adapter_params().items():
            by_role[ROLES[attr]].append(param)
    by_role["modules"] = list(trained_params(model).values())  # adapter.train_modules
    names = [role for role in GROUP_ORDER if by_role[role]]
    return [{"params": by_role[r], "lr": lrs[r]} for r in names], names


def group_lrs(cfg: RunConfig) -> dict[str, float]:
    """The peak learning rate of each role: ``adapter.robust.sparse_lr`` for the sparse values
    (unset: ``SPARSE_LR_RATIO`` of ``train.lr``), ``train.lr`` for everything else."""
    lr = cfg.train.lr
    sparse = cfg.adapter.robust.sparse_lr or lr * SPARSE_LR_RATIO
    return {"lowrank": lr, "sparse": sparse, "full": lr, "modules": lr}


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
    options: EngineOptions | None = None,
) -> Built:
    """The engine for one training pass (or evaluation), as the method's ``options`` ask."""
    opts = options or EngineOptions()
    set_backend(cfg.adapter.sparse_kernel)
    set_path(cfg.adapter.sparse_path)
    cpu_native.choice()  # a bad ROSA_DS_CPU_KERNELS fails here, before any model is loaded
    placement = init_distributed(cfg.deepspeed.backend, cfg.deepspeed.comm_timeout_minutes)
    ds_config = build_ds_config(cfg, placement.world_size, hidden_size)
    if not training and zero_stage(ds_config) in (1, 2):
        # ZeRO-1/2 shard optimizer state only; with no optimizer DeepSpeed wants stage 0.
        ds_config["zero_optimization"] = {"stage": 0}
    zero3 = zero_stage(ds_config) == 3
    dtype = torch_dtype(cfg.train.precision)
    # Keeping this object alive makes from_pretrained build the model partitioned (zero.Init).
    hf_ds = HfDeepSpeedConfig(ds_config) if zero3 else None  # noqa: F841
    adapter_cfg = cfg.adapter if opts.rank is None else replace(cfg.adapter, rank=opts.rank)
    model = load_model(model_path, cfg.model, dtype, quant=cfg.quant, adapter=adapter_cfg)
    grow_vocabulary(model, len(tokenizer), cfg.model.new_special_tokens)
    torch.manual_seed(cfg.adapter.init_seed if cfg.adapter.init_seed is not None else cfg.seed)
    adapted = inject_adapters(model, adapter_cfg)
    if opts.masks is not None:
        check_masks(opts.masks, model, cfg.adapter)
        attach_masks(model, opts.masks)
        prepare(torch.device(get_accelerator().current_device_name()))  # evaluation merges too
        if zero3:
            register_frozen_reads(model)
    if opts.adapter_state is not None:
        apply_adapter_state(model, opts.adapter_state, allow_missing_sparse=True)
    if zero3:
        place_adapters(model, get_accelerator().current_device_name(), dtype)
    optimizer = scheduler = None
    names: list[str] = []
    if training:
        groups, names = param_groups(model, group_lrs(cfg))
        optimizer = torch.optim.AdamW(
            groups,
            lr=cfg.train.lr,
            betas=tuple(cfg.train.betas),
            weight_decay=cfg.train.weight_decay,
        )
        total = opts.schedule_steps or cfg.train.max_steps
        warmup = warmup_steps(cfg.train.warmup_steps, cfg.train.warmup_ratio, total)
        scheduler = build_scheduler(
            optimizer, cfg.train.scheduler, warmup, total, extra=opts.lr_factor
        )
        with warnings.catch_warnings():  # stepping the schedule before any optimizer step
            warnings.simplefilter("ignore")
            for _ in range(opts.start_step):
                scheduler.step()
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    # Dropout differs per rank; model and adapter initialization above did not.
    torch.manual_seed(cfg.seed + 1000 * (placement.rank + 1))
    return Built(engine, tokenizer, placement, ds_config, adapted, model_path, names)
