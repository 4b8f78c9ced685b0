"""The one adapter layer: a frozen linear map plus a trainable low-rank update.

    y = base(x) + s * dropout(x) A^T B^T          s = alpha / r

``base`` stays the original module, called as a module, so DeepSpeed ZeRO-3 gathers its
partitioned weight through its own hooks and a quantized base can take its place later. The
sparse term of RoSA and the resampling of ROSA are added to this class, not to a second one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class AdaptedLinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be > 0, got {rank}")
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank))
        self.reset_adapter()

    def reset_adapter(self) -> None:
        """LoRA's initialization: A Kaiming-uniform, B zero, so the update starts at zero."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        h = self.dropout(x).to(self.lora_A.dtype)
        update = F.linear(F.linear(h, self.lora_A), self.lora_B)
        return out + (self.scale * update).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The dense update the adapter adds to ``base.weight`` (fp32)."""
        return self.scale * (self.lora_B.float() @ self.lora_A.float())

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"
        )
