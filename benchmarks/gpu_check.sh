#!/usr/bin/env bash
# One CUDA GPU, under 10 minutes (15 with part 5's default limit): are the Triton kernels right
# and fast, what do LoRA, RoSA, ROSA and QLoRA steps cost on SmolLM2-135M in bf16, and how do
# they score there?
#
#   bash benchmarks/gpu_check.sh            # on a machine with one CUDA GPU
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere: the same pipeline on the tiny model, CPU
#
# 1. the kernel tests (Triton SpMM, SDDMM, sparse-add against the dense torch reference);
# 2. benchmarks/sparse_kernels.py: the kernels against a dense GEMM on 7B shapes;
# 3. benchmarks/step_time.py --vs lora: RoSA r=8 + 2.3% vs LoRA r=16 at equal budget, bf16;
# 4. 12 training steps each of LoRA, RoSA, ROSA and QLoRA through `rosa-ds train`: tokens/s,
#    MFU (H100/H200/A100 peaks from rosa_ds/telemetry.py) and peak memory against the planner;
# 5. the equal-budget study's small budget (benchmarks/quality.py: LoRA r4, RoSA r2 + 0.58%,
#    ROSA r4, full fine-tuning, 256 test problems) in bf16, the settings of the CPU study's
#    round 3, 4 runs at a time on the one GPU; GPU_CHECK_QUALITY_SEEDS seeds (1 by default: one
#    H100 took over 380 s for 3), GPU_CHECK_QUALITY_LIMIT seconds (300), GPU_CHECK_QUALITY=0 skips it.
# Without a GPU (and without --dry-run) it says so and exits 0. Every part has a time limit; a
# part that fails is reported as such and the rest still runs. The last line gives the figures
# as name=value pairs; the logs are kept in $OUT (default: a new temporary folder).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY="${ROSA_DS_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$(mktemp -d -t rosa-ds-gpu-check.XXXXXX)}"
mkdir -p "$OUT"

if [ "$DRY" = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to $PY (torch.cuda.is_available() is False): nothing to measure"
    echo "gpu_check=skipped"
    exit 0
fi

if [ "$DRY" = 1 ]; then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
    MODEL=builtin:tiny-llama STEPS=3 PRECISION=fp32 LIMIT=120
    SUBSPACE=tiny-subspace LORA=tiny-lora ROBUST=tiny-robust
else
    "$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(), 'torch', torch.__version__)"
    MODEL=builtin:smollm2-135m-instruct STEPS=12 PRECISION=bf16 LIMIT=60  # parts 1-4: 10 minutes at most
    SUBSPACE=smollm2-subspace LORA=smollm2-lora ROBUST=smollm2-robust
fi
FIGURES=()

# 1. kernels against the dense reference
if [ "$DRY" = 0 ]; then
    timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py \
        tests/test_sparse.py >"$OUT/kernel_tests.log" 2>&1
    code=$?
    echo "gpu_check: kernel tests exit $code: $(tail -1 "$OUT/kernel_tests.log")"
    FIGURES+=("kernel_tests=$([ $code = 0 ] && echo pass || echo FAIL)")
    # 2. kernels against a dense GEMM on 7B shapes
    timeout 45 "$PY" benchmarks/sparse_kernels.py --repeat 5 >"$OUT/kernels.log" 2>&1
    echo "gpu_check: kernels: $(tail -1 "$OUT/kernels.log")"
    FIGURES+=("$(tail -1 "$OUT/kernels.log" | tr -s ' ' '\n' | grep '=' | tr '\n' ' ')")
    # 3. RoSA / LoRA step time at equal budget, one GPU, bf16
    timeout 75 "$PY" benchmarks/step_time.py --vs lora --nproc 1 --dtype bf16 \
        >"$OUT/step_time.log" 2>&1
    ratio=$(tail -1 "$OUT/step_time.log" | tr -s ' ' '\n' | grep '^ratio=' | cut -d= -f2)
    echo "gpu_check: step time: $(tail -1 "$OUT/step_time.log")"
    FIGURES+=("rosa_over_lora=${ratio:-FAIL}")
fi

# 4. each method through the real command line, telemetry from its summary.json
run_method() {  # name config overrides...
    local name=$1 config=$2
    shift 2
    timeout "$LIMIT" "$PY" -m rosa_ds.cli train --config "$config" "model.name_or_path=$MODEL" \
        "train.max_steps=$STEPS" train.log_every=1 "train.precision=$PRECISION" \
        eval.num_generate=0 eval.before_training=false eval.max_loss_examples=8 \
        "output_dir=$OUT/$name" "$@" >"$OUT/$name.log" 2>&1
    local code=$?
    "$PY" - "$OUT/$name" "$name" "$code" <<'EOF'
import json, sys
from pathlib import Path

folder, name, code = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
summary = folder / "summary.json"
if code != 0 or not summary.is_file():
    print(f"gpu_check: {name} failed (exit {code}); see {folder}.log", file=sys.stderr)
    print(f"{name}=FAIL")
    sys.exit(0)
t = json.loads(summary.read_text())["telemetry"]
peak = t.get("peak_allocated_bytes") or t.get("peak_rss_above_start_bytes") or 0
mfu = t.get("median_mfu")
plan = t.get("measured_over_planned")
print(
    f"{name}_tok_s={t['median_tokens_per_second']:.0f} {name}_step_s={t['median_step_seconds']:.4f} "
    f"{name}_mfu={'n/a' if mfu is None else f'{mfu:.4f}'} {name}_peak_mib={peak / 2**20:.1f} "
    f"{name}_mem_vs_plan={'n/a' if plan is None else f'{plan:.2f}'}"
)
EOF
}
METHODS="${GPU_CHECK_METHODS-lora rosa subspace qlora}"  # a subset: GPU_CHECK_METHODS=lora
for m in $METHODS; do
    case $m in
        lora) FIGURES+=("$(run_method lora "$LORA" adapter.rank=16)") ;;
        rosa) FIGURES+=("$(run_method rosa "$ROBUST" adapter.robust.mask_warmup_steps=2)") ;;
        subspace) FIGURES+=("$(run_method subspace "$SUBSPACE" adapter.resample_every=4)") ;;
        qlora) FIGURES+=("$(run_method qlora "$LORA" adapter.rank=16 quant.bits=4)") ;;
        *) echo "gpu_check: unknown method $m in GPU_CHECK_METHODS" >&2 ;;
    esac
done

# 5. the equal-budget study's small budget, bf16
if [ "$DRY" = 0 ] && [ "${GPU_CHECK_QUALITY:-1}" = 1 ]; then
    timeout "${GPU_CHECK_QUALITY_LIMIT:-300}" "$PY" benchmarks/quality.py --small-only \
        --only lora-r4 rosa-r2-small subspace-r4 full --steps 64 --batch 4 --mask-warmup 8 \
        --val 64 --test 256 --max-new-tokens 40 --precision bf16 --lrs 2e-3 --full-lrs 1e-4 \
        --seeds "${GPU_CHECK_QUALITY_SEEDS:-1}" --jobs 4 --out "$OUT/quality" >"$OUT/quality.log" 2>&1
    code=$?
    echo "gpu_check: quality exit $code: $(tail -1 "$OUT/quality.log")"
    FIGURES+=("$(tail -1 "$OUT/quality.log" | tr -s ' ' '\n' | grep '_minus_lora=\|^lora_small=' | tr '\n' ' ')")
fi
for f in "${FIGURES[@]}"; do echo "gpu_check: $f"; done
echo "gpu_check=done out=$OUT ${FIGURES[*]}"
