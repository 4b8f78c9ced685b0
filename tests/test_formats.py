"""Data formats and which tokens carry the loss, on SmolLM2's real tokenizer and chat template
(no generation markers: the assistant turns are found from the template's renderings) and on
the tiny model end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rosa_ds.config import DataConfig, ModelConfig
from rosa_ds.data.loading import load_task_data
from rosa_ds.data.tokenize import CHATML, IGNORE, apply_template_choice, tokenize_records
from rosa_ds.errors import UserError

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]
# ChatML with Hugging Face's generation markers around each assistant turn
CHATML_MARKED = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}{% else %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def smol():
    from rosa_ds.model import load_tokenizer, resolve_model_path

    cfg = ModelConfig(name_or_path="builtin:smollm2-135m-instruct")
    try:
        path = resolve_model_path(cfg)
    except UserError as exc:
        pytest.skip(str(exc))
    return load_tokenizer(path, cfg)


def _trained(tok, example) -> list[str]:
    """The trained stretches of an example, decoded (labels after the causal shift)."""
    pieces, current = [], []
    for tid, label in zip(example["input_ids"][1:], example["labels"][1:], strict=True):
        if label != IGNORE:
            assert label == tid
            current.append(tid)
        elif current:
            pieces.append(tok.decode(current))
            current = []
    if current:
        pieces.append(tok.decode(current))
    return pieces


def test_every_assistant_turn_is_trained_with_its_end_of_turn_and_nothing_else(smol):
    (ex,) = tokenize_records([{"messages": CHAT}], smol, 512, True)
    assert _trained(smol, ex) == ["Hello!<|im_end|>\n", "4<|im_end|>\n"]


def _fresh(tok, template: str):
    """Another copy of a tokenizer, with another chat template."""
    copy = tok.__class__.from_pretrained(tok.name_or_path)
    copy.chat_template = template
    return copy


def test_generation_markers_and_the_template_renderings_find_the_same_tokens(smol):
    """Transformers' own assistant mask (the marked template) and the renderings (ChatML,
    unmarked, the same text) label the same tokens."""
    marked, plain = _fresh(smol, CHATML_MARKED), _fresh(smol, CHATML)
    (a,) = tokenize_records([{"messages": CHAT}], marked, 512, True)
    (b,) = tokenize_records([{"messages": CHAT}], plain, 512, True)
    assert a == b
    assert _trained(plain, b) == ["Hello!<|im_end|>\n", "4<|im_end|>\n"]


def test_train_on_inputs_trains_every_token(smol):
    (ex,) = tokenize_records([{"messages": CHAT}], smol, 512, True, train_on_inputs=True)
    assert ex["labels"] == ex["input_ids"]


def test_a_single_turn_trains_the_answer_and_the_templates_end_of_turn(smol):
    (ex,) = tokenize_records([{"prompt": "2+2?", "response": "4"}], smol, 512, True)
    assert _trained(smol, ex) == ["4<|im_end|>\n"]
    (plain,) = tokenize_records([{"prompt": "2+2?", "response": "4"}], smol, 512, False)
    assert _trained(smol, plain) == ["4" + smol.eos_token]  # no template: answer, then EOS


def test_text_trains_every_token_and_ends_with_eos(smol):
    (ex,) = tokenize_records([{"text": "Once upon a time"}], smol, 512, True)
    assert ex["labels"] == ex["input_ids"] and ex["input_ids"][-1] == smol.eos_token_id


def test_a_template_whose_turns_are_not_prefixes_is_refused(smol):
    last_marked = (
        "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    )
    odd = _fresh(smol, last_marked)
    with pytest.raises(UserError, match="cannot be found; set data.chat_template"):
        tokenize_records([{"messages": CHAT}], odd, 512, True)


def test_a_named_template_is_given_to_a_tokenizer_without_one():
    class Tok:
        chat_template = None

    tok = Tok()
    apply_template_choice(tok, True)
    assert tok.chat_template is None
    apply_template_choice(tok, "chatml")
    assert tok.chat_template == CHATML
    apply_template_choice(tok, "{{ messages }}")
    assert tok.chat_template == "{{ messages }}"


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_formats_are_detected_renamed_and_said(tmp_path):
    alpaca = _jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "2 and 2",
                                            "output": "4"}] * 4)  # fmt: skip
    data = load_task_data(DataConfig(dataset=alpaca, eval_split=None, eval_fraction=0.25))
    assert data.format == "alpaca" and data.train[0]["prompt"] == "Add\n\n2 and 2"
    assert data.describe() == "data.format auto: alpaca (fields input, instruction, output)"
    share = _jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}] * 4)  # fmt: skip
    data = load_task_data(DataConfig(dataset=share, eval_split=None, eval_fraction=0.25))
    assert data.format == "messages"
    assert data.train[0]["messages"] == [{"role": "user", "content": "Hi"},
                                         {"role": "assistant", "content": "Hello"}]  # fmt: skip
    renamed = _jsonl(tmp_path / "r.jsonl", [{"q": "Hi", "a": "Yo"}] * 4)
    cfg = DataConfig(dataset=renamed, columns={"q": "prompt", "a": "response"}, eval_split=None)
    assert load_task_data(cfg).train[0]["response"] == "Yo"
    text = tmp_path / "t.csv"
    text.write_text("text\nOnce upon a time\nThe end\nAgain\n")
    data = load_task_data(DataConfig(dataset=str(text), eval_split=None, eval_fraction=0.34))
    assert data.format == "text" and data.describe().startswith("data.format auto: text")
    assert load_task_data(DataConfig(dataset=alpaca, format="alpaca")).describe() is None


@pytest.mark.parametrize(
    ("turns", "message"),
    [
        ([{"role": "wizard", "content": "x"}], "has role 'wizard'"),
        ([{"role": "user", "content": "x"}], "no assistant turn"),
        ([], "non-empty list"),
    ],
)
def test_bad_conversations_are_one_line_naming_the_record(tmp_path, turns, message):
    path = _jsonl(tmp_path / "m.jsonl", [{"messages": turns}] * 2)
    with pytest.raises(UserError, match=message):
        load_task_data(DataConfig(dataset=path, eval_split=None))


# Each format trains end to end in tests/test_mixing.py: one run mixes conversations and text.


def test_chat_template_takes_a_name_a_jinja_string_or_a_switch():
    from rosa_ds.config import load_config

    def value(text: str):
        return load_config("tiny-lora", [f"data.chat_template={text}"]).data.chat_template

    assert value("chatml") == "chatml" and value("false") is False
    assert value("{% for m in messages %}{{ m['content'] }}{% endfor %}").startswith("{% for")
    with pytest.raises(UserError, match="data.chat_template must be true, false, chatml or a"):
        value("vicuna")
