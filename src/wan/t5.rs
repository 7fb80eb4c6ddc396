//! The umT5 text encoder of Wan 2.1 (spec §6): weights from safetensors, the forward pass on the
//! GPU with the crate's ops, and the context rows the DiT takes.
//!
//! ```text
//! x = token_embedding[ids]                                   (gathered on the CPU: a row copy)
//! per layer:  a = RMSNorm(x; norm1)
//!             x += o( attention_bias(q(a), k(a), v(a); pos_embedding, mask) )
//!             a = RMSNorm(x; norm2)
//!             x += fc2( fc1(a) ⊙ GELU_tanh(gate(a)) )
//! out = RMSNorm(x; norm)                    RMSNorm(x; w) = x·rsqrt(mean(x²) + eps)·w
//! ```
//!
//! The attention has no 1/√d scaling and a relative position bias from a per-layer table
//! (`shared_pos = false`, umT5) or one table for every layer (`shared_pos = true`, original T5);
//! padded keys are masked out. See [`crate::ops::attention_bias`].
//!
//! Precision: every activation is f32 and every op computes in f32. Linear weights stay on the
//! GPU in their checkpoint dtype (f32, bf16 or f16, widened to f32 inside the GEMM); norm
//! weights and position tables are converted to f32. The original runs the whole encoder in
//! bf16 (spec §6.4), so its output differs from this one by roughly 1e-2 relative; the golden
//! vectors are f32 and this path matches them.
//!
//! Memory: the token embedding (2.1 GB for umT5-XXL in bf16) stays memory-mapped on the CPU, and
//! the layers are uploaded and run one at a time, so the GPU holds one layer's weights (about
//! 390 MB for umT5-XXL in bf16) plus the activations, and nothing once [`T5Encoder::encode`]
//! returns. Each call streams the weights again (about 9.3 GB for umT5-XXL).
//!
//! Files: one `.safetensors` file or a directory of them (sharded), with the official Wan key
//! names (`token_embedding.weight`, `blocks.{i}.attn.q.weight`, … spec §3.4) or the HF
//! `UMT5EncoderModel` names (`shared.weight`, `encoder.block.{i}.layer.0.SelfAttention.q.weight`,
//! …), which are mapped to the official ones. The configuration is read from the tensor shapes.

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use crate::ops::attention_bias::{record_attention_bias, relative_position_buckets};
use crate::ops::elementwise::{record_gated_residual, record_merge_heads, record_split_heads};
use crate::ops::linear::{Activation, record_linear};
use crate::ops::norm::record_rms_norm;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// umT5 encoder hyper-parameters (spec §6.2). Everything but `max_distance` and `eps` is read
/// from the tensor shapes when a checkpoint is opened.
#[derive(Clone, Debug, PartialEq)]
pub struct T5Config {
    /// Rows of the token embedding (256 384 for umT5-XXL, the padded vocabulary).
    pub vocab: usize,
    /// Model width (4096).
    pub dim: usize,
    /// Width of q, k, v (`num_heads · head_dim`, 4096).
    pub dim_attn: usize,
    /// FFN hidden width (10 240).
    pub dim_ffn: usize,
    /// Attention heads (64; read from the position table `[num_buckets, num_heads]`).
    pub num_heads: usize,
    /// Encoder blocks (24).
    pub num_layers: usize,
    /// Relative position buckets (32; half for each direction).
    pub num_buckets: usize,
    /// Relative distance where the logarithmic buckets end (128; not visible in the weights).
    pub max_distance: usize,
    /// Epsilon of every RMSNorm (1e-6).
    pub eps: f32,
    /// One position table for all layers (`pos_embedding.embedding.weight`, original T5) instead
    /// of one per layer (`blocks.{i}.pos_embedding.embedding.weight`, umT5: `false`).
    pub shared_pos: bool,
}

impl Default for T5Config {
    fn default() -> Self {
        T5Config::umt5_xxl()
    }
}

impl T5Config {
    /// Maximum relative distance of every released (um)T5 model.
    pub const DEFAULT_MAX_DISTANCE: usize = 128;
    /// RMSNorm epsilon of every released (um)T5 model.
    pub const DEFAULT_EPS: f32 = 1e-6;

