"""Which precision a run computes in: ``train.precision: auto`` picks bf16 only where the device
computes it natively, fp32 elsewhere.

A CPU without bf16 instructions emulates every bf16 matmul (measured on a Zen 3 EPYC: 37x slower
than fp32), so bf16 there turns a minutes-long run into hours. Native means: CUDA with
``torch.cuda.is_bf16_supported()``; a CPU whose flags include ``avx512_bf16`` or ``amx_bf16``
(x86) or ``bf16`` (Arm) *and* whose oneDNN build will use them (``ONEDNN_MAX_CPU_ISA`` can turn
them off). Every rank of a job decides alone; ``check_ranks_agree`` stops a training job whose
ranks decided differently.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rosa_ds.errors import UserError

if TYPE_CHECKING:
    from rosa_ds.config import RunConfig

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86; Arm lists "bf16" among its Features
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class PrecisionChoice:
    """What was asked for, what a run uses, and why (printed at start, kept in summary.json)."""

    requested: str  # auto, bf16 or fp32
    used: str  # bf16 or fp32
    reason: str
    native_bf16: bool

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            return set()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def cpu_bf16_flags(flags: set[str]) -> list[str]:
    found = [f for f in CPU_BF16_FLAGS if f in flags]
    if platform.machine().lower() in ("aarch64", "arm64") and "bf16" in flags:
        found.append("bf16")
    return found


def onednn_bf16() -> bool:
    """Whether torch's oneDNN will run bf16 matmuls on this CPU (honours ONEDNN_MAX_CPU_ISA)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def native_bf16(device_type: str, flags: set[str] | None = None) -> tuple[bool, str]:
    """Whether ``device_type`` (cuda, cpu, ...) computes bf16 natively, and how we know."""
    if device_type == "cuda":
        import torch

        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return True, f"{torch.cuda.get_device_name()} computes bf16 natively"
        return False, "this GPU has no native bf16 (before Ampere)"
    if device_type != "cpu":
        return False, f"native bf16 on {device_type} is not known to rosa-ds"
    found = cpu_bf16_flags(cpu_flags() if flags is None else flags)
    if not found:
        return False, (
            "this CPU has no bf16 instructions (no avx512_bf16 or amx_bf16), so bf16 "
            "matmuls would be emulated"
        )
    if not onednn_bf16():
        return False, (
            f"this CPU has {', '.join(found)} but oneDNN will not use them "
            "(ONEDNN_MAX_CPU_ISA?), so bf16 matmuls would be emulated"
        )
    return True, f"this CPU computes bf16 natively ({', '.join(found)})"


def run_device_type() -> str:
    """The device a run computes on: DeepSpeed's accelerator (DS_ACCELERATOR, else CUDA if any)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name().split(":")[0]


def choose(requested: str, device_type: str, flags: set[str] | None = None) -> PrecisionChoice:
    """Resolve ``train.precision`` for a device; explicit choices stay as they are."""
    native, why = native_bf16(device_type, flags)
    if requested == "auto":
        used = "bf16" if native else "fp32"
        return PrecisionChoice(requested, used, f"auto: {why}", native)
    return PrecisionChoice(requested, requested, f"set explicitly; {why}", native)


@functools.cache
def bf16_slowdown(size: int = 256) -> float:
    """How many times slower a bf16 matmul is than an fp32 one here (median of 3, one thread)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = {}
        for dtype in (torch.float32, torch.bfloat16):
            a = torch.randn(size, 2 * size, dtype=dtype)
            b = torch.randn(2 * size, 2 * size, dtype=dtype)
            a @ b
            runs = []
            for _ in range(3):
                t0 = time.perf_counter()
                a @ b
                runs.append(time.perf_counter() - t0)
            times[dtype] = sorted(runs)[1]
    finally:
        torch.set_num_threads(threads)
    return times[torch.bfloat16] / max(times[torch.float32], 1e-9)


def warning_for(setting: str, choice: PrecisionChoice, device_type: str) -> str | None:
    """A warning for an explicit bf16 ``setting`` on a CPU that emulates it, with the cost
    measured here."""
    if choice.native_bf16 or device_type != "cpu":
        return None
    return (
        f"rosa-ds: warning: {setting}=bf16 on a CPU without native bf16: a bf16 matmul "
        f"measured {bf16_slowdown():.0f}x slower than fp32 here; set {setting}=auto "
        "(or fp32) unless bf16 numerics are what you are testing"
    )


def resolve(
    cfg: RunConfig, *, resumed_config: Path | None = None
) -> tuple[RunConfig, PrecisionChoice]:
    """The config with ``train.precision`` concrete (``quant.compute_dtype: auto`` follows it).

    ``auto`` resuming a run keeps the precision the run started with (its ``config.yaml``), so
    moving a run to other hardware never changes its numerics halfway.
    """
    device = run_device_type()
    requested = cfg.train.precision
    kept = _precision_of(resumed_config) if requested == "auto" and resumed_config else None
    if kept is not None:
        native, why = native_bf16(device)
        choice = PrecisionChoice(
            requested, kept, f"auto: kept from the run being resumed; {why}", native
        )
    else:
        choice = choose(requested, device)
    train = dataclasses.replace(cfg.train, precision=choice.used)
    return dataclasses.replace(cfg, train=train), choice


def announce(choice: PrecisionChoice, cfg: RunConfig) -> None:
    """Print the choice once on stderr (the main rank calls this after pre-flight; stdout stays
    for results), and a warning where an explicit bf16 setting will be emulated."""
    print(f"precision: {choice.used} ({choice.reason})", file=sys.stderr, flush=True)
    quant_dtype = cfg.quant.compute_dtype if cfg.quant.enabled else None
    settings = {"train.precision": choice.requested, "quant.compute_dtype": quant_dtype}
    explicit_bf16 = [name for name, value in settings.items() if value == "bf16"]
    warning = explicit_bf16 and warning_for(explicit_bf16[0], choice, run_device_type())
    if warning:
        print(warning, file=sys.stderr, flush=True)


def check_ranks_agree(choice: PrecisionChoice) -> None:
    """Every rank resolves ``auto`` alone; where a job's nodes differ in native bf16 the ranks
    would train in different dtypes. One all-reduce after the process group starts: bf16 on
    every rank or on none, else a UserError on every rank."""
    import torch.distributed as dist

    from rosa_ds.dist import all_reduce_sum

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    (bf16_ranks,) = all_reduce_sum([1.0 if choice.used == "bf16" else 0.0])
    if 0 < bf16_ranks < world:
        raise UserError(
            f"train.precision={choice.requested} resolved to bf16 on {int(bf16_ranks)} of "
            f"{world} ranks and to fp32 on the others (their devices differ in native bf16); "
            "set train.precision=bf16 or fp32 explicitly"
        )


def _precision_of(config_yaml: Path) -> str | None:
    import yaml

    try:
        value = (yaml.safe_load(config_yaml.read_text()) or {}).get("train", {}).get("precision")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return value if value in ("bf16", "fp32") else None
