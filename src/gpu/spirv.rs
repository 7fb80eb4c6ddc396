//! WGSL → SPIR-V through naga with per-invocation element access to cooperative matrices.
//!
//! WGSL's cooperative matrices are opaque: a kernel can load, store, add, scale and multiply
//! them, never read one element. SPIR-V (`SPV_KHR_cooperative_matrix`) can: `OpCompositeExtract`
//! and `OpCompositeInsert` address the elements a matrix holds in the current invocation, in an
//! order the implementation chooses ([`crate::gpu::coop_layout`] measures it). So a kernel is
//! written in WGSL with stub functions named `cm_get{i}_{tag}` (returning element `i`) and
//! `cm_set{i}_{tag}` (returning the matrix with element `i` replaced), compiled by naga to
//! SPIR-V, and every call of a stub is rewritten here into the one instruction it stands for.
//! The module then goes to the driver through wgpu's SPIR-V passthrough (Vulkan only), with the
//! bind group layout read from the module's globals.

use naga::back::spv;

/// A kernel compiled to SPIR-V with its stub calls rewritten.
pub struct Compiled {
    /// The SPIR-V words.
    pub words: Vec<u32>,
    /// Bind group 0's layout entries, from the module's buffer globals.
    pub entries: Vec<wgpu::BindGroupLayoutEntry>,
    /// How many stub calls were rewritten.
    pub rewritten: usize,
}

const OP_NAME: u32 = 5;
const OP_FUNCTION_CALL: u32 = 57;
const OP_COMPOSITE_EXTRACT: u32 = 81;
const OP_COMPOSITE_INSERT: u32 = 82;

/// What a stub's name stands for: (insert?, element index).
fn stub_kind(name: &str) -> Option<(bool, u32)> {
    let (insert, rest) = if let Some(r) = name.strip_prefix("cm_get") {
        (false, r)
    } else if let Some(r) = name.strip_prefix("cm_set") {
        (true, r)
    } else {
        return None;
    };
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    if digits.is_empty() || !rest[digits.len()..].starts_with('_') {
        return None;
    }
    digits.parse().ok().map(|i| (insert, i))
}

