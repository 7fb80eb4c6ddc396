//! The Wan DiT configuration, read from `config.json` and cross-checked against tensor shapes.

use crate::error::{Error, Result};

/// Wan 2.1 DiT hyper-parameters (spec §2.1).
#[derive(Clone, Debug, PartialEq)]
pub struct WanConfig {
    /// Model width.
    pub dim: usize,
    /// FFN hidden width.
    pub ffn_dim: usize,
    /// Sinusoid width of the time embedding.
    pub freq_dim: usize,
    /// Attention heads (head_dim = dim / num_heads).
    pub num_heads: usize,
    /// Transformer blocks.
    pub num_layers: usize,
    /// Context rows the text is padded to.
    pub text_len: usize,
    /// Text-encoder width.
    pub text_dim: usize,
    /// Latent channels in.
    pub in_dim: usize,
    /// Latent channels out.
    pub out_dim: usize,
    /// Epsilon of every norm.
    pub eps: f64,
    /// Patch size (t, h, w); (1, 2, 2) for every released model.
    pub patch: (usize, usize, usize),
}

impl WanConfig {
    /// The released 1.3B text-to-video model.
    pub fn t2v_1_3b() -> WanConfig {
        WanConfig {
            dim: 1536,
            ffn_dim: 8960,
            freq_dim: 256,
            num_heads: 12,
            num_layers: 30,
            text_len: 512,
            text_dim: 4096,
            in_dim: 16,
            out_dim: 16,
            eps: 1e-6,
            patch: (1, 2, 2),
        }
    }

    /// The released 14B text-to-video model.
    pub fn t2v_14b() -> WanConfig {
        WanConfig {
            dim: 5120,
            ffn_dim: 13824,
            num_heads: 40,
            num_layers: 40,
            ..WanConfig::t2v_1_3b()
        }
    }

    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.dim / self.num_heads
    }

    /// Checks internal consistency (head_dim supported by the attention kernel, etc.).
    pub fn validate(&self) -> Result<()> {
        if self.num_heads == 0 || !self.dim.is_multiple_of(self.num_heads) {
            return Err(Error::Invalid(format!(
                "model config: dim {} is not divisible by num_heads {}",
                self.dim, self.num_heads
            )));
        }
        let hd = self.head_dim();
        if hd != 64 && hd != 128 {
            return Err(Error::Invalid(format!(
                "model config: head_dim {hd} (= dim {} / heads {}) is not supported; 64 or 128 are",
                self.dim, self.num_heads
            )));
        }
        if self.patch != (1, 2, 2) {
            return Err(Error::Invalid(format!(
                "model config: patch size {:?} is not supported; Wan 2.1 uses (1, 2, 2)",
                self.patch
            )));
        }
        if !self.freq_dim.is_multiple_of(2) || self.freq_dim == 0 {
            return Err(Error::Invalid(format!(
                "model config: freq_dim {} must be even",
                self.freq_dim
            )));
        }
        Ok(())
    }

    /// Reads the fields present in a `config.json` (official or diffusers names) over `base`.
    pub fn merge_json(mut self, v: &serde_json::Value) -> Result<WanConfig> {
        let get = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| v.get(*k))
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
        };
        if let Some(x) = get(&["dim"]) {
            self.dim = x;
        }
        if let Some(x) = get(&["ffn_dim"]) {
            self.ffn_dim = x;
        }
        if let Some(x) = get(&["freq_dim"]) {
            self.freq_dim = x;
        }
        if let Some(x) = get(&["num_heads", "num_attention_heads"]) {
            self.num_heads = x;
        }
        if let (Some(h), Some(d)) = (get(&["num_attention_heads"]), get(&["attention_head_dim"])) {
            self.dim = h * d;
        }
        if let Some(x) = get(&["num_layers"]) {
            self.num_layers = x;
        }
        if let Some(x) = get(&["text_len"]) {
            self.text_len = x;
        }
        if let Some(x) = get(&["text_dim"]) {
            self.text_dim = x;
        }
        if let Some(x) = get(&["in_dim", "in_channels"]) {
            self.in_dim = x;
        }
        if let Some(x) = get(&["out_dim", "out_channels"]) {
            self.out_dim = x;
        }
        if let Some(x) = v.get("eps").and_then(|x| x.as_f64()) {
            self.eps = x;
        }
        if let Some(p) = v.get("patch_size").and_then(|x| x.as_array()) {
            let p: Vec<usize> = p
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as usize)
                .collect();
            if let [a, b, c] = p.as_slice() {
                self.patch = (*a, *b, *c);
            }
        }
        if let Some(t) = v.get("model_type").and_then(|x| x.as_str())
            && t != "t2v"
        {
            return Err(Error::Invalid(format!(
                "model_type {t:?} is not supported; only text-to-video (t2v) checkpoints are"
            )));
        }
        Ok(self)
    }
}
