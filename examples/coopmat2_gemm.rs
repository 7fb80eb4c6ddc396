//! `VK_NV_cooperative_matrix2` on this adapter, and a GEMM on workgroup-scope cooperative
//! matrices.
//!
//! # What it measures
//!
//! First the adapter's `VK_NV_cooperative_matrix2` support: its features (workgroup scope,
//! flexible dimensions, reductions, conversions, per-element operations, tensor addressing, block
//! loads), its properties (the largest workgroup for workgroup scope, the largest flexible
//! dimension, the shared memory the compiler reserves) and its flexible-dimension combinations
//! (granularities, component types, scope, invocations). Then, for each configuration given, a
//! GEMM `y = x·Wᵀ` with `x` `[M, K]` f16, `W` `[N, K]` f16 and `y` `[M, N]` f32, one workgroup
//! per `BM×BN` tile of `y` and one workgroup-scope cooperative matrix per operand tile, at 512³,
//! 4096³ and the Wan 14B shapes 8192×5120×5120, 8192×13824×5120 and 8192×5120×13824. Each line
//! gives the time per dispatch (the mean of 1 to 10 after a warm-up), TFLOP/s, the relative L2
//! error against an f64 reference (every element at 512³, 4096 sampled elements otherwise) and
//! how many elements of `y` are not finite (`y` starts as NaN, so this counts unwritten elements
//! too).
//!
//! # How
//!
//! The kernel is WGSL (`coopLoad`/`coopMultiplyAdd`/`coopStore` on `coop_mat16x16`) compiled to
//! SPIR-V by naga, and the SPIR-V is patched: each `OpTypeCooperativeMatrixKHR` gets Workgroup
//! scope and the tile's sizes (A `BM×BK`, B `BK×BN`, C `BM×BN`), and the module declares
//! `SPV_NV_cooperative_matrix2`. In the tensor modes each `OpCooperativeMatrixLoadKHR` also
//! becomes an `OpCooperativeMatrixLoadTensorNV` over a tensor layout of the whole operand
//! (`[M, K]` or `[N, K]`) sliced at the tile, B through a transposing tensor view (so it loads
//! as `K×N`); the WGSL carries the tile's row in the pointer index and `k0` in the stride operand,
//! and the patch moves both into the slice (`SPV_NV_tensor_addressing`). wgpu 30 does not enable
//! the extension, so the device is opened through wgpu-hal's `open_with_callback`, which adds
//! `VK_NV_cooperative_matrix2` and its feature structure (every feature the adapter reports) to
//! the device's creation; the kernels go in through wgpu's SPIR-V passthrough.
//!
//! naga 30's SPIR-V writer panics ("Expression [..] is not cached") on a `coopLoad`/`coopStore`
//! whose pointer index or stride is an inline expression, e.g. `&x[m0 * P.k + k0]` or the stride
//! `P.k`; so the kernel binds every index and stride with `let` first.
//!
//! # Running
//!
//! ```text
//! cargo run --release --example coopmat2_gemm -- 128x128x64x256x2
//! cargo run --release --example coopmat2_gemm -- --spirv spv 128x128x64x256x2 128x128x32x256x3
//! ```
//!
//! Each configuration is `BMxBNxBKxWGxMODE`: the tile (`BM×BN` of `y`, `BK` deep), the workgroup
//! size `WG`, and `MODE` 0 = pointer loads, 1 = pointer loads one step ahead, 2 = tensor loads,
//! 3 = tensor loads one step ahead. Without a configuration it runs `128x128x32x256x0`.
//! `--spirv DIR` writes each configuration's patched SPIR-V to `DIR/cm2_<config>.spv` (tensor
//! layouts sized for 512³) and touches no device. An adapter without Vulkan, the extension or its
//! workgroup-scope and flexible-dimension features is reported and the program exits with 0.
//!
//! # Finding
//!
//! On the H200 (Vulkan, NVIDIA 580.159.04) every form was correct, but the best configuration
//! (`128x128x64`, tensor loads) reached 131–134 TFLOP/s at 4096³ and 8192×5120×5120 and 36–39
//! at the FFN shapes, and no other form passed 116 TFLOP/s, against 222–244 TFLOP/s for the
//! crate's own subgroup-scope kernel
//! (`shaders/linalg/linear_coop.wgsl`): the compiler-managed staging of workgroup-scope matrices
//! is no path to a faster GEMM on that driver. The numbers are in `benches/RESULTS.md`,
//! session 23.

use std::error::Error;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use clap::Parser;

type Result<T, E = Box<dyn Error>> = std::result::Result<T, E>;

/// The side of the cube `--spirv` sizes the tensor layouts for.
const SPIRV_SIZE: u32 = 512;

/// Every benchmark shape's M, N and K is a multiple of this, so a tile side must divide it.
const SHAPE_GRAIN: u32 = 512;

