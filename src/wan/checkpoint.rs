//! Wan DiT checkpoints: the official layout (`diffusion_pytorch_model*.safetensors`, single or
//! sharded with an index, plus `config.json`) and the diffusers layout (`transformer/`, diffusers
//! key names), memory-mapped, with the configuration inferred from tensor shapes and
//! cross-checked against `config.json`. Every problem with the tensors is reported in one error.

use super::WanConfig;
use crate::error::{Error, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Key naming of a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `Wan-AI/Wan2.1-T2V-*` and the NABLA fine-tunes.
    Official,
    /// diffusers `WanTransformer3DModel`.
    Diffusers,
}

/// A memory-mapped DiT checkpoint, addressed by official key names.
pub struct Checkpoint {
    files: Vec<(PathBuf, Mmap)>,
    index: HashMap<String, (usize, String)>,
    /// The key naming found in the files.
    pub layout: Layout,
    /// The configuration, inferred from shapes and `config.json`.
    pub config: WanConfig,
}

/// The official name of a diffusers DiT key (spec §3.3), or `None` when it is not a DiT key.
pub fn official_name(k: &str) -> Option<String> {
    const TOP: &[(&str, &str)] = &[
        (
            "condition_embedder.text_embedder.linear_1.",
            "text_embedding.0.",
        ),
        (
            "condition_embedder.text_embedder.linear_2.",
            "text_embedding.2.",
        ),
        (
            "condition_embedder.time_embedder.linear_1.",
            "time_embedding.0.",
        ),
        (
            "condition_embedder.time_embedder.linear_2.",
            "time_embedding.2.",
        ),
        ("condition_embedder.time_proj.", "time_projection.1."),
        ("proj_out.", "head.head."),
        ("patch_embedding.", "patch_embedding."),
    ];
    if k == "scale_shift_table" {
        return Some("head.modulation".into());
    }
    for (d, o) in TOP {
        if let Some(rest) = k.strip_prefix(d) {
            return Some(format!("{o}{rest}"));
        }
    }
    let rest = k.strip_prefix("blocks.")?;
    let (i, tail) = rest.split_once('.')?;
    i.parse::<usize>().ok()?;
    const BLOCK: &[(&str, &str)] = &[
        ("scale_shift_table", "modulation"),
        ("attn1.to_q.", "self_attn.q."),
        ("attn1.to_k.", "self_attn.k."),
        ("attn1.to_v.", "self_attn.v."),
        ("attn1.to_out.0.", "self_attn.o."),
        ("attn1.norm_q.", "self_attn.norm_q."),
        ("attn1.norm_k.", "self_attn.norm_k."),
        ("attn2.to_q.", "cross_attn.q."),
        ("attn2.to_k.", "cross_attn.k."),
        ("attn2.to_v.", "cross_attn.v."),
        ("attn2.to_out.0.", "cross_attn.o."),
        ("attn2.norm_q.", "cross_attn.norm_q."),
        ("attn2.norm_k.", "cross_attn.norm_k."),
        ("norm2.", "norm3."),
        ("ffn.net.0.proj.", "ffn.0."),
        ("ffn.net.2.", "ffn.2."),
    ];
    for (d, o) in BLOCK {
        if tail == *d || (d.ends_with('.') && tail.starts_with(d)) {
            return Some(format!(
                "blocks.{i}.{o}{}",
                &tail[d.len().min(tail.len())..]
            ));
        }
    }
    None
}

