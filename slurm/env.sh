# Sourced by the sbatch templates in this folder (not run by itself): finds the repository and
# its Python, tells a GPU node from a CPU node, and sets the environment NCCL wants.
#
# In:  ROSA_DS_HOME   the repository (the templates default it to the submit directory)
#      ROSA_DS_PYTHON the Python to run (default: $ROSA_DS_VENV/bin/python, else the
#                     repository's .venv/bin/python, else python3 on PATH)
#      CONFIG         the run config, a name or a YAML path (default: tiny-lora)
# Out: ROSA_DS_PYTHON, ROSA_DS_GPUS (GPUs this job sees on its first node; 0 on a CPU node),
#      CONFIG; exported: PATH (the Python's bin first), DS_ACCELERATOR=cpu on a CPU node, NCCL_*.

if [ ! -f "${ROSA_DS_HOME:-}/launcher/main.py" ]; then
    echo "rosa-ds: ROSA_DS_HOME='${ROSA_DS_HOME:-}' is not the rosa-ds repository;" \
        "submit from the repository root or export ROSA_DS_HOME" >&2
    exit 2
fi

if [ -z "${ROSA_DS_PYTHON:-}" ]; then
    if [ -n "${ROSA_DS_VENV:-}" ]; then
        ROSA_DS_PYTHON="$ROSA_DS_VENV/bin/python"
    elif [ -x "$ROSA_DS_HOME/.venv/bin/python" ]; then
        ROSA_DS_PYTHON="$ROSA_DS_HOME/.venv/bin/python"
    else
        ROSA_DS_PYTHON="$(command -v python3 || true)"
    fi
fi
if [ ! -x "$ROSA_DS_PYTHON" ]; then
    echo "rosa-ds: no Python at ROSA_DS_PYTHON='$ROSA_DS_PYTHON'; set ROSA_DS_PYTHON or" \
        "ROSA_DS_VENV, or run 'make install' in the repository" >&2
    exit 2
fi
# deepspeed's scripts and ninja (for DeepSpeed's C++ op builds) live next to the Python
export PATH="$(dirname "$ROSA_DS_PYTHON"):$PATH"
CONFIG="${CONFIG:-tiny-lora}"

# GPUs: SLURM's count for this node if it allocated any, else what nvidia-smi lists.
if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "${SLURM_GPUS_ON_NODE}" -gt 0 ] 2>/dev/null; then
    ROSA_DS_GPUS="$SLURM_GPUS_ON_NODE"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    ROSA_DS_GPUS="$(nvidia-smi -L | grep -c '^GPU')"
else
    ROSA_DS_GPUS=0
fi
if [ "$ROSA_DS_GPUS" -eq 0 ]; then
    # A CPU node: DeepSpeed's CPU accelerator, gloo; the ranks need no GPU and no NCCL.
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi

# NCCL (ignored on a CPU node). Failures raise in every rank instead of hanging until the
# collective timeout; WARN prints NCCL's problems without its chatter. NCCL_SOCKET_IFNAME is
# left to NCCL unless you set it: export NCCL_SOCKET_IFNAME=ib0 (or =^lo,docker0) when NCCL
# picks an interface the other nodes cannot reach, and NCCL_IB_DISABLE=1 on nodes without
# InfiniBand where NCCL's IB probing fails.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_ASYNC_ERROR_HANDLING="${NCCL_ASYNC_ERROR_HANDLING:-1}"  # torch < 2.2's name

echo "rosa-ds: job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}: config $CONFIG," \
    "python $ROSA_DS_PYTHON, GPUs per node ${ROSA_DS_GPUS}${DS_ACCELERATOR:+, DS_ACCELERATOR=$DS_ACCELERATOR}"
