"""Run as every rank of a job: ``rosa-ds ARGS`` where rank 0's device computes bf16 natively
and every other rank's does not, as in a job whose nodes differ.

    torchrun --nproc_per_node 2 tests/probes/precision_probe.py train --config tiny-lora ...
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rosa_ds import precision  # noqa: E402
from rosa_ds.cli import main  # noqa: E402

if __name__ == "__main__":
    native = os.environ.get("RANK", "0") == "0"
    precision.native_bf16 = lambda device_type, flags=None: (native, f"probe: native={native}")
    main(sys.argv[1:])
