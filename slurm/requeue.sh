# Sourced by the sbatch templates after the run (not run by itself): exit with the run's code,
# and after a stop for preemption or the time limit (code 75, a checkpoint written) put the job
# back in the queue, where train.auto_resume=true continues from that checkpoint.
#
# In: code (the run's exit code), SLURM_JOB_ID, ROSA_DS_REQUEUE (default 1; 0 leaves the job
#     ended).

if [ "$code" -eq 75 ] && [ "${ROSA_DS_REQUEUE:-1}" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "rosa-ds: the run stopped with a checkpoint; requeueing job $SLURM_JOB_ID"
    # a job that SLURM preempts with PreemptMode=REQUEUE is requeued already: no error then
    scontrol requeue "$SLURM_JOB_ID" || true
fi
exit "$code"
