"""Run configuration: typed fields with defaults and help, YAML loading, dotted overrides, validation.

A run config is a YAML file (or the name of one shipped in ``rosa_ds/configs``) plus
``key=value`` overrides on the command line, torchtune style. Every problem is a
:class:`UserError` naming the key and the fix; nothing here imports torch or DeepSpeed, so a bad
config costs a fraction of a second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rosa_ds.errors import UserError
from rosa_ds.preemption import SIGNAL_NAMES
from rosa_ds.tracking import TRACKERS

CONFIG_DIR = Path(__file__).parent / "configs"


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with help text (shown by ``rosa-ds train --help-config``)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    """The base model: where it is and how it is loaded."""

    name_or_path: str = _f(
        "builtin:tiny-llama",
        "A local folder, a hub id (online only), or builtin:tiny-llama / builtin:smollm2-135m-instruct.",
    )
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) for hub ids.")
    trust_remote_code: bool = _f(False, "Allow model code from the hub; off unless you trust it.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    new_special_tokens: list[str] = _f(
        [],
        "Special tokens added to the tokenizer (for example a chat template's markers that a "
        "base model lacks); the embeddings grow to hold them, new rows starting at the mean "
        "of the old ones, and need training: list embed_tokens (and lm_head, unless tied) in "
        "adapter.train_modules.",
    )
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = _f(
        "auto",
        "Attention kernel: eager, sdpa or flash_attention_2 (a CUDA GPU and the flash-attn "
        "package); auto: transformers' default (sdpa where the model supports it).",
    )
    hub_kernels: bool = _f(
        False,
        "Let transformers (5.x) swap layers for kernels fetched from the Hugging Face Hub. Off: "
        "they need the hub at run time (offline, a CUDA run stops at the first train()) and a "
        "swapped layer's forward is not the one the adapters and the planner were built for.",
    )

    def load_kwargs(self) -> dict[str, str]:
        """What ``from_pretrained`` / ``from_config`` get for the attention kernel."""
        return (
            {}
            if self.attn_implementation == "auto"
            else {"attn_implementation": self.attn_implementation}
        )

    def pretrained_kwargs(self) -> dict[str, Any]:
        """``load_kwargs`` plus hub kernels on or off, for ``from_pretrained`` of a transformers
        that has them (5.x turns them on unless told)."""
        from transformers import PreTrainedModel

        kwargs: dict[str, Any] = dict(self.load_kwargs())
        if hasattr(PreTrainedModel, "set_use_kernels"):
            kwargs["use_kernels"] = self.hub_kernels
        elif self.hub_kernels:
            raise UserError(
                "model.hub_kernels=true needs a transformers with hub kernels (5.x); "
                "upgrade transformers or set model.hub_kernels=false"
            )
        return kwargs


# The sparse values' peak learning rate relative to train.lr when adapter.robust.sparse_lr is
# unset: the reference's LLaMA2-7B GSM8K runs (2e-4 / 7e-4).
SPARSE_LR_RATIO = 2 / 7


@dataclass
class RobustConfig:
    """Robust adaptation (RoSA): how the sparse masks are chosen."""

    mask_warmup_steps: int = _f(64, "Optimizer steps of LoRA alone before gradients are collected.")
    mask_grad_steps: int = _f(
        1, "Optimizer steps (all their micro-batches) whose frozen-weight gradients are summed."
    )
    grad_stat: Literal["mean_squared", "per_sample_squared", "mean"] = _f(
        "mean_squared",
        "mean_squared: accumulate G*G of each micro-batch's gradient G (a diagonal Fisher; the "
        "reference's statistic at micro-batch 1); per_sample_squared: square each sequence's "
        "share of G before summing (the reference's per-sample squares at any micro-batch); "
        "mean: accumulate G.",
    )
    after_mask: Literal["restart", "continue"] = _f(
        "restart",
        "restart: the reference's second pass (LoRA re-initialized, training from step 0 with the "
        "mask fixed); continue: one pass, the mask joins the running training.",
    )
    budget: Literal["uniform", "gradient_mass"] = _f(
        "uniform",
        "uniform: k = round(density * numel) per matrix; gradient_mass: the same total budget "
        "spread across matrices in proportion to their accumulated gradient mass.",
    )
    density_patterns: dict[str, float] = _f(
        {}, "Per-module densities: {regex: density}, first match wins, else adapter.density."
    )
    warmup_rank: int = _f(
        8,
        "LoRA rank of the warm-up pass when adapter.rank is 0 (sparse-only): the masks need a "
        "short warm-up, whose LoRA is then discarded.",
    )
    mask_file: str | None = _f(
        None, "Load the masks from this file (written by an earlier run) instead of building them."
    )
    sparse_lr: float | None = _f(
        None,
        "Peak learning rate of the sparse values, on the same schedule as train.lr; unset: "
        "2/7 of train.lr, the reference's LLaMA2-7B GSM8K ratio (2e-4 against LoRA's 7e-4), "
        "which beat train.lr itself by 0.08 exact match at every seed in the README's study.",
    )


@dataclass
class SubspaceConfig:
    """Subspace adaptation (ROSA): how the low-rank adapter is resampled."""

    unit: Literal["steps", "epochs"] = _f(
        "steps", "adapter.resample_every counts optimizer steps or epochs."
    )
    sampling: Literal["random_block", "random_subset", "top", "bottom"] = _f(
        "random_block",
        "Which r singular triplets become the new adapter: a contiguous block at a random offset "
        "(the reference code), a uniform random subset (the paper's wording), the top or bottom.",
    )
    split: Literal["balanced", "one_sided"] = _f(
        "balanced",
        "balanced: sqrt of the singular values on each factor; one_sided: all on B (reference).",
    )
    at_start: bool = _f(True, "Factorize once before training, as the reference does.")
    rewarm_steps: int = _f(
        0, "Linear learning-rate re-warm-up over this many steps after each resample (ReLoRA)."
    )


# Every method by its one name, with the name papers and tables give it. The method follows from
# the adapter keys (adapter.method=auto) or is named, and then checked against them.
METHODS = {
    "lora": "LoRA",
    "sparse": "SpA",
    "robust": "RoSA",
    "subspace": "ROSA",
    "hybrid": "RoSA+ROSA",
    "full": "full fine-tuning",
}
METHOD_NEEDS = {
    "lora": "adapter.rank > 0, adapter.density=0 and no adapter.resample_every",
    "sparse": "adapter.rank=0, adapter.density > 0 and no adapter.resample_every",
    "robust": "adapter.rank > 0, adapter.density > 0 and no adapter.resample_every",
    "subspace": "adapter.rank > 0, adapter.density=0 and adapter.resample_every set",
    "hybrid": "adapter.rank > 0, adapter.density > 0 and adapter.resample_every set",
    "full": "adapter.density=0, no adapter.resample_every and quant.bits=16",
}


@dataclass
class AdapterConfig:
    """Which layers are adapted, by which method, with which low-rank and sparse parts."""

    method: Literal["auto", "lora", "sparse", "robust", "subspace", "hybrid", "full"] = _f(
        "auto",
        "lora, sparse (SpA), robust (RoSA: low-rank plus sparse), subspace (ROSA: resampled "
        "low-rank), hybrid (RoSA+ROSA) or full (the targeted weights themselves trained); "
        "auto: from adapter.rank, adapter.density and adapter.resample_every.",
    )
    rank: int = _f(8, "LoRA rank r (>= 0; 0 with density > 0 is sparse-only, SpA).")
    alpha: float = _f(16.0, "LoRA scale numerator: the update is (alpha / rank) * B A.")
    dropout: float = _f(0.0, "Dropout on the adapter's input, in [0, 1).")
    targets: list[str] = _f(
        ["all-linear"],
        "Module name patterns to adapt: 'all-linear' (every nn.Linear but lm_head) or regexes "
        "matched against the end of the dotted module name, e.g. [q_proj, v_proj].",
    )
    exclude: list[str] = _f(["lm_head"], "Module name patterns never adapted.")
    train_modules: list[str] = _f(
        [],
        "Modules trained whole beside the adapter (PEFT's modules_to_save), by name pattern as "
        "targets: e.g. [embed_tokens, lm_head] for chat SFT of a base model; saved in the "
        "adapter, merged by export, kept in PEFT's modules_to_save.",
    )
    init_seed: int | None = _f(None, "Seed of the adapter initialization (default: the run seed).")
    density: float = _f(
        0.0, "Robust adaptation: fraction of each adapted weight in the sparse part, in [0, 1)."
    )
    robust: RobustConfig = field(default_factory=RobustConfig)
    sparse_kernel: Literal["auto", "torch", "triton"] = _f(
        "auto",
        "Sparse kernels: auto (Triton on CUDA tensors, torch CSR kernels otherwise), or "
        "force one (triton on CPU tensors needs TRITON_INTERPRET=1; for testing).",
    )
    sparse_path: Literal["auto", "spmm", "add"] = _f(
        "auto",
        "How the sparse part runs: spmm (a separate sparse product), add (merge S into W "
        "for one GEMM: in place where the rank holds W whole, into a dense copy under "
        "ZeRO-3; the reference's default) or auto (in place where it can, else by cost).",
    )
    resample_every: int | None = _f(
        None,
        "Subspace adaptation: merge, factorize and resample the low-rank adapter every N "
        "optimizer steps (or epochs, see adapter.subspace.unit); unset: never.",
    )
    subspace: SubspaceConfig = field(default_factory=SubspaceConfig)

    @property
    def resampling(self) -> bool:
        return self.resample_every is not None

    @property
    def method_name(self) -> str:
        """The method these keys give (``adapter.method``, or what ``auto`` derives)."""
        if self.method != "auto":
            return self.method
        return implied_method(self)

    @property
    def sparse(self) -> bool:
        return self.density > 0 or any(d > 0 for d in self.robust.density_patterns.values())


def implied_method(a: AdapterConfig) -> str:
    """The method the rank, density and resampling keys describe."""
    if a.resampling:
        return "hybrid" if a.sparse else "subspace"
    if a.sparse:
        return "robust" if a.rank else "sparse"
    return "lora"


@dataclass
class QuantConfig:
    """4-bit frozen weights (QLoRA-style), through bitsandbytes' functional API."""

    bits: int = _f(16, "16: frozen weights in the training dtype; 4: quantized to 4 bits.")
    type: Literal["nf4", "fp4"] = _f("nf4", "4-bit data type: nf4 (NormalFloat, QLoRA) or fp4.")
    block_size: int = _f(64, "Weights per quantization block (one absmax scale each).")
    double_quant: bool = _f(
        True, "Quantize the block scales too (8-bit, QLoRA's double quantization)."
    )
    compute_dtype: Literal["auto", "bf16", "fp32"] = _f(
        "auto",
        "Dtype the weight is dequantized to for the matmuls; auto: the run's precision "
        "(train.precision, after its own auto is resolved).",
    )
    all_linear: bool = _f(
        False,
        "Also quantize the linear layers that are not adapted (all but the output head); "
        "default: only the adapted layers' frozen weights.",
    )

    @property
    def enabled(self) -> bool:
        return self.bits == 4


