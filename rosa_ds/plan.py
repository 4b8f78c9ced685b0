"""``rosa-ds plan``: memory per GPU and communication per step for a model, a method and a
DeepSpeed layout, before anything is loaded (pure Python: no torch, no DeepSpeed, no weights).

The model follows what this trainer allocates (checked against ``rosa_ds/engine.py``,
``adapters/``, ``kernels/csr.py``, DeepSpeed 0.19's ZeRO optimizers and Hugging Face's Llama):

* **frozen weights**: embeddings, norms, head and block linears in the training dtype (bf16: 2
  bytes, fp32: 4); with ``quant=4`` the quantized linears take NF4 records: per block of 64
  weights 32 packed bytes plus a 4-byte fp32 scale, or with double quantization a 1-byte scale
  plus one fp32 per 256 blocks (``rosa_ds/quant/nf4.py``). ZeRO-3 keeps ``ceil(numel / N)`` of
  each parameter per rank, except those under ``stage3_param_persistence_threshold`` (10 x
  hidden), which stay whole.
* **trainable parameters**: LoRA ``A`` (r x in), ``B`` (out x r) and the sparse values
  (``round(d x out x in)`` per matrix) in the training dtype; the CSR indices of the mask
  (int32: row pointers, column indices, the transposed copy and its permutation, the non-empty
  row orders, ``3 nnz + 2 (out + in)`` entries per matrix) in one frozen parameter per matrix,
  which ZeRO-3 partitions (and gathers with its module) like any other.
* **optimizer state** (``optimizer="fp32"``, DeepSpeed with torch AdamW): an fp32 master copy
  (ZeRO-1/2/3 keep one even in fp32 training) and Adam's two fp32 moments, all ``1/N`` at
  ZeRO >= 1. ``optimizer="param"`` is the reference code's plain AdamW on bf16 adapters: two
  moments in the adapter dtype, no master.
* **gradients**: ZeRO-2 fills a reduce bucket (``reduce_bucket_size`` = hidden^2 elements) and
  keeps its ``1/N`` partition of the gradients; ZeRO-3 keeps a partition buffer for the whole
  run. At the optimizer step the partition becomes fp32 (4 bytes/param/N) and AdamW makes
  temporaries (``sqrt(v)`` and the denominator: 8 bytes/param/N in torch's single-tensor CPU
  path, 4 in the foreach path used on GPUs).
* **activations** of one micro-batch of ``T = micro_batch x seq`` tokens, counted tensor by
  tensor from what autograd saves in Hugging Face's Llama with these adapters (per layer: the
  two RMSNorms' fp32 input copies, the q/k/v and gate/up inputs, q/k/v after RoPE, the attention
  output, gate, SiLU(gate), up and their product, the ``x A^T`` of each adapter, the attention
  log-sum-exp; ``attention="eager"`` adds the fp32 softmax and its cast, heads x seq per token,
  and repeats k/v to all heads), plus the loss: the fp32 log-softmax (4 V bytes per token) and,
  at the start of backward, its gradient and the input gradient (8 V more), the step's peak.
  Gradient checkpointing keeps each layer's input and recomputes one layer at a time.
* **ZeRO-3 gathering** (N > 1): the module in use is gathered whole (twice on CPU, where gloo's
  all-gather fills a flat copy first), and once DeepSpeed has a complete trace of the module
  order it keeps a module gathered from its forward to its backward when the parameters in
  between number fewer than ``stage3_max_reuse_distance`` (1e9 in ``ds_configs/zero3.json``:
  the whole of a model under about 5e8 parameters, the last layers and the head of larger
  ones). That residency is an upper bound: measured runs kept 0 to 75% of it, depending on
  whether the trace survived (evaluation passes and tied embeddings break it).
* **sparse part**: one module's backward at a time merges ``S`` into ``W`` (in place at ZeRO
  0-2: ``W0`` and the sums at the mask; under ZeRO-3 a dense copy of ``W + S``) and copies
  ``dY`` and ``X`` for the SDDMM (fp32 on the CPU path; with the tokens contiguous, in the
  activation dtype, for the Triton kernel); with 4-bit weights one layer's
  weight is dequantized at a time. Besides the layers' masks the trainer keeps only, for the
  in-place merge, each layer's int64 flat positions of its mask (checkpoints gather the masks
  from the layers one at a time).
* **mask phase** (RoSA): the warm-up LoRA's training state plus the fp32 gradient-statistic
  accumulator, ``1/N`` of every adapted matrix (reduce-scattered as backward produces it), and
  while a module's hook runs its fp32 ``G``, the statistic and, with N > 1, the padded buffer
  and the received shard.
* **resample** (ROSA): one matrix at a time; the GPU holds the gathered (or rewritten) weight,
  the owner's host memory the fp32 copy, the merged matrix and LAPACK's SVD (U, Vh, an input
  copy and work space: measured ``4 (m k + k n + 2 m n)`` bytes, ``k = min(m, n)``), since
  ``adapters/resample.py`` factorizes on the CPU. On ``device="cpu"`` both are the same memory.
* **overhead** (``device="gpu"``): the CUDA context and library workspaces, a flat
  ``overhead_gib`` (0.5 by default), not counted by ``torch.cuda.max_memory_allocated``.

Communication is per GPU, bytes sent with ring algorithms (reduce-scatter and all-gather send
``(N-1)/N`` of the tensor, a broadcast about the whole tensor): ZeRO-1/2 reduce-scatter the
trainable gradients (every micro-batch at stage 2, once per step at stage 1) and all-gather the
updated trainable parameters once per step; ZeRO-3 reduce-scatters the gradients every
micro-batch and all-gathers every partitioned parameter, frozen ones included, in forward and
again in backward (no all-gather after the step). A mask collection reduce-scatters the fp32
statistic of every adapted matrix every micro-batch, agrees on each matrix's threshold by
bisection (scalar all-reduces) and all-gathers the k chosen int64 indices; a resample gathers each adapted matrix (ZeRO-3), and writes it back
(ZeRO-3: a gather and a broadcast from the owner; ZeRO-2: a broadcast).

How it was checked (``tests/test_plan.py``): real CPU runs of ``rosa-ds train`` at 1 and 2
ranks, ZeRO-2 and ZeRO-3, bf16 and fp32, LoRA, RoSA's mask phase and ROSA's resample (under
ZeRO-2; ZeRO-3 resamples measured more, partly tensors awaiting Python's cycle collector), all
within 15% of the plan, through
``tests/probes/memory_probe.py``, which measures **tensor bytes alive**: every tensor storage
reachable from Python before a step, plus the running sum of the allocator's events during it
(the CPU analogue of ``torch.cuda.max_memory_allocated``). Not the process RSS: that counts
libraries, the allocator's cached pages and mapped files, which no planner can know. On a GPU
add the allocator's fragmentation (``max_memory_reserved`` minus allocated; a few percent).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rosa_ds.errors import UserError
from rosa_ds.ladder import LADDER
from rosa_ds.ladder import PREFIX as LADDER_PREFIX
from rosa_ds.ladder import VOCAB as LADDER_VOCAB
from rosa_ds.targets import matches

GIB = 2**30
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LINEARS = ATTN + MLP


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-architecture decoder (attention q/k/v/o, SwiGLU MLP)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False
    head_dim: int | None = None

    @property
    def d_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each linear layer of one block."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.d_head, self.kv_heads
        kvd = kv * self.d_head
        return {
            "q_proj": (q, h),
            "k_proj": (kvd, h),
            "v_proj": (kvd, h),
            "o_proj": (h, q),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }

    @property
    def params(self) -> int:
        per_layer = sum(o * i for o, i in self.linear_shapes().values()) + 2 * self.hidden
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return self.vocab * self.hidden + head + self.layers * per_layer + self.hidden


PRESETS: dict[str, ModelShape] = {
    "llama2-7b": ModelShape("Llama-2 7B", 4096, 11008, 32, 32, 32, 32000),
    "llama2-13b": ModelShape("Llama-2 13B", 5120, 13824, 40, 40, 40, 32000),
    "llama2-70b": ModelShape("Llama-2 70B", 8192, 28672, 80, 64, 8, 32000),
    "llama3-8b": ModelShape("Llama-3 8B", 4096, 14336, 32, 32, 8, 128256),
    "llama3-70b": ModelShape("Llama-3 70B", 8192, 28672, 80, 64, 8, 128256),
    "llama3-405b": ModelShape("Llama-3.1 405B", 16384, 53248, 126, 128, 8, 128256),
    "smollm2-135m": ModelShape("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, tied_embeddings=True),
    "tiny-llama": ModelShape("tiny-llama (builtin)", 64, 128, 2, 4, 2, 101),
}
PRESETS |= {
    LADDER_PREFIX + size: ModelShape(
        f"ladder {size} (builtin, random)",
        r.hidden,
        r.intermediate,
        r.layers,
        r.heads,
        r.kv_heads,
        LADDER_VOCAB,
    )
    for size, r in LADDER.items()
}
BUILTIN_PRESETS = {
    "builtin:tiny-llama": "tiny-llama",
    "builtin:smollm2-135m-instruct": "smollm2-135m",
} | {f"builtin:{LADDER_PREFIX}{size}": LADDER_PREFIX + size for size in LADDER}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower().replace("3.1", "3"))


def get_model(name_or_path: str) -> ModelShape:
    """A preset (``llama2-7b``, ``Llama-3 70B``, ...), a built-in model, a ``config.json`` or a
    folder holding one."""
    if name_or_path in BUILTIN_PRESETS:
        return PRESETS[BUILTIN_PRESETS[name_or_path]]
    path = Path(name_or_path).expanduser()
    if path.is_dir() or path.suffix == ".json" or path.exists():
        return read_hf_config(path)
    wanted = _norm(name_or_path.split("/")[-1]).removesuffix("hf").removeprefix("meta")
    for key, shape in PRESETS.items():
        if wanted in (_norm(key), _norm(shape.name)):
            return shape
    raise UserError(
        f"unknown model {name_or_path!r}; give a preset ({', '.join(PRESETS)}) or a Hugging "
        "Face config.json (or a folder with one)"
    )


def read_hf_config(path: str | Path) -> ModelShape:
    """The shape of a decoder from a Hugging Face ``config.json``."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "config.json"
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise UserError(
            f"cannot read model config {path} ({exc.strerror}); give a config.json"
        ) from None
    except json.JSONDecodeError as exc:
        raise UserError(
            f"model config {path} is not valid JSON ({exc.msg}); give a config.json"
        ) from None
    if not isinstance(raw, dict):
        raise UserError(f"model config {path} is not a JSON object; give a config.json")
    raw = raw.get("text_config") or raw  # multimodal wrappers keep the decoder here
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in need + ("vocab_size",) if not isinstance(raw.get(k), int)]
    if missing:
        raise UserError(
            f"model config {path} lacks {', '.join(missing)}; the planner models Llama-style "
            "decoders (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, "
            "vocab_size)"
        )
    return ModelShape(
        name=str(raw.get("_name_or_path") or path.parent.name or "model"),
        hidden=raw["hidden_size"],
        intermediate=raw["intermediate_size"],
        layers=raw["num_hidden_layers"],
        heads=raw["num_attention_heads"],
        kv_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
        vocab=raw["vocab_size"],
        tied_embeddings=bool(raw.get("tie_word_embeddings", False)),
        head_dim=raw.get("head_dim"),
    )


