#!/usr/bin/env bash
# One call on the device machine (see ../.library/device): proves the kernels on the real GPU
# (kernel + golden + error tests, built here and carried in .dev/bin) and times every variant
# next to PyTorch in the same run. Results land in $OUT.
#   RUNS="wan1.3b-480p:auto wan14b-720p:auto wan1.3b-480p:portable" TORCH_FOR="wan14b-720p" bash benches/h200.sh
# GEMM=1, BANDWIDTH=1 and DIT="--model 14b ..." add those benchmarks.
set -uo pipefail
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
export NABLA_BACKEND=vulkan NABLA_GOLDEN_DIR=$PWD/.dev/golden
OUT=${OUT:-/tmp/nabla-out}; mkdir -p "$OUT"
BIN=.dev/bin
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
$BIN/nabla info 2>&1 > "$OUT/info.txt"; head -12 "$OUT/info.txt"
# what the driver made of the tensor-core kernels: registers decide workgroups per SM
# (RESULTS.md session 7); STATS="filter ..." adds kernels
for f in "attention/block_sparse_coop[d128,sg32,pairs=false" "linalg/linear[bf16,none,x_f16][coop,sg32,vec8" ${STATS:-}; do
  $BIN/nabla info --kernel-stats "$f" 2>&1 | grep -vE "^(error: XDG|NVIDIA)" | paste - - | tee -a "$OUT/kernel_stats.txt"
done
for t in ${TESTS-kernels golden errors}; do
  echo "== $t on the GPU"; $BIN/$t > "$OUT/test_$t.txt" 2>&1
  grep -E "test result|panicked|FAILED" "$OUT/test_$t.txt" | head -10
done
if [ -n "${TESTS-kernels}" ]; then
  echo "== tensor-core kernels vs reference (unchecked, then NABLA_CHECKED=1)"
  $BIN/kernels attention_coop --nocapture 2>&1 | grep -E "coop h|skipped|test result|panicked" | head -12
  NABLA_CHECKED=1 $BIN/kernels attention_coop 2>&1 | grep -E "test result|panicked"
  if [ -x $BIN/ops_linear ]; then
    $BIN/ops_linear coop --nocapture 2>&1 | grep -E "rel L2|skipped|test result|panicked" | tail -4
    NABLA_CHECKED=1 $BIN/ops_linear coop 2>&1 | grep -E "test result|panicked"
  fi
fi
if [ "${GEMM:-0}" = 1 ]; then
  echo "== nabla bench gemm"
  $BIN/nabla bench gemm --json "$OUT/gemm.json" --reps 10 2>&1 | tee "$OUT/gemm.txt"
  if [ "${TORCH_GEMM:-1}" = 1 ]; then
    echo "== torch gemm"
    python3 benches/torch_gemm.py --json "$OUT/torch_gemm.json" 2>&1 | tee "$OUT/torch_gemm.txt"
  fi
fi
if [ "${BANDWIDTH:-0}" = 1 ]; then
  echo "== nabla bench bandwidth (the ceiling of the kernels' 16-byte loads: L2 and HBM)"
  $BIN/nabla bench bandwidth --json "$OUT/bandwidth.json" 2>&1 | tee "$OUT/bandwidth.txt"
fi
if [ -n "${DIT:-}" ]; then
  echo "== nabla bench dit $DIT"
  $BIN/nabla bench dit $DIT --json "$OUT/dit.json" 2>&1 | tee "$OUT/dit.txt" | grep -v "^error: XDG"
fi
ALGOS=${ALGOS:-nabla-0.7,nabla-0.4,nabla-0.6_sta-11-3-3,sta-11-3-3}
for run in ${RUNS:-wan1.3b-480p:auto}; do
  p=${run%%:*}; k=${run##*:}
  echo "== nabla bench $p ($k)"
  dr=${DENSE_REPS:-3}; [ "$k" = portable ] && dr=1
  $BIN/nabla bench attention --shape "$p" --kernel "$k" --sparse-algo "$ALGOS" --reps "${REPS:-10}" \
    --dense-reps "$dr" --json "$OUT/nabla_${p}_$k.json" --masks-out "/tmp/masks_$p.safetensors" 2>"$OUT/nabla_${p}_$k.log" | tee "$OUT/nabla_${p}_$k.txt" | tail -7
  grep -E "mask stages|error" "$OUT/nabla_${p}_$k.log"
  if [[ " ${TORCH_FOR:-} " == *" $p "* ]]; then
    echo "== torch $p"
    python3 benches/torch_attention.py --masks "/tmp/masks_$p.safetensors" --json "$OUT/torch_$p.json" \
      --iters "${TORCH_ITERS:-10}" --warmup 3 2>"$OUT/torch_$p.log" | tee "$OUT/torch_$p.txt" | tail -14
    TORCH_FOR=${TORCH_FOR/$p/}
  fi
done
