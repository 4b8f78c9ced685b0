"""Robust adaptation's masks: accumulate frozen-weight gradients per shard, select top-k.

Collection. For every adapted module with a sparse part, a forward hook keeps the module's input
``X`` (by reference, never modified: q/k/v and gate/up share one input tensor) and puts a hook on
the output's gradient ``dY``; the frozen weight's gradient for the micro-batch is
``G = dY^T X`` (it never needs ``W``, so it works for quantized weights too). ``G*G``
(``mean_squared``), the sum of each sequence's ``G_b*G_b`` (``per_sample_squared``), or ``G``
(``mean``) is reduce-scattered at once across the data-parallel ranks:
rank ``r`` owns elements ``[r * shard, (r + 1) * shard)`` of each flattened matrix and keeps only
that accumulator, so no rank ever holds the model's dense accumulator (only one matrix's ``G`` at
a time, as backward produces it). DeepSpeed scales the loss by 1/GAS; that factor is undone so
the accumulator is the same at any world size.

Selection (``topk.py``). The ranks agree on each matrix's k-th largest score by bisection (one
all-reduced count per round), each picks its entries above it, ties go to the lower flat index,
and the k chosen indices are all-gathered: every rank gets the same mask, the one a single
process chooses, and no rank receives more than k indices per matrix whatever the world size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from rosa_ds.adapters.inject import adapted_modules
from rosa_ds.adapters.topk import top_k_sharded
from rosa_ds.atomic import write_atomic
from rosa_ds.config import AdapterConfig
from rosa_ds.dist import all_reduce_sum, comm_device, rank_world
from rosa_ds.errors import TrainingError, UserError
from rosa_ds.kernels.csr import SparseStructure
from rosa_ds.targets import first_match


def module_density(name: str, cfg: AdapterConfig) -> float:
    """The density of a module's sparse part: the first matching pattern, else adapter.density."""
    return first_match(name, cfg.robust.density_patterns, cfg.density)


class GradientCollector:
    """Per-shard accumulation of frozen-weight gradient statistics over micro-batches."""

    def __init__(self, model: nn.Module, cfg: AdapterConfig, grad_scale: float = 1.0) -> None:
        self.rank, self.world = rank_world()
        self.stat = cfg.robust.grad_stat
        self.grad_scale = grad_scale
        self.modules = {
            n: m for n, m in adapted_modules(model).items() if module_density(n, cfg) > 0
        }
        self.shapes = {n: (m.out_features, m.in_features) for n, m in self.modules.items()}
        self.shard = {n: math.ceil(o * i / self.world) for n, (o, i) in self.shapes.items()}
        # on the weights' device, so that NCCL can reduce-scatter straight into it
        self.acc = {
            n: torch.zeros(self.shard[n], dtype=torch.float32, device=m.frozen.device)
            for n, m in self.modules.items()
        }
        self.micro_batches = 0
        self._handles: list = []

    # --- hooks -----------------------------------------------------------------------------
    def start(self) -> None:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))

    def stop(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _forward_hook(self, name: str):
        def hook(module, inputs, output):
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            x = inputs[0]
            output.register_hook(lambda dy: self._accumulate(name, x, dy))

        return hook

    def _accumulate(self, name: str, x: torch.Tensor, dy: torch.Tensor) -> None:
        out_f, in_f = self.shapes[name]
        if self.stat == "per_sample_squared":
            # one sequence's share of G at a time: G_b = dY_b^T X_b, sum of G_b * G_b
            rows = x.shape[0] if x.dim() > 2 else 1
            dys, xs = dy.reshape(rows, -1, out_f), x.reshape(rows, -1, in_f)
            stat = torch.zeros(out_f, in_f, dtype=torch.float32, device=dy.device)
            for dy_b, x_b in zip(dys, xs, strict=True):
                g = (dy_b.float().T @ x_b.float()) * self.grad_scale
                stat += g * g
        else:
            g = dy.reshape(-1, out_f).float().T @ x.reshape(-1, in_f).float()
            g = g * self.grad_scale
            stat = g * g if self.stat == "mean_squared" else g
        flat = stat.flatten().to(self.acc[name].device)
        self.acc[name] += self._reduce_scatter(flat, self.shard[name])

    def _reduce_scatter(self, flat: torch.Tensor, shard: int) -> torch.Tensor:
        if self.world == 1:
            return flat
        padded = torch.zeros(shard * self.world, dtype=flat.dtype, device=flat.device)
        padded[: flat.numel()] = flat
        out = torch.empty(shard, dtype=flat.dtype, device=flat.device)
        dist.reduce_scatter_tensor(out, padded)
        return out

    def count_micro_batch(self, n: int = 1) -> None:
        self.micro_batches += n

    # --- results ---------------------------------------------------------------------------
    def local_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.acc.values())

    def dense_bytes(self) -> int:
        return sum(o * i * 4 for o, i in self.shapes.values())

    def full_accumulator(self, name: str) -> torch.Tensor:
        """The whole accumulator of one matrix (all-gathered; for tests and inspection)."""
        shard = self.acc[name]
        if self.world > 1:
            parts = [torch.empty_like(shard) for _ in range(self.world)]
            dist.all_gather(parts, shard)
            shard = torch.cat(parts)
        out_f, in_f = self.shapes[name]
        return shard[: out_f * in_f].view(out_f, in_f) / max(self.micro_batches, 1)

    def _scores(self, name: str) -> torch.Tensor:
        """This rank's shard of |accumulator|, with padding past the matrix end at -inf."""
        out_f, in_f = self.shapes[name]
        scores = self.acc[name].abs().clone()
        start = self.rank * self.shard[name]
        valid = max(0, min(self.shard[name], out_f * in_f - start))
        scores[valid:] = -math.inf
        return scores

    def budgets(self, cfg: AdapterConfig) -> dict[str, int]:
        """Non-zeros per matrix: uniform density, or one total spread by gradient mass."""
        k = {n: round(module_density(n, cfg) * o * i) for n, (o, i) in self.shapes.items()}
        if cfg.robust.budget == "uniform":
            return k
        names = sorted(self.modules)
        mass = torch.stack([self.acc[n].abs().sum().double() for n in names])
        if self.world > 1:
            dist.all_reduce(mass)
        mass = mass.cpu()
        total = sum(k.values())
        share = mass / mass.sum() if mass.sum() > 0 else torch.full_like(mass, 1 / len(names))
        numel = {n: o * i for n, (o, i) in self.shapes.items()}
        return {
            n: int(min(numel[n], round(total * float(s))))
            for n, s in zip(names, share, strict=True)
        }

    def select(self, cfg: AdapterConfig) -> dict[str, SparseStructure]:
        """Every rank calls this and gets the same masks."""
        bad = sum(int(not bool(torch.isfinite(a).all())) for a in self.acc.values())
        if all_reduce_sum([float(bad)])[0]:
            raise TrainingError(
                "the gradients collected for the masks hold NaN or Inf; lower train.lr or "
                "adapter.robust.mask_warmup_steps, or check the data, and start the run again"
            )
        masks = {}
        for name, k in sorted(self.budgets(cfg).items()):
            flat = self._topk(name, k).cpu()
            masks[name] = SparseStructure.from_flat_indices(flat, self.shapes[name])
        return masks

    def _topk(self, name: str, k: int) -> torch.Tensor:
        offset = self.rank * self.shard[name]
        return top_k_sharded(self._scores(name), k, offset, comm_device())


