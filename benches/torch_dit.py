#!/usr/bin/env python3
"""PyTorch baseline for `nabla bench dit`: one Wan 2.1 DiT forward (random weights of the real shapes).

Usage (H200, same flags as `nabla bench dit`):
    python3 benches/torch_dit.py --model 14b --size 1280*720 --frames 81 \
        --sparse-algo none,nabla-0.7,sta-11-3-3,nabla-0.6_sta-11-3-3 --runs 3 --warmup 1 --json out.json
  (pairs with `DIT="--model 14b --size 1280*720 --sparse-algo ..." bash benches/h200.sh`; on the
  device the golden files travel in .dev/golden, so `--check-golden .dev/golden` works there too;
  the 14B needs ~29 GB of bf16 weights and ~6 forwards per algorithm plus one flex compile per
  mask shape: use --runs 2 --warmup 0 to stay inside one 10-minute call)
CPU smoke test at a tiny shape (and proof of the forward against the golden vectors):
    python3 benches/torch_dit.py --model tiny --device cpu --frames 5 \
        --sparse-algo none,nabla-0.7,sta-11-3-3,nabla-0.6_sta-11-3-3 --runs 1 --warmup 0 \
        --check-golden /work/shared/golden

Written from docs/wan-nabla-spec.md (sections 2 and 4), not copied from the reference fork.
  * Model: patch embedding (as a GEMM on gathered 2x2 patches), f64 sinusoid, f32 time MLPs,
    text embedding over `text_len` rows (all rows random, as our CLI feeds them), blocks of
    self-attention (RMSNorm over dim on q/k, 3-D RoPE) -> cross-attention (affine LN, RMSNorm
    q/k, all text rows, no mask) -> FFN (GELU-tanh), f32 head with `e` modulation, unpatchify.
  * Precision (spec 2.10, --dtype bf16): big Linears bf16 weights/activations through F.linear
    (f32 accumulation in cuBLAS); residual stream, LayerNorms, modulation, gates, time MLPs and
    head in f32; q/k RMSNorm rounds the normalized value to bf16 before the f32 weight; RoPE in
    f32 from f64 tables (--rope-f64: in f64 as the reference); attention on bf16 q/k/v.
  * Sizes: W*H -> latent (H/8, W/8); when any algorithm is sparse, latent H and W are floored to
    multiples of 16 for every algorithm of the run (same rule as our CLI and the fork).
  * Dense self-attention: F.scaled_dot_product_attention (default backend, cuDNN on the H200).
  * Sparse (`nabla-THR`, `sta-T-H-W`, `nabla-THR_sta-T-H-W`, spec 4.8): tokens in fractal order
    (8x8 tiles), RoPE table permuted the same way; per layer the block mask is estimated from the
    post-RoPE bf16 q/k (pool 64 tokens, bf16 scores / sqrt(d), f32 softmax, sort, cumsum,
    >= 1 - thr, scatter back; OR STA on the tile grid), turned into a FlexAttention BlockMask
    exactly as the fork (BLOCK_SIZE 64, full blocks only, no mask_mod) and run through
    torch.compile'd flex_attention (CUDA kernel_options BLOCK_M=BLOCK_N=64, 4 warps, 3 stages).
    On CPU compiled flex is probed first; if it fails or ignores the mask the script falls back to
    SDPA with the block mask expanded to a dense [S, S] boolean mask and says so.
Timing: per algorithm one untimed first forward (compiles flex, records the masks' density and
checks the sparse attention of layer 0 against an f32 masked-softmax reference on a slice), then
--warmup forwards, then --runs forwards timed as a whole (CUDA events; median reported), then
ONE extra instrumented forward with CUDA events around every op for the breakdown (no per-op
synchronisation: the categories are GPU time of the ops; "gaps" is what lies between them).
"""
import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time

BLOCK = 64
# GPU-NOTES: with defaults flex fails to compile for 64-blocks on the H200; 8 warps is half as fast.
KERNEL_OPTIONS = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
CATS = ["gemm", "self_attn", "cross_attn", "mask", "blockmask", "norm_mod", "rope", "other"]
CAT_TITLES = {"gemm": "GEMM", "self_attn": "self-attn", "cross_attn": "cross-attn",
              "mask": "mask", "blockmask": "BlockMask", "norm_mod": "norm/mod/elt",
              "rope": "RoPE", "other": "other"}
COMMON = {"freq_dim": 256, "text_len": 512, "text_dim": 4096, "in_dim": 16, "out_dim": 16,
          "patch": (1, 2, 2), "eps": 1e-6}
