//! Checkpoint loading: official and diffusers names, sharded files, and every malformed input
//! giving a clear error. Built from the tiny golden DiT (`wan_dit_tiny_weights`).

use nabla::io::{OwnedTensor, TensorFile, write_safetensors};
use nabla::wan::{Checkpoint, Layout, WanConfig};
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn golden_weights() -> PathBuf {
    let dir = match std::env::var("NABLA_GOLDEN_DIR") {
        Ok(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/golden"),
    };
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let case = m["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["kind"] == "state_dict" && c["name"].as_str().unwrap_or("").contains("dit"))
        .expect("a DiT state_dict case")
        .clone();
    dir.join(case["file"].as_str().unwrap())
}

fn tiny_base() -> WanConfig {
    WanConfig {
        text_len: 16,
        ..WanConfig::t2v_1_3b()
    }
}

fn all_tensors() -> Vec<OwnedTensor> {
    let f = TensorFile::open(golden_weights()).unwrap();
    f.names()
        .unwrap()
        .into_iter()
        .map(|n| {
            let r = f.raw(&n).unwrap();
            (n.clone(), r.dtype, r.shape.clone(), r.data.to_vec())
        })
        .collect()
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nabla-ckpt-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(path: &Path, t: &[OwnedTensor]) {
    write_safetensors(path, t, HashMap::new()).unwrap();
}

/// Inverse of the spec §3.3 mapping, for building a diffusers copy.
fn to_diffusers(k: &str) -> String {
    let top = [
        (
            "text_embedding.0.",
            "condition_embedder.text_embedder.linear_1.",
        ),
        (
            "text_embedding.2.",
            "condition_embedder.text_embedder.linear_2.",
        ),
        (
            "time_embedding.0.",
            "condition_embedder.time_embedder.linear_1.",
        ),
        (
            "time_embedding.2.",
            "condition_embedder.time_embedder.linear_2.",
        ),
        ("time_projection.1.", "condition_embedder.time_proj."),
        ("head.head.", "proj_out."),
    ];
    if k == "head.modulation" {
        return "scale_shift_table".into();
    }
    for (o, d) in top {
        if let Some(r) = k.strip_prefix(o) {
            return format!("{d}{r}");
        }
    }
    if let Some(r) = k.strip_prefix("blocks.") {
        let (i, t) = r.split_once('.').unwrap();
        let map = [
            ("modulation", "scale_shift_table"),
            ("self_attn.q.", "attn1.to_q."),
            ("self_attn.k.", "attn1.to_k."),
            ("self_attn.v.", "attn1.to_v."),
            ("self_attn.o.", "attn1.to_out.0."),
            ("self_attn.norm_q.", "attn1.norm_q."),
            ("self_attn.norm_k.", "attn1.norm_k."),
            ("cross_attn.q.", "attn2.to_q."),
            ("cross_attn.k.", "attn2.to_k."),
            ("cross_attn.v.", "attn2.to_v."),
            ("cross_attn.o.", "attn2.to_out.0."),
            ("cross_attn.norm_q.", "attn2.norm_q."),
            ("cross_attn.norm_k.", "attn2.norm_k."),
            ("norm3.", "norm2."),
            ("ffn.0.", "ffn.net.0.proj."),
            ("ffn.2.", "ffn.net.2."),
        ];
        for (o, d) in map {
            if let Some(rest) = t.strip_prefix(o) {
                return format!("blocks.{i}.{d}{rest}");
            }
        }
    }
    k.to_string()
}

#[test]
fn official_single_file_infers_config() {
    let ck = Checkpoint::open(golden_weights(), &tiny_base()).unwrap();
    assert_eq!(ck.layout, Layout::Official);
    let c = &ck.config;
    assert_eq!(
        (
            c.dim,
            c.ffn_dim,
            c.num_layers,
            c.text_dim,
            c.freq_dim,
            c.in_dim,
            c.out_dim
        ),
        (256, 512, 2, 64, 256, 16, 16)
    );
    assert_eq!(c.num_heads, 2, "head_dim 128 assumed without config.json");
    // a base of the same width supplies the head count
    let base = WanConfig {
        dim: 256,
        num_heads: 4,
        ..tiny_base()
    };
    assert_eq!(
        Checkpoint::open(golden_weights(), &base)
            .unwrap()
            .config
            .num_heads,
        4
    );
}

#[test]
fn diffusers_names_give_identical_tensors() {
    let t = all_tensors();
    let d = tmpdir("diffusers");
    std::fs::create_dir_all(d.join("transformer")).unwrap();
    let renamed: Vec<OwnedTensor> = t
        .iter()
        .map(|(n, dt, s, b)| (to_diffusers(n), *dt, s.clone(), b.clone()))
        .collect();
    write(
        &d.join("transformer/diffusion_pytorch_model.safetensors"),
        &renamed,
    );
    std::fs::write(d.join("transformer/config.json"), r#"{"num_attention_heads": 2, "attention_head_dim": 128, "num_layers": 2, "ffn_dim": 512, "text_dim": 64, "freq_dim": 256, "in_channels": 16, "out_channels": 16, "patch_size": [1,2,2], "eps": 1e-6}"#).unwrap();
    let a = Checkpoint::open(golden_weights(), &tiny_base()).unwrap();
    let b = Checkpoint::open(&d, &tiny_base()).unwrap();
    assert_eq!(b.layout, Layout::Diffusers);
    assert_eq!(a.config, b.config);
    for (n, ..) in &t {
        assert_eq!(a.f32(n).unwrap(), b.f32(n).unwrap(), "{n}");
    }
}

#[test]
fn sharded_with_index_loads() {
    let t = all_tensors();
    let d = tmpdir("sharded");
    let (a, b) = t.split_at(t.len() / 2);
    write(
        &d.join("diffusion_pytorch_model-00001-of-00002.safetensors"),
        a,
    );
    write(
        &d.join("diffusion_pytorch_model-00002-of-00002.safetensors"),
        b,
    );
    let mut map = serde_json::Map::new();
    for (n, ..) in a {
        map.insert(
            n.clone(),
            "diffusion_pytorch_model-00001-of-00002.safetensors".into(),
        );
    }
    for (n, ..) in b {
        map.insert(
            n.clone(),
            "diffusion_pytorch_model-00002-of-00002.safetensors".into(),
        );
    }
    let idx = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(
        d.join("diffusion_pytorch_model.safetensors.index.json"),
        idx.to_string(),
    )
    .unwrap();
    let ck = Checkpoint::open(&d, &tiny_base()).unwrap();
    assert_eq!(ck.files().len(), 2);
    let whole = Checkpoint::open(golden_weights(), &tiny_base()).unwrap();
    for (n, ..) in &t {
        assert_eq!(ck.f32(n).unwrap(), whole.f32(n).unwrap());
    }
    // bf16 storage converts on read
    let d2 = tmpdir("bf16");
    let bf: Vec<OwnedTensor> = t
        .iter()
        .map(|(n, _, s, b)| {
            let v: Vec<f32> = bytemuck::pod_collect_to_vec(b);
            let h: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_f32(x)).collect();
            (
                n.clone(),
                Dtype::BF16,
                s.clone(),
                bytemuck::cast_slice(&h).to_vec(),
            )
        })
        .collect();
    write(&d2.join("diffusion_pytorch_model.safetensors"), &bf);
    let ck = Checkpoint::open(&d2, &tiny_base()).unwrap();
    let x = ck.f32("blocks.1.ffn.0.weight").unwrap();
    let y = whole.f32("blocks.1.ffn.0.weight").unwrap();
    assert!(
        x.iter()
            .zip(&y)
            .all(|(a, b)| (a - b).abs() <= b.abs() * 1e-2 + 1e-30)
    );
}

fn expect_err(what: &str, r: nabla::Result<Checkpoint>, needles: &[&str]) {
    match r {
        Ok(_) => panic!("{what}: expected an error"),
        Err(e) => {
            let m = e.to_string();
            for n in needles {
                assert!(m.contains(n), "{what}: message {m:?} lacks {n:?}");
            }
            eprintln!("{what}: {m}");
        }
    }
}

#[test]
fn malformed_checkpoints_are_errors() {
    let t = all_tensors();
    // missing key + wrong shape + unknown dtype + extra key, reported together
    let d = tmpdir("bad");
    let mut bad: Vec<OwnedTensor> = t
        .iter()
        .filter(|(n, ..)| n != "blocks.1.norm3.bias")
        .cloned()
        .collect();
    for x in bad.iter_mut() {
        if x.0 == "blocks.0.ffn.2.bias" {
            x.2 = vec![128];
            x.3.truncate(128 * 4);
        }
        if x.0 == "blocks.0.norm3.weight" {
            x.1 = Dtype::I32;
        }
    }
    bad.push((
        "blocks.0.lora_A.weight".into(),
        Dtype::F32,
        vec![1],
        vec![0; 4],
    ));
    write(&d.join("diffusion_pytorch_model.safetensors"), &bad);
    expect_err(
        "bad tensors",
        Checkpoint::open(&d, &tiny_base()),
        &[
            "missing tensors: blocks.1.norm3.bias",
            "wrong shapes: blocks.0.ffn.2.bias: [128], expected [256]",
            "unsupported dtypes",
            "blocks.0.norm3.weight: I32",
            "unexpected tensors: blocks.0.lora_A.weight",
        ],
    );
    // truncated file
    let d = tmpdir("trunc");
    let bytes = std::fs::read(golden_weights()).unwrap();
    std::fs::write(
        d.join("diffusion_pytorch_model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    expect_err(
        "truncated",
        Checkpoint::open(&d, &tiny_base()),
        &["not a valid safetensors file"],
    );
    // not a safetensors file at all
    let p = d.join("notes.safetensors");
    std::fs::write(&p, b"hello, this is not a checkpoint").unwrap();
    expect_err(
        "garbage",
        Checkpoint::open(&p, &tiny_base()),
        &["not a valid safetensors file"],
    );
    // empty directory and missing path
    let e = tmpdir("empty");
    expect_err(
        "empty dir",
        Checkpoint::open(&e, &tiny_base()),
        &["holds no diffusion_pytorch_model"],
    );
    expect_err(
        "missing",
        Checkpoint::open(e.join("nope"), &tiny_base()),
        &["does not exist"],
    );
    // config.json contradicting the weights
    let c = tmpdir("cfg");
    write(&c.join("diffusion_pytorch_model.safetensors"), &t);
    std::fs::write(
        c.join("config.json"),
        r#"{"dim": 512, "num_heads": 4, "num_layers": 2}"#,
    )
    .unwrap();
    expect_err(
        "config mismatch",
        Checkpoint::open(&c, &tiny_base()),
        &[
            "config.json contradicts",
            "dim: config.json says 512, the tensors say 256",
        ],
    );
    // a safetensors file of something else entirely
    let o = tmpdir("other");
    write(
        &o.join("diffusion_pytorch_model.safetensors"),
        &[("encoder.weight".into(), Dtype::F32, vec![2], vec![0; 8])],
    );
    expect_err(
        "not a DiT",
        Checkpoint::open(&o, &tiny_base()),
        &["patch_embedding.weight", "does not look like a Wan 2.1 DiT"],
    );
    // index naming a missing shard
    let s = tmpdir("shardmissing");
    std::fs::write(
        s.join("diffusion_pytorch_model.safetensors.index.json"),
        r#"{"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    expect_err(
        "missing shard",
        Checkpoint::open(&s, &tiny_base()),
        &["names shard diffusion_pytorch_model-00001-of-00002.safetensors which is missing"],
    );
}

/// `RandomInit::Wan` draws every tensor as the reference's `init_weights()` leaves it.
#[test]
fn wan_random_init_follows_the_reference() {
    use nabla::wan::{RandomInit, RandomWeights, WeightSource};
    // small, but every fan-in and fan-out differs from the others
    let cfg = WanConfig {
        dim: 256,
        ffn_dim: 640,
        num_heads: 2,
        num_layers: 2,
        text_dim: 96,
        ..tiny_base()
    };
    let rw = RandomWeights::with_init(&cfg, 7, RandomInit::Wan);
    let d = cfg.dim;
    let stats = |v: &[f32]| {
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        let amax = v.iter().fold(0f32, |m, &x| m.max(x.abs()));
        (mean, var.sqrt(), amax)
    };
    for name in nabla::wan::expected_tensors(&cfg)
        .into_iter()
        .map(|(n, _)| n)
    {
        let (v, shape) = rw.get(&name).unwrap();
        assert_eq!(v.len(), shape.iter().product::<usize>(), "{name}");
        assert!(v.iter().all(|x| x.is_finite()), "{name}");
        let (mean, std, amax) = stats(&v);
        let fan_in: usize = shape[1..].iter().product();
        let xavier = if shape.len() > 1 {
            (6.0 / (fan_in + shape[0]) as f64).sqrt()
        } else {
            0.0
        };
        if name.contains("norm") {
            let one = if name.ends_with("weight") { 1.0 } else { 0.0 };
            assert!(v.iter().all(|&x| x == one), "{name}: every value {one}");
        } else if name == "head.head.weight"
            || (name.ends_with("bias") && name != "patch_embedding.bias")
        {
            assert!(v.iter().all(|&x| x == 0.0), "{name}: zero");
        } else if name.ends_with("modulation") {
            let want = 1.0 / (d as f64).sqrt();
            assert!(
                (std / want - 1.0).abs() < 0.1,
                "{name}: std {std} vs {want}"
            );
        } else if name.starts_with("text_embedding.") || name.starts_with("time_embedding.") {
            assert!((std / 0.02 - 1.0).abs() < 0.1, "{name}: std {std} vs 0.02");
        } else if name == "patch_embedding.bias" {
            let bound = 1.0 / ((cfg.in_dim * 4) as f64).sqrt();
            assert!(
                amax as f64 <= bound && amax as f64 > 0.8 * bound,
                "{name}: max {amax}"
            );
        } else {
            // Xavier uniform: |x| < a, std a / √3
            assert!(amax as f64 <= xavier, "{name}: max {amax} above {xavier}");
            let want = xavier / 3f64.sqrt();
            assert!(
                (std / want - 1.0).abs() < 0.1,
                "{name}: std {std} vs {want}"
            );
            assert!(mean.abs() < 0.1 * want, "{name}: mean {mean}");
        }
    }
    // and the default draw is a different one
    let syn = RandomWeights::new(&cfg, 7);
    let name = "blocks.0.self_attn.norm_q.weight";
    assert_ne!(syn.get(name).unwrap().0, rw.get(name).unwrap().0);
    assert!(
        "bogus"
            .parse::<RandomInit>()
            .unwrap_err()
            .to_string()
            .contains("synthetic")
    );
    assert_eq!("wan".parse::<RandomInit>().unwrap(), RandomInit::Wan);
}
