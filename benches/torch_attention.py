#!/usr/bin/env python3
"""PyTorch attention baseline for the nabla benchmarks (same GPU, same block masks).

Usage:
    python3 benches/torch_attention.py --masks masks.safetensors \
        [--json out.json] [--iters 20] [--warmup 5] [--skip-dense-sdpa]

The masks file is written by the Rust benchmark. It holds tensors `mask_<label>`
(uint8, [H, Nb, Nb], 1 = query block i attends key block j, 64-token blocks) and string
metadata `heads`, `head_dim`, `tokens` (S = Nb*64), `grid` ("T,Hb,Wb") and `preset`.

On random bf16 q/k/v of shape [1, H, S, D] (fixed seed) it times, as medians of --iters runs
after --warmup runs (CUDA events, synchronized around every run):
  * SDPA dense (default backend; cuDNN on H200), unless --skip-dense-sdpa;
  * compiled FlexAttention with an all-blocks BlockMask (dense) and with every file mask,
    reporting density, effective TFLOP/s (4*S^2*D*H*density / t) and the relative L2 error
    against an f32 masked-softmax reference on a slice (proves the mask is applied);
  * the NABLA mask estimate of the reference fork (spec 4.4: pool, scores, f32 softmax,
    sort, cumsum, scatter) and, separately, its BlockMask build (spec 4.7), for thr = 0.7 or
    each threshold parsed from a `nabla-<thr>[...]` label.
BlockMasks are built exactly as the fork does: BLOCK_SIZE=64, full blocks only, no mask_mod.
Exit code 2 on a missing/invalid masks file.
"""
import argparse
import json
import math
import os
import statistics
import sys

BLOCK = 64
# GPU-NOTES: defaults fail to compile for 64-blocks on H200; 8 warps is half as fast.
KERNEL_OPTIONS = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
REF_HEADS, REF_QBLOCKS = 2, 4  # slice checked against the f32 reference


