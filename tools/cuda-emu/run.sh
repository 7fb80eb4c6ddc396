#!/usr/bin/env bash
# Runs the CUDA kernels of src/cuda/kernels/{nabla,attention,attention_sm90a}.cu on the CPU (one
# OS thread per CUDA thread; ldmatrix / mma / wgmma / cp.async / shuffles emulated from their PTX
# ISA definitions, cp.async groups land only when waited for) against numpy references. Needs g++
# (C++20) and python3 with numpy; no GPU, no CUDA toolkit. Slow: keep shapes small.
#   tools/cuda-emu/run.sh            all attention and mask cases
#   ROT=0 / W2=1 tools/cuda-emu/run.sh attn   walk lists unrotated / the 32-rows-per-warp kernels
#   tools/cuda-emu/run.sh attn90    the Hopper wgmma kernels (attention_sm90a.cu), both load forms
#   tools/cuda-emu/run.sh tma       only its tensor-map (TMA + mbarrier) form
#   tools/cuda-emu/run.sh fa        its dense FlashAttention-3 form (producer warpgroup, ping-pong,
#                                   P V overlapped with the next S)
#   tools/cuda-emu/run.sh fs        its block-sparse form (two query blocks per CTA)
#   tools/cuda-emu/run.sh rope      nabla.cu's RoPE + head split (+ pooling) kernels
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
export EMU_BUILD="${EMU_BUILD:-/tmp/cuda-emu}"
mkdir -p "$EMU_BUILD"
cp "$here"/emu.h "$here"/prims*.h "$here"/*_driver.cpp "$EMU_BUILD"/
python3 "$here/prep.py" "$root/src/cuda/kernels/attention.cu" prims.h "$EMU_BUILD/attn_emu.cpp"
python3 "$here/prep.py" "$root/src/cuda/kernels/nabla.cu" prims.h "$EMU_BUILD/nabla_emu.cpp"
python3 "$here/prep.py" "$root/src/cuda/kernels/attention_sm90a.cu" prims.h "$EMU_BUILD/attn90_emu.cpp"
(cd "$EMU_BUILD" && g++ -std=c++20 -O1 -pthread -Wno-unused-result -ffp-contract=off -o attn_driver attn_driver.cpp \
  && g++ -std=c++20 -O1 -pthread -Wno-unused-result -ffp-contract=off -DSM90A -o attn90_driver attn_driver.cpp \
  && g++ -std=c++20 -O1 -pthread -Wno-unused-result -ffp-contract=off -o nabla_driver nabla_driver.cpp \
  && g++ -std=c++20 -O1 -pthread -Wno-unused-result -ffp-contract=off -o rope_driver rope_driver.cpp)
what="${1:-all}"
if [[ "$what" == all || "$what" == attn ]]; then python3 "$here/test_attn.py"; fi
if [[ "$what" == all || "$what" == attn90 ]]; then KERNEL=wgmma python3 "$here/test_attn.py"; fi
if [[ "$what" == all || "$what" == attn90 || "$what" == tma ]]; then KERNEL=tma python3 "$here/test_attn.py"; fi
if [[ "$what" == all || "$what" == attn90 || "$what" == fa ]]; then KERNEL=fa python3 "$here/test_attn.py"; fi
if [[ "$what" == all || "$what" == attn90 || "$what" == fs ]]; then KERNEL=fs python3 "$here/test_attn.py"; fi
if [[ "$what" == all || "$what" == mask ]]; then python3 "$here/test_nabla.py"; fi
if [[ "$what" == all || "$what" == rope ]]; then python3 "$here/test_rope.py"; fi
