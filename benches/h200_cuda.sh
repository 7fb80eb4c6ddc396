#!/usr/bin/env bash
# One device call for the CUDA layer (see ../.library/device): the `--features cuda` binary and
# test binaries built here and carried in .dev/bin, golden files in .dev/golden. Proves the CUDA
# kernels (tests + selftest), then times attention (both layers + FlexAttention on the same masks)
# and DiT forwards (both layers + benches/torch_dit.py) in the same run. Results land in $OUT;
# everything is summarised in $OUT/summary.txt (printed at the end).
#   STEPS="tests attn dit" DIT_MODEL=1.3b DIT_ALGOS=none,nabla-0.7 bash benches/h200_cuda.sh
#   ATTN_VARIANTS="default NABLA_CUDA_ATTN_KERNEL=tma" compares the attention kernels in one call;
#   DIT_INIT=wan draws the DiT's random weights as the reference fork's benchmarks do (the
#   session-6 comparison with the fork: DIT_MODEL=14b DIT_SIZE=1280*640 DIT_INIT=wan)
set -uo pipefail
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
export NABLA_BACKEND=vulkan NABLA_GOLDEN_DIR=$PWD/.dev/golden
B=.dev/bin; OUT=${OUT:-/tmp/nabla-out}; mkdir -p "$OUT"; S=$OUT/summary.txt; : > "$S"
L=""
for n in libnvrtc.so.13 libcublasLt.so.13; do
  p=$(find /usr/local/cuda*/ /opt/torch/.venv/lib/python3*/site-packages/nvidia -name "$n" 2>/dev/null | head -1)
  [ -n "$p" ] && L="$L:$(dirname "$p")"
done
export LD_LIBRARY_PATH="${L#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> "$S"
STEPS=${STEPS:-tests attn dit}
if [[ " $STEPS " == *" tests "* ]]; then
  for t in ${TESTS:-cuda cuda_nabla}; do
    [ -x $B/$t ] || continue
    timeout 300 $B/$t > "$OUT/test_$t.txt" 2>&1
    echo "$t: $(grep -E 'test result' "$OUT/test_$t.txt" | tail -1)" >> "$S"
    grep -E "^test .* FAILED|panicked at" -A 2 "$OUT/test_$t.txt" | head -12 >> "$S"
  done
  grep -E "GELU fused" "$OUT/test_cuda.txt" 2>/dev/null | head -3 >> "$S"
  timeout 200 $B/nabla selftest --backend cuda > "$OUT/selftest.txt" 2>&1
  echo "selftest cuda: $(tail -1 "$OUT/selftest.txt")" >> "$S"; grep FAIL "$OUT/selftest.txt" | head -8 >> "$S"
fi
if [[ " $STEPS " == *" attn "* ]]; then
  A=${ATTN_ALGOS:-nabla-0.7,nabla-0.4,nabla-0.6_sta-11-3-3}
  for v in ${ATTN_VARIANTS:-default}; do
    echo "== cuda attention wan14b-720p ($v)" >> "$S"
    env $( [ "$v" = default ] || echo "$v" ) timeout 200 $B/nabla bench attention --backend cuda --shape wan14b-720p \
      --sparse-algo "$A" --reps 5 --dense-reps 3 --masks-out /tmp/masks.safetensors 2>"$OUT/attn.log" | grep -E "^dense|^nabla|^sta" >> "$S"
    grep -E "mask stages|error" "$OUT/attn.log" | head -3 >> "$S"
  done
  if [ "${WGPU_ATTN:-1}" = 1 ]; then
    echo "== wgpu attention wan14b-720p" >> "$S"
    timeout 200 $B/nabla bench attention --backend wgpu --shape wan14b-720p --sparse-algo "$A" --reps 5 --dense-reps 2 2>/dev/null | grep -E "^dense|^nabla|^sta" >> "$S"
  fi
  echo "== FlexAttention on the CUDA layer's masks" >> "$S"
  timeout 240 python3 benches/torch_attention.py --masks /tmp/masks.safetensors --iters 10 --warmup 3 2>/dev/null | grep -vE "^wrote" | tail -14 >> "$S"
fi
if [[ " $STEPS " == *" dit "* ]]; then
  M=${DIT_MODEL:-1.3b}; SZ=${DIT_SIZE:-832*480}; AL=${DIT_ALGOS:-none,nabla-0.7}; R=${DIT_REPS:-2}
  INIT=${DIT_INIT:-synthetic}
  for be in ${DIT_BACKENDS:-cuda wgpu}; do
    echo "== nabla bench dit $M $SZ ($be)" >> "$S"
    timeout ${DIT_TIMEOUT:-300} $B/nabla bench dit --backend $be --model "$M" --size "$SZ" --sparse-algo "$AL" --reps "$R" \
      --init "$INIT" --json "$OUT/dit_${M}_$be.json" > "$OUT/dit_${M}_$be.txt" 2>&1
    grep -E "forward|  (attention|GEMM|NABLA mask|norms|elementwise) |error" "$OUT/dit_${M}_$be.txt" >> "$S"
  done
  if [ "${TORCH_DIT:-1}" = 1 ]; then
    echo "== torch_dit.py $M $SZ" >> "$S"
    timeout ${TORCH_TIMEOUT:-300} python3 benches/torch_dit.py --model "$M" --size "$SZ" --frames 81 --sparse-algo "$AL" \
      --runs "$R" --warmup 0 --init "$INIT" --json "$OUT/torch_dit_$M.json" > "$OUT/torch_dit_$M.txt" 2>&1
    grep -vE "^wrote|^timing|^sparse " "$OUT/torch_dit_$M.txt" | tail -10 >> "$S"
  fi
fi
cat "$S"