CONFIGS = {
    "1.3b": dict(COMMON, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "14b": dict(COMMON, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # head_dim 128 as in the real models (and the golden tiny DiT), small everything else
    "tiny": dict(COMMON, dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64, text_len=16),
}
DEFAULT_SIZE = {"1.3b": "832*480", "14b": "832*480", "tiny": "384*384"}


def die(msg, code=2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# sparse_algo grammar (spec 4.8)

def parse_algo(s):
    """None for dense, else {"name", "thr" (or None), "sta" (tuple or None)}."""
    s = s.strip()
    if s in ("", "none", "dense"):
        return None
    try:
        if "_" in s:
            a, b = s.split("_")  # more than one "_" is an error, as in the fork
            thr = float(a.rsplit("-", 1)[1])
            sta = tuple(int(x) for x in b.split("-")[1:])
        elif "nabla" in s:
            thr, sta = float(s.rsplit("-", 1)[1]), None
        elif "sta" in s:
            thr, sta = None, tuple(int(x) for x in s.split("-")[1:])
        else:
            raise ValueError("neither nabla nor sta")
        if sta is not None and (len(sta) != 3 or min(sta) < 1):
            raise ValueError("STA needs three positive window sizes")
    except ValueError as e:
        die(f"--sparse-algo {s!r}: {e} (use none, nabla-0.7, sta-11-3-3, nabla-0.6_sta-11-3-3)")
    return {"name": s, "thr": thr, "sta": sta}


# ------------------------------------------------------------------------------------------------
# timers

class NullTimer:
    _ctx = contextlib.nullcontext()

    def __call__(self, cat):
        return self._ctx


class OpTimer:
    """Records (category, start, end) per op: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, cuda):
        self.cuda, self.records = cuda, []

    @contextlib.contextmanager
    def __call__(self, cat):
        import torch
        if self.cuda:
            s = torch.cuda.Event(enable_timing=True)
            s.record()
            yield
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.records.append((cat, s, e))
        else:
            t0 = time.perf_counter()
            yield
            self.records.append((cat, (time.perf_counter() - t0) * 1e3, None))

    def totals(self):
        import torch
        if self.cuda:
            torch.cuda.synchronize()
        out, counts = {c: 0.0 for c in CATS}, {c: 0 for c in CATS}
        for cat, s, e in self.records:
            out[cat] += s.elapsed_time(e) if self.cuda else s
            counts[cat] += 1
        return out, counts


def time_call(fn, cuda):
    import torch
    if cuda:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        s.record()
        r = fn()
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e), r
    t0 = time.perf_counter()
    r = fn()
    return (time.perf_counter() - t0) * 1e3, r


# ------------------------------------------------------------------------------------------------
# grid helpers: fractal order (spec 4.2), RoPE tables (2.6), STA (4.5), NABLA (4.4), BlockMask (4.7)

def fractal_perm(T, Hp, Wp, device):
    """perm[j] = natural index of the token at fractal position j (x_fractal = x[perm])."""
    import torch
    Hb, Wb = Hp // 8, Wp // 8
    ar = lambda n: torch.arange(n, device=device)  # noqa: E731
    f = ar(T).view(T, 1, 1, 1, 1)
    hb, wb = ar(Hb).view(1, Hb, 1, 1, 1), ar(Wb).view(1, 1, Wb, 1, 1)
    g1, g2 = ar(8).view(1, 1, 1, 8, 1), ar(8).view(1, 1, 1, 1, 8)
    perm = (f * Hp * Wp + (hb * 8 + g1) * Wp + wb * 8 + g2).reshape(-1)
    return perm, torch.argsort(perm)


def rope_angles(T, Hp, Wp, hd, device):
    """Per-token RoPE angles [S, hd/2] in f64, natural order (spec 2.6)."""
    import torch
    d_f, d_hw = hd - 4 * (hd // 6), 2 * (hd // 6)

    def table(n, d):  # positions 0..n-1 x frequencies 10000^(-2k/d), k < d/2
        w = 1.0 / torch.pow(10000.0, torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
        return torch.outer(torch.arange(n, dtype=torch.float64, device=device), w)

    at, ah, aw = table(T, d_f), table(Hp, d_hw), table(Wp, d_hw)
    ang = torch.cat([at.view(T, 1, 1, -1).expand(T, Hp, Wp, -1),
                     ah.view(1, Hp, 1, -1).expand(T, Hp, Wp, -1),
                     aw.view(1, 1, Wp, -1).expand(T, Hp, Wp, -1)], dim=-1)
    return ang.reshape(T * Hp * Wp, hd // 2)


def sta_mask(T, Hb, Wb, win, device):
    """bool [Nb, Nb]: |dt| <= wT//2 and |dy| <= wH//2 and |dx| <= wW//2 on the block grid."""
    import torch
    b = torch.arange(T * Hb * Wb, device=device)
    t, y, x = b // (Hb * Wb), (b // Wb) % Hb, b % Wb
    close = lambda c, w: (c[:, None] - c[None, :]).abs() <= w // 2  # noqa: E731
    return close(t, win[0]) & close(y, win[1]) & close(x, win[2])


def nabla_mask(q, k, heads, thr, sta):
    """bool [H, Nb, Nb] from q, k [S, dim] (fractal order, post-RoPE, compute dtype).

    Pooling over each run of 64 tokens (mean in the tensor's dtype, f32 accumulation), scores
    in the tensor's dtype divided by sqrt(d), f32 softmax over key blocks, ascending sort,
    inclusive cumsum, keep >= 1 - thr, scatter back, OR the STA mask if any."""
    import torch
    s, dim = q.shape
    d, nb = dim // heads, s // BLOCK
    qa = q.view(nb, BLOCK, heads, d).mean(1).transpose(0, 1)  # [H, Nb, d]
    ka = k.view(nb, BLOCK, heads, d).mean(1).transpose(0, 1)
    scores = (qa @ ka.transpose(-1, -2)) / math.sqrt(d)
    p = torch.softmax(scores.float(), dim=-1)
    vals, inds = p.sort(dim=-1)
    keep = vals.cumsum(dim=-1) >= 1 - thr
    m = torch.zeros_like(keep).scatter_(-1, inds, keep)
    if sta is not None:
        m |= sta
    return m


def build_block_mask(m):
    """FlexAttention BlockMask from bool [H, Nb, Nb], exactly as the fork: full blocks only.

    The fork passes one index tensor as both the partial and the full list (no partial blocks).
    On CPU, inductor's flex template (torch 2.15) fails to compile with that aliasing
    ("kv_indices was not declared"), so there the (never read) partial list is a copy."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask
    m = m.unsqueeze(0)
    kv_nb = m.sum(-1).to(torch.int32)
    kv_inds = m.argsort(dim=-1, descending=True).to(torch.int32)
    partial = kv_inds if kv_inds.is_cuda else kv_inds.clone()
    return BlockMask.from_kv_blocks(torch.zeros_like(kv_nb), partial, kv_nb, kv_inds,
                                    BLOCK_SIZE=BLOCK, mask_mod=None)


def masked_reference(q, k, v, m, heads=2, qblocks=4):
    """f32 block-masked softmax attention on a slice: q/k/v [1, H, S, D], m bool [H|1, Nb, Nb]."""
    import torch
    h, nq = min(heads, q.shape[1]), min(qblocks, m.shape[1])
    qs, ks, vs = (t[0, :h].float() for t in (q, k, v))
    qs = qs[:, :nq * BLOCK]
    logits = qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mm = m.expand(q.shape[1], -1, -1)[:h, :nq]
    tok = mm.repeat_interleave(BLOCK, 1).repeat_interleave(BLOCK, 2)
    p = torch.softmax(logits.masked_fill(~tok, float("-inf")), dim=-1).nan_to_num(0.0)
    return p @ vs, h, nq * BLOCK


def rel_l2(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ------------------------------------------------------------------------------------------------
# sparse attention back-ends

class SparseAttention:
    """Block-sparse self-attention: compiled flex_attention, or masked SDPA as a CPU fallback."""

    def __init__(self, device, impl):
        import torch
        self.device, self.impl, self.note = device, impl, ""
        self.cuda = device.type == "cuda"
        self._flex = None
        if impl in ("auto", "flex"):
            from torch.nn.attention.flex_attention import flex_attention
            # every new shape (heads 1 for STA-only, other grids in the golden check) recompiles;
            # past dynamo's limit flex would silently run eagerly and ignore the block mask
            cfg = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(cfg, name):
                    setattr(cfg, name, max(64, getattr(cfg, name)))
            if hasattr(cfg, "fail_on_recompile_limit_hit"):
                cfg.fail_on_recompile_limit_hit = True
            self._flex = torch.compile(flex_attention, dynamic=False)
            if self.cuda:
                self.impl = "flex"
                self.name = f"flex_attention (torch.compile, kernel_options {KERNEL_OPTIONS})"
            else:
                self._probe(force=impl == "flex")
        elif impl == "masked-sdpa":
            self.impl, self.name = "masked-sdpa", "SDPA with the block mask expanded to [S, S] (explicit)"
        else:
            die(f"--sparse-impl {impl!r}: use auto, flex or masked-sdpa")

    def _probe(self, force):
        """CPU: does compiled flex run and honour the block mask? Otherwise fall back."""
        import torch
        g = torch.Generator().manual_seed(7)
        h, s, d = 2, 4 * BLOCK, 128
        q, k, v = (torch.randn(1, h, s, d, generator=g).to(torch.bfloat16) for _ in range(3))
        m = torch.rand(h, 4, 4, generator=g) < 0.5
        m[:, torch.arange(4), torch.arange(4)] = True
        err, why = None, ""
        try:
            out = self._flex(q, k, v, block_mask=build_block_mask(m))
            ref, hh, n = masked_reference(q, k, v, m, heads=h, qblocks=4)
            err = rel_l2(out[0, :hh, :n], ref)
            if not err < 2e-2:
                why = f"compiled flex ignores the block mask (rel L2 {err:.2e} vs masked reference)"
        except Exception as e:  # noqa: BLE001 - any failure of flex on CPU means: fall back
            why = f"compiled flex failed on CPU: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if not why:
            self.impl, self.name = "flex", f"flex_attention (torch.compile, CPU; probe rel L2 {err:.1e})"
            return
        if force:
            die(why, code=1)
        log(f"note: {why}; falling back to masked SDPA")
        self.impl, self._flex = "masked-sdpa", None
        self.name = "SDPA with the block mask expanded to [S, S] (CPU fallback: " + why + ")"
        self.note = why

    def __call__(self, q, k, v, m, bm):
        import torch.nn.functional as F
        if self.impl == "flex":
            if self.cuda:
                # f32 operands (golden check, --dtype f32): 3 stages of f32 64x128 K/V tiles
                # would not fit in shared memory; one stage does
                ko = KERNEL_OPTIONS if q.element_size() <= 2 else dict(KERNEL_OPTIONS, num_stages=1)
                return self._flex(q, k, v, block_mask=bm, kernel_options=ko)
            return self._flex(q, k, v, block_mask=bm)
        tok = m.unsqueeze(0).repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=tok)


# ------------------------------------------------------------------------------------------------
# the model

BIG_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
               "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def param_shapes(cfg):
    """Official key -> (shape, kind); kind 'big' = compute dtype (bf16 Linears), else f32."""
    d, f, td, fd = cfg["dim"], cfg["ffn_dim"], cfg["text_dim"], cfg["freq_dim"]
    sh = {"patch_embedding.weight": ((d, cfg["in_dim"], 1, 2, 2), "big"),
          "patch_embedding.bias": ((d,), "big"),
          "text_embedding.0.weight": ((d, td), "big"), "text_embedding.0.bias": ((d,), "big"),
          "text_embedding.2.weight": ((d, d), "big"), "text_embedding.2.bias": ((d,), "big"),
          "time_embedding.0.weight": ((d, fd), "f32"), "time_embedding.0.bias": ((d,), "f32"),
          "time_embedding.2.weight": ((d, d), "f32"), "time_embedding.2.bias": ((d,), "f32"),
          "time_projection.1.weight": ((6 * d, d), "f32"), "time_projection.1.bias": ((6 * d,), "f32"),
          "head.modulation": ((1, 2, d), "f32"),
          "head.head.weight": ((cfg["out_dim"] * 4, d), "f32"), "head.head.bias": ((cfg["out_dim"] * 4,), "f32")}
    for i in range(cfg["num_layers"]):
        p = f"blocks.{i}."
        sh[p + "modulation"] = ((1, 6, d), "f32")
        for name in BIG_LINEARS:
            o, n = {"ffn.0": (f, d), "ffn.2": (d, f)}.get(name, (d, d))
            sh[p + name + ".weight"] = ((o, n), "big")
            sh[p + name + ".bias"] = ((o,), "big")
        for a in ("self_attn", "cross_attn"):
            sh[p + a + ".norm_q.weight"] = ((d,), "norm")
            sh[p + a + ".norm_k.weight"] = ((d,), "norm")
        sh[p + "norm3.weight"] = ((d,), "norm")
        sh[p + "norm3.bias"] = ((d,), "f32")
    return sh


def synthetic_std(key, shape):
    """(std, mean) of one tensor's normal draw in nabla's synthetic init (src/wan/dit.rs,
    `RandomWeights::synthetic`), so that both forwards see the same weight distributions and
    therefore NABLA masks of the same density: every name with "norm" N(1, 0.1) (norm3.bias
    too, as there), modulations N(0, 0.1), biases N(0, 0.02), weights N(0, 1/fan_in)."""
    if "norm" in key:
        return 0.1, 1.0
    if key.endswith("modulation"):
        return 0.1, 0.0
    if key.endswith("bias"):
        return 0.02, 0.0
    return 1.0 / math.sqrt(max(math.prod(shape[1:]), 1)), 0.0


def wan_init(key, shape, g, device):
    """One tensor as the reference's WanModel.init_weights() leaves it (f32)."""
    import torch
    t = torch.empty(shape, device=device, dtype=torch.float32)
    fan_in, fan_out = (math.prod(shape[1:]), shape[0]) if len(shape) > 1 else (1, 1)
    if key.endswith("modulation"):
        return t.normal_(0.0, 1.0 / math.sqrt(shape[-1]), generator=g)
    if "norm" in key:
        return t.fill_(1.0 if key.endswith("weight") else 0.0)
    if key == "patch_embedding.bias":  # nn.Conv3d's default, left alone by init_weights
        bound = 1.0 / math.sqrt(COMMON["in_dim"] * math.prod(COMMON["patch"]))
        return t.uniform_(-bound, bound, generator=g)
    if key.endswith("bias") or key == "head.head.weight":
        return t.zero_()
    if key.startswith(("text_embedding.", "time_embedding.")):
        return t.normal_(0.0, 0.02, generator=g)
    a = math.sqrt(6.0 / (fan_in + fan_out))  # xavier_uniform_ (patch embedding: flatten(1))
    return t.uniform_(-a, a, generator=g)


class WanDiT:
    def __init__(self, cfg, device, cdt, state=None, seed=0, rope_f64=False, sparse=None,
                 init="synthetic"):
        import torch
        self.cfg, self.dev, self.cdt, self.rope_f64 = cfg, device, cdt, rope_f64
        self.heads, self.dim = cfg["num_heads"], cfg["dim"]
        self.hd = self.dim // self.heads
        self.eps = cfg["eps"]
        self.sparse = sparse
        self.p = {}
        g = torch.Generator(device=device).manual_seed(seed)
        for key, (shape, kind) in param_shapes(cfg).items():
            dt = cdt if kind == "big" else torch.float32
            if state is not None:
                if key not in state:
                    die(f"golden weights lack {key}")
                t = state[key].to(device=device, dtype=dt)
                if tuple(t.shape) != tuple(shape):
                    die(f"golden {key} has shape {list(t.shape)}, expected {list(shape)}")
            elif init == "wan":
                t = wan_init(key, shape, g, device).to(dt)
            else:
                std, mean = synthetic_std(key, shape)
                t = (torch.randn(shape, generator=g, device=device, dtype=torch.float32)
                     .mul_(std).add_(mean).to(dt))
            self.p[key] = t
        self.p["patch_embedding.weight"] = self.p["patch_embedding.weight"].reshape(self.dim, -1)
        self._grid_cache = {}
        self.record = None  # dict to collect masks/densities/checks during an untimed forward

    def weight_bytes(self):
        return sum(t.numel() * t.element_size() for t in self.p.values())

    def _grid(self, T, Hp, Wp, fractal):
        key = (T, Hp, Wp, fractal)
        if key not in self._grid_cache:
            ang = rope_angles(T, Hp, Wp, self.hd, self.dev)
            perm = inv = None
            if fractal:
                perm, inv = fractal_perm(T, Hp, Wp, self.dev)
                ang = ang[perm]
            cos, sin = ang.cos().unsqueeze(1), ang.sin().unsqueeze(1)  # [S, 1, hd/2]
            if not self.rope_f64:
                cos, sin = cos.float(), sin.float()
            self._grid_cache[key] = (cos, sin, perm, inv)
        return self._grid_cache[key]

    # -- small ops (f32 unless stated) --
    def _ln(self, x):
        """Parameter-free LayerNorm: f32 math, cast back to x's dtype (block 0: bf16), then f32."""
        import torch.nn.functional as F
        return F.layer_norm(x.float(), (self.dim,), eps=self.eps).to(x.dtype).float()

    def _rms(self, x, w):
        """WanRMSNorm: normalize in f32, round to x's dtype, times the f32 weight -> f32."""
        import torch
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * w

    def _rope(self, x, cos, sin):
        """x [S, dim] f32 -> rotated pairs (2j, 2j+1) per head, returned in the compute dtype."""
        import torch
        s = x.shape[0]
        if self.rope_f64:
            x = x.double()
        xr = x.view(s, self.heads, self.hd // 2, 2)
        a, b = xr[..., 0], xr[..., 1]
        out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
        return out.view(s, self.dim).float().to(self.cdt)

    def _heads(self, x):  # [S, dim] -> [1, H, S, hd] (strided view, no copy)
        return x.view(1, x.shape[0], self.heads, self.hd).transpose(1, 2)

    def _merge(self, o):  # [1, H, S, hd] -> [S, dim]
        return o.transpose(1, 2).reshape(o.shape[2], self.dim)

    def forward(self, latent, t, context, algo=None, tm=None):
        """latent [16, T, H, W] f32, t float, context [L, text_dim] -> velocity [16, T, H, W] f32."""
        import torch
        import torch.nn.functional as F
        tm = tm or NullTimer()
        p, cdt, dim, eps = self.p, self.cdt, self.dim, self.eps
        C_in, T, H, W = latent.shape
        Hp, Wp = H // 2, W // 2
        S = T * Hp * Wp
        sparse = algo is not None
        cos, sin, perm, inv = self._grid(T, Hp, Wp, sparse)
        Hb, Wb = (Hp // 8, Wp // 8) if sparse else (0, 0)

        # patch embedding: Conv3d (1,2,2) == GEMM on (c, q, r)-ordered 64-vectors
        with tm("other"):
            patches = (latent.to(cdt).view(C_in, T, Hp, 2, Wp, 2).permute(1, 2, 4, 0, 3, 5)
                       .reshape(S, C_in * 4))
        with tm("gemm"):
            x = F.linear(patches, p["patch_embedding.weight"], p["patch_embedding.bias"])
        if sparse:
            with tm("other"):
                x = x[perm]
        # time: f64 sinusoid (cos first, exponent -i/half), f32 MLPs
        with tm("other"):
            half = self.cfg["freq_dim"] // 2
            w = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=self.dev) / half)
            ph = float(t) * w
            emb = torch.cat([ph.cos(), ph.sin()]).float().unsqueeze(0)
            e = F.linear(F.silu(F.linear(emb, p["time_embedding.0.weight"], p["time_embedding.0.bias"])),
                         p["time_embedding.2.weight"], p["time_embedding.2.bias"])
            e0 = F.linear(F.silu(e), p["time_projection.1.weight"], p["time_projection.1.bias"])
            e0 = e0.view(6, dim)
        # text: zero-pad to text_len rows, bf16 Linears, GELU-tanh
        with tm("other"):
            c0 = torch.zeros(self.cfg["text_len"], self.cfg["text_dim"], device=self.dev, dtype=cdt)
            c0[:context.shape[0]] = context.to(cdt)
        with tm("gemm"):
            ctx = F.linear(c0, p["text_embedding.0.weight"], p["text_embedding.0.bias"])
        with tm("norm_mod"):
            ctx = F.gelu(ctx, approximate="tanh")
        with tm("gemm"):
            ctx = F.linear(ctx, p["text_embedding.2.weight"], p["text_embedding.2.bias"])

        for i in range(self.cfg["num_layers"]):
            b = f"blocks.{i}."
            lin = lambda name, a: F.linear(a, p[b + name + ".weight"], p[b + name + ".bias"])  # noqa: E731
            # 1. self-attention
            with tm("norm_mod"):
                m = p[b + "modulation"][0] + e0  # [6, dim] f32
                a = (self._ln(x) * (1 + m[1]) + m[0]).to(cdt)
            with tm("gemm"):
                q = lin("self_attn.q", a)
            with tm("gemm"):
                k = lin("self_attn.k", a)
            with tm("gemm"):
                v = lin("self_attn.v", a)
            with tm("norm_mod"):
                q = self._rms(q, p[b + "self_attn.norm_q.weight"])
                k = self._rms(k, p[b + "self_attn.norm_k.weight"])
            with tm("rope"):
                q = self._rope(q, cos, sin)
                k = self._rope(k, cos, sin)
            qh, kh, vh = self._heads(q), self._heads(k), self._heads(v)
            if not sparse:
                with tm("self_attn"):
                    o = self._merge(F.scaled_dot_product_attention(qh, kh, vh))
            else:
                with tm("mask"):
                    sta = (sta_mask(T, Hb, Wb, algo["sta"], self.dev)
                           if algo["sta"] is not None else None)
                    if algo["thr"] is None:
                        mk = sta.unsqueeze(0)  # STA only: one mask for every head
                    else:
                        mk = nabla_mask(q, k, self.heads, algo["thr"], sta)
                with tm("blockmask"):
                    bm = build_block_mask(mk)
                with tm("self_attn"):
                    oh = self.sparse(qh, kh, vh, mk, bm)
                    o = self._merge(oh)
                if self.record is not None:
                    self.record.setdefault("density", []).append(mk.float().mean().item())
                    if "masks" in self.record:  # golden check only (14B: 44 MB per layer)
                        self.record["masks"].append(mk.to("cpu"))
                    if i == 0:
                        ref, hh, n = masked_reference(qh, kh, vh, mk)
                        self.record["layer0_rel_l2_vs_masked_ref"] = rel_l2(oh[0, :hh, :n], ref)
            with tm("gemm"):
                y = lin("self_attn.o", o)
            if self.record is not None and i == 0 and "masks" in self.record:
                self.record["block0_self_attn_out"] = y.float().cpu()
            with tm("norm_mod"):
                x = x + y.float() * m[2]
            # 2. cross-attention (affine LN, RMS q/k, all text rows, no RoPE, no gate)
            with tm("norm_mod"):
                c = F.layer_norm(x.float(), (dim,), p[b + "norm3.weight"], p[b + "norm3.bias"],
                                 eps).to(cdt)
            with tm("gemm"):
                qc = lin("cross_attn.q", c)
            with tm("gemm"):
                kc = lin("cross_attn.k", ctx)
            with tm("gemm"):
                vc = lin("cross_attn.v", ctx)
            with tm("norm_mod"):
                qc = self._rms(qc, p[b + "cross_attn.norm_q.weight"]).to(cdt)
                kc = self._rms(kc, p[b + "cross_attn.norm_k.weight"]).to(cdt)
            with tm("cross_attn"):
                oc = self._merge(F.scaled_dot_product_attention(
                    self._heads(qc), self._heads(kc), self._heads(vc)))
            with tm("gemm"):
                y = lin("cross_attn.o", oc)
            with tm("norm_mod"):
                x = x + y.float()
            # 3. feed-forward
            with tm("norm_mod"):
                f = (self._ln(x) * (1 + m[4]) + m[3]).to(cdt)
            with tm("gemm"):
                h = lin("ffn.0", f)
            with tm("norm_mod"):
                h = F.gelu(h, approximate="tanh")
            with tm("gemm"):
                y = lin("ffn.2", h)
            with tm("norm_mod"):
                x = x + y.float() * m[5]

        # head (f32, modulated by e), back to natural order, unpatchify
        with tm("norm_mod"):
            hm = p["head.modulation"][0] + e
            z = self._ln(x) * (1 + hm[1]) + hm[0]
        with tm("gemm"):
            out = F.linear(z, p["head.head.weight"], p["head.head.bias"])
        with tm("other"):
            if sparse:
                out = out[inv]
            c_out = self.cfg["out_dim"]
            vel = (out.view(T, Hp, Wp, 2, 2, c_out).permute(5, 0, 1, 3, 2, 4)
                   .reshape(c_out, T, H, W).float())
        return vel


# ------------------------------------------------------------------------------------------------
# golden check (/work/shared/golden: wan_dit_tiny_weights + wan_dit cases)

def check_golden(gdir, device, dtypes, sparse_impl, rope_f64):
    import torch
    from safetensors.torch import load_file
    man_path = os.path.join(gdir, "manifest.json")
    if not os.path.isfile(man_path):
        die(f"--check-golden: {man_path} not found")
    with open(man_path) as fh:
        man = json.load(fh)
    wcase = next((c for c in man["cases"] if c["kind"] == "state_dict" and "dit" in c["name"]), None)
    if wcase is None:
        die("--check-golden: no DiT state_dict case in the manifest")
    gc = wcase["config"]
    cfg = dict(COMMON, dim=gc["dim"], ffn_dim=gc["ffn_dim"], num_heads=gc["num_heads"],
               num_layers=gc["num_layers"], text_dim=gc["text_dim"], text_len=gc["text_len"],
               freq_dim=gc["freq_dim"], in_dim=gc["in_dim"], out_dim=gc["out_dim"], eps=gc["eps"])
    state = load_file(os.path.join(gdir, wcase["file"]))
    sparse = SparseAttention(device, sparse_impl)
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
    results, ok = [], True
    for cdt in dtypes:
        model = WanDiT(cfg, device, cdt, state=state, rope_f64=rope_f64, sparse=sparse)
        for case in (c for c in man["cases"] if c["kind"] == "wan_dit"):
            g = load_file(os.path.join(gdir, case["file"]))
            x, ctx = g["x"].to(device), g["context"].to(device)
            t = float(g["t"].reshape(-1)[0])
            runs = [(None, "out_dense")]
            for tn in case["tensors"]:
                prm = tn.get("params") or {}
                if tn["name"].startswith("out_") and "sparse_algo" in prm:
                    runs.append((prm["sparse_algo"], tn["name"]))
            for algo_s, out_name in runs:
                algo = parse_algo(algo_s) if algo_s else None
                model.record = {"masks": []}
                with torch.no_grad():
                    out = model.forward(x, t, ctx, algo)
                rec, model.record = model.record, None
                err = rel_l2(out.cpu(), g[out_name])
                mad = (out.cpu().double() - g[out_name].double()).abs().max().item()
                row = {"case": case["name"], "dtype": str(cdt).replace("torch.", ""),
                       "algo": algo_s or "dense", "rel_l2": err, "max_abs": mad,
                       "tol_rel_l2": tol[cdt]}
                if algo_s is None and "block0_self_attn_out" in g:
                    row["block0_self_attn_rel_l2"] = rel_l2(rec["block0_self_attn_out"],
                                                           g["block0_self_attn_out"])
                if algo_s is not None:
                    mism = tot = 0
                    for tn in case["tensors"]:
                        prm = tn.get("params") or {}
                        if prm.get("sparse_algo") == algo_s and "layer" in prm:
                            gm = g[tn["name"]].bool()[0]
                            mine = rec["masks"][prm["layer"]]
                            mine = mine.expand_as(gm) if mine.shape != gm.shape else mine
                            mism += int((mine != gm).sum())
                            tot += gm.numel()
                    row["mask_mismatches"] = f"{mism}/{tot}"
                    row["layer0_sparse_attn_rel_l2_vs_masked_ref"] = rec.get("layer0_rel_l2_vs_masked_ref")
                    if "fractal_perm" in g:
                        T, Hp, Wp = (int(v) for v in g["grid_sizes"].reshape(-1))
                        perm, _ = fractal_perm(T, Hp, Wp, "cpu")
                        row["fractal_perm_exact"] = bool(torch.equal(perm, g["fractal_perm"].long()))
                flips = algo_s is not None and not row["mask_mismatches"].startswith("0/")
                # f32 must match the f32 golden masks exactly (their margins are >= 4e-4); a bf16
                # estimate may flip a block near the cut (spec 4.4), which moves the output O(1)
                # locally: reported, not failed
                row["pass"] = (err < tol[cdt] and not flips) if cdt == torch.float32 else (
                    err < tol[cdt] or flips)
                if flips and cdt != torch.float32:
                    row["note"] = "bf16 mask estimate flipped block(s) near the cut"
                ok &= row["pass"]
                results.append(row)
    print(f"\ngolden check ({gdir}, weights {wcase['file']}, sparse attention: {sparse.name})")
    print(f"{'case':<16} {'dtype':<9} {'algo':<22} {'rel L2':>9} {'max abs':>9} {'masks diff':>11}  ok")
    for r in results:
        print(f"{r['case']:<16} {r['dtype']:<9} {r['algo']:<22} {r['rel_l2']:>9.2e} {r['max_abs']:>9.2e} "
              f"{r.get('mask_mismatches', '-'):>11}  {'yes' if r['pass'] else 'NO'}"
              + (f" ({r['note']})" if r.get("note") else ""))
    return {"ok": ok, "rows": results, "sparse_attention": sparse.name}


# ------------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="1.3b", choices=["1.3b", "14b", "tiny"])
    ap.add_argument("--size", help="video W*H as the reference writes it (default 832*480; tiny 384*384)")
    ap.add_argument("--frames", type=int, default=81, help="4k+1")
    ap.add_argument("--sparse-algo", default="none,nabla-0.7",
                    help="comma list: none (dense), nabla-THR, sta-T-H-W, nabla-THR_sta-T-H-W")
    ap.add_argument("--runs", type=int, default=3, help="timed forwards per algorithm (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed forwards after the first call")
    ap.add_argument("--json", help="write rows + env here")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"],
                    help="big-Linear weights/activations and attention operands")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", default="synthetic", choices=["synthetic", "wan"],
                    help="random weights: synthetic (nabla's: see synthetic_std) or wan "
                         "(the reference's init_weights, as the fork builds its model)")
    ap.add_argument("--rope-f64", action="store_true", help="rotate q/k in f64 as the reference")
    ap.add_argument("--sparse-impl", default="auto", choices=["auto", "flex", "masked-sdpa"],
                    help="auto: compiled flex (CPU: probed, falls back to masked SDPA)")
    ap.add_argument("--check-golden", metavar="DIR",
                    help="first load the golden tiny DiT (official keys) and compare outputs")
    args = ap.parse_args()
    if args.runs < 1 or args.warmup < 0:
        die("--runs must be >= 1 and --warmup >= 0")
    if args.frames < 1 or (args.frames - 1) % 4:
        die(f"--frames {args.frames}: the Wan VAE needs 4k+1 frames (e.g. 81)")
    size = args.size or DEFAULT_SIZE[args.model]
    try:
        w_px, h_px = (int(v) for v in size.split("*"))
    except ValueError:
        die(f"--size {size!r}: use W*H, e.g. 1280*720")
    algos = [parse_algo(s) for s in args.sparse_algo.split(",")]

    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        die("CUDA is not available (use --device cpu for the tiny test)", code=1)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    cdt = {"bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]
    torch.manual_seed(args.seed)

    golden = None
    if args.check_golden:
        dts = [torch.float32] + ([cdt] if cdt != torch.float32 else [])
        golden = check_golden(args.check_golden, dev, dts, args.sparse_impl, args.rope_f64)

    cfg = CONFIGS[args.model]
    lh, lw = h_px // 8, w_px // 8
    if any(a is not None for a in algos):
        ch, cw = lh // 16 * 16, lw // 16 * 16
        if (ch, cw) != (lh, lw):
            log(f"note: sparse attention crops the video to {cw * 8}x{ch * 8} (multiples of 128 px), "
                "as the reference does")
        lh, lw = ch, cw
    if lh < 2 or lw < 2 or lh % 2 or lw % 2:
        die(f"--size {size}: latent {lh}x{lw} is not a positive even grid")
    T = (args.frames - 1) // 4 + 1
    S = T * (lh // 2) * (lw // 2)

    sparse = SparseAttention(dev, args.sparse_impl) if any(a is not None for a in algos) else None
    log(f"creating random {args.model} weights ({args.dtype}) on {dev} ...")
    t0 = time.perf_counter()
    model = WanDiT(cfg, dev, cdt, seed=args.seed, rope_f64=args.rope_f64, sparse=sparse,
                   init=args.init)
    if cuda:
        torch.cuda.synchronize()
    log(f"  {time.perf_counter() - t0:.1f} s, {model.weight_bytes() / 1e9:.2f} GB of weights")
    g = torch.Generator(device=dev).manual_seed(args.seed + 1)
    latent = torch.randn(cfg["in_dim"], T, lh, lw, generator=g, device=dev)
    context = (torch.randn(cfg["text_len"], cfg["text_dim"], generator=g, device=dev) * 0.5).to(cdt)
    t_step = 999.0

    env = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
           "model": args.model, "config": {k: v for k, v in cfg.items() if k != "patch"},
           "dtype": args.dtype, "video": [lw * 8, lh * 8, args.frames], "latent": [T, lh, lw],
           "tokens": S, "blocks": S // BLOCK if S % BLOCK == 0 else None, "timestep": t_step,
           "runs": args.runs, "warmup": args.warmup, "init": args.init, "weight_bytes": model.weight_bytes(),
           "rope": "f64" if args.rope_f64 else "f32 (f64 tables)",
           "dense_attention": "F.scaled_dot_product_attention (default backend)",
           "sparse_attention": sparse.name if sparse else None,
           "kernel_options": KERNEL_OPTIONS if cuda else None}
    rows = []
    with torch.no_grad():
        for algo in algos:
            name = algo["name"] if algo else "dense"
            compiles = algo is not None and sparse.impl == "flex"
            log(f"{name}: first forward (untimed{', compiles flex' if compiles else ''}) ...")
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            model.record = {}
            first_ms, _ = time_call(lambda: model.forward(latent, t_step, context, algo), cuda)
            rec, model.record = model.record, None
            for _ in range(args.warmup):
                model.forward(latent, t_step, context, algo)
            samples = [time_call(lambda: model.forward(latent, t_step, context, algo), cuda)[0]
                       for _ in range(args.runs)]
            ms = statistics.median(samples)
            log(f"  forward {ms:.1f} ms (samples {', '.join(f'{s:.1f}' for s in samples)})")
            tm = OpTimer(cuda)
            instr_ms, _ = time_call(lambda: model.forward(latent, t_step, context, algo, tm), cuda)
            br, counts = tm.totals()
            dens = rec.get("density")
            rows.append({
                "algo": name, "forward_ms": ms, "samples_ms": samples, "first_call_ms": first_ms,
                "density": statistics.mean(dens) if dens else 1.0, "density_per_layer": dens,
                "breakdown_ms": br, "breakdown_ops": counts, "instrumented_forward_ms": instr_ms,
                "breakdown_gaps_ms": instr_ms - sum(br.values()),
                "layer0_sparse_rel_l2_vs_masked_ref": rec.get("layer0_rel_l2_vs_masked_ref"),
                "attention": env["sparse_attention"] if algo else env["dense_attention"],
                "peak_memory_bytes": torch.cuda.max_memory_allocated(dev) if cuda else None,
            })

    print(f"\ndevice   {env['device']} | torch {env['torch']} | CUDA {env['cuda']} | cuDNN {env['cudnn']}")
    print(f"model    Wan 2.1 {args.model} (dim {cfg['dim']}, {cfg['num_layers']} layers, {cfg['num_heads']} heads), "
          f"{args.dtype} weights | video {lw * 8}x{lh * 8} x {args.frames} frames -> latent {T}x{lh}x{lw}, "
          f"{S} tokens | t={t_step:g}")
    if sparse:
        print(f"sparse   {sparse.name}")
    print(f"timing   median of {args.runs} forwards after 1 first call + {args.warmup} warm-up; "
          "breakdown from one extra instrumented forward (GPU time per op, summed per category)")
    w = max(24, max(len(r["algo"]) for r in rows))
    head = f"{'algo':<{w}} {'forward ms':>11} {'density':>8}" + "".join(
        f" {CAT_TITLES[c]:>12}" for c in CATS) + f" {'gaps':>9} {'instr ms':>10}"
    print("\n" + head)
    for r in rows:
        print(f"{r['algo']:<{w}} {r['forward_ms']:>11.1f} {r['density']:>8.4f}" + "".join(
            f" {r['breakdown_ms'][c]:>12.2f}" for c in CATS)
            + f" {r['breakdown_gaps_ms']:>9.2f} {r['instrumented_forward_ms']:>10.1f}")
    print("\nshare of the instrumented forward (%):")
    for r in rows:
        tot = r["instrumented_forward_ms"]
        print(f"{r['algo']:<{w}} {'':>11} {'':>8}" + "".join(
            f" {100 * r['breakdown_ms'][c] / tot:>11.1f}%" for c in CATS))
    checks = [(r["algo"], r["layer0_sparse_rel_l2_vs_masked_ref"]) for r in rows
              if r["layer0_sparse_rel_l2_vs_masked_ref"] is not None]
    if checks:
        print("sparse attention of layer 0 vs f32 masked reference (2 heads x 256 queries): "
              + ", ".join(f"{a} {e:.1e}" for a, e in checks))
    bad = [a for a, e in checks if not e < 2e-2]
    if bad:
        log(f"warning: sparse attention does not follow the block mask for {bad}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"env": env, "rows": rows, "golden": golden}, fh, indent=2)
        print(f"wrote {args.json}")
    if (golden and not golden["ok"]) or bad:
        sys.exit(3)


if __name__ == "__main__":
    main()
