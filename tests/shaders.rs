//! Every WGSL kernel variant the crate can create parses, validates with only the capabilities it
//! declares, and translates to MSL, HLSL and SPIR-V. No GPU needed: this is naga alone.

use naga::back::{hlsl, msl, spv};
use naga::valid::{Capabilities, ModuleInfo, ValidationFlags, Validator};
use std::path::{Path, PathBuf};

/// Whether a variant's source turns on `enable f16;` (only those may use SHADER_FLOAT16).
fn uses_f16(source: &str) -> bool {
    source
        .lines()
        .any(|l| l.trim_start().starts_with("enable") && l.contains("f16"))
}

/// Whether a variant uses cooperative matrices (Vulkan-only 16×16 tensor-core kernels).
fn uses_coop(source: &str) -> bool {
    source
        .lines()
        .any(|l| l.trim_start().starts_with("enable") && l.contains("wgpu_cooperative_matrix"))
}

/// The validator capabilities a variant needs: none, SHADER_FLOAT16 for f16 storage, for
/// cooperative-matrix kernels COOPERATIVE_MATRIX + SUBGROUP (shuffles, subgroup ids), and
/// SHADER_INT16 / SHADER_FLOAT16_IN_FLOAT32 for their 16-byte f16 span loads.
fn capabilities_for(source: &str) -> Capabilities {
    let mut c = Capabilities::empty();
    if uses_f16(source) {
        c |= Capabilities::SHADER_FLOAT16;
    }
    if uses_coop(source) {
        c |= Capabilities::COOPERATIVE_MATRIX;
    }
    if source.contains("subgroup") {
        c |= Capabilities::SUBGROUP;
    }
    if source.contains("enable wgpu_int16;") {
        c |= Capabilities::SHADER_INT16;
    }
    // wgpu grants it from the downlevel SHADER_F16_IN_F32, which every Vulkan device has
    if source.contains("unpack2x16float") {
        c |= Capabilities::SHADER_FLOAT16_IN_FLOAT32;
    }
    c
}

/// Parses WGSL; the error names the variant and carries naga's rendered diagnostic.
fn parse(name: &str, source: &str) -> Result<naga::Module, String> {
    naga::front::wgsl::parse_str(source)
        .map_err(|e| format!("{name}: WGSL parse error:\n{}", e.emit_to_string(source)))
}

/// Validates a module with exactly `caps`.
fn validate(
    name: &str,
    source: &str,
    module: &naga::Module,
    caps: Capabilities,
) -> Result<ModuleInfo, String> {
    Validator::new(ValidationFlags::all(), caps)
        .validate(module)
        .map_err(|e| {
            format!(
                "{name}: validation error (capabilities {caps:?}):\n{}",
                e.emit_to_string(source)
            )
        })
}

fn to_msl(name: &str, module: &naga::Module, info: &ModuleInfo) -> Result<String, String> {
    let options = msl::Options {
        // Metal 2.4: what wgpu asks for on current Apple GPUs; f16 and everything the kernels
        // use is available there.
        lang_version: (2, 4),
        ..Default::default()
    };
    let (out, _) = msl::write_string(module, info, &options, &msl::PipelineOptions::default())
        .map_err(|e| format!("{name}: MSL translation failed: {e}"))?;
    Ok(out)
}

fn to_hlsl(
    name: &str,
    module: &naga::Module,
    info: &ModuleInfo,
    f16: bool,
) -> Result<String, String> {
    // 16-bit types need shader model 6.2 (native 16-bit scalars in DXC).
    let options = hlsl::Options {
        shader_model: if f16 {
            hlsl::ShaderModel::V6_2
        } else {
            hlsl::ShaderModel::V5_1
        },
        ..Default::default()
    };
    let pipeline = hlsl::PipelineOptions::default();
    let mut out = String::new();
    hlsl::Writer::new(&mut out, &options, &pipeline)
        .write(module, info, None)
        .map_err(|e| format!("{name}: HLSL translation failed: {e}"))?;
    Ok(out)
}

fn to_spirv(name: &str, module: &naga::Module, info: &ModuleInfo) -> Result<Vec<u32>, String> {
    let options = spv::Options {
        lang_version: (1, 3),
        ..Default::default()
    };
    spv::write_vec(module, info, &options, None)
        .map_err(|e| format!("{name}: SPIR-V translation failed: {e}"))
}

