#!/usr/bin/env python3
"""PyTorch baseline for `nabla bench gemm`: the same linear shapes in bf16 (cuBLAS) on the same GPU.

Usage: python3 benches/torch_gemm.py [--tokens 67200] [--iters 20] [--json out.json]
Times F.linear(x, W, b) with bf16 x, W, b (f32 accumulation inside cuBLAS), median of CUDA-event
timings after warm-up, on random data (never zeros).
"""
import argparse
import json
import statistics
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=67200)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json")
    a = ap.parse_args()
    import torch
    import torch.nn.functional as F
    if not torch.cuda.is_available():
        print("error: CUDA is not available", file=sys.stderr)
        sys.exit(1)
    m = a.tokens
    shapes = [("square 4096", 4096, 4096, 4096),
              ("14B qkvo 5120->5120", m, 5120, 5120), ("14B ffn.0 5120->13824", m, 13824, 5120),
              ("14B ffn.2 13824->5120", m, 5120, 13824), ("1.3B qkvo 1536->1536", m, 1536, 1536),
              ("1.3B ffn.0 1536->8960", m, 8960, 1536), ("1.3B ffn.2 8960->1536", m, 1536, 8960),
              ("text 4096->5120 (512 rows)", 512, 5120, 4096)]
    rows = []
    print(f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda}")
    print(f"{'shape':<28} {'M':>7} {'N':>6} {'K':>6} {'ms':>10} {'TFLOP/s':>9}")
    for name, m_, n, k in shapes:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(m_, k, device="cuda", dtype=torch.bfloat16, generator=g)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.05
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=g)
        for _ in range(3):
            F.linear(x, w, b)
        torch.cuda.synchronize()
        ts = []
        for _ in range(a.iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            F.linear(x, w, b)
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
        ms = statistics.median(ts)
        tf = 2.0 * m_ * n * k / (ms * 1e-3) / 1e12
        print(f"{name:<28} {m_:>7} {n:>6} {k:>6} {ms:>10.3f} {tf:>9.1f}")
        rows.append({"shape": name, "m": m_, "n": n, "k": k, "ms": ms, "tflops": tf})
        del x, w, b
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
