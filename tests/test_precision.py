"""train.precision: auto picks bf16 only where the device computes it natively, the choice is
printed and recorded, and an emulated bf16 warns with its cost."""

from __future__ import annotations

import json

import pytest

from rosa_ds import precision
from rosa_ds.config import load_config
from rosa_ds.plan import plan_precision
from tests.helpers import child_env, launch

ZEN3 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma f16c\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile\n"
# Emulates a CPU without bf16 on any x86 machine: torch and oneDNN then use AVX2 kernels only.
NO_BF16_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def test_cpu_flags_are_read_from_cpuinfo():
    assert "avx2" in precision.cpu_flags(ZEN3)
    assert precision.cpu_bf16_flags(precision.cpu_flags(ZEN3)) == []
    assert precision.cpu_bf16_flags(precision.cpu_flags(SAPPHIRE)) == ["avx512_bf16", "amx_bf16"]
    assert precision.cpu_flags("") == set()


def test_auto_is_fp32_on_a_cpu_without_bf16_instructions():
    choice = precision.choose("auto", "cpu", precision.cpu_flags(ZEN3))
    assert (choice.used, choice.native_bf16) == ("fp32", False)
    assert "no bf16 instructions" in choice.reason and choice.reason.startswith("auto:")


def test_auto_is_bf16_on_a_cpu_with_them_when_onednn_uses_them(monkeypatch):
    monkeypatch.setattr(precision, "onednn_bf16", lambda: True)
    choice = precision.choose("auto", "cpu", precision.cpu_flags(SAPPHIRE))
    assert (choice.used, choice.native_bf16) == ("bf16", True)
    monkeypatch.setattr(precision, "onednn_bf16", lambda: False)  # ONEDNN_MAX_CPU_ISA=AVX2
    choice = precision.choose("auto", "cpu", precision.cpu_flags(SAPPHIRE))
    assert choice.used == "fp32" and "oneDNN will not use them" in choice.reason


def test_explicit_choices_stay():
    for requested in ("bf16", "fp32"):
        choice = precision.choose(requested, "cpu", precision.cpu_flags(ZEN3))
        assert choice.used == requested and choice.reason.startswith("set explicitly")


def test_warning_only_for_emulated_bf16_on_cpu(monkeypatch):
    monkeypatch.setattr(precision, "bf16_slowdown", lambda: 37.0)
    emulated = precision.choose("bf16", "cpu", precision.cpu_flags(ZEN3))
    message = precision.warning_for("train.precision", emulated, "cpu")
    assert "37x slower than fp32" in message and "train.precision=auto" in message
    monkeypatch.setattr(precision, "onednn_bf16", lambda: True)
    native = precision.choose("bf16", "cpu", precision.cpu_flags(SAPPHIRE))
    assert precision.warning_for("train.precision", native, "cpu") is None


def test_auto_is_the_default_and_of_the_demo_configs():
    assert load_config(None).train.precision == "auto"
    for name in ("smollm2-lora", "smollm2-robust", "smollm2-subspace"):
        assert load_config(name).train.precision == "auto"


def test_plan_follows_the_same_rule():
    assert plan_precision("auto", "gpu")[0] == "bf16"
    assert plan_precision("fp32", "gpu")[0] == "fp32"
    local = precision.choose("auto", "cpu")
    assert plan_precision("auto", "cpu")[0] == local.used