/// Runs the whole chain for one variant; the error says which step failed and why.
fn check_variant(name: &str, source: &str) -> Result<(), String> {
    let module = parse(name, source)?;
    let f16 = uses_f16(source);
    let info = validate(name, source, &module, capabilities_for(source))?;
    if module.entry_points.is_empty() {
        return Err(format!("{name}: no entry point"));
    }
    if !module.entry_points.iter().any(|ep| ep.name == "main") {
        return Err(format!(
            "{name}: no entry point named `main` (the pipelines use entry_point \"main\")"
        ));
    }
    // 16×16 cooperative matrices exist only on Vulkan (Metal offers 8×8 simdgroup matrices,
    // DX12 none through naga): the dispatcher selects those kernels on Vulkan adapters only,
    // so they are translated to SPIR-V alone.
    let (mut m, mut h) = (String::new(), String::new());
    if !uses_coop(source) {
        m = to_msl(name, &module, &info)?;
        if m.trim().is_empty() {
            return Err(format!("{name}: MSL output is empty"));
        }
        h = to_hlsl(name, &module, &info, f16)?;
        if h.trim().is_empty() {
            return Err(format!("{name}: HLSL output is empty"));
        }
    }
    let s = to_spirv(name, &module, &info)?;
    if s.len() <= 5 {
        return Err(format!(
            "{name}: SPIR-V output has {} words (header only)",
            s.len()
        ));
    }
    if s[0] != 0x0723_0203 {
        return Err(format!("{name}: SPIR-V magic number is {:#x}", s[0]));
    }
    eprintln!(
        "{name}: ok (MSL {} B, HLSL {} B, SPIR-V {} words)",
        m.len(),
        h.len(),
        s.len()
    );
    Ok(())
}

#[test]
fn all_variants_validate_and_translate() {
    let variants = nabla::shaders::all_variants();
    assert!(!variants.is_empty(), "shaders::all_variants() is empty");
    let failures: Vec<String> = variants
        .iter()
        .filter_map(|(name, src)| check_variant(name, src).err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} shader variants failed:\n\n{}",
        failures.len(),
        variants.len(),
        failures.join("\n\n")
    );
}

#[test]
fn variant_names_are_unique() {
    let variants = nabla::shaders::all_variants();
    let mut names: Vec<&str> = variants.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(before, names.len(), "duplicate variant names: {names:?}");
}

#[test]
fn both_f32_and_f16_variants_are_registered() {
    // `check_variant` validates f32 variants with no capabilities and f16 ones with
    // SHADER_FLOAT16 only; make sure both kinds exist so both paths are exercised.
    let variants = nabla::shaders::all_variants();
    let f16 = variants.iter().filter(|(_, s)| uses_f16(s)).count();
    assert!(f16 > 0, "no f16 variant registered");
    assert!(f16 < variants.len(), "no f32 variant registered");
}

#[test]
fn f16_variants_fail_without_shader_float16() {
    // Validation with the real capability set must matter: an f16 variant validated without
    // SHADER_FLOAT16 is rejected.
    for (name, src) in nabla::shaders::all_variants() {
        if !uses_f16(&src) {
            continue;
        }
        let module = parse(&name, &src).unwrap_or_else(|e| panic!("{e}"));
        let r = Validator::new(ValidationFlags::all(), Capabilities::empty()).validate(&module);
        assert!(
            r.is_err(),
            "{name}: validated without SHADER_FLOAT16 although it enables f16"
        );
    }
}

#[test]
fn int16_variants_need_shader_int16_and_have_a_fallback() {
    // The 16-bit-integer forms (16-byte f16 span loads) are rejected without SHADER_INT16, and
    // every one has a twin without it under the same name (`i16=false`), for devices without.
    let all = nabla::shaders::all_variants();
    let names: std::collections::HashSet<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    let mut seen = 0;
    for (name, src) in &all {
        if !src.contains("enable wgpu_int16;") {
            continue;
        }
        seen += 1;
        let module = parse(name, src).unwrap_or_else(|e| panic!("{e}"));
        let caps = capabilities_for(src) & !Capabilities::SHADER_INT16;
        let r = Validator::new(ValidationFlags::all(), caps).validate(&module);
        assert!(r.is_err(), "{name}: validated without SHADER_INT16");
        let twin = name.replace("i16=true", "i16=false");
        assert!(
            twin != *name && names.contains(twin.as_str()),
            "{name}: no fallback variant {twin}"
        );
    }
    assert!(seen > 0, "no variant uses 16-bit integers");
}

