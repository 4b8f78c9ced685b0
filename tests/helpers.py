"""Helpers for tests: run the real command line in subprocesses, one process or several ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

os.environ.setdefault("ROSA_DS_CACHE", str(REPO / ".cache" / "rosa-ds"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


if not _has_gpu():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


# The shared uninterrupted tiny-lora run (conftest.reference_run); tests that resume or compare
# against it pass these arguments, with deepspeed.config, output_dir and --resume.
LORA_REFERENCE = [
    "--config",
    "tiny-lora",
    "train.max_steps=8",
    "train.save_every=4",
    "train.keep_checkpoints=4",
    "train.lr=1e-2",
    "eval.num_generate=0",
]
# A prompt from the arithmetic task, for comparing logits of two forms of one model.
PROMPT = "Ava has 3 apples and buys 4 more."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def launch(
    args: list[str],
    nproc: int = 1,
    launcher: str = "python",
    timeout: int = 600,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run ``rosa-ds ARGS`` as ``nproc`` ranks through a real launcher."""
    entry = str(REPO / "launcher" / "main.py")
    if launcher == "python":
        cmd = [sys.executable, "-m", "rosa_ds.cli", *args]
    elif launcher == "torchrun":
        cmd = [
            str(BIN / "torchrun"),
            f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}",
            entry,
            *args,
        ]
    elif launcher in ("mpirun", "mpirun-hidden-vars"):  # MPICH from the mpich wheel
        if launcher == "mpirun-hidden-vars":  # as under an MPI that exports no rank variables
            entry = str(REPO / "tests" / "probes" / "mpi4py_entry.py")
        cmd = [str(BIN / "mpirun"), "-n", str(nproc), sys.executable, entry, *args]
    elif launcher == "deepspeed":
        cmd = [
            str(BIN / "deepspeed"),
            "--num_gpus",
            str(nproc),
            "--master_port",
            str(free_port()),
            entry,
            *args,
        ]
    else:
        raise ValueError(launcher)
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or child_env(),
        cwd=cwd or REPO,
    )


def train_ok(args: list[str], **kw) -> dict:
    """Train and return the run's summary.json; fail with the output if the run failed."""
    proc = launch(["train", *args], **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = next(a.split("=", 1)[1] for a in args if a.startswith("output_dir="))
    return json.loads((Path(out) / "summary.json").read_text())


def start_ranks(cmd: list[str], nproc: int = 2, **env: str) -> list[subprocess.Popen]:
    """``cmd`` as ``nproc`` ranks of one job, plain processes with the torch launcher's
    variables: no launcher that would kill the others or wrap their output."""
    port = str(free_port())
    rank_env = dict(WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env)
    return [
        subprocess.Popen(
            cmd,
            env=child_env(RANK=str(r), LOCAL_RANK=str(r), **rank_env),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(nproc)
    ]


def wait_for_logged_step(
    output_dir: Path, step: int, procs: list[subprocess.Popen] = (), timeout: float = 300
) -> None:
    """Wait until a live run's metrics.jsonl logs training step ``step`` or a later one (to
    signal it mid-run); fail if one of ``procs`` ends first or the time runs out."""
    import time

    metrics = Path(output_dir) / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        if any("loss" in (r := json.loads(x)) and r["step"] >= step for x in lines):
            return
        for proc in procs:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    raise AssertionError(f"{metrics} logged no step {step} within {timeout:.0f} s")


def export_run(run: Path, out: Path | None = None) -> Path:
    """``rosa-ds export --run RUN`` (to ``out`` if given); the folder holding ``merged``."""
    args = ["export", "--run", str(run), *(["--out", str(out)] if out else [])]
    proc = launch(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out or Path(run) / "export"


def merged_eval_loss(merged: Path, config: str, overrides: tuple[str, ...], tmp: Path) -> float:
    """The held-out loss of a merged model loaded by transformers alone (no adapter code),
    computed in this process on the config's held-out split as ``rosa-ds eval`` computes it."""
    from transformers import AutoModelForCausalLM

    from rosa_ds.config import load_config
    from rosa_ds.evaluate import heldout_loss
    from rosa_ds.preflight import prepare

    model = AutoModelForCausalLM.from_pretrained(merged)
    cfg = load_config(config, [*overrides, f"output_dir={tmp}"])
    prep = prepare(cfg, resume=None, training=False)
    result = heldout_loss(
        model,
        prep.eval_examples,
        cfg.train.micro_batch_size,
        prep.tokenizer.pad_token_id,
        0,
        1,
        cfg.eval.max_loss_examples,
    )
    return result["eval_loss"]


def run_probe(script: str, args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    """Run a script of tests/probes as ``nproc`` ranks (torchrun) or one plain process."""
    path = str(REPO / "tests" / "probes" / script)
    if nproc == 1:
        cmd = [sys.executable, path, *args]
    else:
        cmd = [
            str(BIN / "torchrun"),
            f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}",
            path,
            *args,
        ]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env=child_env(), cwd=REPO
    )