/// Every tensor a DiT of `c` must have, with its shape (official names).
pub fn expected_tensors(c: &WanConfig) -> Vec<(String, Vec<usize>)> {
    let (d, f, pt) = (c.dim, c.ffn_dim, c.patch.0 * c.patch.1 * c.patch.2);
    let mut v: Vec<(String, Vec<usize>)> = vec![
        (
            "patch_embedding.weight".into(),
            vec![d, c.in_dim, c.patch.0, c.patch.1, c.patch.2],
        ),
        ("patch_embedding.bias".into(), vec![d]),
        ("text_embedding.0.weight".into(), vec![d, c.text_dim]),
        ("text_embedding.0.bias".into(), vec![d]),
        ("text_embedding.2.weight".into(), vec![d, d]),
        ("text_embedding.2.bias".into(), vec![d]),
        ("time_embedding.0.weight".into(), vec![d, c.freq_dim]),
        ("time_embedding.0.bias".into(), vec![d]),
        ("time_embedding.2.weight".into(), vec![d, d]),
        ("time_embedding.2.bias".into(), vec![d]),
        ("time_projection.1.weight".into(), vec![6 * d, d]),
        ("time_projection.1.bias".into(), vec![6 * d]),
        ("head.modulation".into(), vec![1, 2, d]),
        ("head.head.weight".into(), vec![c.out_dim * pt, d]),
        ("head.head.bias".into(), vec![c.out_dim * pt]),
    ];
    for i in 0..c.num_layers {
        let b = |s: &str| format!("blocks.{i}.{s}");
        v.push((b("modulation"), vec![1, 6, d]));
        for a in ["self_attn", "cross_attn"] {
            for p in ["q", "k", "v", "o"] {
                v.push((b(&format!("{a}.{p}.weight")), vec![d, d]));
                v.push((b(&format!("{a}.{p}.bias")), vec![d]));
            }
            v.push((b(&format!("{a}.norm_q.weight")), vec![d]));
            v.push((b(&format!("{a}.norm_k.weight")), vec![d]));
        }
        v.push((b("norm3.weight"), vec![d]));
        v.push((b("norm3.bias"), vec![d]));
        v.push((b("ffn.0.weight"), vec![f, d]));
        v.push((b("ffn.0.bias"), vec![f]));
        v.push((b("ffn.2.weight"), vec![d, f]));
        v.push((b("ffn.2.bias"), vec![d]));
    }
    v
}

fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("diffusion_pytorch_model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::file(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(&index, format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::file(&index, "has no \"weight_map\" object"))?;
        let mut names: Vec<String> = map
            .values()
            .filter_map(|x| x.as_str().map(String::from))
            .collect();
        names.sort();
        names.dedup();
        if names.is_empty() {
            return Err(Error::file(&index, "weight_map lists no shard"));
        }
        return names
            .into_iter()
            .map(|n| {
                let p = dir.join(&n);
                if p.exists() {
                    Ok(p)
                } else {
                    Err(Error::file(
                        &index,
                        format!("names shard {n} which is missing"),
                    ))
                }
            })
            .collect();
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::file(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("diffusion_pytorch_model") && n.ends_with(".safetensors")
            })
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::file(
            dir,
            "holds no diffusion_pytorch_model*.safetensors (expected a Wan 2.1 checkpoint directory, its \
             transformer/ folder in the diffusers layout, or a .safetensors file)",
        ));
    }
    Ok(files)
}