CHAT_TEMPLATE_NAMES = ("chatml",)  # templates data.chat_template may name (data/tokenize.py)
DATA_FORMATS = ("prompt_response", "gsm8k", "sql_context", "alpaca", "messages", "text")


@dataclass
class DatasetSource:
    """One dataset of a mix (``data.datasets``): where it is, its share of the training
    examples, and how it is read; unset keys take the data section's value."""

    path: str = _f("", "A generator, a local file or folder, or a hub id (as data.dataset).")
    weight: float = _f(
        1.0,
        "Share of the mixed training examples, relative to the other entries' weights; the mix "
        "holds as many examples as its sources together, so a source whose share exceeds its "
        "size repeats (seeded), one below it is a seeded subset.",
    )
    format: Literal["auto", *DATA_FORMATS] | None = _f(None, "As data.format, for this source.")
    columns: dict[str, str] | None = _f(None, "As data.columns, for this source.")
    subset: str | None = _f(None, "As data.subset.")
    train_split: str | None = _f(None, "As data.train_split.")
    eval_split: str | None = _f(None, "As data.eval_split.")
    eval_fraction: float | None = _f(None, "As data.eval_fraction.")
    num_train: int | None = _f(None, "As data.num_train (generators).")
    num_eval: int | None = _f(None, "As data.num_eval (generators).")
    difficulty: int | None = _f(None, "As data.difficulty (multistep).")


