"""Export: the merged model reproduces the adapted model in plain transformers (no rosa-ds),
and the PEFT export loads in peft with the same logits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rosa_ds.export import load_adapted_model
from tests.helpers import child_env, launch, train_ok

pytestmark = pytest.mark.slow
PROMPT = "Ava has 3 apples and buys 4 more."


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
    proc = launch(["export", "--run", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
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


def test_peft_export_loads_in_peft(exported, tiny_model_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ref, ids = _adapted_logits(exported)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    model = PeftModel.from_pretrained(base, str(exported / "export" / "adapter" / "peft"))
    model.eval()
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_eval_command_reproduces_the_final_evaluation(exported):
    """`rosa-ds eval` on the saved adapter gives the loss the run measured at its end."""
    summary = json.loads((exported / "summary.json").read_text())
    proc = launch(
        ["eval", "--config", "tiny-lora", f"output_dir={exported}", "eval.num_generate=0"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert result["adapter"] == str(exported / "adapter")
    assert abs(result["eval_loss"] - summary["after"]["eval_loss"]) < 1e-4
    assert result["eval_loss"] < summary["before"]["eval_loss"] - 1e-3


@pytest.mark.parametrize("rank", [8, 0])
def test_robust_export_merges_the_sparse_part(tmp_path, rank):
    """RoSA (rank 8) and sparse-only SpA (rank 0) export the sparse part into the merge."""
    from transformers import AutoModelForCausalLM

    from rosa_ds.adapters.inject import adapted_modules

    out = tmp_path / "run"
    train_ok(
        [
            "--config",
            "tiny-robust",
            f"output_dir={out}",
            "train.max_steps=6",
            "adapter.robust.mask_warmup_steps=2",
            "train.lr=2e-2",
            "eval.num_generate=0",
            f"adapter.rank={rank}",
        ]
    )
    proc = launch(["export", "--run", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, tok, meta = load_adapted_model(out / "adapter")
    assert meta["method"] == ("robust" if rank else "sparse") and meta["sparse_nnz"] > 0
    assert not (out / "adapter" / "peft").exists()  # PEFT has no sparse adapters
    sparse = [m for m in adapted_modules(model).values() if m.sparse_values is not None]
    assert sparse and all(m.sparse_values.abs().sum() > 0 for m in sparse)
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    merged = AutoModelForCausalLM.from_pretrained(out / "export" / "merged")
    with torch.no_grad():
        ref = model(ids).logits
        got = merged(ids).logits
        for m in sparse:  # without the sparse part the logits differ
            m.sparse_values.zero_()
        no_sparse = model(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert (no_sparse - ref).abs().max() > 1e-4
    # `rosa-ds eval` rebuilds the adapter from its adapter.json and masks, whatever the config
    # says about rank and alpha, and reproduces the run's final loss
    summary = json.loads((out / "summary.json").read_text())
    proc = launch(
        ["eval", "--config", "tiny-robust", f"output_dir={out}", "eval.num_generate=0"]
        + ["adapter.rank=3", "adapter.alpha=1"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert abs(result["eval_loss"] - summary["after"]["eval_loss"]) < 1e-4