    /// The umT5-XXL encoder used by Wan 2.1 (`models_t5_umt5-xxl-enc-bf16.pth`).
    pub fn umt5_xxl() -> T5Config {
        T5Config {
            vocab: 256_384,
            dim: 4096,
            dim_attn: 4096,
            dim_ffn: 10_240,
            num_heads: 64,
            num_layers: 24,
            num_buckets: 32,
            max_distance: Self::DEFAULT_MAX_DISTANCE,
            eps: Self::DEFAULT_EPS,
            shared_pos: false,
        }
    }

    /// Channels per head, `dim_attn / num_heads`.
    pub fn head_dim(&self) -> usize {
        self.dim_attn / self.num_heads.max(1)
    }

    /// Fails with a message naming the first inconsistent value.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(format!("T5 config: {m}")));
        for (name, v) in [
            ("vocab", self.vocab),
            ("dim", self.dim),
            ("dim_attn", self.dim_attn),
            ("dim_ffn", self.dim_ffn),
            ("num_heads", self.num_heads),
            ("num_layers", self.num_layers),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if !self.dim_attn.is_multiple_of(self.num_heads) {
            return bad(format!(
                "dim_attn {} is not a multiple of num_heads {}",
                self.dim_attn, self.num_heads
            ));
        }
        if self.num_buckets < 4 || self.max_distance <= self.num_buckets / 4 {
            return bad(format!(
                "num_buckets {} and max_distance {} leave no logarithmic buckets (need \
                 num_buckets ≥ 4, max_distance > num_buckets / 4)",
                self.num_buckets, self.max_distance
            ));
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return bad(format!("eps must be finite and ≥ 0, got {}", self.eps));
        }
        Ok(())
    }

    /// Every tensor of an encoder of this configuration: official name and shape.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (d, da, f) = (self.dim, self.dim_attn, self.dim_ffn);
        let mut v = vec![("token_embedding.weight".to_string(), vec![self.vocab, d])];
        let pos = vec![self.num_buckets, self.num_heads];
        for i in 0..self.num_layers {
            let b = format!("blocks.{i}.");
            v.push((format!("{b}norm1.weight"), vec![d]));
            for p in ["q", "k", "v"] {
                v.push((format!("{b}attn.{p}.weight"), vec![da, d]));
            }
            v.push((format!("{b}attn.o.weight"), vec![d, da]));
            v.push((format!("{b}norm2.weight"), vec![d]));
            v.push((format!("{b}ffn.gate.0.weight"), vec![f, d]));
            v.push((format!("{b}ffn.fc1.weight"), vec![f, d]));
            v.push((format!("{b}ffn.fc2.weight"), vec![d, f]));
            if !self.shared_pos {
                v.push((format!("{b}pos_embedding.embedding.weight"), pos.clone()));
            }
        }
        if self.shared_pos {
            v.push(("pos_embedding.embedding.weight".to_string(), pos));
        }
        v.push(("norm.weight".to_string(), vec![d]));
        v
    }
}

