"""4-bit block quantization (NF4 or FP4) through ``bitsandbytes.functional``, flattened into one
plain ``uint8`` tensor that ZeRO can shard and safetensors can store.

bitsandbytes returns the packed nibbles and a ``QuantState`` (per-block ``absmax``, and with
double quantization an 8-bit ``absmax`` plus a nested fp32 ``absmax`` per 256 blocks and one
``offset``). Here they become one flat byte tensor laid out as *records*, one per block of
``block_size`` weights::

    [ block 0: block_size/2 packed bytes | its scale (4 bytes fp32, or 1 byte double-quantized) ]
    [ block 1: ... ]
    ...
    [ tail, double quantization only: nested absmax (fp32, one per 256 blocks) | offset (fp32) ]

Keeping each block's scale beside its bytes means that any contiguous slice (a ZeRO-3
partition) holds about the same share of the packed bytes and of the scales. The weight is
padded with zeros to whole blocks (zeros change no block's absmax). The code tables (16 NF4/FP4
levels, bitsandbytes' 256-entry dynamic map for the nested scales) are constants, not stored.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cache

import torch

from rosa_ds.errors import UserError

NESTED_BLOCK = 256  # bitsandbytes quantizes the absmax in blocks of 256
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")


def _bnb():
    try:
        import bitsandbytes.functional as bnb_f
    except ImportError as exc:  # pragma: no cover - the environment installs it
        raise UserError(
            f"quant.bits=4 needs bitsandbytes ({exc}); install it: pip install bitsandbytes"
        ) from None
    return bnb_f


@dataclass(frozen=True)
class QuantSpec:
    """How one matrix is quantized, and the byte layout that follows from it."""

    shape: tuple[int, int]
    quant_type: str = "nf4"
    block_size: int = 64
    double_quant: bool = True

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def blocks(self) -> int:
        return math.ceil(self.numel / self.block_size)

    @property
    def packed_per_block(self) -> int:
        return self.block_size // 2

    @property
    def scale_per_block(self) -> int:
        return 1 if self.double_quant else 4

    @property
    def record(self) -> int:
        return self.packed_per_block + self.scale_per_block

    @property
    def nested(self) -> int:
        return math.ceil(self.blocks / NESTED_BLOCK) if self.double_quant else 0

    @property
    def tail(self) -> int:
        return 4 * self.nested + 4 if self.double_quant else 0

    @property
    def nbytes(self) -> int:
        return self.blocks * self.record + self.tail

    def component_bytes(self, start: int = 0, stop: int | None = None) -> dict[str, int]:
        """How many bytes of ``[start, stop)`` are packed weights and how many are scales."""
        stop = self.nbytes if stop is None else min(stop, self.nbytes)
        start = max(0, min(start, stop))
        body = self.blocks * self.record

        def packed_before(pos: int) -> int:
            pos = min(pos, body)
            whole, part = divmod(pos, self.record)
            return whole * self.packed_per_block + min(part, self.packed_per_block)

        packed = packed_before(stop) - packed_before(start)
        return {"packed": packed, "scales": (stop - start) - packed}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QuantSpec:
        return cls(
            tuple(d["shape"]), d["quant_type"], int(d["block_size"]), bool(d["double_quant"])
        )


@cache
def _codes(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    f = _bnb()
    return f.get_4bit_type(quant_type, device="cpu"), f.create_dynamic_map(signed=True)


def quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The flat ``uint8`` records of ``w`` (any float dtype; quantized as given)."""
    f = _bnb()
    if tuple(w.shape) != spec.shape:
        raise ValueError(f"weight shape {tuple(w.shape)} does not match {spec.shape}")
    flat = w.detach().reshape(-1)
    pad = spec.blocks * spec.block_size - spec.numel
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    packed, state = f.quantize_4bit(
        flat.contiguous().view(-1, spec.block_size),
        blocksize=spec.block_size,
        compress_statistics=spec.double_quant,
        quant_type=spec.quant_type,
    )
    packed = packed.reshape(spec.blocks, spec.packed_per_block)
    if spec.double_quant:
        scales = state.absmax.reshape(spec.blocks, 1).to(torch.uint8)
        tail = torch.cat(
            [
                state.state2.absmax.float().reshape(-1).view(torch.uint8),
                state.offset.float().reshape(1).view(torch.uint8),
            ]
        )
    else:
        scales = state.absmax.float().reshape(spec.blocks, 1).contiguous().view(torch.uint8)
        tail = packed.new_zeros(0)
    out = torch.cat([torch.cat([packed.cpu(), scales.cpu()], dim=1).reshape(-1), tail.cpu()])
    assert out.numel() == spec.nbytes, (out.numel(), spec.nbytes)
    return out.to(w.device)


def dequantize(
    q: torch.Tensor, spec: QuantSpec, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The ``spec.shape`` matrix in ``dtype`` that the records ``q`` stand for."""
    f = _bnb()
    if q.numel() != spec.nbytes or q.dtype != torch.uint8:
        raise ValueError(
            f"expected {spec.nbytes} uint8 bytes for {spec}, got {q.numel()} {q.dtype}"
        )
    q = q.reshape(-1)
    body = spec.blocks * spec.record
    records = q[:body].view(spec.blocks, spec.record)
    packed = records[:, : spec.packed_per_block].contiguous().view(-1, 1)
    scales = records[:, spec.packed_per_block :].contiguous()
    code4, code8 = _codes(spec.quant_type)
    code4, code8 = code4.to(q.device), code8.to(q.device)
    if spec.double_quant:
        tail = q[body:].clone()  # a fresh, aligned buffer to view as fp32
        nested = tail[: 4 * spec.nested].view(torch.float32)
        offset = tail[4 * spec.nested :].view(torch.float32)[0]
        inner = f.QuantState(absmax=nested, code=code8, blocksize=NESTED_BLOCK, dtype=torch.float32)
        state = f.QuantState(
            absmax=scales.reshape(-1),
            shape=torch.Size((spec.blocks, spec.block_size)),
            code=code4,
            blocksize=spec.block_size,
            quant_type=spec.quant_type,
            dtype=dtype,
            offset=offset,
            state2=inner,
        )
    else:
        state = f.QuantState(
            absmax=scales.view(torch.float32).reshape(-1),
            shape=torch.Size((spec.blocks, spec.block_size)),
            code=code4,
            blocksize=spec.block_size,
            quant_type=spec.quant_type,
            dtype=dtype,
        )
    w = f.dequantize_4bit(packed, state)
    return w.reshape(-1)[: spec.numel].view(spec.shape)


@dataclass
class QuantError:
    """Error of quantizing one matrix: ``||deq(q(W)) - W||_F`` and ``||W||_F``."""

    abs: float
    norm: float

    @property
    def rel(self) -> float:
        return self.abs / self.norm if self.norm > 0 else 0.0


def quantize_with_error(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, QuantError]:
    """Quantize ``w`` and measure the error against ``w`` itself (fp32)."""
    q = quantize(w, spec)
    back = dequantize(q, spec, torch.float32)
    err = QuantError(float((back - w.float()).norm()), float(w.float().norm()))
    return q, err


def bytes_per_param(spec: QuantSpec) -> float:
    return spec.nbytes / spec.numel
