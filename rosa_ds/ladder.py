"""The model-size ladder: random Llama-architecture decoders from about 1M to about 400M
parameters, for measuring how cost grows with size on any machine (random weights cost what
trained ones cost). Pure data, shared by the model builder (``builtin:ladder-<size>``) and the
planner, so both describe the same shapes.

Every rung uses the character tokenizer of ``builtin:tiny-llama`` (101 tokens): the embeddings
stay small and the parameters sit where fine-tuning spends its work, in the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

VOCAB = 101  # the character tokenizer's size (rosa_ds/model.py builds it)


@dataclass(frozen=True)
class Rung:
    """The shape of one ladder model (every rung a Llama: GQA attention, SwiGLU MLP)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int

    @property
    def params(self) -> int:
        d = self.hidden // self.heads
        attn = 2 * self.hidden * self.heads * d + 2 * self.hidden * self.kv_heads * d
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attn + mlp + 2 * self.hidden) + 2 * VOCAB * self.hidden + self.hidden


# name -> shape; about 4x apart up to 64M, then the sizes where a CPU step takes seconds
LADDER: dict[str, Rung] = {
    "1m": Rung(hidden=128, intermediate=352, layers=5, heads=4, kv_heads=2),
    "4m": Rung(hidden=256, intermediate=704, layers=5, heads=4, kv_heads=2),
    "16m": Rung(hidden=512, intermediate=1408, layers=5, heads=8, kv_heads=4),
    "64m": Rung(hidden=768, intermediate=2048, layers=10, heads=12, kv_heads=6),
    "160m": Rung(hidden=1024, intermediate=2816, layers=14, heads=16, kv_heads=8),
    "400m": Rung(hidden=1536, intermediate=4096, layers=15, heads=24, kv_heads=12),
}
PREFIX = "ladder-"
