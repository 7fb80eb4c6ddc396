//! The block grid of a video: frames × tile rows × tile columns, one 64-token block per tile.

use crate::error::{Error, Result};

/// The NABLA block grid `(T, Hb, Wb)`; block `b = t·Hb·Wb + y·Wb + x`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockGrid {
    /// Latent frames.
    pub t: usize,
    /// Tile rows (patch-grid rows / 8).
    pub hb: usize,
    /// Tile columns (patch-grid columns / 8).
    pub wb: usize,
}

impl BlockGrid {
    /// A grid of `t × hb × wb` blocks; every side must be positive.
    pub fn new(t: usize, hb: usize, wb: usize) -> Result<BlockGrid> {
        if t == 0 || hb == 0 || wb == 0 {
            return Err(Error::shape(format!(
                "block grid {t}x{hb}x{wb} has a zero side; every side must be at least 1"
            )));
        }
        Ok(BlockGrid { t, hb, wb })
    }

    /// The block grid of a patch-token grid `(F, H, W)`; H and W must be multiples of 8
    /// (the reference crops latent sizes to multiples of 16 to guarantee it).
    pub fn from_tokens(f: usize, h: usize, w: usize) -> Result<BlockGrid> {
        if !h.is_multiple_of(8) || !w.is_multiple_of(8) || h == 0 || w == 0 {
            return Err(Error::shape(format!(
                "token grid {f}x{h}x{w}: H and W must be positive multiples of 8 for 8x8 tiles \
                 (video height and width multiples of 128 pixels)"
            )));
        }
        BlockGrid::new(f, h / 8, w / 8)
    }

    /// Number of blocks `Nb`.
    pub fn blocks(&self) -> usize {
        self.t * self.hb * self.wb
    }

    /// Number of tokens `S = 64·Nb`.
    pub fn tokens(&self) -> usize {
        self.blocks() * super::BLOCK
    }

    /// `(t, y, x)` of block `b`.
    pub fn coords(&self, b: usize) -> (usize, usize, usize) {
        let hw = self.hb * self.wb;
        (b / hw, (b % hw) / self.wb, b % self.wb)
    }
}

impl std::str::FromStr for BlockGrid {
    type Err = crate::Error;
    /// Parses `T,Hb,Wb`.
    fn from_str(s: &str) -> Result<BlockGrid> {
        let v: Vec<usize> = s
            .split(',')
            .map(|x| x.trim().parse::<usize>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| Error::Invalid(format!("grid {s:?} is not three integers T,Hb,Wb")))?;
        match v.as_slice() {
            [t, h, w] => BlockGrid::new(*t, *h, *w),
            _ => Err(Error::Invalid(format!(
                "grid {s:?} must have three integers T,Hb,Wb (frames, tile rows, tile columns)"
            ))),
        }
    }
}
