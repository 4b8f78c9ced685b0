"""Elastic resume: load a DeepSpeed ZeRO checkpoint written at another world size (or stage).

DeepSpeed 0.19.8 refuses to load ZeRO optimizer state at a new data-parallel world size. The
trainable parameters here are small adapters, so every rank reads all of the checkpoint's
per-rank optimizer files, rebuilds each parameter's full fp32 master weight and optimizer
moments (the layouts ``deepspeed.utils.zero_to_fp32`` reads), and writes them into the new
engine's own partitions:

- ZeRO-1/2: through the fragment mappings DeepSpeed keeps per parameter
  (``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state``);
- ZeRO-3: into this rank's padded slice of the flat fp32 partition, of the optimizer state and
  of the parameter's shard (DeepSpeed's own setter does not pad the last shard).

Adam's step count (kept per parameter group), the group hyperparameters (learning rate), the
learning-rate schedule and the engine's step counters are restored as well, so the next step is
the one the uninterrupted run would have taken. Frozen weights (the base model's, or the
rewritten ``frozen.safetensors`` of subspace adaptation) and sparse masks do not depend on the
world size; the trainer restores them as for any resume.
"""

from __future__ import annotations

import importlib
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rosa_ds.errors import UserError

OPTIM_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
MODEL_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


@dataclass
class FullState:
    """The trainable state of a ZeRO checkpoint, unpartitioned, by parameter name."""

    stage: int
    world_size: int
    fp32: dict[str, torch.Tensor] = field(default_factory=dict)
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # name -> key -> t
    group_of: dict[str, int] = field(default_factory=dict)
    group_scalars: list[dict[str, Any]] = field(default_factory=list)  # per group: step
    group_hyper: list[dict[str, Any]] = field(default_factory=list)  # per group: lr, betas, ...
    global_state: dict[str, Any] = field(default_factory=dict)  # loss scaler
    model_state: dict[str, Any] = field(default_factory=dict)  # lr_scheduler, global_steps


# --- reading -------------------------------------------------------------------------------


def optim_files(folder: Path) -> list[Path]:
    """The per-rank ZeRO optimizer files of a checkpoint, in rank order."""
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := OPTIM_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def saved_world_size(folder: Path) -> int | None:
    """The data-parallel world size that wrote a ZeRO checkpoint (None: not a ZeRO checkpoint)."""
    return len(optim_files(folder)) or None


_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _load(path: Path) -> dict[str, Any]:
    """A DeepSpeed checkpoint file, unpickled with ``weights_only=True``: besides tensors and
    plain containers, only classes of DeepSpeed itself (its loss scaler, ZeRO stage enum,
    fragment addresses) are allowed, added one at a time as the file names them."""
    allowed: list[Any] = []
    while True:
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            found = _UNSUPPORTED.search(str(exc))
            if not found or not found.group(1).startswith("deepspeed."):
                raise UserError(
                    f"{path} holds objects other than tensors and DeepSpeed's own classes "
                    f"({found.group(1) if found else exc}); refusing to unpickle it"
                ) from None
            module, _, name = found.group(1).rpartition(".")
            allowed.append(getattr(importlib.import_module(module), name))


def _model_states(folder: Path) -> dict[str, Any]:
    for name in MODEL_FILES:
        if (folder / name).is_file():
            return _load(folder / name)
    raise UserError(f"{folder} has no DeepSpeed model-states file; the checkpoint is incomplete")


