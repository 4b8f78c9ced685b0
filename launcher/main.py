"""Start ``rosa-ds`` as one rank of a job, for launchers that run a script per rank.

    deepspeed --num_gpus 2 launcher/main.py train --config tiny-lora
    torchrun --nproc_per_node 2 launcher/main.py train --config tiny-lora
    mpirun -n 2 python launcher/main.py train --config tiny-lora
    srun python launcher/main.py train --config tiny-lora

Each rank finds its rank, world size and master address from what its launcher exported
(see ``rosa_ds.dist.detect_placement``); the user exports nothing.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rosa_ds.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
