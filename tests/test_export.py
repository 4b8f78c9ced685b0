"""Export: the merged model reproduces the adapted model in plain transformers (no rosa-ds),
(the PEFT folder is checked for every method by tests/method_contract.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rosa_ds.export import load_adapted_model
from tests.helpers import PROMPT, child_env, export_run, train_ok

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    train_ok(
        [
            "--config",
            "tiny-lora",
            f"output_dir={out}",
            "train.max_steps=4",
            "train.lr=2e-2",
            "eval.num_generate=0",
        ]
    )
    export_run(out)
    return out


def _adapted_logits(run: Path) -> tuple[torch.Tensor, list[int]]:
    model, tok, _ = load_adapted_model(run / "adapter")
    ids = tok(PROMPT)["input_ids"]
    with torch.no_grad():
        return model(torch.tensor([ids])).logits, ids


def test_merged_model_loads_in_plain_transformers(exported):
    ref, ids = _adapted_logits(exported)
    merged = exported / "export" / "merged"
    config = json.loads((merged / "config.json").read_text())
    assert "auto_map" not in config and config["model_type"] == "llama"
    # A fresh interpreter in which importing rosa_ds fails: plain transformers only.
    code = (
        "import sys, json, torch; sys.modules['rosa_ds'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(merged)!r})\n"
        f"print(json.dumps(m(torch.tensor([{ids}])).logits.tolist()))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_merge_changes_the_base(exported, tiny_model_path):
    from transformers import AutoModelForCausalLM

    ref, ids = _adapted_logits(exported)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with torch.no_grad():
        base_logits = base(torch.tensor([ids])).logits
    assert (base_logits - ref).abs().max() > 1e-3  # the adapter did something to compare
