"""Read and write whole parameters at any ZeRO stage, with DeepSpeed's traps handled once.

A parameter is in one of three places: whole on every rank (no ZeRO, ZeRO-1/2 model copies),
partitioned across ranks (ZeRO-3: ``ds_id``, ``ds_tensor``), and, when trainable, also in
DeepSpeed's fp32 master copy, which is what the optimizer updates. Resampling, checkpoints of
rewritten frozen weights and adapter files all go through these functions, so each trap
(the master copy, ``GatheredParameters``' modifier rank, per-group optimizer state) is handled
here and nowhere else. Every function is a collective: every rank calls it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rosa_ds.dist import comm_device, rank_world


def is_partitioned(p: torch.Tensor) -> bool:
    """A ZeRO-3 parameter (its full value exists only inside ``gathered``)."""
    return hasattr(p, "ds_id")


@contextlib.contextmanager
def gathered(params: list[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """The full values of ``params`` inside the block (a no-op for parameters that are whole);
    with ``modifier_rank`` that rank's in-place changes are re-partitioned on exit."""
    if any(is_partitioned(p) for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
            yield
    else:
        yield


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The elements of ``p`` this rank holds: its ZeRO-3 partition, or the whole tensor.

    A partition is ``ceil(numel / world)`` long; DeepSpeed copies only the real elements into
    the last ones and leaves their padding uninitialized (whatever the allocator hands back,
    NaN included), so the padding is cut off here."""
    if not hasattr(p, "ds_tensor"):
        return p.data
    size = p.ds_tensor.numel()
    start = rank_world()[0] * size
    return p.ds_tensor.narrow(0, 0, max(0, min(size, p.ds_numel - start)))


def local_numel(p: torch.Tensor) -> tuple[int, int]:
    """Elements this rank holds of ``p``, and the full parameter's (they differ under ZeRO-3)."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor.numel(), p.ds_numel
    return p.numel(), p.numel()


def read_full(
    p: nn.Parameter,
    *,
    master: bool,
    keep: bool = True,
    dtype: torch.dtype | None = torch.float32,
) -> torch.Tensor | None:
    """A copy of the whole value of ``p`` on the CPU in ``dtype`` (None: as stored), on ranks
    with ``keep``.

    ``master``: read DeepSpeed's fp32 master copy (a trainable parameter of a built engine);
    otherwise, or if the parameter has none, the (possibly partitioned) model copy."""
    if master:
        from deepspeed.utils import safe_get_full_fp32_param

        value = safe_get_full_fp32_param(p)
        if value is not None:
            return value.detach().to("cpu", dtype or value.dtype, copy=True) if keep else None
    with gathered([p]):
        return p.detach().to("cpu", dtype or p.dtype, copy=True) if keep else None


def write_from_owner(p: torch.Tensor, value: torch.Tensor | None, owner: int) -> None:
    """Give every rank's copy or partition of ``p`` the value only ``owner`` holds."""
    rank, world = rank_world()
    if is_partitioned(p):
        with gathered([p], modifier_rank=owner):
            if rank == owner:
                p.data.copy_(value.reshape(p.shape).to(p.device, p.dtype))
        return
    if rank == owner:
        p.data.copy_(value.reshape(p.shape).to(p.device, p.dtype))
    if world > 1:
        dist.broadcast(p.data, src=owner)


def write_trainable(p: nn.Parameter, value: torch.Tensor, *, has_optimizer: bool) -> None:
    """Write a trainable parameter (the same full ``value`` on every rank): the fp32 master and
    the model copy, since DeepSpeed's setter alone leaves the next forward on the old value."""
    if has_optimizer:
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(p, value.to(torch.float32))
    if is_partitioned(p):
        rank, _ = rank_world()
        with gathered([p], modifier_rank=0):
            if rank == 0:
                p.data.copy_(value.to(p.dtype))
    else:
        p.data.copy_(value.to(p.device, p.dtype))


def broadcast(t: torch.Tensor | None, shape: tuple[int, ...], src: int) -> torch.Tensor:
    """A small fp32 tensor from ``src`` to every rank (on the device the backend needs)."""
    rank, world = rank_world()
    if world == 1:
        return t
    device = comm_device()
    buf = (
        t.to(device, torch.float32).contiguous()
        if rank == src
        else torch.empty(shape, dtype=torch.float32, device=device)
    )
    dist.broadcast(buf, src=src)
    return buf.cpu()


def link_optimizer_states(engine: Any) -> None:
    """Make DeepSpeed's per-parameter optimizer-state views (``safe_get_full_optimizer_state``)
    work for every parameter group under ZeRO-1/2.

    DeepSpeed 0.19 links them after group 0's first step only: for a parameter of another
    group the rank holding it raises "exp_avg not found" while the others hang in a collective.
    Re-linking after a step fixes it.
    """
    zo = engine.optimizer
    if hasattr(zo, "_lazy_init_hp_params_optimizer_state") and len(zo.optimizer.param_groups) > 1:
        zo._hp_optimizer_states_linked = False
        zo._lazy_init_hp_params_optimizer_state()


def reset_optimizer_group(engine: Any, group: int) -> None:
    """Zero Adam's moments and step count for one parameter group (DeepSpeed ZeRO 0-3).

    Adam's step is kept per group (the state is keyed by the group's flat fp32 partition), so
    parameters that get reset live in a group of their own; zeroing the moments but keeping a
    large step count would make the next updates several times too large.
    """
    zo = engine.optimizer
    inner = getattr(zo, "optimizer", zo)
    if hasattr(zo, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        flats = [zo.single_partition_of_fp32_groups[group]]
    elif hasattr(zo, "fp32_partitioned_groups_flat"):  # ZeRO-3
        flats = [
            f
            for sg, f in enumerate(zo.fp32_partitioned_groups_flat)
            if zo.sub_group_to_group_id[sg] == group
        ]
    else:  # no ZeRO: the torch optimizer's own per-parameter state
        flats = list(inner.param_groups[group]["params"])
    for flat in flats:
        state = inner.state.get(flat)
        if not state:
            continue
        for key, value in state.items():
            if torch.is_tensor(value):
                value.zero_()
            elif key == "step":
                state[key] = 0