# --- mask files ------------------------------------------------------------------------------


def save_masks(path: str | Path, masks: dict[str, SparseStructure]) -> None:
    tensors, shapes = {}, {}
    for name, s in masks.items():
        tensors[f"{name}.row_ptr"] = s.row_ptr.contiguous()
        tensors[f"{name}.col_idx"] = s.col_idx.contiguous()
        shapes[name] = list(s.shape)
    metadata = {"format": "rosa-ds-masks", "shapes": json.dumps(shapes)}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_masks(path: str | Path) -> dict[str, SparseStructure]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "rosa-ds-masks":
                raise ValueError("not a rosa-ds mask file")
            shapes = json.loads(meta["shapes"])
            return {
                name: SparseStructure.from_csr(
                    f.get_tensor(f"{name}.row_ptr"), f.get_tensor(f"{name}.col_idx"), tuple(shape)
                )
                for name, shape in shapes.items()
            }
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise UserError(
            f"mask file {path} cannot be read ({exc}); give a masks.safetensors written by rosa-ds"
        ) from None
    except Exception as exc:  # safetensors raises its own error type for truncated files
        raise UserError(
            f"mask file {path} cannot be read ({exc}); give a masks.safetensors written by rosa-ds"
        ) from None


def check_masks(masks: dict[str, SparseStructure], model: nn.Module, cfg: AdapterConfig) -> None:
    """The masks name exactly the model's sparse modules, with their shapes."""
    modules = adapted_modules(model)
    wanted = {n for n in modules if module_density(n, cfg) > 0}
    if set(masks) != wanted:
        missing, extra = sorted(wanted - set(masks))[:2], sorted(set(masks) - wanted)[:2]
        raise UserError(
            f"mask file does not match the model (missing {missing}, unexpected "
            f"{extra}); use masks built for this model and adapter.targets"
        )
    for name, s in masks.items():
        shape = (modules[name].out_features, modules[name].in_features)
        if s.shape != shape:
            raise UserError(
                f"mask for {name} has shape {s.shape} but the layer is {shape}; "
                "use masks built for this model"
            )


def masks_of(model: nn.Module, keep: bool = True) -> dict[str, SparseStructure]:
    """Copies of the model's masks on ranks with ``keep``; every rank calls this (ZeRO-3
    gathers each mask in turn, so no rank ever holds more than one mask it does not keep)."""
    masks = {n: m.read_mask(keep) for n, m in adapted_modules(model).items()}
    return {n: s for n, s in masks.items() if s is not None}


def attach_masks(model: nn.Module, masks: dict[str, SparseStructure]) -> None:
    modules = adapted_modules(model)
    for name, s in masks.items():
        modules[name].attach_mask(s)
