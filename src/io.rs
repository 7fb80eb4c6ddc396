//! Reading tensors from safetensors files (golden data, user Q/K files) with clear errors.

use crate::error::{Error, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A safetensors file read into memory.
pub struct TensorFile {
    path: PathBuf,
    bytes: Vec<u8>,
}

/// One tensor's raw data.
pub struct RawTensor<'a> {
    /// Element type as stored.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub data: &'a [u8],
}

impl TensorFile {
    /// Reads and checks the header of a safetensors file.
    pub fn open(path: impl AsRef<Path>) -> Result<TensorFile> {
        let path = path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path).map_err(|e| Error::file(&path, e))?;
        SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::file(&path, format!("not a valid safetensors file: {e}")))?;
        Ok(TensorFile { path, bytes })
    }

    fn st(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.bytes).map_err(|e| Error::file(&self.path, e))
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names.
    pub fn names(&self) -> Result<Vec<String>> {
        Ok(self
            .st()?
            .names()
            .into_iter()
            .map(|s| s.to_string())
            .collect())
    }

    /// The `__metadata__` map (empty when absent).
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        let (_, meta) =
            SafeTensors::read_metadata(&self.bytes).map_err(|e| Error::file(&self.path, e))?;
        Ok(meta.metadata().clone().unwrap_or_default())
    }

    /// Raw access to one tensor.
    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let st = self.st()?;
        let t = st
            .tensor(name)
            .map_err(|_| Error::file(&self.path, format!("has no tensor named {name:?}")))?;
        let data = t.data();
        // re-borrow from self.bytes so the slice outlives the SafeTensors view
        let off = data.as_ptr() as usize - self.bytes.as_ptr() as usize;
        Ok(RawTensor {
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            data: &self.bytes[off..off + data.len()],
        })
    }

    /// A float tensor as f32 (F32, F16 and BF16 are converted) with its shape.
    pub fn f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let r = self.raw(name)?;
        let v = match crate::io::float_to_f32(r.dtype, r.data) {
            Some(v) => v,
            None => {
                let d = r.dtype;
                return Err(Error::file(
                    &self.path,
                    format!("tensor {name:?} has dtype {d:?}; expected F32, F16, BF16 or F64"),
                ));
            }
        };
        Ok((v, r.shape))
    }

    /// A U8 / BOOL tensor.
    pub fn u8(&self, name: &str) -> Result<(Vec<u8>, Vec<usize>)> {
        let r = self.raw(name)?;
        match r.dtype {
            Dtype::U8 | Dtype::BOOL => Ok((r.data.to_vec(), r.shape)),
            d => Err(Error::file(
                &self.path,
                format!("tensor {name:?} has dtype {d:?}; expected U8"),
            )),
        }
    }

    /// An integer tensor (I64, I32, U32) as i64.
    pub fn i64(&self, name: &str) -> Result<(Vec<i64>, Vec<usize>)> {
        let r = self.raw(name)?;
        let v = match r.dtype {
            Dtype::I64 => bytemuck::pod_collect_to_vec::<u8, i64>(r.data),
            Dtype::I32 => bytemuck::pod_collect_to_vec::<u8, i32>(r.data)
                .into_iter()
                .map(i64::from)
                .collect(),
            Dtype::U32 => bytemuck::pod_collect_to_vec::<u8, u32>(r.data)
                .into_iter()
                .map(i64::from)
                .collect(),
            d => {
                return Err(Error::file(
                    &self.path,
                    format!("tensor {name:?} has dtype {d:?}; expected an integer type"),
                ));
            }
        };
        Ok((v, r.shape))
    }
}

/// One tensor to write: name, dtype, shape, little-endian bytes.
pub type OwnedTensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// Writes tensors and string metadata to a safetensors file.
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: &[OwnedTensor],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, dt, s, d)| {
            safetensors::tensor::TensorView::new(*dt, s.clone(), d)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::file(path, e))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| Error::file(path, e))
}

/// Little-endian float bytes of a safetensors dtype as f32 (F32, F16, BF16, F64), or `None`
/// for any other dtype: the one widening every loader uses.
pub fn float_to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    fn le<const N: usize>(b: &[u8]) -> [u8; N] {
        b.try_into().unwrap_or([0; N])
    }
    Some(match dtype {
        Dtype::F32 => decode_par(bytes, 4, |b| f32::from_le_bytes(le(b))),
        Dtype::F16 => decode_par(bytes, 2, |b| half::f16::from_le_bytes(le(b)).to_f32()),
        Dtype::BF16 => decode_par(bytes, 2, |b| half::bf16::from_le_bytes(le(b)).to_f32()),
        Dtype::F64 => decode_par(bytes, 8, |b| f64::from_le_bytes(le(b)) as f32),
        _ => return None,
    })
}

/// Little-endian elements of `size` bytes decoded by `f`, on all CPU cores (a Wan 14B
/// checkpoint holds 14·10⁹ of them); a trailing partial element is ignored.
fn decode_par(bytes: &[u8], size: usize, f: impl Fn(&[u8]) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; bytes.len() / size];
    crate::par::for_chunks(&mut out, |first, part| {
        for (o, e) in part
            .iter_mut()
            .zip(bytes[first * size..].chunks_exact(size))
        {
            *o = f(e);
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parallel decode equals the element-by-element widening for every dtype, across
    /// chunk boundaries (3·2²⁰ + 3 elements), and ignores a trailing partial element.
    #[test]
    fn float_to_f32_matches_the_elementwise_widening() {
        let n = (3 << 20) + 3;
        let vals: Vec<f32> = (0..n)
            .map(|i| ((i as f32) * 0.618).sin() * 1000.0 / (1 + i % 97) as f32)
            .collect();
        let bytes = |dt: Dtype| -> (Vec<u8>, Vec<f32>) {
            let (b, want): (Vec<u8>, Vec<f32>) = match dt {
                Dtype::F32 => (bytemuck::cast_slice(&vals).to_vec(), vals.clone()),
                Dtype::F16 => {
                    let h: Vec<half::f16> = vals.iter().map(|&x| half::f16::from_f32(x)).collect();
                    let w = h.iter().map(|x| x.to_f32()).collect();
                    (bytemuck::cast_slice(&h).to_vec(), w)
                }
                Dtype::BF16 => {
                    let h: Vec<half::bf16> =
                        vals.iter().map(|&x| half::bf16::from_f32(x)).collect();
                    let w = h.iter().map(|x| x.to_f32()).collect();
                    (bytemuck::cast_slice(&h).to_vec(), w)
                }
                _ => {
                    let d: Vec<f64> = vals.iter().map(|&x| x as f64 * 1.000_000_1).collect();
                    let w = d.iter().map(|&x| x as f32).collect();
                    (bytemuck::cast_slice(&d).to_vec(), w)
                }
            };
            (b, want)
        };
        for dt in [Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::F64] {
            let (mut b, want) = bytes(dt);
            b.push(0x7f); // a partial element
            let got = float_to_f32(dt, &b).unwrap();
            assert_eq!(got.len(), n, "{dt:?}");
            let bad = got
                .iter()
                .zip(&want)
                .position(|(a, b)| a.to_bits() != b.to_bits());
            assert_eq!(bad, None, "{dt:?}");
        }
        assert!(float_to_f32(Dtype::I32, &[0; 8]).is_none());
    }
}