fn wgsl_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| panic!("cannot read an entry of {}: {e}", dir.display()))
            .path();
        if path.is_dir() {
            wgsl_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "wgsl") {
            out.push(path);
        }
    }
}

#[test]
fn unroll_expansion() {
    let src = "a\n    //@unroll N\n    x{t} = y{t+M};\n    //@end\nb\n";
    let out = nabla::shaders::expand_unroll(src, &[("N", 3), ("M", 10)]);
    assert_eq!(out, "a\n    x0 = y10;\n    x1 = y11;\n    x2 = y12;\nb\n");
    for (name, src) in nabla::shaders::all_variants() {
        assert!(
            !src.contains("//@unroll") && !src.contains("{t}"),
            "{name}: unexpanded unroll block"
        );
    }
}

#[test]
fn every_wgsl_file_is_a_registered_variant() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let mut files = Vec::new();
    wgsl_files(&root, &mut files);
    files.sort();
    assert!(!files.is_empty(), "no .wgsl files under {}", root.display());
    let variants = nabla::shaders::all_variants();
    let mut missing = Vec::new();
    for f in &files {
        let body = std::fs::read_to_string(f)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", f.display()));
        assert!(!body.trim().is_empty(), "{} is empty", f.display());
        // files with `//@unroll` blocks are expanded before use: their text after the last
        // `//@end` stays verbatim, so that tail identifies them
        let tail = match body.rfind("//@end\n") {
            Some(i) => &body[i + "//@end\n".len()..],
            None => body.as_str(),
        };
        let covered: Vec<&str> = variants
            .iter()
            .filter(|(_, src)| src.contains(tail))
            .map(|(n, _)| n.as_str())
            .collect();
        if covered.is_empty() {
            missing.push(f.strip_prefix(&root).unwrap_or(f).display().to_string());
        } else {
            eprintln!("{}: {}", f.display(), covered.join(", "));
        }
    }
    assert!(
        missing.is_empty(),
        "these shader files are not the body of any variant in nabla::shaders::all_variants(), \
         so they escape validation; register them: {missing:?}"
    );
}

#[test]
fn every_shader_const_is_a_registered_variant() {
    use nabla::shaders::{
        BLOCK_SPARSE, BLOCK_SPARSE_COOP, FRACTAL, POOL, REDUCE_SG, REDUCE_WG, SCORES, THRESHOLD,
    };
    let variants = nabla::shaders::all_variants();
    for (name, body) in [
        ("POOL", POOL),
        ("SCORES", SCORES),
        ("THRESHOLD", THRESHOLD),
        ("REDUCE_WG", REDUCE_WG),
        ("REDUCE_SG", REDUCE_SG),
        ("FRACTAL", FRACTAL),
        ("BLOCK_SPARSE", BLOCK_SPARSE),
        ("BLOCK_SPARSE_COOP", BLOCK_SPARSE_COOP),
    ] {
        // unroll blocks are expanded: the text after the last one stays verbatim
        let tail = body
            .rfind("//@end\n")
            .map_or(body, |i| &body[i + "//@end\n".len()..]);
        assert!(
            variants.iter().any(|(_, src)| src.contains(tail)),
            "nabla::shaders::{name} is not the body of any registered variant"
        );
    }
}

#[test]
fn broken_wgsl_is_rejected() {
    // Parses, but the validator rejects it: `bool` is not host-shareable, so it cannot live in a
    // storage buffer.
    let bool_storage = "
@group(0) @binding(0) var<storage, read_write> out: array<bool>;
@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32) {
    out[lid] = true;
}
";
    let module = parse("broken/bool-storage", bool_storage)
        .unwrap_or_else(|e| panic!("the negative sample must parse: {e}"));
    let e = validate(
        "broken/bool-storage",
        bool_storage,
        &module,
        Capabilities::empty(),
    )
    .expect_err("a bool storage buffer must fail validation");
    assert!(
        e.contains("broken/bool-storage") && e.contains("validation error"),
        "unexpected message: {e}"
    );
    eprintln!("{e}");
    let e = check_variant("broken/bool-storage", bool_storage)
        .expect_err("check_variant must report the validation failure");
    assert!(
        e.contains("broken/bool-storage"),
        "error does not name the variant: {e}"
    );

    // A type error: naga's WGSL front end lowers and type-checks, so this fails at the parse
    // step; the message carries naga's rendered diagnostic.
    let type_error = "
