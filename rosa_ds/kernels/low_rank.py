"""``y + s · (h Aᵀ) Bᵀ``, the low-rank update added to the frozen layer's output, as one autograd
function whose products all have the wide shape BLAS libraries handle well.

Why not autograd of ``F.linear(F.linear(h, A), B)``: two of its backward products, ``g B``
(tokens x r) and ``gᵀ (h Aᵀ)`` (out x r), have an output only r columns wide. At r < 16 MKL's
CPU GEMM runs them 4-6x slower than the same products computed transposed, as r x tokens and
r x out (``benchmarks/low_rank.py``; on an AVX2 AMD EPYC a rank-8 LoRA's backward took longer
than a rank-16 one's). The transposed forms give the same sums and cost nothing at other ranks
or on GPUs. The function also adds the update to ``y`` inside the GEMM (``addmm``, scale as its
``alpha``) and puts the scale on the r-wide gradient, so neither direction spends a pass over
the tokens x out output on scaling or adding it.
"""

from __future__ import annotations

import torch


class LowRankAdd(torch.autograd.Function):
    """``y + scale · (h Aᵀ) Bᵀ`` for 2-D ``y`` (T, out) and ``h`` (T, in); ``A`` (r, in) and
    ``B`` (out, r) in ``h``'s dtype. ``y`` may be of another dtype (a bf16 or 4-bit base under
    fp32 adapters): the update is then computed in the adapters' dtype and cast onto ``y``."""

    @staticmethod
    def forward(ctx, y, h, lora_a, lora_b, scale: float):
        device = h.device.type
        # Under autocast, backward runs as forward did (what torch.amp.custom_bwd does, for
        # any device): its products then meet the dtypes forward saved.
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ha_t = lora_a @ h.t()  # (r, T): h Aᵀ, computed wide
        ctx.save_for_backward(h, lora_a, lora_b, ha_t)
        ctx.scale = scale
        if y.dtype == h.dtype == lora_a.dtype and not ctx.autocast[1]:
            return torch.addmm(y, ha_t.t(), lora_b.t(), alpha=scale)
        update = torch.mm(ha_t.t(), lora_b.t()).mul_(scale)
        return y + update.to(y.dtype)

    @staticmethod
    def backward(ctx, g):
        h, lora_a, lora_b, ha_t = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            return (
                g if ctx.needs_input_grad[0] else None,
                *_factor_grads(ctx, g, h, lora_a, lora_b, ha_t),
            )


def _factor_grads(ctx, g, h, lora_a, lora_b, ha_t):
    """The gradients of h, A and B (None where not needed), every product wide."""
    scale, need = ctx.scale, ctx.needs_input_grad
    g = g.to(h.dtype)
    dh = da = db = None
    if need[1] or need[2]:
        # d(h Aᵀ) = s · g B, as (Bᵀ gᵀ)ᵀ: an (r, T) output, not (T, r)
        d_ha_t = (lora_b.t() @ g.t()).mul_(scale)
        dh = d_ha_t.t() @ lora_a if need[1] else None
        da = d_ha_t @ h if need[2] else None
    if need[3]:
        # dB = s · gᵀ (h Aᵀ), as ((h Aᵀ)ᵀ g)ᵀ: an (r, out) output, not (out, r)
        db = (ha_t @ g).mul_(scale).t().contiguous()
    return dh, da, db, None


def low_rank_add(
    y: torch.Tensor, h: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """``y + scale · h Aᵀ Bᵀ`` for ``y`` of shape (..., out) and ``h`` of shape (..., in)."""
    lead = y.shape[:-1]
    out = LowRankAdd.apply(
        y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), lora_a, lora_b, scale
    )
    return out.reshape(*lead, y.shape[-1])