@dataclass
class DataConfig:
    """The dataset, its schema and metric, and how examples become sequences."""

    dataset: str = _f(
        "arithmetic",
        "A bundled generator (arithmetic, multistep, sql), a local .json/.jsonl/.parquet file "
        "or folder, or a hub dataset id (online only).",
    )
    format: Literal["auto", *DATA_FORMATS] = _f(
        "auto",
        "Schema of the records: prompt_response (prompt, response), gsm8k (question, answer with "
        "'#### N'), sql_context (question, context, answer), alpaca (instruction, input, "
        "output), messages (OpenAI messages or ShareGPT conversations: every assistant turn "
        "trained), text (every token trained). auto: detected from the fields, and logged.",
    )
    columns: dict[str, str] = _f(
        {}, "Rename fields before the format reads them: {source_field: format_field}."
    )
    datasets: list[DatasetSource] = _f(
        [],
        "Several datasets mixed by weight, replacing data.dataset: a list of {path, weight, "
        "format, columns, ...} (keys under data.datasets[]); held-out examples of every source "
        "are evaluated together, scored by the metric they share (else loss only).",
    )
    train_on_inputs: bool = _f(
        False, "Train on every token (prompts, user and system turns too), not the answers only."
    )
    metric: Literal["auto", "number_match", "sql_execution", "none"] = _f(
        "auto", "Task metric by generation; auto: from the format."
    )
    subset: str | None = _f(None, "Dataset configuration on the hub, e.g. main for openai/gsm8k.")
    train_split: str = _f("train", "Split used for training (hub datasets).")
    eval_split: str | None = _f(
        "test",
        "Split for evaluation; if missing, eval_fraction of train is held out. The generators "
        "have two: test and validation (disjoint from each other and from train).",
    )
    eval_fraction: float = _f(0.05, "Held-out fraction when the dataset has no eval split.")
    num_train: int = _f(2000, "Number of generated training examples (generators only).")
    num_eval: int = _f(64, "Number of generated evaluation examples (generators only).")
    difficulty: int = _f(
        4, "Operations per problem of the multistep generator (1 to 12; other data ignore it)."
    )
    max_length: int = _f(256, "Longest tokenized example; longer ones are truncated.")
    packing: bool = _f(False, "Pack several examples into each sequence instead of padding.")
    chat_template: bool | str = _f(
        True,
        "true: the tokenizer's chat template when it has one; false: a plain ### Question / "
        "### Answer template; or a template for models without one: chatml or a Jinja string.",
    )
    cache: bool = _f(
        True,
        "Tokenize once: keep the tokenized (and packed) splits under a hash of the data, the "
        "tokenizer and these settings, shared by every rank, resume and later runs (rosa-ds "
        "prepare fills it ahead of a job); false: tokenize in memory on every start.",
    )
    cache_dir: str | None = _f(
        None,
        "Where the tokenized data is kept; unset: tokenized/ in $ROSA_DS_CACHE, else in "
        "~/.cache/rosa-ds.",
    )
    num_proc: int = _f(
        0, "Processes that tokenize (datasets.map); 0: one per 2000 records, at most 8."
    )
    seed: int = _f(1234, "Seed of the generators and of the held-out split.")