def die(msg, code=2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def load_masks(path):
    """Return (meta dict, [(label, uint8 CPU tensor [H, Nb, Nb])]); exits 2 on bad input."""
    if not os.path.isfile(path):
        die(f"masks file not found: {path}")
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            masks = [(n[len("mask_"):], f.get_tensor(n)) for n in sorted(f.keys()) if n.startswith("mask_")]
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad input file
        die(f"cannot read {path} as safetensors: {e}")
    missing = [k for k in ("heads", "head_dim", "tokens", "grid") if k not in meta]
    if missing:
        die(f"{path}: metadata lacks {missing} (has {sorted(meta)})")
    try:
        h, d, s = int(meta["heads"]), int(meta["head_dim"]), int(meta["tokens"])
        grid = tuple(int(x) for x in meta["grid"].split(","))
    except ValueError as e:
        die(f"{path}: bad metadata value: {e}")
    if s <= 0 or s % BLOCK:
        die(f"{path}: tokens={s} is not a positive multiple of {BLOCK}")
    nb = s // BLOCK
    if len(grid) != 3 or math.prod(grid) != nb:
        die(f"{path}: grid {meta['grid']} does not give Nb = tokens/64 = {nb} blocks")
    for label, m in masks:
        if tuple(m.shape) != (h, nb, nb):
            die(f"{path}: mask_{label} has shape {list(m.shape)}, expected [{h}, {nb}, {nb}]")
        if m.dtype.is_floating_point or m.dtype.is_complex:
            die(f"{path}: mask_{label} has dtype {m.dtype}, expected uint8")
    meta.update(heads=h, head_dim=d, tokens=s, nb=nb, grid=grid)
    return meta, masks


def bench(fn, iters, warmup):
    """Median milliseconds of fn() over `iters` runs, each bracketed by CUDA events."""
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def build_block_mask(mask):
    """BlockMask from a bool [H, Nb, Nb] mask, exactly as the NABLA fork (spec 4.7)."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask
    mask = mask.unsqueeze(0)
    kv_nb = mask.sum(-1).to(torch.int32)
    kv_inds = mask.argsort(dim=-1, descending=True).to(torch.int32)
    return BlockMask.from_kv_blocks(torch.zeros_like(kv_nb), kv_inds, kv_nb, kv_inds,
                                    BLOCK_SIZE=BLOCK, mask_mod=None)


def nabla_mask(q, k, thr):
    """Reference NABLA estimate (spec 4.4, no STA): bool [H, Nb, Nb]."""
    import torch
    _, h, s, d = q.shape
    nb = s // BLOCK
    qa = q[0].view(h, nb, BLOCK, d).mean(-2)  # bf16 result, f32 accumulation
    ka = k[0].view(h, nb, BLOCK, d).mean(-2)
    scores = (qa @ ka.transpose(-1, -2)) / math.sqrt(d)  # bf16, as under autocast
    p = torch.softmax(scores.float(), dim=-1)
    vals, inds = p.sort(dim=-1)
    keep = vals.cumsum(dim=-1) >= 1 - thr
    return torch.zeros_like(keep).scatter_(-1, inds, keep)


def reference_slice(q, k, v, mask):
    """f32 block-masked softmax attention for the first heads / query blocks."""
    import torch
    h, nq = min(REF_HEADS, q.shape[1]), min(REF_QBLOCKS, mask.shape[1])
    qs, ks, vs = (t[0, :h].float() for t in (q, k, v))
    qs = qs[:, :nq * BLOCK]
    logits = qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1])
    tok = mask[:h, :nq].bool().repeat_interleave(BLOCK, 1).repeat_interleave(BLOCK, 2)
    p = torch.softmax(logits.masked_fill(~tok, float("-inf")), dim=-1).nan_to_num(0.0)
    return p @ vs, (h, nq * BLOCK)


def rel_err(out, q, k, v, mask):
    ref, (h, n) = reference_slice(q, k, v, mask)
    diff = out[0, :h, :n].float() - ref
    return (diff.norm() / ref.norm().clamp_min(1e-30)).item()


def parse_thr(label):
    """Threshold of a `nabla-<thr>[_sta-...]` label (fork grammar, spec 4.8), else None."""
    if not label.startswith("nabla-"):
        return None
    try:
        return float(label.split("_")[0].rsplit("-", 1)[1])
    except ValueError:
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--masks", required=True, help="safetensors file written by the Rust bench")
    ap.add_argument("--json", help="write rows + env here")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--skip-dense-sdpa", action="store_true")
    args = ap.parse_args()
    if args.iters < 1 or args.warmup < 0:
        die("--iters must be >= 1 and --warmup >= 0")

    meta, masks = load_masks(args.masks)
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import flex_attention

    if not torch.cuda.is_available():
        die("CUDA is not available", code=1)
    if not masks:
        log("warning: no mask_<label> tensors in the file; running dense baselines only")
    H, D, S, NB = meta["heads"], meta["head_dim"], meta["tokens"], meta["nb"]
    dense_flops = 4.0 * S * S * D * H
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, H, S, D, device=dev, dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    env = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "heads": H, "head_dim": D, "tokens": S, "blocks": NB, "grid": list(meta["grid"]),
           "preset": meta.get("preset", ""), "iters": args.iters, "warmup": args.warmup,
           "masks_file": os.path.abspath(args.masks), "kernel_options": KERNEL_OPTIONS}
    rows = []

    def add(name, ms, density=None, err=None, flops=True, **extra):
        tf = dense_flops * density / (ms * 1e-3) / 1e12 if flops and density is not None else None
        rows.append({"name": name, "ms": ms, "tflops": tf, "density": density, "rel_err": err, **extra})
        log(f"  {name}: {ms:.3f} ms")

    with torch.no_grad():
        if not args.skip_dense_sdpa:
            log("SDPA dense ...")
            out = F.scaled_dot_product_attention(q, k, v)
            err = rel_err(out, q, k, v, torch.ones(H, NB, NB, dtype=torch.bool, device=dev))
            add("sdpa dense (default backend)", bench(lambda: F.scaled_dot_product_attention(q, k, v),
                                                      args.iters, args.warmup), 1.0, err, kind="sdpa")

        flex = torch.compile(flex_attention, dynamic=False)

        def run_flex(label, mask_u8, kind):
            mask = mask_u8.to(dev).bool()
            bm = build_block_mask(mask)
            fn = lambda: flex(q, k, v, block_mask=bm, kernel_options=KERNEL_OPTIONS)  # noqa: E731
            log(f"flex {label} (first call compiles) ...")
            out = fn()
            err = rel_err(out, q, k, v, mask)
            add(f"flex {label}", bench(fn, args.iters, args.warmup), mask.float().mean().item(),
                err, kind=kind, label=label)
            del out, bm

        run_flex("dense", torch.ones(H, NB, NB, dtype=torch.uint8), "flex_dense")
        for label, m in masks:
            run_flex(label, m, "flex_mask")

        thrs = sorted({t for t in (parse_thr(lab) for lab, _ in masks) if t is not None}) or [0.7]
        for thr in thrs:
            log(f"NABLA estimate thr={thr} ...")
            est = nabla_mask(q, k, thr)
            dens = est.float().mean().item()
            add(f"nabla mask math thr={thr}", bench(lambda: nabla_mask(q, k, thr), args.iters,
                                                     args.warmup), dens, flops=False,
                kind="nabla_mask", thr=thr)
            add(f"nabla BlockMask build thr={thr}", bench(lambda: build_block_mask(est), args.iters,
                                                           args.warmup), dens, flops=False,
                kind="nabla_build", thr=thr)

    print(f"\nGPU {env['gpu']} | torch {env['torch']} | CUDA {env['cuda']} | cuDNN {env['cudnn']}")
    print(f"H={H} D={D} S={S} Nb={NB} grid={meta['grid']} preset={env['preset'] or '-'} "
          f"(median of {args.iters}, {args.warmup} warm-up)")
    w = max(len(r["name"]) for r in rows)
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    print(f"{'name':<{w}}  {'ms':>10}  {'TFLOP/s':>8}  {'density':>7}  {'rel err':>9}")
    for r in rows:
        print(f"{r['name']:<{w}}  {r['ms']:>10.3f}  {fmt(r['tflops'], '.1f'):>8}  "
              f"{fmt(r['density'], '.4f'):>7}  {fmt(r['rel_err'], '.2e'):>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
