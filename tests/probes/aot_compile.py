"""Compile every Triton kernel launch configuration ahead of time for real GPU targets (no GPU
needed) and report what the compiler says: shared memory, registers, tensor-core use.

    python tests/probes/aot_compile.py OUT.json
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rosa_ds.kernels import triton_sparse as ts  # noqa: E402

ARCHS = {80: 163 * 1024, 90: 227 * 1024}  # per-block shared-memory limits (A100, H100)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def registers(cubin: bytes) -> int | None:
    """Registers per thread, read from the cubin by the cuobjdump that ships with Triton."""
    if not CUOBJDUMP.is_file() or not cubin:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    found = re.search(r"REG:(\d+)", out)
    return int(found.group(1)) if found else None


def main() -> None:
    found = sorted(name for name, obj in vars(ts).items() if isinstance(obj, triton.JITFunction))
    results = []
    for name, configs in ts.LAUNCH_CONFIGS.items():
        for config in configs:
            for dt in ts.DTYPES:
                sig = {k: v.format(dt=dt) for k, v in ts.SIGNATURES[name].items()}
                sig.update({k: "constexpr" for k in config})
                for arch, limit in ARCHS.items():
                    src = ASTSource(fn=ts.KERNELS[name], signature=sig, constexprs=config)
                    k = triton.compile(src, target=GPUTarget("cuda", arch, 32))
                    ptx, ttir = k.asm["ptx"], str(k.asm["ttir"])
                    results.append(
                        {
                            "kernel": name,
                            "config": config,
                            "dtype": dt,
                            "arch": arch,
                            "shared": k.metadata.shared,
                            "shared_limit": limit,
                            "num_warps": k.metadata.num_warps,
                            "uses_dot": "tt.dot" in ttir,
                            "tensor_cores": ("wgmma" in ptx) or ("mma.sync" in ptx),
                            "cubin_bytes": len(k.asm.get("cubin", b"")),
                            "registers": registers(k.asm.get("cubin", b"")),
                        }
                    )
    Path(sys.argv[1]).write_text(json.dumps({"found": found, "compiled": results}, indent=1))


if __name__ == "__main__":
    main()