const OP_EXTENSION: u32 = 10;
const OP_UNDEF: u32 = 1;
const OP_CAPABILITY: u32 = 17;
const OP_TYPE_BOOL: u32 = 20;
const OP_TYPE_INT: u32 = 21;
const OP_CONSTANT_FALSE: u32 = 42;
const OP_CONSTANT: u32 = 43;
const OP_FUNCTION: u32 = 54;
const OP_ACCESS_CHAIN: u32 = 65;
const OP_TYPE_COOPERATIVE_MATRIX_KHR: u32 = 4456;
const OP_COOPERATIVE_MATRIX_LOAD_KHR: u32 = 4457;
const OP_COOPERATIVE_MATRIX_LOAD_TENSOR_NV: u32 = 5367;
const OP_TYPE_TENSOR_LAYOUT_NV: u32 = 5370;
const OP_TYPE_TENSOR_VIEW_NV: u32 = 5371;
const OP_CREATE_TENSOR_LAYOUT_NV: u32 = 5372;
const OP_TENSOR_LAYOUT_SET_DIMENSION_NV: u32 = 5373;
const OP_TENSOR_LAYOUT_SLICE_NV: u32 = 5375;
const OP_CREATE_TENSOR_VIEW_NV: u32 = 5377;
const CAPABILITY_TENSOR_ADDRESSING_NV: u32 = 5439;
const CAPABILITY_COOPERATIVE_MATRIX_TENSOR_ADDRESSING_NV: u32 = 5433;
/// `Scope` Workgroup.
const SCOPE_WORKGROUP: u32 = 2;
/// `TensorAddressingOperands` TensorView.
const TENSOR_ADDRESSING_TENSOR_VIEW: u32 = 1;

/// VK_NV_cooperative_matrix2 support, and a GEMM on workgroup-scope cooperative matrices.
#[derive(Parser)]
struct Args {
    /// Kernel configurations: tile BM×BN×BK, workgroup size WG, MODE 0 = pointer loads,
    /// 1 = pointer loads one step ahead, 2 = tensor loads, 3 = tensor loads one step ahead.
    #[arg(value_name = "BMxBNxBKxWGxMODE", default_value = "128x128x32x256x0")]
    configs: Vec<Config>,
    /// Write each configuration's patched SPIR-V to DIR/cm2_<config>.spv (tensor layouts sized
    /// for 512³) and exit without touching a device.
    #[arg(long, value_name = "DIR")]
    spirv: Option<PathBuf>,
}

/// One kernel: the tile, the workgroup size and how the operands are loaded.
#[derive(Clone, Copy, Debug)]
struct Config {
    bm: u32,
    bn: u32,
    bk: u32,
    wg: u32,
    /// 0 pointer loads, 1 pointer loads one step ahead, 2 tensor loads, 3 tensor loads ahead.
    mode: u32,
}

impl FromStr for Config {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        const FORM: &str = "expected BMxBNxBKxWGxMODE, e.g. 128x128x64x256x2";
        let fields: Vec<u32> = s
            .split('x')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("`{s}`: {e}; {FORM}"))?;
        let [bm, bn, bk, wg, mode] = fields[..] else {
            return Err(format!("`{s}` has {} fields; {FORM}", fields.len()));
        };
        for (name, side) in [("BM", bm), ("BN", bn), ("BK", bk)] {
            if !SHAPE_GRAIN.is_multiple_of(side) {
                return Err(format!(
                    "`{s}`: {name} = {side} must divide {SHAPE_GRAIN} (every benchmark shape is \
                     a multiple of it); {FORM}"
                ));
            }
        }
        if wg == 0 {
            return Err(format!(
                "`{s}`: the workgroup size WG must be positive; {FORM}"
            ));
        }
        if mode > 3 {
            return Err(format!(
                "`{s}`: MODE {mode} is not 0 (pointer loads), 1 (pointer loads one step ahead), \
                 2 (tensor loads) or 3 (tensor loads one step ahead); {FORM}"
            ));
        }
        Ok(Config {
            bm,
            bn,
            bk,
            wg,
            mode,
        })
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Config {
            bm,
            bn,
            bk,
            wg,
            mode,
        } = self;
        write!(f, "{bm}x{bn}x{bk}x{wg}x{mode}")
    }
}

impl Config {
    /// Whether the loads are tensor-layout loads.
    fn tensor(&self) -> bool {
        self.mode >= 2
    }

    /// The patched SPIR-V for an `m`×`n`×`k` GEMM (the shape only matters to the tensor layouts).
    fn spirv(&self, m: u32, n: u32, k: u32) -> Result<Vec<u32>> {
        let Config { bm, bn, bk, .. } = *self;
        let shape = TensorShape {
            m,
            n,
            k,
            bm,
            bn,
            bk,
        };
        let tensor = self.tensor().then_some(shape);
        spirv(&self.wgsl(), [(bm, bk), (bk, bn), (bm, bn)], tensor)
    }

