//! The umT5 encoder: parity with every `t5_encode` case of the golden manifest in
//! `NABLA_GOLDEN_DIR` (default `../shared/golden`; config, weights file, inputs and tolerances
//! all come from the manifest), the key mask, HF key names, configurations the golden case does
//! not cover (shared position table, dim_attn ≠ dim, bf16/f16 weights, other buckets) against a
//! CPU composition of the reference ops, and the loader's errors.

mod common;

use common::golden::*;

use common::gpu;
use nabla::io::{OwnedTensor, TensorFile, write_safetensors};
use nabla::ops::linear::Activation;
use nabla::reference::nn::{attention_bias as ref_attn, elementwise, linear, norm};
use nabla::wan::t5::{T5Config, T5Encoder};
use safetensors::Dtype;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn t5_cases() -> Vec<Value> {
    let cs: Vec<Value> = manifest()["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .filter(|c| c["kind"] == "t5_encode")
        .cloned()
        .collect();
    assert!(!cs.is_empty(), "manifest has no t5_encode case");
    cs
}

fn usize_of(v: &Value, what: &str) -> usize {
    v.as_u64()
        .unwrap_or_else(|| panic!("manifest: {what} is not an integer: {v}")) as usize
}

/// The case's encoder, with the manifest's config checked against the one read from the file.
fn encoder_of(case: &Value) -> T5Encoder {
    let cfg = &case["config"];
    let weights = golden_dir().join(cfg["weights"].as_str().expect("config.weights"));
    let max_distance = cfg
        .get("relative_attention_max_distance")
        .map_or(T5Config::DEFAULT_MAX_DISTANCE, |v| {
            usize_of(v, "relative_attention_max_distance")
        });
    let enc = T5Encoder::open_with(&weights, max_distance, T5Config::DEFAULT_EPS)
        .unwrap_or_else(|e| panic!("{}: {e}", weights.display()));
    let c = enc.config();
    for (key, got) in [
        ("vocab", c.vocab),
        ("dim", c.dim),
        ("dim_attn", c.dim_attn),
        ("dim_ffn", c.dim_ffn),
        ("num_heads", c.num_heads),
        ("num_layers", c.num_layers),
        ("num_buckets", c.num_buckets),
    ] {
        if let Some(v) = cfg.get(key) {
            assert_eq!(got, usize_of(v, key), "config {key}");
        }
    }
    if let Some(s) = cfg["shared_pos"].as_bool() {
        assert_eq!(c.shared_pos, s, "config shared_pos");
    }
    enc
}

/// ids and mask of a case (`[1, L]` I64 each).
fn inputs(f: &TensorFile) -> (Vec<i64>, Vec<i64>) {
    let (ids, ids_shape) = f.i64("ids").unwrap();
    let (mask, mask_shape) = f.i64("mask").unwrap();
    assert_eq!(ids_shape, mask_shape, "ids and mask shapes");
    assert_eq!(ids_shape.first(), Some(&1), "one sequence per case");
    (ids, mask)
}

#[test]
fn golden_t5_encode() {
    let g = gpu();
    for case in t5_cases() {
        let name = case["name"].as_str().unwrap();
        let enc = encoder_of(&case);
        let f = TensorFile::open(golden_dir().join(case["file"].as_str().unwrap())).unwrap();
        let (ids, mask) = inputs(&f);
        let cfg = &case["config"];
        if let Some(v) = cfg.get("padded_len") {
            assert_eq!(ids.len(), usize_of(v, "padded_len"));
        }
        let real = mask.iter().filter(|&&m| m != 0).count();
        if let Some(v) = cfg.get("real_len") {
            assert_eq!(real, usize_of(v, "real_len"));
        }
        let out = enc.encode(g, &ids, &mask).unwrap();
        let ctx = enc.context(g, &ids, &mask).unwrap();
        let dim = enc.config().dim;
        assert_eq!(out.len(), ids.len() * dim);
        assert_eq!(ctx.len(), real * dim);
        let mut checked = 0;
        for t in case["tensors"].as_array().unwrap() {
            let tname = t["name"].as_str().unwrap();
            let got = match tname {
                "out" => &out,
                "context" => &ctx,
                _ => continue,
            };
            let (want, shape) = f.f32(tname).unwrap();
            let want_shape: Vec<usize> = t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| usize_of(v, "shape"))
                .collect();
            assert_eq!(
                shape, want_shape,
                "{name}.{tname}: shape in file vs manifest"
            );
            check(&format!("{name}.{tname}"), got, &want, tolerance(t));
            checked += 1;
        }
        assert_eq!(checked, 2, "{name}: expected tensors out and context");
    }
}