@pytest.mark.slow
def test_run_without_native_bf16_picks_fp32_and_records_why(tmp_path):
    """A real run on an emulated AVX2-only CPU: auto trains in fp32, says so once, and writes
    the choice to config.yaml and summary.json; an explicit bf16 warns with the measured cost."""
    out = tmp_path / "auto"
    args = ["train", "--config", "tiny-lora", f"output_dir={out}", "train.max_steps=1"]
    args += ["train.precision=auto", "eval.num_generate=0", "eval.before_training=false"]
    proc = launch(args, env=child_env(**NO_BF16_ENV))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("precision: fp32 (auto:") == 1, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"]["requested"] == "auto"
    assert summary["precision"]["used"] == "fp32" and not summary["precision"]["native_bf16"]
    assert "precision: fp32" in (out / "config.yaml").read_text()

    args = [*args[:3], f"output_dir={tmp_path / 'bf16'}", *args[4:], "train.precision=bf16"]
    proc = launch(args, env=child_env(**NO_BF16_ENV))
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "without native bf16" in line]
    assert len(warnings) == 1 and "slower than fp32 here" in warnings[0], proc.stderr
    assert json.loads((tmp_path / "bf16" / "summary.json").read_text())["precision"]["used"] == (
        "bf16"
    )


def test_auto_resuming_keeps_the_precision_the_run_started_with(tmp_path):
    cfg = load_config("tiny-lora", ["train.precision=auto"])
    (tmp_path / "config.yaml").write_text("train:\n  precision: fp32\n")
    resolved, choice = precision.resolve(cfg, resumed_config=tmp_path / "config.yaml")
    assert resolved.train.precision == "fp32" and "kept from the run" in choice.reason
    (tmp_path / "config.yaml").write_text("train:\n  precision: bf16\n")
    resolved, _ = precision.resolve(cfg, resumed_config=tmp_path / "config.yaml")
    assert resolved.train.precision == "bf16"
    explicit = load_config("tiny-lora", ["train.precision=fp32"])
    resolved, _ = precision.resolve(explicit, resumed_config=tmp_path / "config.yaml")
    assert resolved.train.precision == "fp32"


def test_env_says_what_auto_picks():
    proc = launch(["env", "--json"], env=child_env(**NO_BF16_ENV))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert report["precision_auto"]["picks"] == "fp32"
    assert "cpu" in report and "bf16_flags" in report["cpu"]


def _two_ranks(script_args: list[str]) -> list[tuple[int, str]]:
    """Two ranks of the precision probe: (exit code, stderr) per rank."""
    import sys

    from tests.helpers import REPO, start_ranks

    probe = str(REPO / "tests" / "probes" / "precision_probe.py")
    procs = start_ranks([sys.executable, probe, *script_args])
    errors = [p.communicate(timeout=600)[1] for p in procs]
    return [(p.returncode, err) for p, err in zip(procs, errors, strict=True)]


@pytest.mark.slow
@pytest.mark.distributed
def test_ranks_that_resolve_auto_differently_stop_with_one_line(tmp_path):
    """Rank 0 computes bf16 natively, rank 1 does not: auto would mix dtypes, so the job stops
    after the process group starts, with one line and exit code 2, before anything is written;
    the next test checks the explicit precision the message asks for."""
    base = ["train", "--config", "tiny-lora", "train.max_steps=1", "eval.num_generate=0"]
    out = tmp_path / "auto"
    (code0, err0), (code1, err1) = _two_ranks([*base, f"output_dir={out}", "train.precision=auto"])
    assert code0 == code1 == 2, err0[-3000:] + err1[-3000:]
    lines = [line for line in err0.splitlines() if line.strip()]
    assert len(lines) == 1 and "resolved to bf16 on 1 of 2 ranks" in lines[0], lines
    assert "Traceback" not in err0 + err1
    assert not out.exists() or not any(out.iterdir())


def test_an_explicit_precision_is_the_same_on_ranks_that_differ_in_native_bf16(monkeypatch):
    """What the two-rank stop above asks the user to do: an explicit precision does not depend
    on the device, so ranks that differ in native bf16 agree (auto would not)."""
    used = {}
    for native in (True, False):
        monkeypatch.setattr(precision, "native_bf16", lambda *a, n=native: (n, "stub"))
        used[native] = {r: precision.choose(r, "cpu").used for r in ("fp32", "bf16", "auto")}
    assert used[True]["fp32"] == used[False]["fp32"] == "fp32"
    assert used[True]["bf16"] == used[False]["bf16"] == "bf16"
    assert used[True]["auto"] != used[False]["auto"]
