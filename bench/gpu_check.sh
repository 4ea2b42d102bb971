#!/usr/bin/env bash
# One-shot check on one H100/H200 (no network; torch + transformers preinstalled), run from the repo root:
#   OUT=/some/dir bash bench/gpu_check.sh
# Most wanted first (the deadline skips what is left):
# 1. default workload (batch 8, 5 tiles, bf16): sft, coconut, decode, decode_graph, coconut_graphed
#    (compiles last: a timeout loses least; vision was measured before);
# 2. the latent-loop and decoding equality tests (CPU and CUDA tensors; CUDA-graph decoding == eager);
# 3. decoding at batch 32: decode, decode_step, decode_graph (the decode target is at batch 32); batch 8
#    left-padded as real data is (--ragged 8: transformers' masked attention paths): sft, coconut, decode_step;
# 3b. reduce-overhead over a run's mix of latent columns (--shapes 7: each timed step a new column), with
#    the columns bucketed (--column-multiple 64: graphs replayed) and without (graphs recorded each step);
# 4. batch 2: sft, coconut, coconut_graphed, naive (vision re-run every pass), naive_decode — naive at
#    batch 8 would not fit; if naive does not complete at batch 2 (an H100 has ~78 GiB), again at batch 1;
# 5. one profiled run each of sft, coconut, decode at batch 8 (op and launch counts, busy GPU ms, top ops);
# 6. the demo in bf16 on the GPU, eval decoding by CUDA graphs; 7. batch 8 with --freeze-backbone: sft, coconut.
# Every step runs under `timeout`, clamped so that the whole script ends within 7 minutes.
# All output goes to $OUT/gpu_log.txt, the JSON lines to $OUT/bench.jsonl. Exit status 1 if a step failed.
# TINY=1 runs the same steps on the tiny model on CPU (a dry run of this script's logic).
set -u -o pipefail

: "${OUT:?set OUT to an output directory}"
mkdir -p "$OUT"
LOG="$OUT/gpu_log.txt"
JSONL="$OUT/bench.jsonl"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
DEADLINE=$((SECONDS + 400))  # 7 minutes less a margin for start-up and the last step's teardown
FAILED=0

if [[ "${TINY:-0}" == 1 ]]; then
  BENCH=(--tiny --device cpu --dtype fp32 --iters 1 --warmup 0 --tiles 1 --question 8 --latents 2 --answer 8
         --new-tokens 4)
else
  BENCH=(--device cuda --dtype bf16)
fi

log() { echo "$*" | tee -a "$LOG"; }

# step LIMIT_S COMMAND...: run under timeout (clamped to the deadline), output tee'd to the log.
step() {
  local limit=$1 left=$((DEADLINE - SECONDS))
  shift
  if ((left < 20)); then
    log "=== SKIPPED (deadline): $*"
    FAILED=1
    return 1
  fi
  ((limit > left)) && limit=$left
  log "=== $(date -u +%H:%M:%S) [timeout ${limit}s] $*"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  log "=== exit $rc after ${SECONDS}s"
  ((rc == 0)) || FAILED=1
  return "$rc"
}

bench() { step "$1" "$PYTHON" -m bench.bench_step "${BENCH[@]}" "${@:2}" --out "$JSONL"; }

log "=== gpu_check $(date -u +%FT%TZ) TINY=${TINY:-0} commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
fi
"$PYTHON" -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__, torch.cuda.is_available())" 2>&1 | tee -a "$LOG"

if [[ "${TINY:-0}" == 1 ]]; then DECODE_GRAPH=; else DECODE_GRAPH=,decode_graph; fi
bench 240 --batch 8 --modes sft,coconut,decode$DECODE_GRAPH,coconut_graphed
# (the compiled-pass tests run on CPU tensors, the same as in CI: left out here for time)
step 120 "$PYTHON" -m pytest -q -rs tests/unit/test_coconut_text.py tests/unit/test_coconut_mm.py tests/unit/test_decoder_steps.py \
  -k "not (reference and (default or reduce))"
bench 90 --batch 32 --iters 3 --warmup 1 --modes decode,decode_step$DECODE_GRAPH
bench 60 --batch 8 --ragged 8 --modes sft,coconut,decode_step
bench 150 --batch 8 --shapes 7 --column-multiple 64 --modes sft,coconut,coconut_graphed
bench 150 --batch 8 --shapes 7 --modes sft,coconut_graphed
bench 150 --batch 2 --modes sft,coconut,coconut_graphed,naive,naive_decode
if ! grep -q '"mode": "naive", "ms_median"' "$JSONL" 2>/dev/null; then
  log "=== naive did not complete at batch 2: batch 1"
  bench 90 --batch 1 --modes sft,coconut,naive
fi
bench 90 --batch 8 --iters 1 --warmup 1 --profile --modes sft,coconut,decode
# the training CLI on the GPU in bf16 (autocast, fused AdamW, CUDA-graph decoding in eval): the demo, two epochs
sed -e 's/^num_epochs: .*/num_epochs: 2/' -e "s#^save_path: .*#save_path: /tmp/gpu_check_ckpt#" \
    -e 's#data/easy_vqa_demo#data/demo#' args/demo.yaml > /tmp/demo_gpu.yaml  # the committed sample: nothing to build
echo "bf16: true" >> /tmp/demo_gpu.yaml
[[ "${TINY:-0}" == 1 ]] || echo "decode_cuda_graph: true" >> /tmp/demo_gpu.yaml  # a CPU refuses the key
step 90 "$PYTHON" run.py /tmp/demo_gpu.yaml
bench 90 --batch 8 --freeze-backbone --modes sft,coconut

log "=== done in ${SECONDS}s, failed=$FAILED"
exit "$FAILED"