#[test]
fn padded_token_ids_do_not_change_the_real_rows() {
    let g = gpu();
    for case in t5_cases() {
        let enc = encoder_of(&case);
        let f = TensorFile::open(golden_dir().join(case["file"].as_str().unwrap())).unwrap();
        let (ids, mask) = inputs(&f);
        let base = enc.context(g, &ids, &mask).unwrap();
        let vocab = enc.config().vocab as i64;
        let mut changed = ids.clone();
        let mut n = 0;
        for (i, m) in mask.iter().enumerate() {
            if *m == 0 {
                changed[i] = (ids[i] + 7 + i as i64) % vocab;
                n += usize::from(changed[i] != ids[i]);
            }
        }
        assert!(n > 0, "case has no padding to change");
        let after = enc.context(g, &changed, &mask).unwrap();
        // padded keys are excluded exactly (weight 0), so the real rows are bit-identical
        assert_eq!(
            after, base,
            "changing padded token ids changed the real rows"
        );
        // while a real token does change them (the test can fail)
        let mut real_changed = ids.clone();
        real_changed[0] = (ids[0] + 1) % vocab;
        let moved = enc.context(g, &real_changed, &mask).unwrap();
        assert_ne!(moved, base, "changing a real token changed nothing");
    }
}

/// Writes tensors to a fresh temporary directory; returns the directory.
fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nabla_t5_{tag}_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// All tensors of a safetensors file as (name, dtype, shape, bytes).
fn all_tensors(path: &Path) -> Vec<OwnedTensor> {
    let f = TensorFile::open(path).unwrap();
    let mut v = Vec::new();
    for n in f.names().unwrap() {
        let r = f.raw(&n).unwrap();
        v.push((n.clone(), r.dtype, r.shape.clone(), r.data.to_vec()));
    }
    v
}

/// The HF `UMT5EncoderModel` name of an official key.
fn hf_name(k: &str) -> String {
    match k {
        "token_embedding.weight" => return "shared.weight".into(),
        "norm.weight" => return "encoder.final_layer_norm.weight".into(),
        _ => {}
    }
    let rest = k.strip_prefix("blocks.").unwrap();
    let (i, tail) = rest.split_once('.').unwrap();
    let t = match tail {
        "norm1.weight" => "layer.0.layer_norm.weight",
        "attn.q.weight" => "layer.0.SelfAttention.q.weight",
        "attn.k.weight" => "layer.0.SelfAttention.k.weight",
        "attn.v.weight" => "layer.0.SelfAttention.v.weight",
        "attn.o.weight" => "layer.0.SelfAttention.o.weight",
        "pos_embedding.embedding.weight" => "layer.0.SelfAttention.relative_attention_bias.weight",
        "norm2.weight" => "layer.1.layer_norm.weight",
        "ffn.gate.0.weight" => "layer.1.DenseReluDense.wi_0.weight",
        "ffn.fc1.weight" => "layer.1.DenseReluDense.wi_1.weight",
        "ffn.fc2.weight" => "layer.1.DenseReluDense.wo.weight",
        other => panic!("unknown key {other}"),
    };
    format!("encoder.block.{i}.{t}")
}

