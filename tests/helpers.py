"""Helpers for tests: run the real command line in subprocesses, one process or several ranks."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
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
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


# --- runs forked from a warm process (tests/zygote.py) ---------------------------------------

CLI = [sys.executable, "-m", "rosa_ds.cli"]
# A run whose environment differs from the warm process's in a variable that the libraries
# read when they are imported (these prefixes: the CPU kernels, threads, CUDA, torch, DeepSpeed,
# Hugging Face, Triton, bitsandbytes, the interpreter, the loader) gets a new interpreter;
# any other difference (rank variables, ROSA_DS_*, what in-process tests set, pytest's own)
# is read when the run reads it, so the run is forked.
_IMPORT_TIME_PREFIXES = (
    "ATEN_", "ONEDNN_", "DNNL_", "MKL_", "OMP_", "KMP_", "OPENBLAS_", "CUDA_", "NVIDIA_",
    "TORCH", "PYTORCH_", "DS_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TRITON_", "BNB_",
    "PYTHON", "LD_",
)  # fmt: skip


class RunProcess:
    """A ``subprocess.Popen`` look-alike for one run whose output goes to files (no pipe to
    fill while a test waits): forked by the warm process (``pid``) or a new interpreter
    (``popen``). The same pid, signals and exit code (negative for a signal)."""

    def __init__(self, args: list[str], files: Path, pid: int = 0, popen=None):
        self.args, self._files, self._popen = args, files, popen
        self.pid = popen.pid if popen else pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            if self._popen is not None:
                self.returncode = self._popen.poll()
            elif (self._files / "status").is_file():
                self.returncode = int((self._files / "status").read_text())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        read = lambda name: (self._files / name).read_text(errors="replace")  # noqa: E731
        return read("stdout"), read("stderr")

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _WarmProcess:
    """This test process's warm process (one per pytest worker), started at its first run."""

    def __init__(self) -> None:
        start_env = child_env()
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "zygote.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=start_env,
            cwd=REPO,
        )
        self.lock = threading.Lock()
        atexit.register(self.close)
        # Its environment once imported; what the imports set themselves, a new interpreter's
        # run has too once it has imported them, so every request gets it (``with_imports``).
        self.env = json.loads(self.proc.stdout.readline())["env"]
        self.set_by_imports = self.env.keys() - start_env.keys()

    def with_imports(self, env: dict[str, str]) -> dict[str, str]:
        return {**{k: self.env[k] for k in self.set_by_imports}, **env}

    def accepts(self, cmd: list[str], env: dict[str, str]) -> bool:
        """Whether ``cmd`` (``python -m MODULE ...`` or ``python SCRIPT.py ...``) in ``env``
        runs as it would in a new interpreter."""
        differ = {k for k in env.keys() | self.env.keys() if env.get(k) != self.env.get(k)}
        python = cmd[0] == sys.executable and (cmd[1] == "-m" or cmd[1].endswith(".py"))
        return (
            python
            and self.proc.poll() is None
            and not any(k.startswith(_IMPORT_TIME_PREFIXES) for k in differ)
        )

    def start(self, cmd: list[str], env: dict[str, str], cwd: Path, files: Path) -> RunProcess:
        with self.lock:  # one request, one reply
            request = {"argv": cmd[1:], "env": env, "cwd": str(cwd)}
            request.update({name: str(files / name) for name in ("stdout", "stderr", "status")})
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            reply = json.loads(self.proc.stdout.readline())
        return RunProcess(cmd, files, pid=reply["pid"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=600)


_warm: _WarmProcess | None = None
_RUN_FILES = Path(tempfile.mkdtemp(prefix="rosa-ds-test-runs-"))  # each run's output and status
atexit.register(shutil.rmtree, _RUN_FILES, ignore_errors=True)


def start_run(
    cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> RunProcess:
    """Start ``cmd`` (a Python command: ``CLI + args``, a probe) as its own process: forked
    from the warm process where it can be (``ROSA_DS_FORK_RUNS=0``: never), else a new
    interpreter."""
    global _warm
    env, cwd = env or child_env(), cwd or REPO
    files = Path(tempfile.mkdtemp(dir=_RUN_FILES))
    if os.environ.get("ROSA_DS_FORK_RUNS", "1") != "0":
        if _warm is None:
            _warm = _WarmProcess()
        forked_env = _warm.with_imports(env)
        if _warm.accepts(cmd, forked_env):
            return _warm.start(cmd, forked_env, cwd, files)
    with open(files / "stdout", "w") as out, open(files / "stderr", "w") as err:
        popen = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err)
    return RunProcess(cmd, files, popen=popen)


def _finish(procs: list, cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Wait for a job's processes (as a launcher would: once one fails, the others get 30 s,
    then are killed) and return what they did as one completed process, rank 0's output
    first."""
    deadline = time.monotonic() + timeout
    failed_at = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + 30):
            for p in procs:
                p.kill()
            if now > deadline:
                raise subprocess.TimeoutExpired(cmd, timeout)
        time.sleep(0.02)
    outputs = [p.communicate() for p in procs]
    code = next((p.returncode for p in procs if p.returncode != 0), 0)
    return subprocess.CompletedProcess(
        cmd, code, "".join(o for o, _ in outputs), "".join(e for _, e in outputs)
    )


def launch(
    args: list[str],
    nproc: int = 1,
    launcher: str = "python",
    timeout: int = 600,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run ``rosa-ds ARGS`` as ``nproc`` ranks: ``python`` one process, ``ranks`` plain
    processes with the torch launcher's variables (both forked where they can be), or through
    a real launcher (``torchrun``, ``deepspeed``, ``mpirun``)."""
    entry = str(REPO / "launcher" / "main.py")
    if launcher == "python":
        return _finish([start_run([*CLI, *args], env, cwd)], [*CLI, *args], timeout)
    if launcher == "ranks":
        return _finish(start_ranks([*CLI, *args], nproc), [*CLI, *args], timeout)
    if launcher == "torchrun":
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


def start_ranks(cmd: list[str], nproc: int = 2, **env: str) -> list[RunProcess]:
    """``cmd`` (a Python command) as ``nproc`` ranks of one job, plain processes with the torch
    launcher's variables (forked where they can be): no launcher that would kill the others or
    wrap their output."""
    port = str(free_port())
    rank_env = dict(WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env)
    return [
        start_run(cmd, child_env(RANK=str(r), LOCAL_RANK=str(r), **rank_env)) for r in range(nproc)
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
    """Run a script of tests/probes as one process or ``nproc`` ranks (forked where they can
    be, as every run here)."""
    cmd = [sys.executable, str(REPO / "tests" / "probes" / script), *args]
    procs = start_ranks(cmd, nproc) if nproc > 1 else [start_run(cmd)]
    return _finish(procs, cmd, timeout=600)
