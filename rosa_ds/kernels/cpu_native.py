"""The compiled CPU sparse kernels (``csrc/sparse_cpu.cpp``): the SDDMM of the value gradient and
the in-place merge of ``S`` into ``W``, built on first use with torch's extension builder,
cached, and optional.

torch's ``sampled_addmm`` copies both token-major operands whole into feature-major layout before
its dot products, and at RoSA's densities that copy costs more than the products; the compiled
SDDMM transposes blocks of tokens that stay in cache instead. The merge does in one pass over the
mask what ``index_select`` and ``index_copy_`` do in three (``benchmarks/sparse_kernels.py``,
``benchmarks/step_time.py``). Without a C++ compiler, or with ``ROSA_DS_CPU_KERNELS=torch``, the
CPU path keeps torch's ops: the same values (the merge bit for bit, the SDDMM to fp32
rounding), only slower.

The build (about 25 s, once) goes to ``TORCH_EXTENSIONS_DIR`` like DeepSpeed's own CPU ops; ranks
building at once wait on torch's lock. Its name carries the instruction set it was compiled for,
so nodes of different CPUs sharing one cache each get their own.
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from pathlib import Path
from types import ModuleType

import torch

from rosa_ds.errors import UserError

SOURCE = Path(__file__).with_name("csrc") / "sparse_cpu.cpp"
CHOICES = ("auto", "native", "torch")
ENV = "ROSA_DS_CPU_KERNELS"


def choice() -> str:
    """``ROSA_DS_CPU_KERNELS``: ``auto`` (the compiled kernels where they build, else torch's
    ops), ``native`` (the compiled kernels or an error) or ``torch`` (torch's ops)."""
    value = os.environ.get(ENV, "auto")
    if value not in CHOICES:
        raise UserError(f"{ENV}={value!r} is not one of {', '.join(CHOICES)}; unset it or pick one")
    return value


def compiler() -> str | None:
    """The C++ compiler the build would use (``CXX``, else ``c++``), if it is on PATH."""
    return shutil.which(os.environ.get("CXX", "c++"))


def _isa_flags() -> tuple[str, list[str]]:
    """The instruction set to compile for: AVX2 + FMA where torch's own kernels use at least
    that (the SDDMM's 8x8 transposes and 8-wide dot products), else the compiler's baseline."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith(("AVX2", "AVX512")):
        return "avx2", ["-mavx2", "-mfma"]
    return "base", []


@functools.cache
def kernels() -> ModuleType | None:
    """The compiled module, or None where the CPU path keeps torch's ops (chosen, or the build
    failed: then one warning says why)."""
    wanted = choice()
    if wanted == "torch":
        return None
    try:
        if compiler() is None:
            raise RuntimeError("no C++ compiler on PATH (set CXX, or install g++)")
        from torch.utils.cpp_extension import load

        isa, flags = _isa_flags()
        return load(
            name=f"rosa_ds_sparse_cpu_{isa}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp", *flags],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # any build or load failure: the torch path still works
        if wanted == "native":
            raise RuntimeError(
                f"{ENV}=native but the CPU kernels did not build: {_first_line(exc)}"
            ) from exc
        warnings.warn(
            f"rosa-ds: the compiled CPU kernels did not build ({_first_line(exc)}); "
            "using torch's sampled_addmm and index ops (same values, slower)",
            stacklevel=2,
        )
        return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def available() -> bool:
    return kernels() is not None
