"""Every Triton kernel configuration the code can launch compiles ahead of time for sm_80 and
sm_90 (no GPU needed), fits the GPU's shared memory, and uses tensor cores where it uses
``tl.dot`` on 16-bit data; a kernel without compile checks fails the suite."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, child_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = child_env(TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "probes" / "aot_compile.py"), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_every_kernel_has_compile_checks(report):
    compiled = {r["kernel"] for r in report["compiled"]}
    assert report["found"] and set(report["found"]) == compiled


def test_every_config_compiles_for_both_targets_and_dtypes(report):
    from rosa_ds.kernels.triton_sparse import DTYPES, LAUNCH_CONFIGS

    expected = sum(len(c) for c in LAUNCH_CONFIGS.values()) * len(DTYPES) * 2
    assert len(report["compiled"]) == expected
    for r in report["compiled"]:
        assert r["cubin_bytes"] > 0, r


def test_shared_memory_fits_and_dot_uses_tensor_cores(report):
    for r in report["compiled"]:
        assert r["shared"] <= r["shared_limit"], r
        assert r["registers"] is None or r["registers"] <= 255, r  # no spill past the file
        if r["uses_dot"] and r["dtype"] in ("bf16", "fp16"):
            assert r["tensor_cores"], r