@dataclass
class TrainConfig:
    """Optimizer steps, batches, the schedule, precision, checkpoints and logging."""

    max_steps: int = _f(100, "Optimizer steps to run (> 0); train.num_epochs, when set, decides.")
    num_epochs: float | None = _f(
        None,
        "Passes over the training data instead of max_steps: max_steps becomes ceil(num_epochs "
        "x sequences / global_batch_size) once the data is tokenized (and packed), logged at "
        "start and kept in config.yaml; fractions are allowed (0.5: half an epoch).",
    )
    micro_batch_size: int = _f(2, "Sequences per rank per forward pass.")
    global_batch_size: int = _f(
        8, "Sequences per optimizer step over all ranks; gradient accumulation fills the gap."
    )
    lr: float = _f(2e-4, "Peak learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas.")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = _f(
        "cosine",
        "Decay after the warm-up: cosine or linear to zero at max_steps; constant (as in "
        "transformers, without warm-up) or constant_with_warmup.",
    )
    warmup_steps: int = _f(10, "Linear warm-up steps.")
    warmup_ratio: float | None = _f(
        None,
        "Warm-up as a fraction of the schedule's steps (rounded up), instead of warmup_steps; "
        "in [0, 1).",
    )
    grad_clip: float = _f(1.0, "Gradient norm clipping; 0 turns it off.")
    precision: Literal["auto", "bf16", "fp32"] = _f(
        "auto",
        "Compute and frozen-weight precision. auto: bf16 where the device computes it natively "
        "(CUDA with bf16; a CPU with avx512_bf16 or amx_bf16), else fp32; the choice is printed "
        "at start and kept in config.yaml and summary.json.",
    )
    eval_every: int = _f(0, "Held-out loss every N steps (0: only before and after training).")
    save_every: int = _f(0, "Checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = _f(2, "How many of the newest checkpoints to keep (>= 1).")
    log_every: int = _f(1, "Log metrics every N steps.")
    max_bad_steps: int = _f(
        3,
        "Optimizer steps in a row with a non-finite loss or gradient that are skipped (no "
        "update) before the run stops with an error; 0 stops at the first.",
    )
    peak_tflops: float | None = _f(
        None,
        "Peak dense TFLOP/s of one device at the run's precision, for MFU; unset: from a table "
        "of GPUs (H100, H200, A100, L40S, A10G, L4), and no MFU on a CPU.",
    )
    trackers: list[str] = _f(
        ["tensorboard"],
        "Where metrics go besides metrics.jsonl (always written): tensorboard, wandb, mlflow "
        "(W&B and MLflow through accelerate's trackers; pip install wandb / mlflow-skinny). "
        "W&B and MLflow read their usual environment (WANDB_MODE, WANDB_API_KEY, "
        "MLFLOW_TRACKING_URI; without it MLflow writes to output_dir/mlruns).",
    )
    project: str = _f(
        "rosa-ds", "W&B project and MLflow experiment; the run's name is output_dir's."
    )
    stop_signals: list[str] = _f(
        ["SIGTERM", "SIGUSR1"],
        "Signals that stop the run cleanly: every rank finishes the optimizer step, writes a "
        "checkpoint and exits with code 75 (SLURM sends SIGTERM at preemption and at the time "
        "limit; sbatch --signal=USR1@180 asks for a warning before it). Any of SIGTERM, SIGUSR1, "
        "SIGUSR2, SIGINT, SIGHUP; [] leaves signals alone.",
    )
    stop_timeout: float = _f(
        25.0,
        "Seconds from a stop signal to exit at most: a stop checkpoint not written by then is "
        "abandoned (the previous one stays latest). Keep it under the scheduler's grace period "
        "(SLURM KillWait, 30 s by default) or the --signal warning time; 0: no limit.",
    )
    auto_resume: bool = _f(
        False,
        "Continue from output_dir's latest checkpoint when it holds one (as --resume), else "
        "start; for jobs that are requeued after preemption.",
    )


@dataclass
class EvalConfig:
    """Held-out loss and the generated task metric."""

    before_training: bool = _f(True, "Measure the task metric before training too.")
    num_generate: int = _f(32, "Held-out examples scored by generation (0: skip the task metric).")
    max_new_tokens: int = _f(48, "Generation length for the task metric.")
    batch_size: int = _f(8, "Sequences per generation batch per rank.")
    max_loss_examples: int = _f(
        64, "Held-out examples for the loss, the same set at any world size (0: all)."
    )


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed JSON, the communication backend and the failure timeouts."""

    config: str = _f(
        "zero2",
        "A JSON in ds_configs/ by name (zero2, zero3, zero3_offload) or a path.",
    )
    backend: Literal["auto", "nccl", "gloo", "ccl", "mpi"] = _f(
        "auto", "Communication backend; auto: nccl on CUDA, gloo on CPU."
    )
    heartbeat_timeout: float = _f(
        30.0,
        "Seconds without a heartbeat after which a rank counts as lost and every rank exits "
        "with an error naming it (0 turns the watchdog off).",
    )
    comm_timeout_minutes: float = _f(
        30.0, "Timeout of a single collective (the process group's), the last line of defence."
    )


@dataclass
class RunConfig:
    """A whole run: one YAML file plus overrides, validated before anything starts."""

    name: str = _f("run", "Name of the run (used in logs).")
    output_dir: str = _f("runs/run", "Where checkpoints, metrics and the adapter go.")
    seed: int = _f(42, "Seed of model, adapter, data order and dropout.")
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# loading


def named_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    if not name_or_path.strip():
        raise UserError(
            f"--config is empty; give a YAML path or one of: {', '.join(named_configs())}"
        )
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".json") or path.exists() or "/" in name_or_path:
        if path.is_dir():
            raise UserError(
                f"config {name_or_path} is a folder, not a file; give a YAML file (e.g. "
                f"{Path(name_or_path) / 'config.yaml'}) or one of: {', '.join(named_configs())}"
            )
        if path.exists() and not path.is_file():
            raise UserError(f"config {name_or_path} is not a regular file; give a YAML file")
        if not path.exists():
            raise UserError(
                f"config file {name_or_path} not found; give a YAML path or one of: "
                f"{', '.join(named_configs())}"
            )
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise UserError(
            f"unknown config {name_or_path!r}; give a YAML path or one of: "
            f"{', '.join(named_configs())}"
        )
    return shipped


DEEPSPEED_KEYS = {"train_batch_size", "train_micro_batch_size_per_gpu", "zero_optimization"}


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping a config file holds; anything else (binary, empty, a list, a DeepSpeed JSON)
    is a UserError, so a wrong file never runs on the defaults."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(
            f"config {path} is not UTF-8 text (a binary file?); give a YAML run config"
        ) from None
    except OSError as exc:
        raise UserError(f"config {path} cannot be read ({exc.strerror}); check the path") from None
    if "\x00" in text:
        raise UserError(f"config {path} is a binary file, not YAML; give a YAML run config")
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(
            f"config {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}; fix the syntax"
        ) from None
    if loaded is None:
        raise UserError(
            f"config {path} is empty (no keys); write the keys to set, e.g. a copy of "
            f"{CONFIG_DIR / 'tiny-lora.yaml'}, or start from a named config with --config tiny-lora"
        )
    if not isinstance(loaded, dict):
        raise UserError(
            f"config {path} must be a mapping of keys to values, not a {type(loaded).__name__}"
        )
    if DEEPSPEED_KEYS & set(loaded):
        raise UserError(
            f"config {path} is a DeepSpeed config, not a rosa-ds run config; pass it as "
            f"deepspeed.config={path}"
        )
    return loaded


def load_config(name_or_path: str | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or start from defaults), apply ``key=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    if name_or_path is not None:
        raw = read_config_file(resolve_config_path(name_or_path))
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    cfg = _build(RunConfig, raw, prefix="")
    validate(cfg)
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item or item.startswith("="):
        raise UserError(f"override {item!r} must look like key=value, e.g. train.max_steps=20")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, typ in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(typ):
            keys += _all_keys(typ, prefix + name + ".")
        else:
            keys.append(prefix + name)
    return keys


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise UserError(f"{where} must be a section (a mapping of keys), got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            full = prefix + str(key)
            close = difflib.get_close_matches(full, _all_keys(RunConfig), n=1, cutoff=0.6)
            hint = (
                f"; did you mean {close[0]}?"
                if close
                else f"; known keys in {where}: " + ", ".join(sorted(known))
            )
            raise UserError(f"unknown config key {full}{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            kwargs[f.name] = _build(typ, raw[f.name] or {}, prefix + f.name + ".")
        else:
            kwargs[f.name] = _coerce(raw[f.name], typ, prefix + f.name)
    return cls(**kwargs)


def _type_name(typ: Any) -> str:
    if typing.get_origin(typ) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(typ))
    return getattr(typ, "__name__", str(typ))


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check ``value`` against the annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for option in inner:  # the first type that takes the value (bool | str: true, chatml)
            try:
                return _coerce(value, option, key)
            except UserError as exc:
                errors.append(exc)
        raise (
            errors[0]
            if len(inner) == 1
            else UserError(f"{key} must be {_type_name(typ)}, got {value!r}")
        )
    if dataclasses.is_dataclass(typ):  # an entry of a list of sections (data.datasets)
        if not isinstance(value, dict):
            raise UserError(f"{key} must be a mapping, got {value!r}")
        return _build(typ, value, key + ".")
    if origin is Literal:
        if value not in args:
            raise UserError(f"{key} must be {_type_name(typ)}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key} must be a mapping, got {value!r}; e.g. {key}={{q_proj: 0.01}}")
        return {
            _coerce(k, args[0], key): _coerce(v, args[1], f"{key}[{k}]") for k, v in value.items()
        }
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise UserError(f"{key} must be a list, got {value!r}; e.g. {key}=[a,b]")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if typ is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key} must be true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key} must be an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)  # YAML reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"{key} must be a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise UserError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {typ} for {key}")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise UserError(message)


def validate(cfg: RunConfig) -> None:
    """Reject impossible values with a message that says what to set instead."""
    for check in (
        _check_method,
        _check_adapter,
        _check_robust,
        _check_train,
        _check_data_eval,
        _check_quant_deepspeed,
    ):
        check(cfg)


def _check_method(cfg: RunConfig) -> None:
    """The output folder, and a named method against the keys that describe it."""
    a = cfg.adapter
    _require(bool(cfg.output_dir.strip()), "output_dir must not be empty; set output_dir=runs/NAME")
    if a.method == "full":
        _require(
            not a.sparse and not a.resampling and not cfg.quant.enabled,
            f"adapter.method=full needs {METHOD_NEEDS['full']} (4-bit weights cannot be "
            "trained); drop the other methods' keys or choose another adapter.method",
        )
    elif a.method != "auto":
        _require(
            implied_method(a) == a.method,
            f"adapter.method={a.method} needs {METHOD_NEEDS[a.method]}, but the keys describe "
            f"{implied_method(a)}; fix them or set adapter.method=auto",
        )


def _check_adapter(cfg: RunConfig) -> None:
    """The low-rank part, the sparse densities, resampling, the targets."""
    a = cfg.adapter
    _require(a.rank >= 0, f"adapter.rank must be >= 0, got {a.rank}; e.g. adapter.rank=8")
    _require(0 <= a.density < 1, f"adapter.density must be in [0, 1), got {a.density}")
    for pattern, dens in a.robust.density_patterns.items():
        _require(
            0 <= dens < 1,
            f"adapter.robust.density_patterns[{pattern}] must be in [0, 1), got {dens}",
        )
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UserError(
                f"adapter.robust.density_patterns key {pattern!r} is not a valid regular "
                f"expression ({exc}); escape special characters, e.g. 'mlp\\.down_proj'"
            ) from None
    _require(
        a.rank > 0 or a.sparse or a.method == "full",
        f"adapter.rank must be > 0 unless adapter.density > 0 "
        f"(sparse-only), got rank {a.rank}; e.g. adapter.rank=8",
    )
    if a.resample_every is not None:
        _require(
            a.resample_every > 0,
            f"adapter.resample_every must be > 0, got "
            f"{a.resample_every}; leave it unset to never resample",
        )
        _require(
            a.rank > 0,
            "adapter.resample_every needs adapter.rank > 0 (it resamples the low-rank adapter)",
        )
        _require(a.subspace.rewarm_steps >= 0, "adapter.subspace.rewarm_steps must be >= 0")
    _require(a.alpha > 0, f"adapter.alpha must be > 0, got {a.alpha}; e.g. adapter.alpha=16")
    _require(0 <= a.dropout < 1, f"adapter.dropout must be in [0, 1), got {a.dropout}")
    _require(len(a.targets) > 0, "adapter.targets must name at least one module pattern")
    _require(
        a.method_name != "full" or not a.train_modules,
        "adapter.train_modules is for adapters; with adapter.method=full add the modules to "
        "adapter.targets",
    )
    tokens = cfg.model.new_special_tokens
    _require(
        all(t.strip() for t in tokens) and len(set(tokens)) == len(tokens),
        f"model.new_special_tokens must be distinct, non-empty strings, got {tokens}",
    )
    _require(
        not tokens or a.train_modules,
        "model.new_special_tokens need trained embeddings: set adapter.train_modules="
        "[embed_tokens, lm_head] (lm_head is the embedding itself in tied models)",
    )


def _check_robust(cfg: RunConfig) -> None:
    """How robust adaptation chooses its masks."""
    a = cfg.adapter
    r = a.robust
    _require(r.mask_warmup_steps >= 0, "adapter.robust.mask_warmup_steps must be >= 0")
    _require(
        r.sparse_lr is None or r.sparse_lr > 0,
        f"adapter.robust.sparse_lr must be > 0 (unset: 2/7 of train.lr), got {r.sparse_lr}; "
        "e.g. adapter.robust.sparse_lr=2e-4",
    )
    _require(r.mask_grad_steps >= 1, "adapter.robust.mask_grad_steps must be >= 1")
    if a.sparse and a.rank == 0 and r.mask_file is None:
        _require(
            r.after_mask == "restart",
            "adapter.robust.after_mask=continue needs "
            "adapter.rank > 0 (a sparse-only run discards its warm-up LoRA); use restart",
        )
        _require(r.warmup_rank > 0, "adapter.robust.warmup_rank must be > 0")
    if a.sparse and r.mask_file is None and r.after_mask == "continue":
        # restart: the warm-up is a pass of its own and max_steps counts the main pass alone
        _require(
            r.mask_warmup_steps + r.mask_grad_steps <= cfg.train.max_steps,
            f"adapter.robust.mask_warmup_steps + mask_grad_steps ({r.mask_warmup_steps} + "
            f"{r.mask_grad_steps}) is longer than the run (train.max_steps="
            f"{cfg.train.max_steps}), which after_mask=continue counts them in; shorten the "
            "warm-up, train longer or use adapter.robust.after_mask=restart",
        )


def _check_train(cfg: RunConfig) -> None:
    """Steps, batches, the optimizer, the schedule, checkpoints and logging."""
    t = cfg.train
    _require(t.max_steps > 0, f"train.max_steps must be > 0, got {t.max_steps}")
    _require(
        t.micro_batch_size > 0, f"train.micro_batch_size must be > 0, got {t.micro_batch_size}"
    )
    _require(
        t.global_batch_size % t.micro_batch_size == 0 and t.global_batch_size > 0,
        f"train.global_batch_size ({t.global_batch_size}) must be a positive multiple of "
        f"train.micro_batch_size ({t.micro_batch_size})",
    )
    _require(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    _require(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    _require(
        len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas),
        f"train.betas must be two numbers in [0, 1), got {t.betas}",
    )
    _require(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    _require(
        t.warmup_ratio is None or 0 <= t.warmup_ratio < 1,
        f"train.warmup_ratio must be in [0, 1) or unset, got {t.warmup_ratio}",
    )
    _require(
        t.num_epochs is None or t.num_epochs > 0,
        f"train.num_epochs must be > 0 or unset (then train.max_steps counts), got {t.num_epochs}",
    )
    _require(t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 turns it off), got {t.grad_clip}")
    for k in ("eval_every", "save_every"):
        _require(getattr(t, k) >= 0, f"train.{k} must be >= 0, got {getattr(t, k)}")
    _require(t.log_every > 0, f"train.log_every must be > 0, got {t.log_every}")
    _require(
        t.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}"
    )
    _require(t.max_bad_steps >= 0, f"train.max_bad_steps must be >= 0, got {t.max_bad_steps}")
    _require(
        t.peak_tflops is None or t.peak_tflops > 0,
        f"train.peak_tflops must be > 0 or unset, got {t.peak_tflops}",
    )
    bad = [name for name in t.trackers if name not in TRACKERS]
    _require(not bad, f"train.trackers: {bad} unknown; use any of {list(TRACKERS)}")
    unknown = [s for s in t.stop_signals if s not in SIGNAL_NAMES]
    _require(
        not unknown,
        f"train.stop_signals: {unknown} are not stop signals; use any of {list(SIGNAL_NAMES)}",
    )
    _require(
        t.stop_timeout >= 0, f"train.stop_timeout must be >= 0 (0: no limit), got {t.stop_timeout}"
    )


def _check_data_eval(cfg: RunConfig) -> None:
    """The data and the evaluation."""
    d, e = cfg.data, cfg.eval
    _require(d.max_length >= 8, f"data.max_length must be >= 8, got {d.max_length}")
    _require(
        0 < d.eval_fraction < 1, f"data.eval_fraction must be in (0, 1), got {d.eval_fraction}"
    )
    _require(d.num_train > 0 and d.num_eval > 0, "data.num_train and data.num_eval must be > 0")
    _require(
        not isinstance(d.chat_template, str)
        or d.chat_template in CHAT_TEMPLATE_NAMES
        or "{" in d.chat_template,
        f"data.chat_template must be true, false, {', '.join(CHAT_TEMPLATE_NAMES)} or a Jinja "
        f"template, got {d.chat_template!r}",
    )
    _require(
        all(isinstance(k, str) and isinstance(v, str) and v for k, v in d.columns.items()),
        f"data.columns must map field names to field names, e.g. {{question: prompt}}; got "
        f"{d.columns!r}",
    )
    _require(
        d.num_proc >= 0, f"data.num_proc must be >= 0 (0: by the data's size), got {d.num_proc}"
    )
    for i, src in enumerate(d.datasets):
        where = f"data.datasets[{i}]"
        _require(bool(src.path), f"{where} needs a path (a file, folder, hub id or generator)")
        _require(src.weight > 0, f"{where}.weight must be > 0, got {src.weight}")
        _require(
            src.eval_fraction is None or 0 < src.eval_fraction < 1,
            f"{where}.eval_fraction must be in (0, 1), got {src.eval_fraction}",
        )
        for k in ("num_train", "num_eval"):
            n = getattr(src, k)
            _require(n is None or n > 0, f"{where}.{k} must be > 0, got {n}")
        _require(
            src.difficulty is None or 1 <= src.difficulty <= 12,
            f"{where}.difficulty must be from 1 to 12 operations, got {src.difficulty}",
        )
    _require(
        1 <= d.difficulty <= 12,
        f"data.difficulty must be from 1 to 12 operations, got {d.difficulty}; e.g. data.difficulty=4",
    )
    _require(
        e.num_generate >= 0 and e.max_new_tokens > 0 and e.batch_size > 0,
        "eval.num_generate must be >= 0, eval.max_new_tokens and eval.batch_size > 0",
    )
    _require(e.max_loss_examples >= 0, "eval.max_loss_examples must be >= 0")


def _check_quant_deepspeed(cfg: RunConfig) -> None:
    """4-bit settings and the DeepSpeed timeouts."""
    q = cfg.quant
    _require(q.bits in (4, 16), f"quant.bits must be 16 or 4, got {q.bits}; e.g. quant.bits=4")
    _require(
        q.block_size in (32, 64, 128, 256, 512, 1024, 2048, 4096),
        f"quant.block_size must be a power of two from 32 to 4096, got {q.block_size}; "
        "e.g. quant.block_size=64",
    )
    ds = cfg.deepspeed
    _require(
        ds.heartbeat_timeout >= 0,
        f"deepspeed.heartbeat_timeout must be >= 0 (0: off), got {ds.heartbeat_timeout}",
    )
    _require(
        ds.comm_timeout_minutes > 0,
        f"deepspeed.comm_timeout_minutes must be > 0, got {ds.comm_timeout_minutes}",
    )


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_help() -> str:
    """Every key with its default and help, for ``rosa-ds train --help-config``."""
    lines = []

    def walk(obj: Any, prefix: str) -> None:
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, prefix + f.name + ".")
                continue
            lines.append(
                f"{prefix + f.name} = {value!r}  [{_type_name(hints[f.name])}]"
                f"\n    {f.metadata.get('help', '')}"
            )
            entry = typing.get_args(hints[f.name])
            if typing.get_origin(hints[f.name]) is list and dataclasses.is_dataclass(entry[0]):
                walk(entry[0](), prefix + f.name + "[].")

    walk(RunConfig(), "")
    return "\n".join(lines)
