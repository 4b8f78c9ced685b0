"""``rosa-ds generate``: a run's greedy text equals the exported merged model's (LoRA and a
resampled ROSA run, whose adapter is an accumulated update); the chat keeps the conversation;
prompts come from files; bad input is one line."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rosa_ds.cli import run
from rosa_ds.data.tokenize import CHATML
from rosa_ds.errors import UserError
from rosa_ds.export import export
from tests.helpers import PROMPT, train_ok

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(reference_run, tmp_path_factory):
    """A LoRA run (the shared reference) and a tiny ROSA run that resampled, with a chat
    template of its own (the exported tokenizer must carry it)."""
    rosa = tmp_path_factory.mktemp("rosa") / "run"
    summary = train_ok(["--config", "tiny-subspace", f"output_dir={rosa}", "train.max_steps=6",
                        "adapter.resample_every=3", "eval.num_generate=0",
                        "data.chat_template=chatml"])  # fmt: skip
    assert summary["resamples"] >= 2
    return {"lora": reference_run("zero2", 1)[0], "subspace": rosa}


def _generate(args, capsys) -> list[dict]:
    capsys.readouterr()
    assert run(["generate", *args, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("method", ["lora", "subspace"])
def test_a_runs_text_is_the_merged_models(runs, method, tmp_path, capsys):
    (got,) = _generate(["--run", str(runs[method]), "-p", PROMPT, "--max-new-tokens", "12"],
                       capsys)  # fmt: skip
    merged = export(runs[method] / "adapter", tmp_path / "export")["merged"]
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(merged)
    assert (tok.chat_template == CHATML) is (method == "subspace")  # the run's own template
    text = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
    expected = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert got == {"prompt": PROMPT, "completion": expected}
    base = _generate(["--base", "builtin:tiny-llama", "-p", PROMPT, "--max-new-tokens", "12"],
                     capsys)  # fmt: skip
    assert base[0]["completion"] != expected  # the adapter changed the model


def test_the_chat_answers_with_the_conversation_so_far(runs, monkeypatch, capsys, tmp_path):
    from rosa_ds.cli import build_parser
    from rosa_ds.generate import generate_text, load_for_generation

    monkeypatch.setattr("sys.stdin", io.StringIO("Ava has 3 apples.\nAnd 4 more?\n\nignored\n"))
    capsys.readouterr()
    args = ["generate", "--run", str(runs["lora"]), "--chat", "--max-new-tokens", "6"]
    assert run(args) == 0
    first, second = capsys.readouterr().out.splitlines()
    parsed = build_parser().parse_args(args)
    model, tok, template = load_for_generation(parsed)
    turns = [{"role": "user", "content": "Ava has 3 apples."},
             {"role": "assistant", "content": first}, {"role": "user", "content": "And 4 more?"}]  # fmt: skip
    assert second == generate_text(model, tok, turns, template, parsed)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"messages": turns}) + "\n" + json.dumps({"prompt": PROMPT}) + "\n"
    )
    out = _generate(["--run", str(runs["lora"]), "--file", str(prompts), "--max-new-tokens", "6"],
                    capsys)  # fmt: skip
    assert out[0]["completion"] == second and len(out) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--base", "builtin:tiny-llama"], "needs --prompt TEXT, --file FILE or --chat"),
        (["-p", "hi"], "needs --run DIR, --adapter DIR or --base MODEL"),
        (["--run", "/nonexistent", "-p", "hi"], "is not a finished run"),
        (["--base", "builtin:tiny-llama", "-p", "hi", "--top-p", "0"], "--top-p in (0, 1]"),
    ],
)
def test_bad_generate_arguments_are_one_line(args, message):
    with pytest.raises(UserError, match=re.escape(message)):
        run(["generate", *args])
