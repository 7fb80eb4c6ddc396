#!/usr/bin/env bash
# One call on the device machine (see ../.library/device): proves the kernels on the real GPU
# (kernel + golden + error tests, built here and carried in .dev/bin) and times every variant
# next to PyTorch in the same run. Results land in $OUT.
#   PRESETS="wan1.3b-480p wan14b-720p" ALGOS=nabla-0.7,... bash benches/h200.sh
set -uo pipefail
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
export NABLA_BACKEND=vulkan NABLA_GOLDEN_DIR=$PWD/.dev/golden
OUT=${OUT:-/tmp/nabla-out}; mkdir -p "$OUT"
BIN=.dev/bin
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
$BIN/nabla info 2>&1 | tee "$OUT/info.txt" | head -20
if [ "${TESTS:-1}" = 1 ]; then
  for t in kernels golden errors; do
    echo "== $t on the GPU"; $BIN/$t 2>&1 | tee "$OUT/test_$t.txt" | grep -E "^test |test result|panicked" | grep -v " ok$"
  done
fi
ALGOS=${ALGOS:-nabla-0.7,nabla-0.4,nabla-0.6_sta-11-3-3,sta-11-3-3}
for p in ${PRESETS:-wan1.3b-480p}; do
  echo "== nabla bench $p"
  $BIN/nabla bench attention --shape "$p" --sparse-algo "$ALGOS" --reps "${REPS:-10}" \
    --dense-reps "${DENSE_REPS:-3}" --json "$OUT/nabla_$p.json" --masks-out "/tmp/masks_$p.safetensors" 2>&1 | tee "$OUT/nabla_$p.txt" | grep -v "^generating\|\.\.\.$"
  if [ "${TORCH:-1}" = 1 ]; then
    echo "== torch $p"
    python3 benches/torch_attention.py --masks "/tmp/masks_$p.safetensors" --json "$OUT/torch_$p.json" \
      --iters "${TORCH_ITERS:-10}" --warmup 3 2>"$OUT/torch_$p.log" | tee "$OUT/torch_$p.txt"
    tail -3 "$OUT/torch_$p.log"
  fi
done