impl Checkpoint {
    /// Opens a checkpoint: a `.safetensors` file, an official checkpoint directory, or a
    /// diffusers pipeline directory (its `transformer/` is used). `base` supplies what shapes
    /// cannot tell (text_len, eps, and the head count when its width matches) when no
    /// `config.json` says it.
    pub fn open(path: impl AsRef<Path>, base: &WanConfig) -> Result<Checkpoint> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(Error::file(path, "does not exist"));
        }
        let (dir, files) = if path.is_dir() {
            let dir = if path.join("transformer").is_dir() {
                path.join("transformer")
            } else {
                path.to_path_buf()
            };
            let f = shard_files(&dir)?;
            (Some(dir), f)
        } else {
            (
                path.parent().map(Path::to_path_buf),
                vec![path.to_path_buf()],
            )
        };
        let mut mapped = Vec::new();
        let mut index = HashMap::new();
        let mut diffusers = 0usize;
        let mut unknown = Vec::new();
        for (fi, p) in files.iter().enumerate() {
            let file = std::fs::File::open(p).map_err(|e| Error::file(p, e))?;
            // SAFETY: the file is opened read-only; a checkpoint changed underneath a running
            // process is outside what we can defend against (same as every mmap-based loader).
            let mm = unsafe { Mmap::map(&file) }.map_err(|e| Error::file(p, e))?;
            let st = SafeTensors::deserialize(&mm)
                .map_err(|e| Error::file(p, format!("not a valid safetensors file: {e}")))?;
            for name in st.names() {
                let official = if expected_prefix(name) {
                    Some(name.to_string())
                } else {
                    official_name(name).inspect(|_| diffusers += 1)
                };
                match official {
                    Some(o) => {
                        index.insert(o, (fi, name.to_string()));
                    }
                    None => unknown.push(name.to_string()),
                }
            }
            mapped.push((p.clone(), mm));
        }
        let layout = if diffusers > 0 {
            Layout::Diffusers
        } else {
            Layout::Official
        };
        let mut ck = Checkpoint {
            files: mapped,
            index,
            layout,
            config: base.clone(),
        };
        ck.config = ck.infer_config(base, dir.as_deref())?;
        ck.verify(&unknown)?;
        Ok(ck)
    }

    fn shape_of(&self, key: &str) -> Option<Vec<usize>> {
        self.raw(key).ok().map(|(_, s, _)| s)
    }

    fn infer_config(&self, base: &WanConfig, dir: Option<&Path>) -> Result<WanConfig> {
        let mut c = base.clone();
        let from_json = match dir.map(|d| d.join("config.json")).filter(|p| p.exists()) {
            Some(p) => {
                let text = std::fs::read_to_string(&p).map_err(|e| Error::file(&p, e))?;
                let v: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| Error::file(&p, format!("not valid JSON: {e}")))?;
                c = c.merge_json(&v)?;
                Some(c.clone())
            }
            None => None,
        };
        let need = |k: &str| {
            self.shape_of(k).ok_or_else(|| {
                Error::Invalid(format!(
                    "checkpoint has no tensor {k:?} (official name); this does not look like a Wan 2.1 DiT"
                ))
            })
        };
        let pe = need("patch_embedding.weight")?;
        if pe.len() != 5 {
            return Err(Error::Invalid(format!(
                "patch_embedding.weight has shape {pe:?}, expected [dim, in, t, h, w]"
            )));
        }
        c.dim = pe[0];
        c.in_dim = pe[1];
        c.patch = (pe[2], pe[3], pe[4]);
        c.text_dim = need("text_embedding.0.weight")?
            .get(1)
            .copied()
            .unwrap_or(0);
        c.freq_dim = need("time_embedding.0.weight")?
            .get(1)
            .copied()
            .unwrap_or(0);
        c.ffn_dim = need("blocks.0.ffn.0.weight")?.first().copied().unwrap_or(0);
        let pt = c.patch.0 * c.patch.1 * c.patch.2;
        c.out_dim = need("head.head.weight")?.first().copied().unwrap_or(0) / pt.max(1);
        c.num_layers = (0..)
            .take_while(|i| self.index.contains_key(&format!("blocks.{i}.modulation")))
            .count();
        if from_json.is_none() && base.dim != c.dim {
            // heads are not visible in shapes: without config.json or a base of the same width,
            // take head_dim 128 as every released Wan 2.1 model has
            c.num_heads = (c.dim / 128).max(1);
        }
        if let Some(j) = from_json {
            let mut diffs = Vec::new();
            for (name, a, b) in [
                ("dim", j.dim, c.dim),
                ("ffn_dim", j.ffn_dim, c.ffn_dim),
                ("num_layers", j.num_layers, c.num_layers),
                ("in_dim", j.in_dim, c.in_dim),
                ("out_dim", j.out_dim, c.out_dim),
                ("text_dim", j.text_dim, c.text_dim),
                ("freq_dim", j.freq_dim, c.freq_dim),
            ] {
                if a != b {
                    diffs.push(format!("{name}: config.json says {a}, the tensors say {b}"));
                }
            }
            if !diffs.is_empty() {
                return Err(Error::Invalid(format!(
                    "config.json contradicts the weights: {}",
                    diffs.join("; ")
                )));
            }
        }
        c.validate()?;
        Ok(c)
    }

    fn verify(&self, unknown: &[String]) -> Result<()> {
        let expected = expected_tensors(&self.config);
        let mut missing = Vec::new();
        let mut misshaped = Vec::new();
        let mut bad_dtype = Vec::new();
        let want: BTreeMap<&str, &Vec<usize>> =
            expected.iter().map(|(k, s)| (k.as_str(), s)).collect();
        for (k, s) in &expected {
            match self.raw(k) {
                Err(_) => missing.push(k.clone()),
                Ok((dt, shape, _)) => {
                    if &shape != s {
                        misshaped.push(format!("{k}: {shape:?}, expected {s:?}"));
                    }
                    if !matches!(dt, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                        bad_dtype.push(format!("{k}: {dt:?}"));
                    }
                }
            }
        }
        let mut extra: Vec<String> = self
            .index
            .keys()
            .filter(|k| !want.contains_key(k.as_str()))
            .cloned()
            .collect();
        extra.extend(unknown.iter().cloned());
        extra.sort();
        let Some(report) = mismatch_report(&missing, &misshaped, &bad_dtype, &extra) else {
            return Ok(());
        };
        Err(Error::Invalid(format!(
            "checkpoint does not match a Wan 2.1 DiT of dim {}, {} layers: {report}",
            self.config.dim, self.config.num_layers
        )))
    }

    /// Raw data of a tensor by official name: dtype, shape, little-endian bytes.
    pub fn raw(&self, key: &str) -> Result<(Dtype, Vec<usize>, &[u8])> {
        let (fi, stored) = self
            .index
            .get(key)
            .ok_or_else(|| Error::Invalid(format!("checkpoint has no tensor {key:?}")))?;
        let (path, mm) = &self.files[*fi];
        let st = SafeTensors::deserialize(mm).map_err(|e| Error::file(path, e))?;
        let t = st.tensor(stored).map_err(|e| Error::file(path, e))?;
        let data = t.data();
        let off = data.as_ptr() as usize - mm.as_ptr() as usize;
        Ok((t.dtype(), t.shape().to_vec(), &mm[off..off + data.len()]))
    }

    /// A tensor converted to f32.
    pub fn f32(&self, key: &str) -> Result<Vec<f32>> {
        let (dt, _, b) = self.raw(key)?;
        Ok(match crate::io::float_to_f32(dt, b) {
            Some(v) => v,
            None => {
                let d = dt;
                return Err(Error::Invalid(format!(
                    "tensor {key:?} has dtype {d:?}; F32, F16, BF16 or F64 expected"
                )));
            }
        })
    }

    /// Files the checkpoint was read from.
    pub fn files(&self) -> Vec<&Path> {
        self.files.iter().map(|(p, _)| p.as_path()).collect()
    }
}

