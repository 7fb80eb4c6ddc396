# nabla.cu's RoPE + head split (+ pooling) kernels on the CPU (rope_driver) against numpy: the
# heads bit for bit (f32 products and sums rounded one by one, as rope_rotate, then the storage
# rounding), the rope-only kernel equal to the pooled one, the pooled rows the means of the
# stored heads, and the hi / lo / inv split reproducing them.
import numpy as np, os, subprocess, tempfile
from emu_common import BUILD, from_bits, to_bits
seed = int.from_bytes(os.urandom(4), 'little'); rng = np.random.default_rng(seed); print("seed", seed)
f32 = np.float32

def case(S, H, D, dt):
    x = rng.normal(size=(S, H, D)).astype(f32)
    ang = rng.uniform(-3.2, 3.2, size=(S, D // 2))
    c, s = np.cos(ang).astype(f32), np.sin(ang).astype(f32)
    with tempfile.TemporaryDirectory() as td:
        x.tofile(td + "/x.bin"); c.tofile(td + "/cos.bin"); s.tofile(td + "/sin.bin")
        open(td + "/params.txt", "w").write(f"{S} {H} {D} {dt}")
        subprocess.run([os.path.join(BUILD, "rope_driver"), td], check=True)
        et = np.float32 if dt == 0 else np.uint16
        out = np.fromfile(td + "/out.bin", et); out2 = np.fromfile(td + "/out2.bin", et)
        nb = S // 64
        pooled = np.fromfile(td + "/pooled.bin", f32).reshape(H, nb, D)
        inv = np.fromfile(td + "/inv.bin", f32).reshape(H, nb)
        hi = np.fromfile(td + "/hi.bin", np.float16).reshape(H, nb, D)
        lo = np.fromfile(td + "/lo.bin", np.float16).reshape(H, nb, D)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    cc, ss = c[:, None, :], s[:, None, :]
    y = np.empty_like(x)
    y[..., 0::2] = (x0 * cc).astype(f32) - (x1 * ss).astype(f32)
    y[..., 1::2] = (x0 * ss).astype(f32) + (x1 * cc).astype(f32)
    want = to_bits(y.transpose(1, 0, 2).astype(f32), dt).reshape(-1)
    ok = np.array_equal(out.view(np.uint32 if dt == 0 else np.uint16), want.view(np.uint32 if dt == 0 else np.uint16))
    ok &= np.array_equal(out, out2)
    stored = from_bits(out.reshape(H, S, D) if dt != 0 else out.reshape(H, S, D), dt)
    pref = stored.reshape(H, nb, 64, D).mean(2)
    # f32 sums of 64 values in another order: within 1e-6 + 1e-5 |mean|
    e_pool = np.max(np.abs(pooled - pref) / (1e-6 + 1e-5 * np.abs(pref)))
    split = (hi.astype(np.float64) + lo.astype(np.float64)) * inv[..., None]
    e_split = np.max(np.abs(split - pooled) / (1e-30 + np.abs(pooled).max(axis=2, keepdims=True)))
    ok &= e_pool <= 1.0 and e_split < 1e-6
    print(f"{'OK ' if ok else 'BAD'} S{S} H{H} D{D} dt{dt}: heads exact {np.array_equal(out, out2)}, pooled err/bound {e_pool:.2f}, split rel {e_split:.1e}", flush=True)
    return ok

allok = True
for (S, H, D) in ((64, 1, 64), (128, 2, 128), (192, 1, 16), (64, 2, 512)):
    for dt in (0, 1, 2):
        allok &= case(S, H, D, dt)
print("ALL OK" if allok else "FAILURES")
if not allok: raise SystemExit(1)
