//! The order in which an invocation holds the elements of a 16×16 cooperative matrix.
//!
//! SPIR-V lets a kernel read and replace the elements of a cooperative matrix that the current
//! invocation holds ([`super::spirv`]), but which row and column element `i` is, the
//! implementation decides. Kernels that compute on single elements (the attention's softmax in
//! registers) are built for one family of layouts, the one of NVIDIA's 16×8×16 tensor-core
//! fragments: with 32 invocations of 8 elements each, invocation `l` holds rows `l/4` and
//! `l/4 + 8`, columns `2·(l%4)` and `2·(l%4) + 1`, and the same eight columns plus 8. Within the
//! family the order of the eight is free: [`Layout`] records it. This module measures it once
//! per device (`shaders/gpu/coop_layout.wgsl`) and also checks that an f16 A matrix built from
//! an f32 C matrix's elements, index by index, holds them where the C matrix did. A device whose
//! layout is outside the family, or whose A and C orders differ, gets no layout ([`probe`] says
//! why), and the kernels that need it are not used there. It checks, too, whether an f16 B
//! matrix holds element `i` where the layout puts it with rows and columns swapped (row
//! `2·(l%4) + col[i]`, column `l/4 + 8·hi[i]`: the k-pairs of NVIDIA's B fragments), which the
//! linear kernel that builds W's fragments from storage needs ([`Layout::b_ok`]).

use super::Gpu;
use crate::error::Result;
use crate::shaders;

/// The probe kernel.
pub const SOURCE: &str = include_str!("../../shaders/gpu/coop_layout.wgsl");

/// Element `i` of invocation `l` holds row `l/4 + 8·hi[i]` and column `2·(l%4) + col[i]`
/// (`col[i]` ∈ {0, 1, 8, 9}), for f32 C and f16 A matrices alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// 1 where element `i` lies in the upper eight rows of the invocation's two.
    pub hi: [u32; 8],
    /// Element `i`'s column offset from `2·(l%4)`.
    pub col: [u32; 8],
    /// Whether an f16 B matrix holds element `i` at row `2·(l%4) + col[i]`, column
    /// `l/4 + 8·hi[i]` (the transposed places).
    pub b_ok: bool,
}

impl Layout {
    /// The order the H200 reports (Vulkan, NVIDIA 580.159.04), B included: what the kernel
    /// variant lists are built with (other orders only permute constants).
    pub const NVIDIA: Layout = Layout {
        hi: [0, 0, 0, 0, 1, 1, 1, 1],
        col: [0, 1, 8, 9, 0, 1, 8, 9],
        b_ok: true,
    };
}

/// The probe's source (8 elements per invocation).
pub fn source() -> String {
    format!(
        "enable f16;\nenable wgpu_cooperative_matrix;\n{}",
        shaders::expand_unroll(SOURCE, &[("E", 8)])
    )
}

/// Reads a [`Layout`] from the probe's output (`out[l·8 + i]` = r·16 + c of invocation `l`'s
/// element `i`; then the 256 values of the A round trip, then the 256 of the B round trip), or
/// says why it is outside the family
/// or how the A matrix's order differs from the C matrix's.
pub fn decode(out: &[f32]) -> std::result::Result<Layout, String> {
    if out.len() < 768 {
        return Err(format!("{} values, expected 768", out.len()));
    }
    let mut l = Layout {
        hi: [0; 8],
        col: [0; 8],
        b_ok: false,
    };
    for (i, &v) in out[..8].iter().enumerate() {
        if v.fract() != 0.0 || !(0.0..256.0).contains(&v) {
            return Err(format!("element {i} of invocation 0 reads {v}"));
        }
        let (r, c) = (v as u32 / 16, v as u32 % 16);
        if !matches!(r, 0 | 8) || !matches!(c, 0 | 1 | 8 | 9) {
            return Err(format!(
                "element {i} of invocation 0 is row {r}, column {c}"
            ));
        }
        l.hi[i] = r / 8;
        l.col[i] = c;
    }
    // every (row half, column) pair once
    let mut seen = [false; 8];
    for i in 0..8 {
        let slot = (l.hi[i] * 4 + (l.col[i] & 1) + l.col[i] / 8 * 2) as usize;
        if seen[slot] {
            return Err(format!(
                "invocation 0 holds row {}, column {} twice",
                l.hi[i] * 8,
                l.col[i]
            ));
        }
        seen[slot] = true;
    }
    for lane in 0..32u32 {
        for i in 0..8 {
            let want = (lane / 4 + 8 * l.hi[i]) * 16 + 2 * (lane % 4) + l.col[i];
            let got = out[(lane * 8) as usize + i];
            if got != want as f32 {
                return Err(format!(
                    "element {i} of invocation {lane} reads {got}, the family has {want}"
                ));
            }
        }
    }
    for e in 0..256 {
        if out[256 + e] != e as f32 {
            return Err(format!(
                "A built from C's elements: row {}, column {} reads {} (A's order differs)",
                e / 16,
                e % 16,
                out[256 + e]
            ));
        }
    }
    l.b_ok = (0..256).all(|e| out[512 + e] == e as f32);
    Ok(l)
}

