//! `SparseAlgo`: the reference's `--sparse_algo` strings, parsed strictly.

use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// A Sliding Tile Attention window on the block grid: frames, tile rows, tile columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StaWindow {
    /// Window in latent frames.
    pub t: u32,
    /// Window in 8-token tile rows.
    pub h: u32,
    /// Window in 8-token tile columns.
    pub w: u32,
}

impl StaWindow {
    /// Radii `(w div 2)` per axis: an even window behaves like the next odd one.
    pub fn radii(&self) -> [u32; 3] {
        [self.t / 2, self.h / 2, self.w / 2]
    }
}

/// The sparse self-attention algorithm, as the reference's `--sparse_algo` names it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SparseAlgo {
    /// `nabla-<thr>`: CDF-thresholded block mask keeping at least `thr` of the estimated mass.
    Nabla {
        /// Threshold in [0, 1].
        thr: f64,
    },
    /// `sta-<wT>-<wH>-<wW>`: a fixed sliding-tile window.
    Sta(StaWindow),
    /// `nabla-<thr>_sta-<wT>-<wH>-<wW>`: the union of both.
    NablaSta {
        /// Threshold in [0, 1].
        thr: f64,
        /// The STA window.
        window: StaWindow,
    },
}

fn err(input: &str, reason: impl Into<String>) -> Error {
    Error::SparseAlgo {
        input: input.to_string(),
        reason: reason.into(),
    }
}

fn parse_thr(input: &str, part: &str) -> Result<f64> {
    let t = part
        .strip_prefix("nabla-")
        .ok_or_else(|| err(input, format!("{part:?} does not start with `nabla-`")))?;
    if t.is_empty() || !t.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(err(
            input,
            format!("threshold {t:?} is not a decimal number"),
        ));
    }
    let thr: f64 = t
        .parse()
        .map_err(|_| err(input, format!("threshold {t:?} is not a number")))?;
    if !(0.0..=1.0).contains(&thr) {
        return Err(err(input, format!("threshold {thr} is outside [0, 1]")));
    }
    Ok(thr)
}

fn parse_sta(input: &str, part: &str) -> Result<StaWindow> {
    let rest = part
        .strip_prefix("sta-")
        .ok_or_else(|| err(input, format!("{part:?} does not start with `sta-`")))?;
    let fields: Vec<&str> = rest.split('-').collect();
    if fields.len() != 3 {
        return Err(err(
            input,
            format!("STA needs three windows wT-wH-wW, found {}", fields.len()),
        ));
    }
    let mut w = [0u32; 3];
    for (slot, f) in w.iter_mut().zip(&fields) {
        if f.is_empty() || !f.chars().all(|c| c.is_ascii_digit()) {
            return Err(err(
                input,
                format!("window {f:?} is not a positive integer"),
            ));
        }
        let n: u32 = f
            .parse()
            .map_err(|_| err(input, format!("window {f:?} is too large")))?;
        if n == 0 {
            return Err(err(input, "windows must be positive (found 0)"));
        }
        *slot = n;
    }
    Ok(StaWindow {
        t: w[0],
        h: w[1],
        w: w[2],
    })
}

impl SparseAlgo {
    /// Parses a `--sparse-algo` value where `none` (or an empty string) means dense attention.
    pub fn parse_optional(s: &str) -> Result<Option<SparseAlgo>> {
        match s.trim() {
            "" | "none" => Ok(None),
            t => t.parse().map(Some),
        }
    }

    /// The NABLA threshold, if any.
    pub fn threshold(&self) -> Option<f64> {
        match *self {
            SparseAlgo::Nabla { thr } | SparseAlgo::NablaSta { thr, .. } => Some(thr),
            SparseAlgo::Sta(_) => None,
        }
    }

    /// The STA window, if any.
    pub fn sta(&self) -> Option<StaWindow> {
        match *self {
            SparseAlgo::Sta(w) | SparseAlgo::NablaSta { window: w, .. } => Some(w),
            SparseAlgo::Nabla { .. } => None,
        }
    }

    /// The cut of the CDF rule as the reference compares it: `f32(1 - thr)`.
    pub fn cut(&self) -> Option<f32> {
        self.threshold().map(|t| (1.0 - t) as f32)
    }

    /// Whether a sampling step is sparse: STA-only algorithms run dense for the first 12 steps,
    /// every other algorithm is sparse from step 0 (reference `text2video.py`).
    pub fn sparse_at_step(&self, step: usize) -> bool {
        match self {
            SparseAlgo::Sta(_) => step >= 12,
            _ => true,
        }
    }
}

impl FromStr for SparseAlgo {
    type Err = Error;

    fn from_str(s: &str) -> Result<SparseAlgo> {
        let parts: Vec<&str> = s.split('_').collect();
        match parts.as_slice() {
            [one] if one.starts_with("nabla-") => Ok(SparseAlgo::Nabla {
                thr: parse_thr(s, one)?,
            }),
            [one] if one.starts_with("sta-") => Ok(SparseAlgo::Sta(parse_sta(s, one)?)),
            [a, b] => Ok(SparseAlgo::NablaSta {
                thr: parse_thr(s, a)?,
                window: parse_sta(s, b)?,
            }),
            [_] => Err(err(s, "unknown algorithm")),
            _ => Err(err(s, "more than one `_`")),
        }
    }
}

impl fmt::Display for SparseAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SparseAlgo::Nabla { thr } => write!(f, "nabla-{thr}"),
            SparseAlgo::Sta(w) => write!(f, "sta-{}-{}-{}", w.t, w.h, w.w),
            SparseAlgo::NablaSta { thr, window: w } => {
                write!(f, "nabla-{thr}_sta-{}-{}-{}", w.t, w.h, w.w)
            }
        }
    }
}