    /// The kernel's WGSL. Every `coopLoad`/`coopStore` index and stride is a `let` (naga 30's
    /// SPIR-V writer panics on inline ones).
    fn wgsl(&self) -> String {
        let Config {
            bm,
            bn,
            bk,
            wg: wgs,
            mode: pre,
        } = *self;
        let tensor = self.tensor();
        // tensor mode: the row offset rides in the pointer index and k0 in the stride; the patch
        // turns each load into a tensor-layout load of slice (row0, B*, k0, BK)
        let (ia, ib, sa, sb) = if tensor {
            ("m0", "n0", "k0", "k0")
        } else {
            ("m0 * ks + k0", "n0 * ks + k0", "ks", "ks")
        };
        let body = if pre % 2 == 0 {
            format!(
                "for (var k0 = 0u; k0 < ks; k0 += BK) {{
            let ia = {ia};
            let ib = {ib};
            let a = coopLoadT<coop_mat16x16<f16, A>>(&x[ia], {sa});
            let b = coopLoad<coop_mat16x16<f16, B>>(&w[ib], {sb});
            c = coopMultiplyAdd(a, b, c);
        }}"
            )
        } else {
            format!(
                "var k0 = 0u;
        let i0 = {ia};
        let j0 = {ib};
        var a = coopLoadT<coop_mat16x16<f16, A>>(&x[i0], {sa});
        var b = coopLoad<coop_mat16x16<f16, B>>(&w[j0], {sb});
        for (k0 = BK; k0 < ks; k0 += BK) {{
            let ia = {ia};
            let ib = {ib};
            let a2 = coopLoadT<coop_mat16x16<f16, A>>(&x[ia], {sa});
            let b2 = coopLoad<coop_mat16x16<f16, B>>(&w[ib], {sb});
            c = coopMultiplyAdd(a, b, c);
            a = a2;
            b = b2;
        }}
        c = coopMultiplyAdd(a, b, c);"
            )
        };
        format!(
            "enable f16;
enable wgpu_cooperative_matrix;
struct Params {{ m: u32, n: u32, k: u32, gx: u32 }}
@group(0) @binding(0) var<storage, read> x: array<f16>;
@group(0) @binding(1) var<storage, read> w: array<f16>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> P: Params;
const BM: u32 = {bm}u;
const BN: u32 = {bn}u;
const BK: u32 = {bk}u;
@compute @workgroup_size({wgs})
fn main(@builtin(workgroup_id) wid: vec3<u32>) {{
    let m0 = wid.y * BM;
    let n0 = wid.x * BN;
    let ks = P.k;
    let ns = P.n;
    var c = coop_mat16x16<f32, C>();
    {body}
    let iy = m0 * ns + n0;
    coopStoreT(c, &y[iy], ns);
}}
"
        )
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(dir) = &args.spirv {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        for cfg in &args.configs {
            let words = cfg.spirv(SPIRV_SIZE, SPIRV_SIZE, SPIRV_SIZE)?;
            let path = dir.join(format!("cm2_{cfg}.spv"));
            std::fs::write(&path, bytemuck::cast_slice(&words))
                .map_err(|e| format!("writing {}: {e}", path.display()))?;
            println!("{cfg}: {} words -> {}", words.len(), path.display());
        }
        return Ok(());
    }
    #[cfg(any(
        windows,
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd"
    ))]
    {
        device::run(&args.configs)
    }
    #[cfg(not(any(
        windows,
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd"
    )))]
    {
        println!(
            "VK_NV_cooperative_matrix2 needs Vulkan through wgpu-hal (Windows, Linux, Android, \
             FreeBSD); only --spirv works here"
        );
        Ok(())
    }
}

/// A tensor-mode GEMM's shape and tile, for the tensor layouts.
#[derive(Clone, Copy)]
struct TensorShape {
    m: u32,
    n: u32,
    k: u32,
    bm: u32,
    bn: u32,
    bk: u32,
}

/// Compiles `src` with naga and patches the SPIR-V (see [`patch`]).
fn spirv(src: &str, dims: [(u32, u32); 3], tensor: Option<TensorShape>) -> Result<Vec<u32>> {
    let module = naga::front::wgsl::parse_str(src).map_err(|e| e.emit_to_string(src))?;
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .map_err(|e| e.emit_to_string(src))?;
    let opts = naga::back::spv::Options {
        lang_version: (1, 6),
        flags: naga::back::spv::WriterFlags::empty(),
        ..Default::default()
    };
    let words = naga::back::spv::write_vec(&module, &info, &opts, None)?;
    patch(words, dims, tensor)
}

/// A SPIR-V literal string: its bytes, NUL-terminated, packed little-endian into words.
fn str_words(t: &str) -> Vec<u32> {
    let mut s = t.as_bytes().to_vec();
    s.push(0);
    let mut words = vec![0u32; s.len().div_ceil(4)];
    for (j, b) in s.iter().enumerate() {
        words[j / 4] |= (*b as u32) << (8 * (j % 4));
    }
    words
}

/// One instruction: opcode `op` with operands `ops`.
fn ins(op: u32, ops: &[u32]) -> Vec<u32> {
    let mut v = vec![((1 + ops.len() as u32) << 16) | op];
    v.extend_from_slice(ops);
    v
}

/// New result ids, from the module's bound up.
struct Ids {
    bound: u32,
}

impl Ids {
    fn fresh(&mut self) -> u32 {
        self.bound += 1;
        self.bound - 1
    }

    /// A new `OpConstant` of type `ty` and value `v`, appended to `out`.
    fn constant(&mut self, ty: u32, v: u32, out: &mut Vec<u32>) -> u32 {
        let id = self.fresh();
        out.extend(ins(OP_CONSTANT, &[ty, id, v]));
        id
    }
}

fn missing(what: &str) -> Box<dyn Error> {
    format!("unexpected SPIR-V from naga: {what}").into()
}