def nf4_bytes(out_f: int, in_f: int, block: int = 64, double_quant: bool = True) -> int:
    """Bytes of one 4-bit matrix in ``rosa_ds/quant/nf4.py``'s layout."""
    blocks = math.ceil(out_f * in_f / block)
    if not double_quant:
        return blocks * (block // 2 + 4)
    return blocks * (block // 2 + 1) + 4 * math.ceil(blocks / 256) + 4


@dataclass
class PlanInputs:
    """Everything the plan depends on; bytes are per GPU (per rank)."""

    model: ModelShape
    rank: int = 16
    density: float = 0.0
    resample: bool = False
    targets: tuple[str, ...] = LINEARS
    dropout: float = 0.0
    precision: str = "bf16"  # bf16 or fp32: compute, frozen and trainable dtype
    quant: int = 16  # 16 (frozen weights in the training dtype) or 4 (NF4 records)
    quant_block: int = 64
    double_quant: bool = True
    quant_all_linear: bool = False  # also quantize the linears that are not adapted
    zero_stage: int = 2
    gpus: int = 1
    micro_batch: int = 1
    seq_len: int = 512
    grad_accum: int = 1
    checkpointing: bool = False
    attention: str = "sdpa"  # sdpa (flash / memory-efficient kernels) or eager
    optimizer: str = "fp32"  # fp32: master + fp32 moments (DeepSpeed); param: moments in dtype
    mask_phase: bool = True  # RoSA builds masks from gradients (False: a mask file is given)
    warmup_rank: int = 8  # LoRA rank of the warm-up of a sparse-only run
    device: str = "gpu"  # gpu or cpu (cpu: no context overhead, torch's CPU AdamW path)
    overhead_gib: float | None = None  # default: 0.5 on gpu, 0 on cpu
    reduce_bucket: int | None = None  # elements; default hidden^2 (ds_configs "auto")
    persistence_threshold: int | None = None  # ZeRO-3 elements; default 10 x hidden
    max_reuse_distance: int = 10**9  # ZeRO-3 stage3_max_reuse_distance (ds_configs/zero3.json)
    tflops: float | None = None  # achieved (not peak) TFLOP/s per GPU, for the step time
    bandwidth_gbs: float | None = None  # GB/s each GPU sends at; None: communication not timed
    steps: int | None = None  # optimizer steps of the run, for its hours and GPU-hours
    whole_trained: int = 0  # elements of modules trained whole (adapter.train_modules)

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(msg)

        need(self.rank >= 0, f"rank must be >= 0, got {self.rank}")
        need(0 <= self.density < 1, f"density must be in [0, 1), got {self.density}")
        need(self.rank > 0 or self.density > 0, "rank 0 needs density > 0 (sparse-only)")
        need(not self.resample or self.rank > 0, "resampling needs rank > 0")
        need(len(self.targets) > 0, "targets must name at least one linear layer")
        bad = [t for t in self.targets if t not in LINEARS]
        need(not bad, f"unknown target {bad[:1]}; choose from {', '.join(LINEARS)}")
        need(
            self.precision in ("bf16", "fp32"),
            f"precision must be bf16 or fp32, not {self.precision}",
        )
        need(self.quant in (4, 16), f"quant must be 4 or 16 bits, got {self.quant}")
        need(
            self.quant_block in (32, 64, 128, 256, 512, 1024, 2048, 4096),
            f"quant block must be a power of two from 32 to 4096, got {self.quant_block}",
        )
        need(self.zero_stage in (0, 1, 2, 3), f"ZeRO stage must be 0-3, got {self.zero_stage}")
        need(self.gpus >= 1, f"gpus must be >= 1, got {self.gpus}")
        need(self.micro_batch >= 1, f"micro-batch must be >= 1, got {self.micro_batch}")
        need(self.seq_len >= 1, f"sequence length must be >= 1, got {self.seq_len}")
        need(self.grad_accum >= 1, f"gradient accumulation must be >= 1, got {self.grad_accum}")
        need(
            self.attention in ("sdpa", "eager"),
            f"attention must be sdpa or eager, not {self.attention}",
        )
        need(
            self.optimizer in ("fp32", "param"),
            f"optimizer must be fp32 or param, not {self.optimizer}",
        )
        need(self.device in ("gpu", "cpu"), f"device must be gpu or cpu, not {self.device}")
        need(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.tflops is None or self.tflops > 0, f"tflops must be > 0, got {self.tflops}")
        need(
            self.bandwidth_gbs is None or self.bandwidth_gbs > 0,
            f"bandwidth must be > 0 GB/s, got {self.bandwidth_gbs}",
        )
        need(self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps}")

    @property
    def act_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len

    def method(self) -> str:
        parts = []
        if self.rank and self.density:
            parts.append(f"RoSA r={self.rank} d={self.density:.4g}")
        elif self.density:
            parts.append(f"SpA d={self.density:.4g}")
        else:
            parts.append(f"LoRA r={self.rank}")
        if self.resample:
            parts.append("+ ROSA resampling")
        return " ".join(parts)


@dataclass
class Breakdown:
    """Bytes per GPU (memory) and bytes sent per GPU (communication)."""

    frozen: float = 0
    trainable: float = 0
    gradients: float = 0
    optimizer: float = 0
    activations: float = 0  # peak of one micro-batch's forward/backward (loss gradients included)
    zero3_gathered: float = 0
    step_transient: float = 0  # fp32 gradients and AdamW temporaries during the optimizer step
    train_peak: float = 0
    mask_accumulator: float = 0
    mask_peak: float = 0
    resample_device: float = 0  # extra on the GPU during a resample
    resample_host: float = 0  # the owner's CPU memory for one matrix's SVD
    resample_peak: float = 0
    overhead: float = 0
    peak: float = 0  # the largest of the phases, plus the overhead
    trainable_params: int = 0
    saved_activations: float = 0
    comm_step: float = 0
    comm_mask_step: float = 0
    comm_resample: float = 0
    flops_per_token: float = 0  # training FLOPs per token at the planned sequence length
    flops_step: float = 0  # per GPU per optimizer step
    step_seconds: float | None = None  # compute at ``tflops`` (+ communication at ``bandwidth``)
    run_hours: float | None = None  # ``steps`` optimizer steps
    gpu_hours: float | None = None
    details: dict[str, float] = field(default_factory=dict)

    @property
    def persistent(self) -> float:
        return self.frozen + self.trainable + self.optimizer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# the model


def _shard(numel: int, n: int, stage: int, threshold: int) -> int:
    """Elements of one parameter held on a rank under ZeRO-3 (others: the whole parameter)."""
    if stage < 3 or n == 1 or numel < threshold:
        return numel
    return math.ceil(numel / n)


def _merges_in_place(inp: PlanInputs) -> bool:
    """Does the sparse part merge into the frozen weight in place (``layer._merge_mode``)? Where
    the rank holds the weight whole, and it is not 4-bit (those run the separate product)."""
    return inp.zero_stage < 3 and inp.quant != 4


def _csr_entries(o: int, i: int, density: float) -> int:
    """int32 entries of one matrix's mask (``kernels/csr.py``): the CSR, its transpose with the
    permutation, and the non-empty rows of both in order."""
    nnz = round(density * o * i)
    return 3 * nnz + (o + 1) + (i + 1) + min(o, nnz) + min(i, nnz)


def _trainable_shapes(inp: PlanInputs, rank: int, density: float) -> list[tuple[int, str]]:
    """(numel, kind) of every trainable parameter, for one layer."""
    shapes = inp.model.linear_shapes()
    out = []
    for name in inp.targets:
        o, i = shapes[name]
        if rank:
            out += [(rank * i, "lora"), (o * rank, "lora")]
        if density:
            out.append((round(density * o * i), "sparse"))
    return out


def _saved_per_layer_token(inp: PlanInputs, rank: int) -> float:
    """Bytes autograd keeps per token for one decoder layer (see the module docstring)."""
    m, a, tg = inp.model, inp.act_bytes, set(inp.targets)
    h, inter = m.hidden, m.intermediate
    q, kv = m.heads * m.d_head, m.kv_heads * m.d_head
    shapes = m.linear_shapes()
    per = 2 * (4 * h + 4)  # both RMSNorms: fp32 copy of the input, rsqrt
    if tg & {"q_proj", "k_proj", "v_proj"}:
        per += a * h  # normed input of q/k/v, kept by the adapters
    if inp.attention == "sdpa":
        per += a * (q + 2 * kv) + a * q + 4 * m.heads  # q, k, v after RoPE; output; logsumexp
    else:  # eager: k/v repeated to every head, fp32 softmax and its cast
        per += a * 3 * q + m.heads * inp.seq_len * (4 + a) + (a * q if "o_proj" in tg else 0)
    if tg & {"gate_proj", "up_proj"}:
        per += a * h
    per += 3 * a * inter + (a * inter if "down_proj" in tg else 0)  # gate, SiLU, up (, product)
    per += a * rank * len(tg)  # x A^T of each adapter
    if inp.dropout > 0:  # dropout output and mask (bool on GPU, dtype on CPU) of each adapter
        mask = 1 if inp.device == "gpu" else a
        per += sum((a + mask) * shapes[n][1] for n in tg)
    return per


def _collector_inputs(inp: PlanInputs) -> float:
    """Bytes the mask collector keeps with checkpointing on: its hooks hold each adapted
    layer's input until the backward reaches it (q/k/v share one input, gate/up another), which
    recomputation would otherwise have freed. Without checkpointing autograd keeps them anyway."""
    if not inp.checkpointing:
        return 0.0
    m, tg = inp.model, set(inp.targets)
    per = (m.hidden if tg & {"q_proj", "k_proj", "v_proj"} else 0) + (
        m.heads * m.d_head if "o_proj" in tg else 0
    )
    per += (m.hidden if tg & {"gate_proj", "up_proj"} else 0) + (
        m.intermediate if "down_proj" in tg else 0
    )
    return float(inp.tokens * m.layers * inp.act_bytes * per)


def activation_bytes(inp: PlanInputs, rank: int | None = None) -> tuple[float, float, float]:
    """(saved by the decoder layers, saved in all, peak) for one micro-batch."""
    m, a, t = inp.model, inp.act_bytes, inp.tokens
    per = _saved_per_layer_token(inp, inp.rank if rank is None else rank)
    loss_saved = 4 * m.vocab + 8  # fp32 log-softmax output, int64 labels
    loss_backward = 8 * m.vocab  # its gradient and the input gradient, fp32
    if inp.checkpointing:
        layers = t * m.layers * a * m.hidden  # each layer's input
        saved = layers + t * (4 * m.hidden + 4 + loss_saved)
        peak = saved + max(t * loss_backward, t * (per + 2 * a * m.hidden))
        return layers, saved, peak
    layers = t * m.layers * per  # (layer 0's input norm keeps nothing; the final norm does)
    saved = layers + t * loss_saved
    return layers, saved, saved + t * loss_backward


def _state(inp: PlanInputs, rank: int, density: float) -> dict[str, float]:
    """Persistent and per-step memory of a training pass with this adapter."""
    m, a, n, z = inp.model, inp.act_bytes, inp.gpus, inp.zero_stage
    shapes = m.linear_shapes()
    thr = inp.persistence_threshold or 10 * m.hidden
    nz = n if z >= 1 else 1
    # frozen weights
    quantized = set(LINEARS if inp.quant_all_linear else inp.targets) if inp.quant == 4 else set()
    frozen = 0.0
    for name, (o, i) in shapes.items():
        if name in quantized:
            nbytes = nf4_bytes(o, i, inp.quant_block, inp.double_quant)
            frozen += m.layers * _shard(nbytes, n, z, thr)
        else:
            frozen += m.layers * a * _shard(o * i, n, z, thr)
    frozen += a * (2 * m.layers + 1) * _shard(m.hidden, n, z, thr)  # norms
    embeds = 1 if m.tied_embeddings else 2
    frozen += embeds * a * _shard(m.vocab * m.hidden, n, z, thr)
    # trainable parameters (+ the CSR index buffers of the masks)
    layer_params = _trainable_shapes(inp, rank, density)
    # modules trained whole (embeddings, head): their weights are counted above, their
    # gradients and optimizer state here
    p_train = m.layers * sum(k for k, _ in layer_params) + inp.whole_trained
    trainable = m.layers * a * sum(_shard(k, n, z, thr) for k, _ in layer_params)
    csr = 0  # the packed int32 mask indices, one frozen parameter per matrix (ZeRO-3 shards it)
    if density:
        for name in inp.targets:
            csr += 4 * _shard(_csr_entries(*shapes[name], density), n, z, thr)
            if _merges_in_place(inp):  # + the layer's cached int64 flat positions of the
                # mask, and the held merge's W0 at the mask (and on the CPU the copy of S it
                # compares against)
                held = 2 * a if inp.device == "cpu" else a
                csr += (8 + held) * round(density * math.prod(shapes[name]))
    trainable += m.layers * csr
    part = math.ceil(p_train / nz)
    # optimizer state
    if inp.optimizer == "fp32":
        master = 4 * part if (a == 2 or z >= 1) else 0
        optimizer = master + 8 * part
    else:
        optimizer = 2 * a * part
    # gradients, in backward and at the step
    bucket = min(p_train, inp.reduce_bucket or m.hidden**2)
    if z == 0:
        fp32_acc = a == 2 and inp.optimizer == "fp32"  # DeepSpeed's bf16 optimizer accumulates
        grads_bwd = a * p_train + (4 * p_train if fp32_acc else 0)
        grads_step = grads_bwd
    elif z == 1:
        grads_bwd = grads_step = a * p_train
    elif z == 2:
        grads_bwd, grads_step = a * math.ceil(p_train / n) + a * bucket, 0
    else:
        grads_bwd, grads_step = a * math.ceil(p_train / n) + a * bucket, a * math.ceil(p_train / n)
    adam_temp = 8 if inp.device == "cpu" else 4  # torch AdamW: single-tensor (CPU), foreach
    # the fp32 gradient partition and AdamW's temporaries (in the moments' dtype)
    step = (4 + adam_temp) * part if inp.optimizer == "fp32" else adam_temp // 4 * a * part
    return {
        "frozen": frozen,
        "trainable": trainable,
        "optimizer": optimizer,
        "grads_bwd": grads_bwd,
        "grads_step": grads_step,
        "step": step,
        "p_train": p_train,
        "csr": m.layers * csr,
    }


def _module_bytes(inp: PlanInputs) -> list[tuple[str, float]]:
    """(name, gathered bytes) of every parameter-holding module in forward order (ZeRO-3)."""
    m, a = inp.model, inp.act_bytes
    quantized = set(LINEARS if inp.quant_all_linear else inp.targets) if inp.quant == 4 else set()
    shapes = m.linear_shapes()
    per_layer = []
    for name, (o, i) in shapes.items():
        if name in quantized:
            nbytes = nf4_bytes(o, i, inp.quant_block, inp.double_quant)
        else:
            nbytes = a * o * i
        if name in inp.targets:
            nbytes += a * (inp.rank * (o + i) + round(inp.density * o * i))
            if inp.density:
                nbytes += 4 * _csr_entries(o, i, inp.density)
        per_layer.append((name, nbytes))
    mods = [("embed", a * m.vocab * m.hidden)]
    for layer in range(m.layers):
        mods += [(f"{layer}.{n}", b) for n, b in per_layer]
    mods.append(("head", a * m.vocab * m.hidden))
    return mods


def _gathered(inp: PlanInputs) -> tuple[float, float]:
    """ZeRO-3 with N > 1: (bytes kept gathered from forward into backward, bytes of the largest
    module being gathered). DeepSpeed keeps a module's parameters after its forward when they are
    used again (in its backward) within ``stage3_max_reuse_distance`` elements of the trace;
    the module in use is gathered whole (gloo's all-gather adds a flat copy: twice on CPU)."""
    if inp.zero_stage < 3 or inp.gpus == 1:
        return 0.0, 0.0
    mods = _module_bytes(inp)
    factor = 2 if inp.device == "cpu" else 1
    elem = inp.act_bytes
    # trace: forward (embed, layers, head), backward (head, layers reversed); the embedding is
    # not used again. Distance of forward module k to its backward: everything in between.
    kept, others = 0.0, [mods[0][1]]
    after = 0.0  # elements between a module's forward and its backward, counted from the end
    for _, nbytes in reversed(mods[1:]):
        if after < inp.max_reuse_distance:
            kept += nbytes
        else:
            others.append(nbytes)
        after += 2 * nbytes / elem
    return kept, factor * max(others)


def plan(inp: PlanInputs) -> Breakdown:
    """Memory per GPU and communication per GPU for one configuration."""
    inp.validate()
    m, a, n = inp.model, inp.act_bytes, inp.gpus
    shapes = m.linear_shapes()
    sparse = inp.density > 0
    st = _state(inp, inp.rank, inp.density)
    layers_saved, saved, act_peak = activation_bytes(inp)
    kept, in_use = _gathered(inp)
    gathered = kept + in_use
    persistent = st["frozen"] + st["trainable"] + st["optimizer"]
    mats = [shapes[t] for t in inp.targets]
    max_mn = max(o * i for o, i in mats)
    sparse_tmp = 0.0
    if sparse:  # one module's backward: the merge (held in place: S widened to fp32, and on a
        # GPU W0 + S formed in fp32 and cast; under ZeRO-3 a merged dense copy), copies of dY
        # and X for the SDDMM (fp32 on the CPU path; tokens-contiguous ones in the activation
        # dtype for the Triton kernel)
        t = inp.tokens
        cpu = inp.device == "cpu"
        in_place = _merges_in_place(inp)
        sparse_tmp = max(
            ((4 if cpu else 12 + a) * round(inp.density * o * i) if in_place else a * o * i)
            + (4 * t * (o + i) + 16 * round(inp.density * o * i) if cpu else a * t * (o + i))
            for o, i in mats
        )
    quantized = set(LINEARS if inp.quant_all_linear else inp.targets) if inp.quant == 4 else set()
    quant_tmp = max((a * o * i for n, (o, i) in shapes.items() if n in quantized), default=0)
    backward_peak = (
        persistent
        + st["grads_bwd"]
        + gathered
        + max(act_peak, layers_saved + sparse_tmp + quant_tmp)
    )
    step_peak = persistent + st["grads_step"] + st["step"]
    bd = Breakdown(
        frozen=st["frozen"],
        trainable=st["trainable"],
        gradients=st["grads_bwd"],
        optimizer=st["optimizer"],
        activations=act_peak,
        zero3_gathered=gathered,
        step_transient=st["step"],
        train_peak=max(backward_peak, step_peak),
        trainable_params=int(st["p_train"]),
        saved_activations=saved,
    )
    bd.details = {"csr_index_bytes": st["csr"], "backward_peak": backward_peak,
                  "step_peak": step_peak, "zero3_kept": kept, "zero3_in_use": in_use,
                  "sparse_module_transient": sparse_tmp,
                  "dequantized_weight": quant_tmp}  # fmt: skip
    # RoSA's mask phase: the warm-up LoRA's training state + the accumulator + one matrix's G
    if sparse and inp.mask_phase:
        wrank = inp.rank or inp.warmup_rank
        w = _state(inp, wrank, 0.0)
        w_layers, _, w_peak = activation_bytes(inp, rank=wrank)
        held = _collector_inputs(inp)  # what recomputation cannot free while collecting
        w_layers, w_peak = w_layers + held, w_peak + held
        acc = 4 * m.layers * sum(math.ceil(o * i / n) for o, i in mats)
        g_transient = 4 * max_mn * (2 + (1 + 1 / n if n > 1 else 0))
        w_persist = w["frozen"] + w["trainable"] + w["optimizer"]
        bd.mask_accumulator = acc
        bd.mask_peak = acc + max(
            w_persist + w["grads_bwd"] + max(w_peak + gathered, w_layers + g_transient),
            w_persist + w["grads_step"] + w["step"],
        )
    # ROSA's resample: one matrix at a time; the SVD runs on the owner's CPU
    if inp.resample:
        # fp32 copy, merged W', LAPACK's input copy and work (2 m n), U and Vh (k (m + n))
        host = max(4 * (4 * o * i + min(o, i) * (o + i)) for o, i in mats)
        bd.resample_device = a * max_mn
        bd.resample_host = host
        extra = max(host, bd.resample_device) if inp.device == "cpu" else bd.resample_device
        bd.resample_peak = persistent + st["grads_step"] + extra
    overhead = (
        inp.overhead_gib if inp.overhead_gib is not None else (0.5 if inp.device == "gpu" else 0.0)
    )
    bd.overhead = overhead * GIB
    bd.peak = max(bd.train_peak, bd.mask_peak, bd.resample_peak) + bd.overhead
    _communication(inp, bd, st)
    _time(inp, bd)
    return bd


def flops_per_token(inp: PlanInputs) -> float:
    """Training FLOPs per token, counted as ``rosa_ds/telemetry.py`` counts a run's (PaLM
    convention: 2 per multiply-add; backward twice the forward for what is trained, once for
    frozen weights; attention as if not causal) for sequences of ``seq_len`` tokens."""
    m, shapes = inp.model, inp.model.linear_shapes()
    per_layer = 0.0
    for name, (o, i) in shapes.items():
        per_layer += 2 * 2.0 * o * i  # frozen: forward and the input gradient
        if name in inp.targets:
            if inp.rank:
                per_layer += 3 * 2.0 * inp.rank * (o + i)
            per_layer += 3 * 2.0 * round(inp.density * o * i)
    head = 2 * 2.0 * m.vocab * m.hidden
    attention = 3 * 4.0 * m.heads * m.d_head * inp.seq_len  # two products over the context
    return m.layers * (per_layer + attention) + head


def _time(inp: PlanInputs, bd: Breakdown) -> None:
    """FLOPs of a step per GPU and, given an achieved TFLOP/s, its time. Mask collection and
    resamples are not in it: they happen once or every N steps (see their own lines)."""
    bd.flops_per_token = flops_per_token(inp)
    bd.flops_step = bd.flops_per_token * inp.tokens * inp.grad_accum
    if inp.tflops is None:
        return
    seconds = bd.flops_step / (inp.tflops * 1e12)
    if inp.bandwidth_gbs is not None:  # not overlapped with compute: an upper bound
        seconds += bd.comm_step / (inp.bandwidth_gbs * 1e9)
    bd.step_seconds = seconds
    if inp.steps is not None:
        bd.run_hours = seconds * inp.steps / 3600
        bd.gpu_hours = bd.run_hours * inp.gpus


def _communication(inp: PlanInputs, bd: Breakdown, st: dict[str, float]) -> None:
    m, a, n, z = inp.model, inp.act_bytes, inp.gpus, inp.zero_stage
    if n == 1:
        return
    f = (n - 1) / n
    shapes = m.linear_shapes()
    grads = a * st["p_train"]
    gas = inp.grad_accum
    if z == 0:
        step = 2 * f * grads  # all-reduce at the boundary
    elif z == 1:
        step = f * grads + f * grads
    elif z == 2:
        step = gas * f * grads + f * grads
    else:  # every partitioned parameter gathered in forward and in backward, every micro-batch
        full = replace(inp, gpus=1, zero_stage=3)
        whole = _state(full, inp.rank, inp.density)
        gathered = whole["frozen"] + whole["trainable"]  # the mask indices too
        step = gas * (f * grads + 2 * f * gathered)
    bd.comm_step = step
    mats = [shapes[t] for t in inp.targets]
    if inp.density and inp.mask_phase:
        stat = 4 * m.layers * sum(o * i for o, i in mats)
        # selection (adapters/topk.py): 31 bisection rounds and 3 more small all-reduces per
        # matrix, then the k chosen int64 indices all-gathered: independent of the GPU count
        chosen = m.layers * sum(round(inp.density * o * i) for o, i in mats)
        rounds = 34 * 8 * m.layers * len(mats) if n > 1 else 0
        bd.comm_mask_step = gas * f * stat + f * 8 * chosen + rounds
    if inp.resample:
        w = a * m.layers * sum(o * i for o, i in mats)
        factors = 4 * m.layers * inp.rank * sum(o + i for o, i in mats)
        bd.comm_resample = (2 * f + 1) * w if z == 3 else w
        bd.comm_resample += 2 * f * factors + factors  # full fp32 reads, broadcasts of A, B


def min_gpus(inp: PlanInputs, budget_bytes: float, limit: int = 1 << 16) -> int | None:
    """The smallest GPU count whose per-GPU peak fits ``budget_bytes`` (None: none up to
    ``limit``). The peak does not grow with the count (micro-batch per GPU fixed)."""

    def fits(n: int) -> bool:
        return plan(replace(inp, gpus=n)).peak <= budget_bytes

    if not fits(limit):
        return None
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


# ----------------------------------------------------------------------------------------------
# tables


def _g(x: float) -> str:
    return f"{x / GIB:9.2f}"


def format_plan(inp: PlanInputs, bd: Breakdown, budget_gib: float | None = None) -> str:
    m = inp.model
    quant = f", frozen NF4 (block {inp.quant_block}{', double quant' if inp.double_quant else ''})"
    lines = [
        f"{m.name}: {m.params / 1e9:.2f} B parameters, {inp.method()}, "
        f"{bd.trainable_params / 1e6:.1f} M trainable",
        f"{inp.precision}{quant if inp.quant == 4 else ''}, ZeRO-{inp.zero_stage}, "
        f"{inp.gpus} GPU(s), micro-batch {inp.micro_batch} x {inp.seq_len} tokens, "
        f"gradient accumulation {inp.grad_accum}, checkpointing "
        f"{'on' if inp.checkpointing else 'off'}, {inp.attention} attention",
        "",
        "memory per GPU                                    GiB",
        f"  frozen weights                            {_g(bd.frozen)}",
        f"  trainable parameters (and mask indices)   {_g(bd.trainable)}",
        f"  gradients (partition + reduce bucket)     {_g(bd.gradients)}",
        f"  optimizer state (master copy, Adam m, v)  {_g(bd.optimizer)}",
        f"  activations (one micro-batch, peak)       {_g(bd.activations)}",
    ]
    if inp.zero_stage == 3:
        lines.append(f"  ZeRO-3 gathered module (peak)             {_g(bd.zero3_gathered)}")
    lines.append(f"  optimizer step temporaries                {_g(bd.step_transient)}")
    lines.append(f"  = training step peak                      {_g(bd.train_peak)}")
    if bd.mask_peak:
        lines.append(f"  mask accumulator (fp32, 1/N of each W)    {_g(bd.mask_accumulator)}")
        lines.append(f"  = mask-collection step peak               {_g(bd.mask_peak)}")
    if bd.resample_peak:
        lines.append(f"  = resample peak (+ one gathered matrix)   {_g(bd.resample_peak)}")
        lines.append(f"    resample SVD, owner's host memory       {_g(bd.resample_host)}")
    if bd.overhead:
        lines.append(f"  CUDA context and workspaces              {_g(bd.overhead)}")
    lines.append(f"  PEAK per GPU                              {_g(bd.peak)}")
    lines += ["", "communication per GPU (bytes sent)                GB"]
    lines.append(f"  per optimizer step                        {bd.comm_step / 1e9:9.3f}")
    if bd.comm_mask_step:
        lines.append(f"  per mask-collection step                  {bd.comm_mask_step / 1e9:9.3f}")
    if inp.resample:
        lines.append(f"  per resample                              {bd.comm_resample / 1e9:9.3f}")
    lines += ["", f"compute per GPU per step                  {bd.flops_step / 1e12:9.3f} TFLOP"]
    if bd.step_seconds is not None:
        net = " + communication" if inp.bandwidth_gbs is not None else ""
        lines.append(f"  step time at {inp.tflops:g} TFLOP/s{net}: {bd.step_seconds:.3f} s")
    if bd.gpu_hours is not None:
        lines.append(f"  {inp.steps} steps: {bd.run_hours:.2f} h, {bd.gpu_hours:.1f} GPU-hours")
    if budget_gib:
        n = min_gpus(inp, budget_gib * GIB)
        where = (
            f"{n}"
            if n is not None
            else "none up to 65536 (the frozen weights do not shard below ZeRO-3)"
        )
        lines += ["", f"smallest GPU count that fits {budget_gib:g} GiB per GPU: {where}"]
    return "\n".join(lines)


def format_scaling(inp: PlanInputs, counts: list[int]) -> str:
    """One line per GPU count: the peak and the step's communication."""
    rows = [f"{'GPUs':>6} {'peak GiB':>9} {'frozen':>8} {'optim':>8} {'act':>8} {'step GB':>9}"]
    for n in counts:
        bd = plan(replace(inp, gpus=n))
        rows.append(
            f"{n:>6} {bd.peak / GIB:9.2f} {bd.frozen / GIB:8.2f} {bd.optimizer / GIB:8.2f} "
            f"{bd.activations / GIB:8.2f} {bd.comm_step / 1e9:9.2f}"
        )
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------
# run configs and the command line


def _resolve_targets(model: ModelShape, targets: list[str], exclude: list[str]) -> tuple[str, ...]:
    """The block linears a run config adapts (its patterns matched as ``inject`` does)."""

    def match(name: str, pattern: str) -> bool:
        return re.search(rf"(^|\.)(?:{pattern})$", name) is not None

    full = {n: f"model.layers.0.{'self_attn' if n in ATTN else 'mlp'}.{n}" for n in LINEARS}
    chosen = [
        n
        for n, path in full.items()
        if any(p == "all-linear" or match(path, p) for p in targets)
        and not any(match(path, p) for p in exclude)
    ]
    if not chosen:
        raise UserError(f"adapter.targets {targets} match none of {', '.join(LINEARS)}")
    return tuple(chosen)


def plan_precision(requested: str, device: str) -> tuple[str, str]:
    """``auto`` as a run would resolve it (``rosa_ds.precision``): the GPU planned for is taken
    to compute bf16 natively (Ampere and newer); on ``device=cpu`` this machine's CPU decides."""
    if requested != "auto":
        return requested, "set explicitly"
    if device == "gpu":
        return "bf16", (
            "auto: bf16, native on every GPU since Ampere (A100, H100); --precision fp32 "
            "for older GPUs"
        )
    from rosa_ds.precision import choose  # torch, for this CPU's oneDNN: only on device=cpu

    choice = choose("auto", "cpu")
    return choice.used, choice.reason


def whole_trained_elements(model: ModelShape, patterns: list[str]) -> int:
    """Elements of the modules ``adapter.train_modules`` selects among a Llama's embeddings,
    head and final norm (a tied head is the embedding: counted once)."""
    sizes = {"model.embed_tokens": model.vocab * model.hidden, "model.norm": model.hidden}
    sizes["lm_head"] = 0 if model.tied_embeddings else model.vocab * model.hidden
    chosen = [n for n in sizes if any(matches(n, p) for p in patterns)]
    if model.tied_embeddings and "lm_head" in chosen and "model.embed_tokens" not in chosen:
        chosen.append("model.embed_tokens")
    return sum(sizes[n] for n in set(chosen))


def inputs_from_config(
    cfg: Any, gpus: int = 1, seq_len: int | None = None, **kw: Any
) -> PlanInputs:
    """Plan inputs from a validated run config (``rosa_ds.config.RunConfig``)."""
    from rosa_ds.ds_config import read_ds_config, zero_stage

    name = cfg.model.name_or_path
    model = get_model(name)
    ds = read_ds_config(cfg.deepspeed.config)
    t, ad = cfg.train, cfg.adapter
    per_step = t.micro_batch_size * gpus
    values = dict(
        model=model,
        rank=ad.rank,
        density=ad.density,
        resample=ad.resample_every is not None,
        targets=_resolve_targets(model, ad.targets, ad.exclude),
        dropout=ad.dropout,
        precision=t.precision,
        quant=cfg.quant.bits,
        quant_block=cfg.quant.block_size,
        double_quant=cfg.quant.double_quant,
        quant_all_linear=cfg.quant.all_linear,
        zero_stage=zero_stage(ds),
        gpus=gpus,
        micro_batch=t.micro_batch_size,
        seq_len=seq_len or cfg.data.max_length,
        grad_accum=max(1, t.global_batch_size // per_step),
        checkpointing=cfg.model.gradient_checkpointing,
        mask_phase=ad.robust.mask_file is None,
        warmup_rank=ad.robust.warmup_rank,
        steps=t.max_steps,
        whole_trained=whole_trained_elements(model, ad.train_modules),
        # flash attention keeps what sdpa's memory-efficient kernels keep
        attention="eager" if cfg.model.attn_implementation == "eager" else "sdpa",
    )
    zero = ds.get("zero_optimization", {})
    for key, name in [("stage3_max_reuse_distance", "max_reuse_distance"),
                      ("reduce_bucket_size", "reduce_bucket"),
                      ("stage3_param_persistence_threshold", "persistence_threshold")]:  # fmt: skip
        if isinstance(zero.get(key), int | float) and not isinstance(zero.get(key), bool):
            values[name] = int(zero[key])
    values.update(kw)
    values["precision"], _ = plan_precision(values["precision"], values.get("device", "gpu"))
    return PlanInputs(**values)


def planned_peak_bytes(cfg: Any, world_size: int) -> float | None:
    """The plan's peak memory per rank for a run config whose precision is resolved, on this
    machine's kind of device; None where the planner cannot model the run's model."""
    import torch

    device = "gpu" if torch.cuda.is_available() else "cpu"
    try:
        return plan(inputs_from_config(cfg, gpus=world_size, device=device)).peak
    except (UserError, KeyError, ValueError, OSError):
        return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="a preset (" + ", ".join(PRESETS) + "), a config.json "
                   "or a model folder; default: the run config's model")  # fmt: skip
    p.add_argument("--config", "-c", help="take the method and layout from a run config")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the run config")
    p.add_argument("--rank", "-r", type=int, help="LoRA rank (default 16)")
    p.add_argument("--density", "-d", type=float, help="sparse density, e.g. 0.0015 (RoSA)")
    p.add_argument("--resample", action="store_true", default=None, help="ROSA resampling")
    p.add_argument("--targets", help="comma-separated: q_proj,k_proj,... (default all)")
    p.add_argument("--dropout", type=float, help="adapter dropout (default 0)")
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        help="default: the config's, else auto (bf16, native on Ampere and newer GPUs)",
    )
    p.add_argument("--quant", type=int, choices=[4, 16], help="frozen weights: 4 (NF4) or 16")
    p.add_argument("--no-double-quant", action="store_true", help="fp32 NF4 block scales")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], help="ZeRO stage (default 2)")
    p.add_argument("--gpus", "-n", type=int, default=1, help="number of GPUs (default 1)")
    p.add_argument("--micro-batch", "-b", type=int, help="sequences per GPU per pass (default 1)")
    p.add_argument("--seq", "-s", type=int, help="sequence length (default 512)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per step (default 1)")
    p.add_argument(
        "--checkpointing", action="store_true", default=None, help="activation checkpointing"
    )
    p.add_argument("--attention", choices=["sdpa", "eager"], help="default sdpa")
    p.add_argument("--optimizer", choices=["fp32", "param"], help="fp32 master + moments (default)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU for the search")
    p.add_argument("--overhead", type=float, help="GiB of CUDA context (default 0.5)")
    p.add_argument(
        "--tflops",
        type=float,
        help="achieved TFLOP/s per GPU (e.g. 40%% of the peak), for the step time and GPU-hours",
    )
    p.add_argument(
        "--bandwidth", type=float, help="GB/s each GPU sends at, to add communication time"
    )
    p.add_argument(
        "--steps",
        type=int,
        help="optimizer steps (default: the config's max_steps; with train.num_epochs, give "
        "the count the run logs at start)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run_plan(args: argparse.Namespace) -> int:
    if args.config:
        from rosa_ds.config import load_config

        cfg = load_config(args.config, args.overrides)
        inp = inputs_from_config(cfg, gpus=args.gpus)
        if args.model:
            inp = replace(inp, model=get_model(args.model))
    else:
        if args.overrides:
            raise UserError("key=value overrides need --config; use the plan's own flags")
        if not args.model:
            raise UserError("plan needs --model (a preset or a config.json) or --config")
        inp = PlanInputs(model=get_model(args.model), gpus=args.gpus)
    changes: dict[str, Any] = {}
    for flag, key in [("rank", "rank"), ("density", "density"), ("resample", "resample"),
                      ("dropout", "dropout"), ("precision", "precision"), ("quant", "quant"),
                      ("zero", "zero_stage"), ("micro_batch", "micro_batch"), ("seq", "seq_len"),
                      ("grad_accum", "grad_accum"), ("checkpointing", "checkpointing"),
                      ("attention", "attention"), ("optimizer", "optimizer"),
                      ("overhead", "overhead_gib"), ("tflops", "tflops"),
                      ("bandwidth", "bandwidth_gbs"), ("steps", "steps")]:  # fmt: skip
        value = getattr(args, flag)
        if value is not None:
            changes[key] = value
    if args.targets:
        changes["targets"] = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    if args.no_double_quant:
        changes["double_quant"] = False
    if "precision" in changes:
        changes["precision"], _ = plan_precision(changes["precision"], inp.device)
    inp = replace(inp, **changes)
    bd = plan(inp)
    if args.json:
        out = {"inputs": {**asdict(inp), "model": asdict(inp.model)}, "bytes": bd.to_dict()}
        out["min_gpus"] = min_gpus(inp, args.gpu_memory * GIB) if args.gpu_memory else None
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(inp, bd, args.gpu_memory))
    return 0
