"""The method contract: what every method (a row of a table) must do, as shared tests.

A test module gives its rows through a ``row`` fixture (parametrized over ``Row`` values) and
imports the tests below; pytest then runs every test for every row of that module. Adding a
method means adding a row (``tests/test_methods.py``, and ``tests/test_methods_4bit.py`` where
4-bit frozen weights apply).

Every row trains 6 steps with checkpoints at 3 and 6 (one process, ZeRO-2), and:
- trains: the run is the method it names (adapter file, summary) and lowers the held-out loss;
- resumes exactly: continued from the step-3 checkpoint, it ends with the same losses;
- exports and reloads: the merged Hugging Face model, loaded by transformers alone, scores the
  run's final held-out loss (and, for the sparse methods, has the adapted model's logits,
  which differ without the sparse part); LoRA and ROSA runs also get a PEFT folder that peft
  alone loads with the merged model's logits;
- evaluates: ``rosa-ds eval`` on the run's adapter scores the run's final held-out loss, with
  the adapter's own rank and alpha whatever the config says;
- 2 ranks equal 1 process: the same run at 2 ranks has the same losses;
- checkpointing changes nothing: with ``model.gradient_checkpointing`` the losses are the same
  (RoSA's mask collection included: recomputation counts no gradient twice); checked on the
  rows marked ``checkpointing`` (the hybrid covers LoRA, masks and resampling in one run).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import PROMPT, export_run, launch, merged_eval_loss, train_ok

COMMON = (
    "train.max_steps=6",
    "train.save_every=3",
    "train.keep_checkpoints=4",
    "eval.num_generate=0",
)


@dataclass(frozen=True)
class Row:
    """One method's configuration: ``method`` is the name its run must report; ``ranks_rtol``
    how far the 2-rank losses may be from one process's (summation order differs)."""

    id: str
    method: str
    config: str
    overrides: tuple[str, ...] = ()
    ranks_rtol: float = 1e-4
    checkpointing: bool = False  # also run with gradient checkpointing

    def args(self, out: Path, *extra: str) -> list[str]:
        return ["--config", self.config, *COMMON, *self.overrides, f"output_dir={out}", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Callable[[Row], tuple[Path, dict]]:
    """Each row's one-process run, trained once per module."""
    cache: dict[str, tuple[Path, dict]] = {}

    def get(row: Row) -> tuple[Path, dict]:
        if row.id not in cache:
            out = tmp_path_factory.mktemp(row.id) / "run"
            cache[row.id] = out, train_ok(row.args(out))
        return cache[row.id]

    return get


def _eval_loss(args: list[str], adapter: Path) -> float:
    """``rosa-ds eval ARGS``'s held-out loss, checking it read ``adapter``."""
    proc = launch(["eval", *args, "eval.num_generate=0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert result["adapter"] == str(adapter)
    return result["eval_loss"]


def test_trains(row, trained):
    out, summary = trained(row)
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    assert summary["method"] == meta["method"] == row.method
    assert all(math.isfinite(x) for x in summary["losses"]) and len(summary["losses"]) == 6
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"] - 1e-3
    if row.method in ("sparse", "robust", "hybrid"):
        assert summary["mask_nnz"] > 0 and meta["sparse_nnz"] == summary["mask_nnz"]
    if row.method in ("subspace", "hybrid"):
        assert summary["resamples"] >= 2 and "delta_ranks" in meta


def test_resumes_exactly(row, trained, tmp_path):
    out, summary = trained(row)
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    resumed = train_ok(
        row.args(copy, "--resume", str(copy / "checkpoints" / "step-000003")), timeout=600
    )
    assert resumed["resumed_from"] == 3
    assert resumed["losses"] == pytest.approx(summary["losses"], rel=1e-5, abs=1e-6)
    after, want = resumed["after"]["eval_loss"], summary["after"]["eval_loss"]
    assert after == pytest.approx(want, rel=1e-5)


def test_exports_and_reloads(row, trained, tmp_path):
    out, summary = trained(row)
    merged = export_run(out, tmp_path / "export") / "merged"
    loss = merged_eval_loss(merged, row.config, row.overrides, tmp_path / "e")
    assert loss == pytest.approx(summary["after"]["eval_loss"], abs=1e-4)
    if row.method in ("sparse", "robust"):
        _assert_the_sparse_part_is_in_the_merge(out, merged)
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    has_peft = row.method == "lora" or (row.method == "subspace" and not meta["exact_frozen"])
    assert (merged.parent / "peft").is_dir() == has_peft
    if has_peft and not meta.get("quant"):  # 4-bit: the merge is into deq(q(W)), not W
        _assert_peft_loads_with_the_merged_logits(merged)


def _assert_peft_loads_with_the_merged_logits(merged: Path) -> None:
    """peft alone loads the PEFT folder (its base_model_name_or_path too) and computes the
    merged model's logits; a ROSA run's accumulated update is a LoRA with a rank_pattern."""
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(merged.parent / "peft"))
    tok = AutoTokenizer.from_pretrained(merged)
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    with torch.no_grad():
        got = peft_model.eval()(ids).logits
        ref = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def _assert_the_sparse_part_is_in_the_merge(run: Path, merged: Path) -> None:
    """The merged logits are the adapted model's, which differ without the sparse values; PEFT,
    which has no sparse adapters, gets no folder."""
    import torch
    from transformers import AutoModelForCausalLM

    from rosa_ds.adapted_model import load_adapted_model
    from rosa_ds.adapters.inject import adapted_modules

    model, tok, _ = load_adapted_model(run / "adapter")
    assert not (merged.parent / "peft").exists()
    sparse = [m for m in adapted_modules(model).values() if m.sparse_values is not None]
    assert sparse and all(m.sparse_values.abs().sum() > 0 for m in sparse)
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    with torch.no_grad():
        ref = model(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
        for m in sparse:
            m.sparse_values.zero_()
        no_sparse = model(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert (no_sparse - ref).abs().max() > 1e-4


def test_evaluates(row, trained):
    """``rosa-ds eval`` rebuilds the adapter from its adapter.json (and masks), whatever the
    config says about rank and alpha, and scores the run's final held-out loss."""
    out, summary = trained(row)
    misleading = () if row.method == "full" else ("adapter.rank=3", "adapter.alpha=1")
    args = ["--config", row.config, *row.overrides, *misleading, f"output_dir={out}"]
    loss = _eval_loss(args, adapter=out / "adapter")
    assert loss == pytest.approx(summary["after"]["eval_loss"], abs=1e-4)


def test_two_ranks_equal_one_process(row, trained, tmp_path):
    _, summary = trained(row)
    two = train_ok(row.args(tmp_path / "run"), nproc=2, launcher="ranks")
    assert two["world_size"] == 2
    assert two["losses"] == pytest.approx(summary["losses"], rel=row.ranks_rtol, abs=1e-5)
    after, want = two["after"]["eval_loss"], summary["after"]["eval_loss"]
    assert after == pytest.approx(want, rel=row.ranks_rtol)


def test_gradient_checkpointing_changes_no_loss(row, trained, tmp_path):
    if not row.checkpointing:
        pytest.skip("checkpointing is checked on the hybrid, full and 4-bit RoSA rows")
    _, summary = trained(row)
    ckpt = train_ok(row.args(tmp_path / "run", "model.gradient_checkpointing=true"))
    assert ckpt["losses"] == pytest.approx(summary["losses"], rel=1e-5, abs=1e-6)
    if "mask_nnz" in summary:
        assert ckpt["warmup_losses"] == pytest.approx(summary["warmup_losses"], rel=1e-5)