fn expected_prefix(k: &str) -> bool {
    [
        "patch_embedding.",
        "text_embedding.",
        "time_embedding.",
        "time_projection.",
        "head.",
    ]
    .iter()
    .any(|p| k.starts_with(p))
        || k.strip_prefix("blocks.")
            .and_then(|r| r.split_once('.'))
            .is_some_and(|(_, t)| {
                [
                    "modulation",
                    "self_attn.",
                    "cross_attn.",
                    "norm3.",
                    "ffn.0.",
                    "ffn.2.",
                ]
                .iter()
                .any(|p| t.starts_with(p))
            })
}

/// The one-line description of what is wrong with a state dict (missing, misshaped, wrongly
/// typed and unexpected tensors, each list cut at 12 names), or `None` when nothing is.
pub(crate) fn mismatch_report(
    missing: &[String],
    misshaped: &[String],
    bad_dtype: &[String],
    extra: &[String],
) -> Option<String> {
    let list = |v: &[String]| {
        let mut s = v.iter().take(12).cloned().collect::<Vec<_>>().join(", ");
        if v.len() > 12 {
            s += &format!(", … ({} in all)", v.len());
        }
        s
    };
    let mut parts = Vec::new();
    for (what, v) in [
        ("missing tensors", missing),
        ("wrong shapes", misshaped),
        ("unsupported dtypes (F32, F16, BF16 are)", bad_dtype),
        ("unexpected tensors", extra),
    ] {
        if !v.is_empty() {
            parts.push(format!("{what}: {}", list(v)));
        }
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}