def _split(state: dict[str, Any], numel: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One optimizer state entry: partition-sized tensors (the moments) and the rest (step)."""
    moments, scalars = {}, {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() == 1 and value.numel() == numel:
            moments[key] = value
        else:
            scalars[key] = value.clone() if torch.is_tensor(value) else value
    return moments, scalars


def _hyper(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k != "params"} for g in groups]


def _store(full: FullState, name: str, key: str, value: torch.Tensor) -> None:
    if key == "fp32":
        full.fp32[name] = value
    else:
        full.moments.setdefault(name, {})[key] = value


def _read_stage12(full: FullState, sds: list[dict], shapes: list[dict], folder: Path) -> None:
    base = sds[0]["base_optimizer_state"]
    if not isinstance(base, dict):
        raise UserError(
            f"{folder} was written with zero_optimization.elastic_checkpoint=true, which rosa-ds "
            "cannot re-shard; resume it on the world size that wrote it"
        )
    full.group_hyper = _hyper(base["param_groups"])
    paddings = sds[0].get("param_alignment_paddings")
    for g, group_shapes in enumerate(shapes):
        flats = [sd["single_partition_of_fp32_groups"][g] for sd in sds]
        pid = base["param_groups"][g]["params"][0]
        parts = [
            _split(sd["base_optimizer_state"]["state"].get(pid, {}), flats[0].numel()) for sd in sds
        ]
        full.group_scalars.append(parts[0][1])
        # ZeRO-1/2: the group's params lie back to back in one flat vector, cut into equal
        # partitions (padding at the end of the last one)
        vectors = {"fp32": torch.cat(flats)}
        vectors.update({key: torch.cat([p[0][key] for p in parts]) for key in parts[0][0]})
        offset = 0
        for i, (name, shape) in enumerate(group_shapes.items()):
            n = torch.Size(shape).numel()
            for key, vec in vectors.items():
                _store(full, name, key, vec.narrow(0, offset, n).view(shape).clone())
            full.group_of[name] = g
            offset += n + (paddings[g][i] if paddings else 0)


def _read_stage3(full: FullState, sds: list[dict], shapes: list[dict]) -> None:
    inner = sds[0]["optimizer_state_dict"]
    full.group_hyper = _hyper(inner["param_groups"])
    sub_groups = [list(g["params"]) for g in inner["param_groups"]]
    order = [sg for sgs in sub_groups for sg in sgs]
    flat0 = sds[0]["fp32_flat_groups"]
    for sgs in sub_groups:
        full.group_scalars.append(_split(inner["state"].get(sgs[0], {}), flat0[sgs[0]].numel())[1])
    keys = list(_split(inner["state"].get(order[0], {}), flat0[order[0]].numel())[0])
    # ZeRO-3: every param is cut into world equal padded shards; each rank's flat vector holds
    # its shard of every param, sub-group after sub-group
    per_rank = []
    for sd in sds:
        state = sd["optimizer_state_dict"]["state"]
        vectors = {"fp32": torch.cat([sd["fp32_flat_groups"][sg] for sg in order])}
        vectors.update({key: torch.cat([state[sg][key] for sg in order]) for key in keys})
        per_rank.append(vectors)
    offset = 0
    for g, group_shapes in enumerate(shapes):
        for name, shape in group_shapes.items():
            n = torch.Size(shape).numel()
            part = -(-n // full.world_size)
            for key in per_rank[0]:
                value = torch.cat([v[key].narrow(0, offset, part) for v in per_rank])[:n]
                _store(full, name, key, value.view(shape).clone())
            full.group_of[name] = g
            offset += part


def read_full_state(folder: Path) -> FullState:
    """Every trainable parameter's full fp32 weight and optimizer moments, from any world size."""
    files = optim_files(folder)
    if not files:
        raise UserError(f"{folder} holds no ZeRO optimizer files; cannot re-shard it")
    sds = [_load(f)["optimizer_state_dict"] for f in files]
    model = _model_states(folder)
    full = FullState(int(sds[0]["zero_stage"]), len(sds))
    full.model_state = {k: model.get(k) for k in ("lr_scheduler", *ENGINE_COUNTERS)}
    full.global_state = {
        k: sds[0][k] for k in ("loss_scaler", "dynamic_loss_scale", "overflow") if k in sds[0]
    }
    shapes = model["param_shapes"]  # one {name: shape} per parameter group, in flat order
    if full.stage in (1, 2):
        _read_stage12(full, sds, shapes, folder)
    elif full.stage == 3:
        _read_stage3(full, sds, shapes)
    else:
        raise UserError(f"{folder}: ZeRO stage {full.stage} checkpoints cannot be re-sharded")
    return full


# --- writing into a live engine -------------------------------------------------------------


def _fresh_state(flat: torch.Tensor, full: FullState, group: int, keys: list[str]) -> dict:
    """The base optimizer's state for one flat fp32 partition: zero moments, the saved step."""
    state: dict[str, Any] = {k: torch.zeros_like(flat) for k in keys}
    for key, value in full.group_scalars[group].items():
        state[key] = value.clone() if torch.is_tensor(value) else value
    return state


def _group_keys(full: FullState, group: int) -> list[str]:
    for name, g in full.group_of.items():
        if g == group:
            return list(full.moments.get(name, {}))
    return []


def _check_match(full: FullState, params: dict[str, torch.nn.Parameter], groups: dict) -> None:
    missing = sorted(set(params) - set(full.fp32))
    unexpected = sorted(set(full.fp32) - set(params))
    if missing or unexpected:
        raise UserError(
            "the checkpoint's trainable parameters do not match this model's ("
            f"missing: {missing[:3]}, unexpected: {unexpected[:3]}); resume with the config "
            "that wrote it"
        )
    moved = [n for n in params if groups[n] != full.group_of[n]]
    if moved or len(full.group_hyper) != len(set(groups.values())):
        raise UserError(
            "the checkpoint's parameter groups do not match this model's; resume with the "
            "config that wrote it"
        )


def _load_stage12(zo: Any, params: dict, full: FullState) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    inner = zo.optimizer
    groups = {}
    for g, group in enumerate(zo.bit16_groups):
        ids = {id(p) for p in group}
        groups.update({n: g for n, p in params.items() if id(p) in ids})
    _check_match(full, params, groups)
    for g, flat in enumerate(zo.single_partition_of_fp32_groups):
        inner.state[flat] = _fresh_state(flat, full, g, _group_keys(full, g))
    # DeepSpeed links each param's view of the optimizer state after the first step: do it now
    zo._hp_optimizer_states_linked = False
    zo._lazy_init_hp_params_optimizer_state()
    for name, p in params.items():
        safe_set_full_fp32_param(p, full.fp32[name].to(p.device))
        for key, value in full.moments.get(name, {}).items():
            safe_set_full_optimizer_state(p, value.to(p.device), key)
        p.data.copy_(full.fp32[name].to(p.device, p.dtype))  # the model's (bit16) copy


def _load_stage3(zo: Any, params: dict, full: FullState) -> None:
    if getattr(zo, "swap_optimizer", False) or getattr(zo, "params_in_nvme_and_cpu", False):
        raise UserError("resuming at another world size does not support NVMe offload")
    inner = zo.optimizer
    position = {n: zo.grad_position[zo.get_param_id(p)] for n, p in params.items()}
    groups = {n: zo.sub_group_to_group_id[position[n][0]] for n in params}
    _check_match(full, params, groups)
    zo.checkpoint_event_prologue()
    for sg, flat in enumerate(zo.fp32_partitioned_groups_flat):
        g = zo.sub_group_to_group_id[sg]
        inner.state[flat] = _fresh_state(flat, full, g, _group_keys(full, g))
    for name, p in params.items():
        sg, offset, n = position[name]
        if hasattr(zo, "_get_param_partition_rank"):
            rank, world = zo._get_param_partition_rank(p), zo._get_param_partition_world_size(p)
        else:
            rank, world = (
                dist.get_rank(zo.dp_process_group),
                dist.get_world_size(zo.dp_process_group),
            )

        def shard(t: torch.Tensor, n=n, rank=rank, world=world) -> torch.Tensor:
            flat = torch.nn.functional.pad(t.flatten(), (0, n * world - t.numel()))
            return flat.narrow(0, n * rank, n)

        fp32 = zo.fp32_partitioned_groups_flat[sg]
        fp32.data.narrow(0, offset, n).copy_(shard(full.fp32[name]))
        for key, value in full.moments.get(name, {}).items():
            inner.state[fp32][key].narrow(0, offset, n).copy_(shard(value))
        p.ds_tensor.data.copy_(shard(full.fp32[name]))  # this rank's shard of the model copy
    zo.checkpoint_event_epilogue()  # re-gathers the persistent (unpartitioned) params


def load_resharded(engine: Any, full: FullState) -> None:
    """Write a checkpoint's full trainable state into a live engine of any world size."""
    zo = engine.optimizer
    params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    if hasattr(zo, "fp32_partitioned_groups_flat") and hasattr(zo, "grad_position"):
        _load_stage3(zo, params, full)
    elif hasattr(zo, "single_partition_of_fp32_groups") and hasattr(zo, "bit16_groups"):
        _load_stage12(zo, params, full)
    else:
        raise UserError(
            f"cannot re-shard a ZeRO checkpoint into a {type(zo).__name__} optimizer; resume with "
            "a ZeRO stage 1-3 DeepSpeed config"
        )
    for g, hyper in enumerate(full.group_hyper):
        zo.optimizer.param_groups[g].update(hyper)
    for key, value in full.global_state.items():
        if hasattr(zo, key):
            setattr(zo, key, value)
    if engine.lr_scheduler is not None and full.model_state.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(full.model_state["lr_scheduler"])
    for key in ENGINE_COUNTERS:
        if full.model_state.get(key) is not None:
            setattr(engine, key, full.model_state[key])


def load_elastic(engine: Any, folder: Path) -> bool:
    """Load ``folder`` into ``engine`` if DeepSpeed itself cannot (written by another world size
    or ZeRO stage) and return True; return False when DeepSpeed's own loader will do."""
    saved = saved_world_size(folder)
    if saved is None:
        return False
    world = dist.get_world_size()
    stage = engine.zero_optimization_stage() if engine.zero_optimization() else 0
    saved_stage = int(_load(optim_files(folder)[0])["optimizer_state_dict"]["zero_stage"])
    if saved == world and saved_stage == stage:
        return False
    full = read_full_state(folder)
    load_resharded(engine, full)
    if dist.get_rank() == 0:
        print(
            f"rosa-ds: resuming {folder.name}, written by {saved} rank(s) with ZeRO-{saved_stage}, "
            f"on {world} rank(s) with ZeRO-{stage}: optimizer state re-sharded",
            file=sys.stderr,
            flush=True,
        )
    return True