/// Widens naga's cooperative matrices to workgroup scope and the tile's sizes.
///
/// `w` is naga's module; `dims` the (rows, columns) of the A, B and C matrices. Each
/// `OpTypeCooperativeMatrixKHR` gets Workgroup scope and its use's sizes, and the module declares
/// `SPV_NV_cooperative_matrix2`. With `tensor`, each `OpCooperativeMatrixLoadKHR` (whose pointer
/// index holds the tile's first row and whose stride holds `k0`) becomes an
/// `OpCooperativeMatrixLoadTensorNV` from element 0 over a 2-D tensor layout of the whole
/// operand (`[M, K]` for A, `[N, K]` for B) sliced at (row, `k0`) with extent (`BM`/`BN`, `BK`);
/// B goes through a tensor view with dimensions swapped, and the module declares
/// `SPV_NV_tensor_addressing` with its capabilities.
fn patch(w: Vec<u32>, dims: [(u32, u32); 3], tensor: Option<TensorShape>) -> Result<Vec<u32>> {
    if w.len() < 5 {
        return Err(missing("no header"));
    }
    let mut ids = Ids { bound: w[3] };
    let mut consts = std::collections::HashMap::new();
    let mut chains = std::collections::HashMap::new();
    let mut u32_ty = 0;
    let mut bool_ty = 0;
    let mut first_coop = 0;
    let mut first_fn = 0;
    let mut last_cap = 0;
    let mut coop_use = std::collections::HashMap::new();
    let mut i = 5;
    while i < w.len() {
        let n = (w[i] >> 16) as usize;
        if n == 0 || i + n > w.len() {
            return Err(missing("a malformed instruction"));
        }
        match w[i] & 0xffff {
            OP_CAPABILITY => last_cap = i + n,
            OP_TYPE_BOOL => bool_ty = w[i + 1],
            OP_TYPE_INT if w[i + 2] == 32 && w[i + 3] == 0 => u32_ty = w[i + 1],
            OP_CONSTANT => {
                consts.insert(w[i + 2], w[i + 3]);
            }
            OP_ACCESS_CHAIN => {
                chains.insert(w[i + 2], i);
            }
            OP_FUNCTION if first_fn == 0 => first_fn = i,
            OP_TYPE_COOPERATIVE_MATRIX_KHR => {
                if first_coop == 0 {
                    first_coop = i;
                }
                coop_use.insert(w[i + 1], w[i + 6]);
            }
            _ => {}
        }
        i += n;
    }
    if u32_ty == 0 {
        return Err(missing("no u32 type"));
    }
    if first_coop == 0 {
        return Err(missing("no cooperative matrix type"));
    }
    // the constants go in front of the first cooperative matrix type, which uses them
    let mut newc: Vec<u32> = Vec::new();
    let scope = ids.constant(u32_ty, SCOPE_WORKGROUP, &mut newc);
    let mut sizes = Vec::new();
    for (r, c) in dims {
        let r = ids.constant(u32_ty, r, &mut newc);
        let c = ids.constant(u32_ty, c, &mut newc);
        sizes.push((r, c));
    }
    // the tensor layout and view types go in front of the first function
    let mut late: Vec<u32> = Vec::new();
    let mut edits: std::collections::HashMap<usize, u32> = Default::default();
    let mut replace: std::collections::HashMap<usize, Vec<u32>> = Default::default();
    if let Some(t) = tensor {
        let c0 = ids.constant(u32_ty, 0, &mut newc);
        let c1 = ids.constant(u32_ty, 1, &mut newc);
        let c2 = ids.constant(u32_ty, 2, &mut newc);
        let cm = ids.constant(u32_ty, t.m, &mut newc);
        let cn = ids.constant(u32_ty, t.n, &mut newc);
        let ck = ids.constant(u32_ty, t.k, &mut newc);
        let cbm = ids.constant(u32_ty, t.bm, &mut newc);
        let cbn = ids.constant(u32_ty, t.bn, &mut newc);
        let cbk = ids.constant(u32_ty, t.bk, &mut newc);
        if bool_ty == 0 {
            bool_ty = ids.fresh();
            late.extend(ins(OP_TYPE_BOOL, &[bool_ty]));
        }
        let cfalse = ids.fresh();
        late.extend(ins(OP_CONSTANT_FALSE, &[bool_ty, cfalse]));
        // 2-D layout, clamp mode Undefined
        let tl = ids.fresh();
        late.extend(ins(OP_TYPE_TENSOR_LAYOUT_NV, &[tl, c2, c1]));
        // 2-D view without its own dimensions, permutation (1, 0): a transpose
        let tv = ids.fresh();
        late.extend(ins(OP_TYPE_TENSOR_VIEW_NV, &[tv, c2, cfalse, c1, c0]));
        let mut i = 5;
        while i < w.len() {
            let n = (w[i] >> 16) as usize;
            if w[i] & 0xffff == OP_COOPERATIVE_MATRIX_LOAD_KHR {
                let (rt, r, p, stride) = (w[i + 1], w[i + 2], w[i + 3], w[i + 5]);
                let ci = *chains
                    .get(&p)
                    .ok_or_else(|| missing("a load not from an access chain"))?;
                let cn_words = (w[ci] >> 16) as usize;
                // the chain's last index (the tile's first row) moves into the slice
                let rowoff = w[ci + cn_words - 1];
                edits.insert(ci + cn_words - 1, c0);
                let use_id = coop_use
                    .get(&rt)
                    .ok_or_else(|| missing("a load of an unknown matrix type"))?;
                let is_a = *consts
                    .get(use_id)
                    .ok_or_else(|| missing("a matrix use that is not a constant"))?
                    == 0;
                // A: rows M, tile BM; B: rows N, tile BN
                let (rows, tile_rows) = if is_a { (cm, cbm) } else { (cn, cbn) };
                let u = ids.fresh();
                let (l0, l1, l2) = (ids.fresh(), ids.fresh(), ids.fresh());
                let mut out = ins(OP_UNDEF, &[rt, u]);
                out.extend(ins(OP_CREATE_TENSOR_LAYOUT_NV, &[tl, l0]));
                out.extend(ins(
                    OP_TENSOR_LAYOUT_SET_DIMENSION_NV,
                    &[tl, l1, l0, rows, ck],
                ));
                out.extend(ins(
                    OP_TENSOR_LAYOUT_SLICE_NV,
                    &[tl, l2, l1, rowoff, tile_rows, stride, cbk],
                ));
                // memory operands none; tensor addressing operands none (A) or the view (B)
                if is_a {
                    out.extend(ins(
                        OP_COOPERATIVE_MATRIX_LOAD_TENSOR_NV,
                        &[rt, r, p, u, l2, 0, 0],
                    ));
                } else {
                    let v = ids.fresh();
                    out.extend(ins(OP_CREATE_TENSOR_VIEW_NV, &[tv, v]));
                    out.extend(ins(
                        OP_COOPERATIVE_MATRIX_LOAD_TENSOR_NV,
                        &[rt, r, p, u, l2, 0, TENSOR_ADDRESSING_TENSOR_VIEW, v],
                    ));
                }
                replace.insert(i, out);
            }
            i += n;
        }
    }
    let mut out = Vec::new();
    out.extend_from_slice(&w[..5]);
    let mut i = 5;
    while i < w.len() {
        let n = (w[i] >> 16) as usize;
        let op = w[i] & 0xffff;
        if i == last_cap {
            if tensor.is_some() {
                out.extend(ins(OP_CAPABILITY, &[CAPABILITY_TENSOR_ADDRESSING_NV]));
                out.extend(ins(
                    OP_CAPABILITY,
                    &[CAPABILITY_COOPERATIVE_MATRIX_TENSOR_ADDRESSING_NV],
                ));
                out.extend(ins(OP_EXTENSION, &str_words("SPV_NV_tensor_addressing")));
            }
            out.extend(ins(OP_EXTENSION, &str_words("SPV_NV_cooperative_matrix2")));
        }
        if i == first_coop {
            out.extend(&newc);
        }
        if i == first_fn {
            out.extend(&late);
        }
        if let Some(r) = replace.get(&i) {
            out.extend(r);
        } else if op == OP_TYPE_COOPERATIVE_MATRIX_KHR {
            let mut x = w[i..i + n].to_vec();
            let usev = *consts
                .get(&x[6])
                .ok_or_else(|| missing("a matrix use that is not a constant"))?
                as usize;
            let &(rows, cols) = sizes
                .get(usev)
                .ok_or_else(|| missing("a matrix use other than A, B or accumulator"))?;
            x[3] = scope;
            x[4] = rows;
            x[5] = cols;
            out.extend(x);
        } else {
            let words = w[i..i + n].iter().enumerate();
            out.extend(words.map(|(d, word)| *edits.get(&(i + d)).unwrap_or(word)));
        }
        i += n;
    }
    out[3] = ids.bound;
    Ok(out)
}

