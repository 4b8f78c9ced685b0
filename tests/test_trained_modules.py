"""adapter.train_modules and model.new_special_tokens: which modules train whole, a tied head
counted once, new embedding rows at the old mean, and bad keys as one line (the end-to-end
contract, ZeRO-3 included, is the lora-vocab-zero3 row of tests/test_methods.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rosa_ds.adapters.inject import inject_adapters
from rosa_ds.adapters.trained_modules import grow_vocabulary, trained_params
from rosa_ds.config import AdapterConfig, ModelConfig, load_config
from rosa_ds.errors import UserError
from rosa_ds.model import load_tokenizer
from rosa_ds.plan import get_model, whole_trained_elements


def _model(path: str, tied: bool = False):
    config = AutoConfig.from_pretrained(path)
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def test_train_modules_train_whole_and_the_rest_stays_frozen(tiny_model_path):
    model = _model(tiny_model_path)
    inject_adapters(model, AdapterConfig(rank=2, train_modules=["embed_tokens", "lm_head"]))
    whole = trained_params(model)
    assert sorted(whole) == ["lm_head.weight", "model.embed_tokens.weight"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    assert trainable == lora | set(whole) and lora


def test_a_tied_head_is_one_tensor_trained_once(tiny_model_path):
    model = _model(tiny_model_path, tied=True)
    inject_adapters(model, AdapterConfig(rank=2, train_modules=["embed_tokens", "lm_head"]))
    assert list(trained_params(model)) == ["model.embed_tokens.weight"]
    smol = get_model("builtin:smollm2-135m-instruct")
    assert whole_trained_elements(smol, ["embed_tokens", "lm_head"]) == smol.vocab * smol.hidden
    assert whole_trained_elements(smol, ["lm_head"]) == smol.vocab * smol.hidden  # the same one


@pytest.mark.parametrize(
    "patterns, message",
    [
        (["nothing_here"], "matched no module; this model's modules with parameters end in"),
        (["q_proj"], "which adapter.targets adapts"),
        (["layers"], "holds no parameters of its own"),
        (["emb[ed"], "is not a regex"),
    ],
)
def test_bad_train_modules_are_one_line(tiny_model_path, patterns, message):
    with pytest.raises(UserError) as info:
        inject_adapters(_model(tiny_model_path), AdapterConfig(rank=2, train_modules=patterns))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_new_tokens_get_rows_at_the_mean_of_the_old(tiny_model_path):
    tok = load_tokenizer(tiny_model_path, ModelConfig(new_special_tokens=["<|tool|>", "<|end|>"]))
    model = _model(tiny_model_path)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    grow_vocabulary(model, len(tok), ["<|tool|>", "<|end|>"])
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    n = old_in.shape[0]
    assert new_in.shape[0] == new_out.shape[0] == len(tok) == n + 2
    assert tok.convert_tokens_to_ids("<|tool|>") == n  # one token, not pieces
    torch.testing.assert_close(new_in[:n], old_in)
    torch.testing.assert_close(new_out[:n], old_out)
    for w, old in ((new_in, old_in), (new_out, old_out)):
        torch.testing.assert_close(w[n:], old.mean(0).expand(2, -1))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.new_special_tokens=[<|tool|>]"], "model.new_special_tokens need trained embeddings"),
        (["model.new_special_tokens=[a, a]", "adapter.train_modules=[embed_tokens]"], "distinct"),
        (["adapter.method=full", "adapter.rank=0", "adapter.train_modules=[lm_head]"],
         "with adapter.method=full add the modules to adapter.targets"),
    ],
)  # fmt: skip
def test_bad_vocabulary_keys_are_one_line(overrides, message):
    with pytest.raises(UserError) as info:
        load_config("tiny-lora", overrides)
    assert message in str(info.value) and "\n" not in str(info.value)