/// This device's layout, measured on first use and cached, or why there is none: no 16×16 f16
/// cooperative matrices, no subgroups of exactly 32, no SPIR-V passthrough, a layout outside
/// the family, or a probe that failed to run. The kernels that need a layout are then not used;
/// nothing else changes.
pub fn probe(gpu: &Gpu) -> std::result::Result<Layout, String> {
    let c = gpu.caps();
    if !c.passthrough || !c.has_coop_f16_16() || c.subgroup_min != 32 || c.subgroup_max != 32 {
        return Err(
            "needs SPIR-V passthrough, 16x16 f16 cooperative matrices and subgroups of 32".into(),
        );
    }
    let run = || -> Result<Vec<f32>> {
        let out = gpu.empty(&[768], super::DType::F32)?;
        gpu.fill_u32(&out, 0x7fc0_0000);
        // (constant indices inside its arrays: no runtime checks, as it ran on the H200)
        let pipe = gpu.pipeline_spirv("gpu/coop_layout", &source(), false)?;
        let mut b = gpu.batch();
        b.dispatch(&pipe, &[], &[&out], [1, 1, 1])?;
        b.submit()?;
        let v = gpu.read_f32(&out)?;
        gpu.check()?;
        Ok(v)
    };
    let found = gpu.cached("gpu/coop_layout", || -> Result<_> {
        Ok(match run() {
            Ok(v) => decode(&v),
            Err(e) => Err(format!("the probe did not run: {e}")),
        })
    });
    match found {
        Ok(f) => (*f).clone(),
        Err(e) => Err(format!("the probe did not run: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe's output for a layout.
    fn output(l: &Layout) -> Vec<f32> {
        let mut out = vec![0.0; 768];
        for lane in 0..32u32 {
            for i in 0..8 {
                out[(lane * 8) as usize + i] =
                    ((lane / 4 + 8 * l.hi[i]) * 16 + 2 * (lane % 4) + l.col[i]) as f32;
            }
        }
        for (e, v) in out[256..512].iter_mut().enumerate() {
            *v = e as f32;
        }
        if l.b_ok {
            for (e, v) in out[512..].iter_mut().enumerate() {
                *v = e as f32;
            }
        }
        out
    }

    #[test]
    fn decodes_layouts_of_the_family_and_rejects_others() {
        let lay = |hi, col| Layout {
            hi,
            col,
            b_ok: true,
        };
        let nv = lay([0, 0, 1, 1, 0, 0, 1, 1], [0, 1, 0, 1, 8, 9, 8, 9]);
        for (l, ok) in [
            (nv, true),
            // what the H200 (Vulkan, driver 580.159.04) reported
            (
                lay([0, 0, 0, 0, 1, 1, 1, 1], [0, 1, 8, 9, 0, 1, 8, 9]),
                true,
            ),
            (
                lay([0, 1, 0, 1, 0, 1, 0, 1], [0, 0, 1, 1, 8, 8, 9, 9]),
                true,
            ),
            // an element twice
            (
                lay([0, 0, 0, 1, 0, 0, 1, 1], [0, 1, 0, 1, 8, 9, 8, 9]),
                false,
            ),
        ] {
            assert_eq!(decode(&output(&l)).ok(), ok.then_some(l), "{l:?}");
        }
        // A's order differs from C's
        let mut out = output(&nv);
        out.swap(256, 257);
        assert_eq!(decode(&out).ok(), None);
        // another lane mapping (a lane off by one row)
        let mut out = output(&nv);
        out[8] += 16.0;
        assert_eq!(decode(&out).ok(), None);
        // B's order differs: the layout stands, B is not usable
        let mut out = output(&nv);
        out.swap(600, 601);
        assert_eq!(decode(&out), Ok(Layout { b_ok: false, ..nv }));
        let mut out = output(&nv);
        out[700] = f32::NAN;
        assert_eq!(decode(&out), Ok(Layout { b_ok: false, ..nv }));
        // unwritten output (NaN poison)
        let mut out = output(&nv);
        out[300] = f32::NAN;
        assert_eq!(decode(&out).ok(), None);
        assert_eq!(decode(&out[..100]).ok(), None);
    }

    #[test]
    fn probe_compiles_with_its_stubs_rewritten() {
        let c = super::super::spirv::compile(&source(), true).unwrap();
        assert_eq!(c.rewritten, 24);
    }
}
