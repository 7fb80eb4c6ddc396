//! Reading the golden set: its directory (`NABLA_GOLDEN_DIR`, default `../shared/golden`), the
//! manifest, cases by kind, tolerances, and the elementwise comparison every golden test uses.

use nabla::wan::WanConfig;
use serde_json::Value;
use std::path::PathBuf;

/// The golden set's directory.
pub fn golden_dir() -> PathBuf {
    match std::env::var("NABLA_GOLDEN_DIR") {
        Ok(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/golden"),
    }
}

/// `manifest.json`, format-checked.
pub fn manifest() -> Value {
    let p = golden_dir().join("manifest.json");
    let text = std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e} (set NABLA_GOLDEN_DIR)", p.display()));
    let m: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert_eq!(m["format"], "golden-vectors/1", "unknown golden format");
    m
}

/// Every case of a kind.
pub fn cases(kind: &str) -> Vec<Value> {
    manifest()["cases"]
        .as_array()
        .expect("manifest: cases")
        .iter()
        .filter(|c| c["kind"] == kind)
        .cloned()
        .collect()
}

/// Elementwise tolerance `(atol, rtol)` of a manifest tensor entry; `exact` gives zeros.
pub fn tolerance(t: &Value) -> (f32, f32) {
    let tol = &t["tolerance"];
    if tol == "exact" {
        return (0.0, 0.0);
    }
    let atol = tol["atol"]
        .as_f64()
        .unwrap_or_else(|| panic!("tolerance of {}: {tol}", t["name"])) as f32;
    let rtol = tol["rtol"].as_f64().unwrap_or(0.0) as f32;
    (atol, rtol)
}

/// Asserts `|got − want| ≤ atol + rtol·|want|` elementwise (NaN never passes) and returns the
/// worst absolute error.
pub fn check(name: &str, got: &[f32], want: &[f32], tol: (f32, f32)) -> f32 {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(!g.is_nan(), "{name}: NaN at {i}");
        let err = (g - w).abs();
        assert!(
            err <= tol.0 + tol.1 * w.abs(),
            "{name}[{i}]: got {g}, expected {w}, tolerance {tol:?}"
        );
        worst = worst.max(err);
    }
    eprintln!(
        "{name}: ok, max abs err {worst:.2e} (tolerance {tol:?}, rel L2 {:.2e})",
        super::rel_l2(got, want)
    );
    worst
}

/// The config a weights case describes, over the 1.3B defaults.
pub fn config_of(weights_case: &Value) -> WanConfig {
    let c = &weights_case["config"];
    let u = |k: &str| {
        c[k].as_u64()
            .unwrap_or_else(|| panic!("weights config lacks {k}")) as usize
    };
    let p: Vec<usize> = c["patch_size"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    WanConfig {
        dim: u("dim"),
        ffn_dim: u("ffn_dim"),
        freq_dim: u("freq_dim"),
        num_heads: u("num_heads"),
        num_layers: u("num_layers"),
        text_len: u("text_len"),
        text_dim: u("text_dim"),
        in_dim: u("in_dim"),
        out_dim: u("out_dim"),
        eps: c["eps"].as_f64().unwrap(),
        patch: (p[0], p[1], p[2]),
    }
}
