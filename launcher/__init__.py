"""Launch entry points: scripts that launchers which need a file path (deepspeed, torchrun,
mpirun, srun) start once per rank. Rank discovery itself lives in ``rosa_ds.dist``."""
