"""``launcher/main.py`` as under an MPI whose launcher exports none of the rank variables
rosa-ds knows, so every rank must find its rank and world size through mpi4py.

    mpirun -n 2 python tests/probes/mpi4py_entry.py train --config tiny-lora
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import rosa_ds.dist  # noqa: E402

rosa_ds.dist.MPI_VARS = ()

from rosa_ds.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
