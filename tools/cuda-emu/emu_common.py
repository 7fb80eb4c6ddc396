# Shared by test_attn.py and test_nabla.py: the build folder and the storage encodings
# (dt 0 = f32, 1 = f16, 2 = bf16 rounded to nearest even).
import os
import numpy as np

BUILD = os.environ.get("EMU_BUILD", "/tmp/cuda-emu")

def to_bits(x, dt):
    if dt == 0: return x.astype(np.float32)
    if dt == 1: return x.astype(np.float16).view(np.uint16)
    b = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7fff + ((b >> 16) & 1)) >> 16
    return b.astype(np.uint16)

def from_bits(b, dt):
    if dt == 0: return b.view(np.float32).astype(np.float64)
    if dt == 1: return b.view(np.float16).astype(np.float64)
    return (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