/// The string of an `OpName` instruction's operands (nul-terminated UTF-8 in words).
fn name_of(words: &[u32]) -> String {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Rewrites every `OpFunctionCall` of a stub into `OpCompositeExtract` (`cm_get`, one argument:
/// the matrix) or `OpCompositeInsert` (`cm_set`, two: the matrix, the new element), in place:
/// both have the word count of the call they replace. Returns the number rewritten.
pub fn rewrite_stubs(words: &mut [u32]) -> Result<usize, String> {
    if words.len() < 5 || words[0] != 0x0723_0203 {
        return Err("not a SPIR-V module".into());
    }
    let mut stubs = std::collections::HashMap::new();
    let mut i = 5;
    while i < words.len() {
        let (wc, op) = ((words[i] >> 16) as usize, words[i] & 0xffff);
        if wc == 0 || i + wc > words.len() {
            return Err(format!("malformed instruction at word {i}"));
        }
        if op == OP_NAME
            && wc >= 3
            && let Some(k) = stub_kind(&name_of(&words[i + 2..i + wc]))
        {
            stubs.insert(words[i + 1], k);
        }
        i += wc;
    }
    let mut n = 0;
    let mut i = 5;
    while i < words.len() {
        let (wc, op) = ((words[i] >> 16) as usize, words[i] & 0xffff);
        if op == OP_FUNCTION_CALL
            && let Some(&(insert, index)) = stubs.get(&words[i + 3])
        {
            let (rt, res) = (words[i + 1], words[i + 2]);
            match (insert, wc) {
                (false, 5) => {
                    let m = words[i + 4];
                    words[i..i + 5].copy_from_slice(&[
                        (5 << 16) | OP_COMPOSITE_EXTRACT,
                        rt,
                        res,
                        m,
                        index,
                    ]);
                }
                (true, 6) => {
                    let (m, x) = (words[i + 4], words[i + 5]);
                    words[i..i + 6].copy_from_slice(&[
                        (6 << 16) | OP_COMPOSITE_INSERT,
                        rt,
                        res,
                        x,
                        m,
                        index,
                    ]);
                }
                _ => return Err(format!("stub call with {} arguments at word {i}", wc - 4)),
            }
            n += 1;
        }
        i += wc;
    }
    Ok(n)
}

/// Whether a WGSL source declares element stubs (`fn cm_get…` / `fn cm_set…`): such kernels
/// are built by [`compile`] only, never by wgpu's own WGSL path.
pub fn has_stubs(source: &str) -> bool {
    source.contains("fn cm_get") || source.contains("fn cm_set")
}

/// WGSL → SPIR-V `lang` with naga, the module and its words: runtime bounds checks off unless
/// `checked`; workgroup memory zeroed by the driver and loops bounded (when `checked`) as
/// wgpu's Vulkan layer does unless `raw`. A source with element stubs ([`has_stubs`]) keeps its
/// debug names and has its stub calls rewritten. [`compile`] and the kernel statistics
/// (stats.rs) both write SPIR-V through here.
pub fn write(
    source: &str,
    lang: (u8, u8),
    raw: bool,
    checked: bool,
) -> Result<(naga::Module, Vec<u32>, usize), String> {
    let module = naga::front::wgsl::parse_str(source).map_err(|e| e.emit_to_string(source))?;
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .map_err(|e| e.emit_to_string(source))?;
    let mut opts = spv::Options {
        lang_version: lang,
        zero_initialize_workgroup_memory: if raw {
            spv::ZeroInitializeWorkgroupMemoryMode::None
        } else {
            spv::ZeroInitializeWorkgroupMemoryMode::Native
        },
        force_loop_bounding: checked && !raw,
        ..Default::default()
    };
    let stubs = has_stubs(source);
    if stubs {
        opts.flags |= spv::WriterFlags::DEBUG;
    }
    // naga's default policies are all Unchecked: the checked form asks for clamped indices
    // explicitly (what wgpu's Vulkan layer asks for without robust buffer access; binding arrays
    // stay unchecked there too)
    let policy = if checked {
        naga::proc::BoundsCheckPolicy::Restrict
    } else {
        naga::proc::BoundsCheckPolicy::Unchecked
    };
    opts.bounds_check_policies = naga::proc::BoundsCheckPolicies {
        index: policy,
        buffer: policy,
        image_load: policy,
        binding_array: naga::proc::BoundsCheckPolicy::Unchecked,
    };
    let pipe = spv::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: "main".into(),
    };
    let mut words =
        spv::write_vec(&module, &info, &opts, Some(&pipe)).map_err(|e| e.to_string())?;
    let rewritten = if stubs { rewrite_stubs(&mut words)? } else { 0 };
    Ok((module, words, rewritten))
}

/// Compiles a kernel with element stubs for `Gpu::pipeline_spirv` (crate-internal): SPIR-V 1.6,
/// runtime bounds checks (indices clamped into their arrays) only when `checked`, the stub calls
/// rewritten. Workgroup memory is not zero-initialised and loops are not bounded: kernels built
/// this way write what they read and their loops end by construction.
pub fn compile(source: &str, checked: bool) -> Result<Compiled, String> {
    let (module, words, rewritten) = write(source, (1, 6), true, checked)?;
    let mut entries = Vec::new();
    for (_, gv) in module.global_variables.iter() {
        let Some(b) = &gv.binding else { continue };
        let ty = match gv.space {
            naga::AddressSpace::Uniform => wgpu::BufferBindingType::Uniform,
            naga::AddressSpace::Storage { access } => wgpu::BufferBindingType::Storage {
                read_only: !access.contains(naga::StorageAccess::STORE),
            },
            _ => continue,
        };
        entries.push(wgpu::BindGroupLayoutEntry {
            binding: b.binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        });
    }
    entries.sort_by_key(|e| e.binding);
    Ok(Compiled {
        words,
        entries,
        rewritten,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stub_names() {
        assert_eq!(stub_kind("cm_get3_c32"), Some((false, 3)));
        assert_eq!(stub_kind("cm_set7_a16"), Some((true, 7)));
        assert_eq!(stub_kind("cm_get_c32"), None);
        assert_eq!(stub_kind("cm_get3"), None);
        assert_eq!(stub_kind("main"), None);
    }

    #[test]
    fn stubs_become_composite_instructions() {
        let src = "enable f16;\nenable wgpu_cooperative_matrix;\n\
            @group(0) @binding(0) var<storage, read_write> buf: array<f32>;\n\
            var<workgroup> w: array<f32, 256>;\n\
            fn cm_get1_c32(m: coop_mat16x16<f32, C>) -> f32 { return 0.0; }\n\
            fn cm_set2_c32(m: coop_mat16x16<f32, C>, x: f32) -> coop_mat16x16<f32, C> { return m; }\n\
            @compute @workgroup_size(32)\n\
            fn main(@builtin(local_invocation_index) lid: u32) {\n\
              var m = coopLoad<coop_mat16x16<f32, C>>(&w[0], 16u);\n\
              m = cm_set2_c32(m, 5.0);\n\
              buf[lid] = cm_get1_c32(m);\n\
              coopStore(m, &w[0], 16u);\n\
            }\n";
        let c = compile(src, true).unwrap();
        assert_eq!(c.rewritten, 2);
        assert_eq!(c.entries.len(), 1);
        let mut ops = Vec::new();
        let mut i = 5;
        while i < c.words.len() {
            ops.push(c.words[i] & 0xffff);
            i += (c.words[i] >> 16) as usize;
        }
        assert!(ops.contains(&OP_COMPOSITE_EXTRACT));
        assert!(ops.contains(&OP_COMPOSITE_INSERT));
        // the stubs' own bodies stay, but nothing calls them any more
        assert!(!ops.contains(&OP_FUNCTION_CALL));
    }

    /// The checked form clamps indices (naga's default policies check nothing; until session 22
    /// `NABLA_CHECKED=1` therefore left the SPIR-V kernels unchecked): a kernel that indexes its
    /// arrays with run-time values gains clamps, the unchecked one does not.
    #[test]
    fn checked_kernels_clamp_their_indices() {
        let src = "@group(0) @binding(0) var<storage, read_write> buf: array<f32>;\n\
            var<workgroup> w: array<f32, 64>;\n\
            fn cm_get0_c32(x: f32) -> f32 { return x; }\n\
            @compute @workgroup_size(64)\n\
            fn main(@builtin(local_invocation_index) lid: u32) {\n\
              w[lid * 3u] = buf[lid * 7u];\n\
              workgroupBarrier();\n\
              buf[lid * 5u] = w[lid * 2u];\n\
            }\n";
        let count = |words: &[u32], op: u32| {
            let mut n = 0;
            let mut i = 5;
            while i < words.len() {
                n += (words[i] & 0xffff == op) as usize;
                i += (words[i] >> 16) as usize;
            }
            n
        };
        const OP_EXT_INST: u32 = 12;
        let checked = compile(src, true).unwrap().words;
        let unchecked = compile(src, false).unwrap().words;
        // the clamps are GLSL.std.450 UMin instructions: two workgroup indices, two buffer ones
        assert!(
            count(&checked, OP_EXT_INST) >= 4 + count(&unchecked, OP_EXT_INST),
            "checked {} words, unchecked {} words",
            checked.len(),
            unchecked.len()
        );
    }

    #[test]
    fn not_spirv_is_an_error() {
        assert!(rewrite_stubs(&mut [1, 2, 3, 4, 5]).is_err());
    }
}