@group(0) @binding(0) var<storage, read_write> out: array<u32>;
@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32) {
    out[lid] = 1.5;
}
";
    let e = check_variant("broken/type", type_error).expect_err("a type error must not pass");
    assert!(
        e.contains("broken/type") && e.contains("parse error") && e.contains("u32"),
        "unexpected message: {e}"
    );
    eprintln!("{e}");

    // Syntax error.
    let syntax_error = "@compute @workgroup_size(64) fn main( { }";
    let e = check_variant("broken/syntax", syntax_error).expect_err("a syntax error must fail");
    assert!(
        e.contains("broken/syntax") && e.contains("parse error"),
        "unexpected message: {e}"
    );
    eprintln!("{e}");

    // f16 without the capability it needs is rejected; with it, the same shader passes.
    let f16_shader = "
enable f16;
@group(0) @binding(0) var<storage, read_write> out: array<f16>;
@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32) {
    out[lid] = 1.0h;
}
";
    let module = parse("broken/f16", f16_shader).expect("parses");
    let r = validate("broken/f16", f16_shader, &module, Capabilities::empty());
    assert!(r.is_err(), "f16 validated without SHADER_FLOAT16");
    assert!(
        check_variant("broken/f16", f16_shader).is_ok(),
        "the same shader must pass with the capability it declares"
    );
}

/// The cooperative-matrix kernels' workgroup memory: NVIDIA's cooperative loads round a
/// misaligned start down (GPU-NOTES.md), so every workgroup variable of those kernels must be a
/// multiple of 16 bytes (declared back to back, each then starts 16-byte aligned) — checked
/// from the layout naga computes for every registered variant.
#[test]
fn cooperative_kernels_keep_workgroup_memory_16_byte_aligned() {
    let mut checked = 0;
    for (name, source) in nabla::shaders::all_variants() {
        if !uses_coop(&source) {
            continue;
        }
        let module = parse(&name, &source).unwrap_or_else(|e| panic!("{e}"));
        let mut layouter = naga::proc::Layouter::default();
        layouter.update(module.to_ctx()).expect("layout");
        for (_, var) in module.global_variables.iter() {
            if var.space != naga::AddressSpace::WorkGroup {
                continue;
            }
            let size = layouter[var.ty].size;
            assert_eq!(
                size % 16,
                0,
                "{name}: workgroup variable {:?} is {size} bytes, not a multiple of 16",
                var.name
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "no cooperative kernel found");
}

/// NVIDIA's Vulkan driver gives all the workgroups resident on an SM 48 KB of workgroup memory
/// together (the H200, driver 580: `nabla bench occupancy`, benches/RESULTS.md session 11), so
/// a tensor-core kernel there keeps 8 subgroups of 32 (256 invocations) per SM only with at
/// most 192 bytes per invocation: 24 KB for a workgroup of 128. Above that one workgroup of 4
/// subgroups runs per SM. That halved the speed of the GEMM (a fourth workgroup variable of 16
/// bytes, session 8; 8 bytes more in a tile array, session 11) and held the attention at 4
/// subgroups per SM until session 11. CI has no GPU to see it: every registered cooperative
/// variant for 32-wide subgroups is checked here.
#[test]
fn tensor_core_kernels_keep_eight_subgroups_per_sm_in_48_kb() {
    const PER_SM: u32 = 48 * 1024;
    const INVOCATIONS: u32 = 8 * 32;
    let mut seen = 0;
    for (name, source) in nabla::shaders::all_variants() {
        if !(uses_coop(&source) && name.contains("sg32")) {
            continue;
        }
        seen += 1;
        let module = parse(&name, &source).unwrap_or_else(|e| panic!("{e}"));
        let mut layouter = naga::proc::Layouter::default();
        layouter.update(module.to_ctx()).expect("layout");
        let bytes: u32 = module
            .global_variables
            .iter()
            .filter(|(_, g)| g.space == naga::AddressSpace::WorkGroup)
            .map(|(_, g)| layouter[g.ty].size)
            .sum();
        let [x, y, z] = module.entry_points[0].workgroup_size;
        let invocations = x * y * z;
        assert!(
            bytes * INVOCATIONS <= PER_SM * invocations,
            "{name}: {bytes} bytes of workgroup memory for {invocations} invocations; keep at \
             most {} so that {INVOCATIONS} invocations share an SM's 48 KB",
            PER_SM * invocations / INVOCATIONS
        );
    }
    assert!(
        seen >= 3,
        "only {seen} cooperative variants for 32-wide subgroups registered"
    );
}
