"""An SVD that does not give up: a resample must not kill a multi-day run because LAPACK (or
cuSOLVER) failed to converge on one ill-conditioned matrix.

Tries, in order: the default driver in the input's precision; on CUDA the other drivers
(``gesvd``, the slow and sure QR-based one, then ``gesvda``); then fp64 on the CPU. Every
fallback is reported on stderr, naming the matrix's shape and what failed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from rosa_ds.errors import TrainingError

SVD = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _attempts(m: torch.Tensor) -> list[tuple[str, Callable[[], SVD]]]:
    def svd(x: torch.Tensor, driver: str | None = None) -> SVD:
        return torch.linalg.svd(x, full_matrices=False, driver=driver)

    out = [("default driver", lambda: svd(m))]
    if m.is_cuda:
        out += [(f"driver {d}", lambda d=d: svd(m, d)) for d in ("gesvd", "gesvda")]
    out.append(("fp64 on the CPU", lambda: svd(m.detach().double().cpu())))
    return out


def robust_svd(m: torch.Tensor, what: str = "matrix") -> SVD:
    """``U, S, Vh`` of ``m`` (reduced), in ``m``'s dtype and device."""
    if not bool(torch.isfinite(m).all()):
        raise TrainingError(
            f"the {what} to factorize ({tuple(m.shape)}) holds NaN or Inf; the adapter has "
            "diverged: continue from the last checkpoint with --resume and a lower train.lr"
        )
    failures = []
    for label, attempt in _attempts(m):
        try:
            u, s, vh = attempt()
        except (RuntimeError, torch.linalg.LinAlgError) as exc:
            failures.append(f"{label}: {str(exc).splitlines()[0]}")
            continue
        if not bool(torch.isfinite(s).all()):  # cuSOLVER can return NaN without raising
            failures.append(f"{label}: non-finite singular values")
            continue
        if failures:
            print(
                f"rosa-ds: warning: SVD of the {what} ({tuple(m.shape)}) fell back to {label} "
                f"({'; '.join(failures)})",
                file=sys.stderr,
            )
        return u.to(m.device, m.dtype), s.to(m.device, m.dtype), vh.to(m.device, m.dtype)
    raise TrainingError(f"SVD of the {what} ({tuple(m.shape)}) failed: {'; '.join(failures)}")