#[test]
fn hf_key_names_and_sharded_directories_load_the_same_model() {
    let g = gpu();
    let case = &t5_cases()[0];
    let enc = encoder_of(case);
    let weights = golden_dir().join(case["config"]["weights"].as_str().unwrap());
    let f = TensorFile::open(golden_dir().join(case["file"].as_str().unwrap())).unwrap();
    let (ids, mask) = inputs(&f);
    let want = enc.encode(g, &ids, &mask).unwrap();

    // HF names, split over two shards, with the tied embedding stored twice
    let dir = temp_dir("hf");
    let mut tensors: Vec<OwnedTensor> = all_tensors(&weights)
        .into_iter()
        .map(|(n, dt, s, b)| (hf_name(&n), dt, s, b))
        .collect();
    let emb = tensors
        .iter()
        .find(|t| t.0 == "shared.weight")
        .cloned()
        .unwrap();
    tensors.push(("encoder.embed_tokens.weight".into(), emb.1, emb.2, emb.3));
    let half = tensors.len() / 2;
    write_safetensors(
        dir.join("model-00001-of-00002.safetensors"),
        &tensors[..half],
        HashMap::new(),
    )
    .unwrap();
    write_safetensors(
        dir.join("model-00002-of-00002.safetensors"),
        &tensors[half..],
        HashMap::new(),
    )
    .unwrap();
    let hf = T5Encoder::open_with(&dir, enc.config().max_distance, enc.config().eps).unwrap();
    assert_eq!(hf.config(), enc.config());
    let got = hf.encode(g, &ids, &mask).unwrap();
    assert_eq!(got, want, "HF-named weights give another output");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn loader_reports_every_problem_at_once() {
    let case = &t5_cases()[0];
    let weights = golden_dir().join(case["config"]["weights"].as_str().unwrap());
    let dir = temp_dir("bad");
    let mut tensors = all_tensors(&weights);
    tensors.retain(|t| t.0 != "blocks.1.attn.k.weight");
    for t in tensors.iter_mut() {
        if t.0 == "blocks.0.ffn.fc2.weight" {
            // same bytes, transposed shape
            t.2 = vec![t.2[1], t.2[0]];
        }
    }
    tensors.push((
        "blocks.0.attn.extra".into(),
        Dtype::F32,
        vec![1],
        vec![0; 4],
    ));
    let path = dir.join("bad.safetensors");
    write_safetensors(&path, &tensors, HashMap::new()).unwrap();
    let msg = match T5Encoder::open(&path) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("broken weights were accepted"),
    };
    eprintln!("{msg}");
    for needle in [
        "blocks.1.attn.k.weight",
        "blocks.0.ffn.fc2.weight",
        "blocks.0.attn.extra",
        "missing",
        "wrong shapes",
        "unexpected",
    ] {
        assert!(
            msg.contains(needle),
            "error does not mention {needle}: {msg}"
        );
    }
    assert!(T5Encoder::open(dir.join("nope.safetensors")).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_inputs_are_errors() {
    let g = gpu();
    let enc = encoder_of(&t5_cases()[0]);
    let vocab = enc.config().vocab as i64;
    assert!(
        enc.encode(g, &[1i64, vocab], &[1i64, 1]).is_err(),
        "id = vocab"
    );
    assert!(
        enc.encode(g, &[1i64, -3], &[1i64, 1]).is_err(),
        "negative id"
    );
    assert!(enc.encode(g, &[1u32, 2], &[true]).is_err(), "mask length");
    assert!(enc.encode::<u32, bool>(g, &[], &[]).is_err(), "no ids");
    let e = enc.context(g, &[3u32, 4, 5], &[1u8, 0, 1]).unwrap_err();
    eprintln!("{e}");
    // u32 ids with a bool mask work, and context keeps the real prefix
    let ctx = enc.context(g, &[3u32, 4, 0], &[true, true, false]).unwrap();
    assert_eq!(ctx.len(), 2 * enc.config().dim);
}

// ---- configurations beyond the golden case, against a CPU composition of the reference ops ----

/// Rounds through the storage dtype, as the GPU sees the weights.
fn store(dtype: Dtype, v: &[f32]) -> (Vec<u8>, Vec<f32>) {
    match dtype {
        Dtype::BF16 => {
            let h: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_f32(x)).collect();
            (
                bytemuck::cast_slice(&h).to_vec(),
                h.iter().map(|x| x.to_f32()).collect(),
            )
        }
        Dtype::F16 => {
            let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
            (
                bytemuck::cast_slice(&h).to_vec(),
                h.iter().map(|x| x.to_f32()).collect(),
            )
        }
        _ => (bytemuck::cast_slice(v).to_vec(), v.to_vec()),
    }
}

/// The encoder on the CPU from the reference ops (f64 inside each op).
fn reference_encode(
    c: &T5Config,
    w: &HashMap<String, Vec<f32>>,
    ids: &[u32],
    mask: &[u32],
) -> Vec<f32> {
    let (l, d, da, f, h) = (ids.len(), c.dim, c.dim_attn, c.dim_ffn, c.num_heads);
    let hd = c.head_dim();
    let eps = c.eps as f64;
    let get = |k: &str| w.get(k).unwrap_or_else(|| panic!("no {k}")).as_slice();
    let emb = get("token_embedding.weight");
    let mut x: Vec<f32> = ids
        .iter()
        .flat_map(|&i| emb[i as usize * d..(i as usize + 1) * d].to_vec())
        .collect();
    let buckets: Vec<u32> = (0..2 * l - 1)
        .map(|r| {
            ref_attn::relative_position_bucket(
                r as i64 - (l as i64 - 1),
                c.num_buckets,
                c.max_distance,
            ) as u32
        })
        .collect();
    let lin = |x: &[f32], k: &str, n: usize, kk: usize, act: Activation| {
        linear::linear(x, get(k), None, l, n, kk, act)
    };
    for i in 0..c.num_layers {
        let b = |s: &str| format!("blocks.{i}.{s}");
        let a = norm::rms_norm(&x, d, get(&b("norm1.weight")), eps);
        let split = |t: Vec<f32>| elementwise::split_heads(&t, l, h, hd);
        let q = split(lin(&a, &b("attn.q.weight"), da, d, Activation::None));
        let k = split(lin(&a, &b("attn.k.weight"), da, d, Activation::None));
        let v = split(lin(&a, &b("attn.v.weight"), da, d, Activation::None));
        let table = if c.shared_pos {
            get("pos_embedding.embedding.weight")
        } else {
            get(&b("pos_embedding.embedding.weight"))
        };
        let o = ref_attn::attention_bias(&q, &k, &v, h, l, hd, table, &buckets, mask);
        let o = elementwise::merge_heads(&o, h, l, hd);
        let y = lin(&o, &b("attn.o.weight"), d, da, Activation::None);
        x = elementwise::add(&x, &y);
        let a = norm::rms_norm(&x, d, get(&b("norm2.weight")), eps);
        let gt = lin(&a, &b("ffn.gate.0.weight"), f, d, Activation::GeluTanh);
        let ft = lin(&a, &b("ffn.fc1.weight"), f, d, Activation::None);
        let p: Vec<f32> = gt.iter().zip(&ft).map(|(a, b)| a * b).collect();
        let y = lin(&p, &b("ffn.fc2.weight"), d, f, Activation::None);
        x = elementwise::add(&x, &y);
    }
    norm::rms_norm(&x, d, get("norm.weight"), eps)
}

#[test]
fn other_configurations_match_the_reference_composition() {
    let g = gpu();
    let mut rng = common::Rng::fresh(0x75);
    // (dim, dim_attn, ffn, heads, layers, buckets, max distance, shared, linear dtype, L, real)
    let configs = [
        (24, 36, 40, 3, 2, 16, 20, true, Dtype::BF16, 45, 40),
        (21, 20, 30, 4, 2, 32, 128, false, Dtype::F16, 70, 70),
        (16, 16, 24, 2, 1, 8, 12, false, Dtype::F32, 33, 5),
    ];
    for (ci, &(d, da, f, h, layers, nb, md, shared, ldt, l, real)) in configs.iter().enumerate() {
        let c = T5Config {
            vocab: 50,
            dim: d,
            dim_attn: da,
            dim_ffn: f,
            num_heads: h,
            num_layers: layers,
            num_buckets: nb,
            max_distance: md,
            eps: 1e-6,
            shared_pos: shared,
        };
        let mut tensors: Vec<OwnedTensor> = Vec::new();
        let mut host = HashMap::new();
        for (name, shape) in c.expected_tensors() {
            let n: usize = shape.iter().product();
            let is_norm = name.ends_with("norm.weight")
                || name.ends_with("norm1.weight")
                || name.ends_with("norm2.weight");
            let is_linear = name.contains("attn.") || name.contains("ffn.");
            let vals: Vec<f32> = if is_norm {
                (0..n).map(|_| 1.0 + 0.2 * rng.normal()).collect()
            } else if is_linear {
                rng.normals(n, 1.0 / (shape[1] as f32).sqrt())
            } else {
                rng.normals(n, 1.0)
            };
            let dt = if is_linear { ldt } else { Dtype::F32 };
            let (bytes, seen) = store(dt, &vals);
            host.insert(name.clone(), seen);
            tensors.push((name, dt, shape, bytes));
        }
        let dir = temp_dir(&format!("cfg{ci}"));
        let path = dir.join("t5.safetensors");
        write_safetensors(&path, &tensors, HashMap::new()).unwrap();
        let enc = T5Encoder::open_with(&path, md, 1e-6).unwrap();
        assert_eq!(enc.config(), &c, "config read from the shapes");
        let ids: Vec<u32> = (0..l)
            .map(|i| if i < real { rng.below(50) as u32 } else { 0 })
            .collect();
        let mask: Vec<u32> = (0..l).map(|i| u32::from(i < real)).collect();
        let got = enc.encode(g, &ids, &mask).unwrap();
        let want = reference_encode(&c, &host, &ids, &mask);
        check(
            &format!("config {ci} (dim {d}, attn {da}, {h} heads, shared {shared}, {ldt:?})"),
            &got,
            &want,
            (1e-4, 1e-3),
        );
        let ctx = enc.context(g, &ids, &mask).unwrap();
        assert_eq!(ctx[..], got[..real * d]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