/// Probing the adapter, opening the device with the extension, and running the GEMMs: Vulkan
/// through wgpu-hal, where wgpu builds Vulkan.
#[cfg(any(
    windows,
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd"
))]
mod device {
    use super::{Config, Result};
    use ash::vk;
    use std::ffi::c_void;
    use std::time::Instant;
    use wgpu::util::DeviceExt;

    /// `VkPhysicalDeviceCooperativeMatrix2FeaturesNV`, sType
    /// `VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_2_FEATURES_NV` (1000593000).
    /// ash 0.38 (Vulkan 1.3.281) predates the extension.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Cm2Features {
        s_type: vk::StructureType,
        p_next: *mut c_void,
        workgroup_scope: vk::Bool32,
        flexible_dimensions: vk::Bool32,
        reductions: vk::Bool32,
        conversions: vk::Bool32,
        per_element_operations: vk::Bool32,
        tensor_addressing: vk::Bool32,
        block_loads: vk::Bool32,
    }

    /// `VkPhysicalDeviceCooperativeMatrix2PropertiesNV`, sType
    /// `VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_2_PROPERTIES_NV` (1000593002).
    #[repr(C)]
    struct Cm2Properties {
        s_type: vk::StructureType,
        p_next: *mut c_void,
        workgroup_scope_max_workgroup_size: u32,
        flexible_dimensions_max_dimension: u32,
        workgroup_scope_reserved_shared_memory: u32,
    }

    /// `VkCooperativeMatrixFlexibleDimensionsPropertiesNV`, sType
    /// `VK_STRUCTURE_TYPE_COOPERATIVE_MATRIX_FLEXIBLE_DIMENSIONS_PROPERTIES_NV` (1000593001).
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct FlexibleDimensionsProperties {
        s_type: vk::StructureType,
        p_next: *mut c_void,
        m_granularity: u32,
        n_granularity: u32,
        k_granularity: u32,
        a_type: vk::ComponentTypeKHR,
        b_type: vk::ComponentTypeKHR,
        c_type: vk::ComponentTypeKHR,
        result_type: vk::ComponentTypeKHR,
        saturating_accumulation: vk::Bool32,
        scope: vk::ScopeKHR,
        workgroup_invocations: u32,
    }

    /// `vkGetPhysicalDeviceCooperativeMatrixFlexibleDimensionsPropertiesNV`.
    type FlexibleDimensionsFn = unsafe extern "system" fn(
        vk::PhysicalDevice,
        *mut u32,
        *mut FlexibleDimensionsProperties,
    ) -> vk::Result;

    const EXTENSION: &std::ffi::CStr = c"VK_NV_cooperative_matrix2";

    /// The GEMM shapes (M, N, K) and the timed dispatches of each.
    const SHAPES: [(u32, u32, u32, u32); 5] = [
        (512, 512, 512, 1),
        (4096, 4096, 4096, 10),
        (8192, 5120, 5120, 10),
        (8192, 13824, 5120, 5),
        (8192, 5120, 13824, 5),
    ];

    /// Probes the adapter, opens the device with the extension and runs every configuration.
    pub fn run(configs: &[Config]) -> Result<()> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: wgpu::Backends::VULKAN,
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let adapter = match pollster::block_on(instance.request_adapter(&Default::default())) {
            Ok(adapter) => adapter,
            Err(e) => {
                println!("no Vulkan adapter ({e}): nothing to measure");
                return Ok(());
            }
        };
        println!("adapter {:?}", adapter.get_info().name);
        let Some(features) = probe(&adapter)? else {
            return Ok(());
        };
        let Some((device, queue)) = open(&adapter, features)? else {
            return Ok(());
        };
        println!("device opened with VK_NV_cooperative_matrix2");
        for cfg in configs {
            if cfg.tensor() && features.tensor_addressing == 0 {
                println!("cfg {cfg}: tensor loads need the tensor addressing feature; skipped");
                continue;
            }
            run_config(&device, &queue, cfg)?;
        }
        Ok(())
    }

    /// Prints the adapter's cooperative-matrix extensions and `VK_NV_cooperative_matrix2`'s
    /// features, properties and flexible dimensions. Returns the features, or `None` (after
    /// saying what is missing) without the extension or its workgroup scope and flexible
    /// dimensions.
    fn probe(adapter: &wgpu::Adapter) -> Result<Option<Cm2Features>> {
        // SAFETY: the hal adapter is only borrowed for queries of its physical device; nothing is
        // destroyed, and the guard is dropped when this function returns.
        let Some(hal) = (unsafe { adapter.as_hal::<wgpu::hal::api::Vulkan>() }) else {
            println!("the adapter is not a Vulkan adapter: nothing to measure");
            return Ok(None);
        };
        let shared = hal.shared_instance();
        let inst = shared.raw_instance();
        let pd = hal.raw_physical_device();
        // SAFETY: `pd` is a physical device of `inst` (wgpu-hal's own handles).
        let exts = unsafe { inst.enumerate_device_extension_properties(pd) }?;
        let mut has = false;
        for e in &exts {
            let Ok(name) = e.extension_name_as_c_str() else {
                continue;
            };
            let n = name.to_string_lossy();
            if n.contains("ooperative") || n.contains("tensor") || n.contains("shader_float") {
                println!("ext {n} v{}", e.spec_version);
            }
            has |= name == EXTENSION;
        }
        if !has {
            println!("VK_NV_cooperative_matrix2 is missing on this adapter: nothing to measure");
            return Ok(None);
        }

        let mut feat = Cm2Features {
            s_type: vk::StructureType::from_raw(1000593000),
            p_next: std::ptr::null_mut(),
            workgroup_scope: 0,
            flexible_dimensions: 0,
            reductions: 0,
            conversions: 0,
            per_element_operations: 0,
            tensor_addressing: 0,
            block_loads: 0,
        };
        let mut f2 = vk::PhysicalDeviceFeatures2 {
            p_next: (&raw mut feat).cast(),
            ..Default::default()
        };
        // SAFETY: `f2` chains one structure, `feat`, laid out as the extension's feature structure
        // with its sType and a null pNext; the device offers the extension, and `feat` outlives
        // the call.
        unsafe { inst.get_physical_device_features2(pd, &mut f2) };
        println!(
            "features: wg_scope {} flex {} reductions {} conversions {} per_element {} \
             tensor_addr {} block_loads {}",
            feat.workgroup_scope,
            feat.flexible_dimensions,
            feat.reductions,
            feat.conversions,
            feat.per_element_operations,
            feat.tensor_addressing,
            feat.block_loads
        );

        let mut props = Cm2Properties {
            s_type: vk::StructureType::from_raw(1000593002),
            p_next: std::ptr::null_mut(),
            workgroup_scope_max_workgroup_size: 0,
            flexible_dimensions_max_dimension: 0,
            workgroup_scope_reserved_shared_memory: 0,
        };
        let mut p2 = vk::PhysicalDeviceProperties2 {
            p_next: (&raw mut props).cast(),
            ..Default::default()
        };
        // SAFETY: as for the features: one chained structure of the extension, outliving the call.
        unsafe { inst.get_physical_device_properties2(pd, &mut p2) };
        println!(
            "props: wg_scope_max_wg {} flex_max_dim {} wg_scope_reserved_smem {}",
            props.workgroup_scope_max_workgroup_size,
            props.flexible_dimensions_max_dimension,
            props.workgroup_scope_reserved_shared_memory
        );

        // SAFETY: this instance's handle and a NUL-terminated command name.
        let pfn = unsafe {
            shared.entry().get_instance_proc_addr(
                inst.handle(),
                c"vkGetPhysicalDeviceCooperativeMatrixFlexibleDimensionsPropertiesNV".as_ptr(),
            )
        };
        match pfn {
            None => {
                println!("no vkGetPhysicalDeviceCooperativeMatrixFlexibleDimensionsPropertiesNV")
            }
            Some(pfn) => {
                // SAFETY: the loader returned `pfn` for exactly this command, whose C signature
                // `FlexibleDimensionsFn` mirrors.
                let flex = unsafe {
                    std::mem::transmute::<unsafe extern "system" fn(), FlexibleDimensionsFn>(pfn)
                };
                let mut count = 0u32;
                // SAFETY: a count query: a valid physical device and count, a null array.
                let r = unsafe { flex(pd, &mut count, std::ptr::null_mut()) };
                enumerated(r)?;
                let blank = FlexibleDimensionsProperties {
                    s_type: vk::StructureType::from_raw(1000593001),
                    p_next: std::ptr::null_mut(),
                    m_granularity: 0,
                    n_granularity: 0,
                    k_granularity: 0,
                    a_type: vk::ComponentTypeKHR::default(),
                    b_type: vk::ComponentTypeKHR::default(),
                    c_type: vk::ComponentTypeKHR::default(),
                    result_type: vk::ComponentTypeKHR::default(),
                    saturating_accumulation: 0,
                    scope: vk::ScopeKHR::default(),
                    workgroup_invocations: 0,
                };
                let mut all = vec![blank; count as usize];
                // SAFETY: `all` holds `count` structures, each with its sType and a null pNext.
                let r = unsafe { flex(pd, &mut count, all.as_mut_ptr()) };
                enumerated(r)?;
                all.truncate(count as usize);
                for p in &all {
                    println!(
                        "flex M{} N{} K{} A {:?} B {:?} C {:?} R {:?} saturating {} scope {:?} \
                         invocations {}",
                        p.m_granularity,
                        p.n_granularity,
                        p.k_granularity,
                        p.a_type,
                        p.b_type,
                        p.c_type,
                        p.result_type,
                        p.saturating_accumulation,
                        p.scope,
                        p.workgroup_invocations
                    );
                }
            }
        }

        let lacking: Vec<&str> = [
            ("workgroup scope", feat.workgroup_scope),
            ("flexible dimensions", feat.flexible_dimensions),
        ]
        .into_iter()
        .filter(|&(_, on)| on == 0)
        .map(|(name, _)| name)
        .collect();
        if !lacking.is_empty() {
            println!(
                "VK_NV_cooperative_matrix2 lacks {}: nothing to measure",
                lacking.join(" and ")
            );
            return Ok(None);
        }
        Ok(Some(feat))
    }

    /// An enumeration's result: success, or incomplete (fewer entries than exist).
    fn enumerated(r: vk::Result) -> Result<()> {
        match r {
            vk::Result::SUCCESS | vk::Result::INCOMPLETE => Ok(()),
            e => Err(format!(
                "vkGetPhysicalDeviceCooperativeMatrixFlexibleDimensionsPropertiesNV: {e}"
            )
            .into()),
        }
    }

    /// Opens the device with `VK_NV_cooperative_matrix2` and every feature in `features`, or
    /// `None` (after saying what is missing) where wgpu lacks a feature the kernels need.
    fn open(
        adapter: &wgpu::Adapter,
        features: Cm2Features,
    ) -> Result<Option<(wgpu::Device, wgpu::Queue)>> {
        let needed = wgpu::Features::SHADER_F16
            | wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX
            | wgpu::Features::PASSTHROUGH_SHADERS;
        let lacking = needed - adapter.features();
        if !lacking.is_empty() {
            println!("the adapter lacks the wgpu features {lacking:?}: nothing to measure");
            return Ok(None);
        }
        let wgpu_features = adapter.features() & (needed | wgpu::Features::SUBGROUP);
        let limits = adapter.limits();
        let mut want = Cm2Features {
            p_next: std::ptr::null_mut(),
            ..features
        };
        let open = {
            // SAFETY: the hal adapter is only used to open a device; the guard is dropped before
            // the wgpu device is made from it.
            let hal = unsafe { adapter.as_hal::<wgpu::hal::api::Vulkan>() }
                .ok_or("the adapter is not a Vulkan adapter")?;
            let want = &mut want;
            // the extension, and `want` in front of wgpu's own pNext chain
            let callback: Box<wgpu::hal::vulkan::CreateDeviceCallback> =
                Box::new(move |a: wgpu::hal::vulkan::CreateDeviceCallbackArgs| {
                    a.extensions.push(EXTENSION);
                    want.p_next = a.create_info.p_next.cast_mut();
                    a.create_info.p_next = std::ptr::from_mut(want).cast_const().cast();
                });
            // SAFETY: the callback only adds an extension the adapter offers and a feature
            // structure that enables features the adapter reports, turning nothing off; `want`
            // outlives the call, inside which the device is created.
            unsafe {
                hal.open_with_callback(
                    wgpu_features,
                    &limits,
                    &wgpu::MemoryHints::Performance,
                    Some(callback),
                )
            }?
        };
        let desc = wgpu::DeviceDescriptor {
            label: None,
            required_features: wgpu_features,
            required_limits: limits,
            // SAFETY: the experimental cooperative-matrix feature is wanted knowingly; the
            // kernels are SPIR-V passthrough, outside wgpu's shader translation.
            experimental_features: unsafe { wgpu::ExperimentalFeatures::enabled() },
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        };
        // SAFETY: `open` was created from this adapter with exactly `desc`'s features.
        let (device, queue) = unsafe { adapter.create_device_from_hal(open, &desc) }?;
        Ok(Some((device, queue)))
    }

    /// Runs `cfg` at every shape of [`SHAPES`] and prints time, TFLOP/s and error; stops at the
    /// first shape whose pipeline the driver rejects.
    fn run_config(device: &wgpu::Device, queue: &wgpu::Queue, cfg: &Config) -> Result<()> {
        let Config {
            bm,
            bn,
            bk,
            wg: wgs,
            mode: pre,
        } = *cfg;
        let ro = |b| wgpu::BindGroupLayoutEntry {
            binding: b,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only: b < 2 },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let bgl = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: None,
            entries: &[
                ro(0),
                ro(1),
                ro(2),
                wgpu::BindGroupLayoutEntry {
                    binding: 3,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                },
            ],
        });
        let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: None,
            bind_group_layouts: &[Some(&bgl)],
            immediate_size: 0,
        });
        let make = |m: u32, n: u32, k: u32| -> Result<Option<wgpu::ComputePipeline>> {
            let words = cfg.spirv(m, n, k)?;
            let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
            // SAFETY: passthrough SPIR-V reaches the driver unchecked by wgpu. The words are
            // naga's validated module with only its cooperative-matrix types and loads rewritten
            // into the forms SPV_NV_cooperative_matrix2 and SPV_NV_tensor_addressing define,
            // whose extension and features the device was opened with; the entry point and
            // workgroup size are the module's own.
            let module = unsafe {
                device.create_shader_module_passthrough(wgpu::ShaderModuleDescriptorPassthrough {
                    label: None,
                    entry_points: std::borrow::Cow::Owned(vec![
                        wgpu::PassthroughShaderEntryPoint {
                            name: "main".into(),
                            workgroup_size: (wgs, 1, 1),
                        },
                    ]),
                    spirv: Some(std::borrow::Cow::Owned(words)),
                    ..Default::default()
                })
            };
            let pipe = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: None,
                layout: Some(&layout),
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            });
            if let Some(e) = pollster::block_on(scope.pop()) {
                println!("cfg {bm}x{bn}x{bk} wg{wgs} pre{pre}: pipeline error {e}");
                return Ok(None);
            }
            Ok(Some(pipe))
        };
        for (m, n, k, reps) in SHAPES {
            let Some(pipe) = make(m, n, k)? else {
                return Ok(());
            };
            let mut seed = 12345u64 ^ (m as u64 * 31 + k as u64);
            let mut rnd = || {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            };
            let x: Vec<half::f16> = (0..m * k).map(|_| half::f16::from_f32(rnd())).collect();
            let wv: Vec<half::f16> = (0..n * k).map(|_| half::f16::from_f32(rnd())).collect();
            let bx = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytemuck::cast_slice(&x),
                usage: wgpu::BufferUsages::STORAGE,
            });
            let bw = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytemuck::cast_slice(&wv),
                usage: wgpu::BufferUsages::STORAGE,
            });
            // NaN everywhere, so an element the kernel never writes shows as non-finite
            let poison = vec![f32::NAN; (m * n) as usize];
            let by = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytemuck::cast_slice(&poison),
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            });
            let bp = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytemuck::cast_slice(&[m, n, k, n / bn]),
                usage: wgpu::BufferUsages::UNIFORM,
            });
            let bg = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &bgl,
                entries: &[
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: bx.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: bw.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 2,
                        resource: by.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 3,
                        resource: bp.as_entire_binding(),
                    },
                ],
            });
            // `r` dispatches in one pass, one submission, waited for
            let run = |r: u32| -> Result<()> {
                let mut enc = device.create_command_encoder(&Default::default());
                {
                    let mut p = enc.begin_compute_pass(&Default::default());
                    p.set_pipeline(&pipe);
                    p.set_bind_group(0, &bg, &[]);
                    for _ in 0..r {
                        p.dispatch_workgroups(n / bn, m / bm, 1);
                    }
                }
                queue.submit([enc.finish()]);
                device.poll(wgpu::PollType::wait_indefinitely())?;
                Ok(())
            };
            run(1)?;
            let t = Instant::now();
            run(reps)?;
            let dt = t.elapsed().as_secs_f64() / reps as f64;

            // check against an f64 reference
            let rb = device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: (m * n * 4) as u64,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut enc = device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(&by, 0, &rb, 0, (m * n * 4) as u64);
            queue.submit([enc.finish()]);
            let (tx, rx) = std::sync::mpsc::channel();
            rb.slice(..).map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
            device.poll(wgpu::PollType::wait_indefinitely())?;
            rx.recv()??;
            let y: Vec<f32> = bytemuck::cast_slice(&rb.slice(..).get_mapped_range()?).to_vec();
            let mut err2 = 0f64;
            let mut ref2 = 0f64;
            let mut bad = 0;
            let samples = if m <= 512 { (m * n) as usize } else { 4096 };
            for s in 0..samples {
                let idx = if m <= 512 {
                    s
                } else {
                    (s * 7919 * 131 + s) % (m * n) as usize
                };
                let (r, c) = (idx / n as usize, idx % n as usize);
                let mut acc = 0f64;
                for kk in 0..k as usize {
                    acc += x[r * k as usize + kk].to_f64() * wv[c * k as usize + kk].to_f64();
                }
                let g = y[idx] as f64;
                if !g.is_finite() {
                    bad += 1;
                }
                err2 += (g - acc) * (g - acc);
                ref2 += acc * acc;
            }
            let nan = y.iter().filter(|v| !v.is_finite()).count();
            println!(
                "cfg {bm}x{bn}x{bk} wg{wgs} pre{pre} | M{m} N{n} K{k}: {:.3} ms {:.1} TFLOP/s \
                 rel_l2 {:.2e} nonfinite {nan} (sampled bad {bad})",
                dt * 1e3,
                2.0 * m as f64 * n as f64 * k as f64 / dt / 1e12,
                (err2 / ref2).sqrt()
            );
        }
        Ok(())
    }
}