/// The official name of an HF `UMT5EncoderModel` key (spec §3.4), `None` for other keys.
pub fn official_t5_name(hf: &str) -> Option<String> {
    match hf {
        "shared.weight" | "encoder.embed_tokens.weight" => {
            return Some("token_embedding.weight".into());
        }
        "encoder.final_layer_norm.weight" => return Some("norm.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("encoder.block.")?;
    let (i, rest) = rest.split_once('.')?;
    i.parse::<usize>().ok()?;
    let tail = match rest {
        "layer.0.layer_norm.weight" => "norm1.weight",
        "layer.0.SelfAttention.q.weight" => "attn.q.weight",
        "layer.0.SelfAttention.k.weight" => "attn.k.weight",
        "layer.0.SelfAttention.v.weight" => "attn.v.weight",
        "layer.0.SelfAttention.o.weight" => "attn.o.weight",
        "layer.0.SelfAttention.relative_attention_bias.weight" => "pos_embedding.embedding.weight",
        "layer.1.layer_norm.weight" => "norm2.weight",
        "layer.1.DenseReluDense.wi_0.weight" => "ffn.gate.0.weight",
        "layer.1.DenseReluDense.wi_1.weight" => "ffn.fc1.weight",
        "layer.1.DenseReluDense.wo.weight" => "ffn.fc2.weight",
        _ => return None,
    };
    Some(format!("blocks.{i}.{tail}"))
}

/// Whether `k` is an official umT5 encoder key (any layer index).
fn is_official(k: &str) -> bool {
    if matches!(
        k,
        "token_embedding.weight" | "norm.weight" | "pos_embedding.embedding.weight"
    ) {
        return true;
    }
    let Some((i, tail)) = k.strip_prefix("blocks.").and_then(|r| r.split_once('.')) else {
        return false;
    };
    i.parse::<usize>().is_ok()
        && matches!(
            tail,
            "norm1.weight"
                | "attn.q.weight"
                | "attn.k.weight"
                | "attn.v.weight"
                | "attn.o.weight"
                | "norm2.weight"
                | "ffn.gate.0.weight"
                | "ffn.fc1.weight"
                | "ffn.fc2.weight"
                | "pos_embedding.embedding.weight"
        )
}

/// Where a tensor lives: file, dtype, shape and byte range in the mapped file.
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Range<usize>,
}

/// One layer's weights on the GPU.
struct Layer {
    norm1: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    table: Option<Tensor>,
    norm2: Tensor,
    gate: Tensor,
    fc1: Tensor,
    fc2: Tensor,
}

/// A umT5 encoder: memory-mapped safetensors weights, verified against the configuration read
/// from their shapes, run on the GPU by [`T5Encoder::encode`].
pub struct T5Encoder {
    config: T5Config,
    files: Vec<(PathBuf, Mmap)>,
    index: HashMap<String, Entry>,
}

impl T5Encoder {
    /// Opens a umT5 encoder checkpoint (a `.safetensors` file or a directory of them, official
    /// or HF key names) with the released models' `max_distance` 128 and `eps` 1e-6. Every
    /// missing, misshaped, unexpected or non-float tensor is reported in one error.
    pub fn open(path: impl AsRef<Path>) -> Result<T5Encoder> {
        T5Encoder::open_with(path, T5Config::DEFAULT_MAX_DISTANCE, T5Config::DEFAULT_EPS)
    }

    /// [`T5Encoder::open`] with the two values the weights do not show.
    pub fn open_with(path: impl AsRef<Path>, max_distance: usize, eps: f32) -> Result<T5Encoder> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(Error::file(path, "does not exist"));
        }
        let paths = if path.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| Error::file(path, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            v.sort();
            if v.is_empty() {
                return Err(Error::file(
                    path,
                    "holds no .safetensors file (expected the umT5 encoder weights)",
                ));
            }
            v
        } else {
            vec![path.to_path_buf()]
        };
        let mut files = Vec::new();
        let mut index = HashMap::new();
        let mut unknown = Vec::new();
        let mut duplicates = Vec::new();
        for (fi, p) in paths.iter().enumerate() {
            let file = std::fs::File::open(p).map_err(|e| Error::file(p, e))?;
            // SAFETY: read-only mapping; a file changed underneath a running process is outside
            // what any mmap-based loader can defend against.
            let mm = unsafe { Mmap::map(&file) }.map_err(|e| Error::file(p, e))?;
            let st = SafeTensors::deserialize(&mm)
                .map_err(|e| Error::file(p, format!("not a valid safetensors file: {e}")))?;
            for (name, view) in st.tensors() {
                let official = if is_official(&name) {
                    Some(name.clone())
                } else {
                    official_t5_name(&name)
                };
                let Some(official) = official else {
                    unknown.push(name);
                    continue;
                };
                let data = view.data();
                let start = data.as_ptr() as usize - mm.as_ptr() as usize;
                let entry = Entry {
                    file: fi,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    bytes: start..start + data.len(),
                };
                // HF stores the tied embedding as `shared.weight` and possibly again as
                // `encoder.embed_tokens.weight`: keep the first, they are the same tensor
                if index.contains_key(&official) {
                    if official != "token_embedding.weight" {
                        duplicates.push(name);
                    }
                    continue;
                }
                index.insert(official, entry);
            }
            files.push((p.clone(), mm));
        }
        let mut enc = T5Encoder {
            config: T5Config::default(),
            files,
            index,
        };
        enc.config = enc.infer_config(max_distance, eps)?;
        enc.verify(&unknown, &duplicates)?;
        Ok(enc)
    }

    /// The configuration read from the weights.
    pub fn config(&self) -> &T5Config {
        &self.config
    }

    fn shape_of(&self, k: &str) -> Option<&[usize]> {
        self.index.get(k).map(|e| e.shape.as_slice())
    }

    fn infer_config(&self, max_distance: usize, eps: f32) -> Result<T5Config> {
        let shape2 = |k: &str| match self.shape_of(k) {
            Some(&[a, b]) => Ok((a, b)),
            Some(s) => Err(Error::Invalid(format!(
                "umT5 weights: {k} has shape {s:?}, expected 2 axes"
            ))),
            None => Err(Error::Invalid(format!(
                "umT5 weights have no tensor {k:?} (official name; found {} tensors): this does \
                 not look like a umT5 encoder",
                self.index.len()
            ))),
        };
        let (vocab, dim) = shape2("token_embedding.weight")?;
        let num_layers = (0..)
            .take_while(|i| self.index.contains_key(&format!("blocks.{i}.norm1.weight")))
            .count();
        let (dim_attn, _) = shape2("blocks.0.attn.q.weight")?;
        let (dim_ffn, _) = shape2("blocks.0.ffn.fc1.weight")?;
        let shared_pos = !self
            .index
            .contains_key("blocks.0.pos_embedding.embedding.weight")
            && self.index.contains_key("pos_embedding.embedding.weight");
        let pos_key = if shared_pos {
            "pos_embedding.embedding.weight"
        } else {
            "blocks.0.pos_embedding.embedding.weight"
        };
        let (num_buckets, num_heads) = shape2(pos_key)?;
        let c = T5Config {
            vocab,
            dim,
            dim_attn,
            dim_ffn,
            num_heads,
            num_layers,
            num_buckets,
            max_distance,
            eps,
            shared_pos,
        };
        c.validate()?;
        Ok(c)
    }

    fn verify(&self, unknown: &[String], duplicates: &[String]) -> Result<()> {
        let expected = self.config.expected_tensors();
        let want: BTreeMap<&str, &Vec<usize>> =
            expected.iter().map(|(k, s)| (k.as_str(), s)).collect();
        let (mut missing, mut misshaped, mut bad_dtype) = (Vec::new(), Vec::new(), Vec::new());
        for (k, s) in &expected {
            match self.index.get(k) {
                None => missing.push(k.clone()),
                Some(e) => {
                    if &e.shape != s {
                        misshaped.push(format!("{k}: {:?}, expected {s:?}", e.shape));
                    }
                    if !matches!(e.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                        bad_dtype.push(format!("{k}: {:?}", e.dtype));
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
        extra.extend(duplicates.iter().map(|d| format!("{d} (a second copy)")));
        extra.sort();
        let Some(report) =
            super::checkpoint::mismatch_report(&missing, &misshaped, &bad_dtype, &extra)
        else {
            return Ok(());
        };
        let c = &self.config;
        Err(Error::Invalid(format!(
            "umT5 weights do not match an encoder of dim {}, {} layers, {} heads, FFN {}, {} \
             buckets{}: {}",
            c.dim,
            c.num_layers,
            c.num_heads,
            c.dim_ffn,
            c.num_buckets,
            if c.shared_pos { " (shared)" } else { "" },
            report
        )))
    }

    fn entry(&self, k: &str) -> Result<(&Entry, &[u8])> {
        let e = self
            .index
            .get(k)
            .ok_or_else(|| Error::Invalid(format!("umT5 weights have no tensor {k:?}")))?;
        Ok((e, &self.files[e.file].1[e.bytes.clone()]))
    }

    /// A tensor widened to f32.
    fn f32(&self, k: &str) -> Result<Vec<f32>> {
        let (e, b) = self.entry(k)?;
        widen(k, e.dtype, b)
    }

    fn upload_f32(&self, gpu: &Gpu, k: &str) -> Result<Tensor> {
        let (e, _) = self.entry(k)?;
        let shape = e.shape.clone();
        gpu.upload_f32(&self.f32(k)?, &shape)
    }

    /// A linear weight in its stored dtype (16-bit weights with an odd `in_features` are widened,
    /// as the linear kernel reads two 16-bit values per word).
    fn upload_linear(&self, gpu: &Gpu, k: &str) -> Result<Tensor> {
        let (e, b) = self.entry(k)?;
        let even = e.shape.last().is_some_and(|k| k % 2 == 0);
        match e.dtype {
            Dtype::BF16 if even => gpu.upload_bytes(b, &e.shape, DType::BF16),
            Dtype::F16 if even => gpu.upload_bytes(b, &e.shape, DType::F16),
            Dtype::F32 => gpu.upload_bytes(b, &e.shape, DType::F32),
            _ => self.upload_f32(gpu, k),
        }
    }

    fn upload_layer(&self, gpu: &Gpu, i: usize) -> Result<Layer> {
        let k = |s: &str| format!("blocks.{i}.{s}");
        Ok(Layer {
            norm1: self.upload_f32(gpu, &k("norm1.weight"))?,
            q: self.upload_linear(gpu, &k("attn.q.weight"))?,
            k: self.upload_linear(gpu, &k("attn.k.weight"))?,
            v: self.upload_linear(gpu, &k("attn.v.weight"))?,
            o: self.upload_linear(gpu, &k("attn.o.weight"))?,
            table: if self.config.shared_pos {
                None
            } else {
                Some(self.upload_f32(gpu, &k("pos_embedding.embedding.weight"))?)
            },
            norm2: self.upload_f32(gpu, &k("norm2.weight"))?,
            gate: self.upload_linear(gpu, &k("ffn.gate.0.weight"))?,
            fc1: self.upload_linear(gpu, &k("ffn.fc1.weight"))?,
            fc2: self.upload_linear(gpu, &k("ffn.fc2.weight"))?,
        })
    }

    /// `token_embedding[ids]` as f32 `[L, dim]` (rows copied from the mapped file).
    fn embed(&self, ids: &[usize]) -> Result<Vec<f32>> {
        let name = "token_embedding.weight";
        let (e, b) = self.entry(name)?;
        let dim = self.config.dim;
        let row_bytes = dim * dtype_size(e.dtype);
        let mut x = Vec::with_capacity(ids.len() * dim);
        for &id in ids {
            x.extend(widen(
                name,
                e.dtype,
                &b[id * row_bytes..(id + 1) * row_bytes],
            )?);
        }
        Ok(x)
    }

    /// Runs the encoder on one sequence and returns its output `[L, dim]` f32 (row-major), every
    /// row including the padded ones (spec §6.2; the caller keeps the real rows, see
    /// [`T5Encoder::context`]).
    ///
    /// * `ids`: `L ≥ 1` token ids (u32, i64, …), each below `vocab`.
    /// * `mask`: `L` values, non-zero (`true`, 1) for real tokens and zero for padding; padded
    ///   keys get no attention weight. The tokenizer's convention is real tokens (with the EOS)
    ///   followed by padding, but any mask works here.
    ///
    /// Uploads and runs the layers one at a time (one submission each), then waits for the
    /// result. Fails on bad ids, mismatched lengths or GPU errors.
    pub fn encode<T, M>(&self, gpu: &Gpu, ids: &[T], mask: &[M]) -> Result<Vec<f32>>
    where
        T: Copy + TryInto<usize> + std::fmt::Display,
        M: Copy + PartialEq + Default,
    {
        let c = &self.config;
        let l = ids.len();
        if l == 0 {
            return Err(Error::shape("T5 encode: no token ids given"));
        }
        if mask.len() != l {
            return Err(Error::shape(format!(
                "T5 encode: mask has {} entries for {l} token ids (one per id: 1 = real token, \
                 0 = padding)",
                mask.len()
            )));
        }
        let idx = ids
            .iter()
            .enumerate()
            .map(|(p, &t)| match t.try_into() {
                Ok(i) if i < c.vocab => Ok(i),
                _ => Err(Error::Invalid(format!(
                    "T5 encode: token id {t} at position {p} is outside the vocabulary of {} \
                     entries",
                    c.vocab
                ))),
            })
            .collect::<Result<Vec<usize>>>()?;
        let mask_u32: Vec<u32> = mask.iter().map(|&m| u32::from(m != M::default())).collect();

        let (d, da, f, h) = (c.dim, c.dim_attn, c.dim_ffn, c.num_heads);
        let hd = c.head_dim();
        let x = gpu.upload_f32(&self.embed(&idx)?, &[l, d])?;
        let buckets = gpu.upload_u32(
            &relative_position_buckets(l, c.num_buckets, c.max_distance)?,
            &[2 * l - 1],
        )?;
        let maskt = gpu.upload_u32(&mask_u32, &[l])?;
        let shared_table = if c.shared_pos {
            Some(self.upload_f32(gpu, "pos_embedding.embedding.weight")?)
        } else {
            None
        };
        let a = gpu.empty(&[l, d], DType::F32)?;
        let y = gpu.empty(&[l, d], DType::F32)?;
        let [qf, kf, vf, of] = [(); 4].map(|_| gpu.empty(&[l, da], DType::F32));
        let (qf, kf, vf, of) = (qf?, kf?, vf?, of?);
        let [qh, kh, vh, oh] = [(); 4].map(|_| gpu.empty(&[h, l, hd], DType::F32));
        let (qh, kh, vh, oh) = (qh?, kh?, vh?, oh?);
        let gt = gpu.empty(&[l, f], DType::F32)?;
        let ft = gpu.empty(&[l, f], DType::F32)?;
        let prod = gpu.empty(&[l, f], DType::F32)?;
        let flat = |t: &Tensor| {
            t.reshape(&[1, l * f])
                .ok_or_else(|| Error::shape("T5 encode: FFN reshape"))
        };
        let (gt1, ft1, prod1) = (flat(&gt)?, flat(&ft)?, flat(&prod)?);

        for i in 0..c.num_layers {
            let w = self.upload_layer(gpu, i)?;
            let table = match (&w.table, &shared_table) {
                (Some(t), _) | (None, Some(t)) => t,
                (None, None) => {
                    return Err(Error::Invalid(format!("T5 layer {i}: no position table")));
                }
            };
            // prod accumulates fc1·gelu(gate) through `x += y·gate` below: it must start at 0
            gpu.fill_u32(&prod, 0);
            let mut b = gpu.batch();
            record_rms_norm(&mut b, &x, &w.norm1, &a, c.eps)?;
            record_linear(&mut b, &a, &w.q, None, Activation::None, &qf)?;
            record_linear(&mut b, &a, &w.k, None, Activation::None, &kf)?;
            record_linear(&mut b, &a, &w.v, None, Activation::None, &vf)?;
            record_split_heads(&mut b, &qf, &qh)?;
            record_split_heads(&mut b, &kf, &kh)?;
            record_split_heads(&mut b, &vf, &vh)?;
            record_attention_bias(&mut b, &qh, &kh, &vh, table, &buckets, &maskt, &oh)?;
            record_merge_heads(&mut b, &oh, &of)?;
            record_linear(&mut b, &of, &w.o, None, Activation::None, &y)?;
            record_gated_residual(&mut b, &x, &y, None)?;
            record_rms_norm(&mut b, &x, &w.norm2, &a, c.eps)?;
            record_linear(&mut b, &a, &w.gate, None, Activation::GeluTanh, &gt)?;
            record_linear(&mut b, &a, &w.fc1, None, Activation::None, &ft)?;
            // elementwise product as a residual with a one-row "gate" as wide as the whole tensor
            record_gated_residual(&mut b, &prod1, &ft1, Some((&gt1, 0)))?;
            record_linear(&mut b, &prod, &w.fc2, None, Activation::None, &y)?;
            record_gated_residual(&mut b, &x, &y, None)?;
            b.submit()?;
        }
        let norm = self.upload_f32(gpu, "norm.weight")?;
        let mut b = gpu.batch();
        record_rms_norm(&mut b, &x, &norm, &a, c.eps)?;
        b.submit()?;
        gpu.read_f32(&a)
    }

    /// The context the DiT takes (spec §6.5): [`T5Encoder::encode`]'s output cut to its first
    /// `L_txt = Σ mask` rows, `[L_txt, dim]` f32. The mask must be real tokens followed by
    /// padding (as the tokenizer produces); anything else is an error, since the original cuts
    /// by count and would keep padded rows.
    pub fn context<T, M>(&self, gpu: &Gpu, ids: &[T], mask: &[M]) -> Result<Vec<f32>>
    where
        T: Copy + TryInto<usize> + std::fmt::Display,
        M: Copy + PartialEq + Default,
    {
        let real = mask.iter().take_while(|&&m| m != M::default()).count();
        if mask[real..].iter().any(|&m| m != M::default()) {
            let late = real
                + mask[real..]
                    .iter()
                    .position(|&m| m != M::default())
                    .unwrap_or(0);
            return Err(Error::Invalid(format!(
                "T5 context: the mask must be real tokens followed by padding only, but padding \
                 starts at position {real} and position {late} is a real token again"
            )));
        }
        let mut out = self.encode(gpu, ids, mask)?;
        out.truncate(real * self.config.dim);
        Ok(out)
    }
}

fn dtype_size(d: Dtype) -> usize {
    match d {
        Dtype::F16 | Dtype::BF16 => 2,
        _ => 4,
    }
}

/// Little-endian F32 / F16 / BF16 bytes as f32.
fn widen(name: &str, dtype: Dtype, b: &[u8]) -> Result<Vec<f32>> {
    Ok(match crate::io::float_to_f32(dtype, b) {
        Some(v) => v,
        None => {
            let d = dtype;
            return Err(Error::Invalid(format!(
                "umT5 tensor {name:?} has dtype {d:?}; F32, F16, BF16 or F64 expected"
            )));
        }
    })
}
