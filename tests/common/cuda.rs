//! Helpers of the CUDA test binaries (feature `cuda`): one device per binary or none, the
//! skip macro, host rounding and uploads.

use nabla::DType;
use nabla::cuda::{Cuda, CudaTensor};
use std::sync::OnceLock;

/// The device of this test binary, or `None` without a driver or a GPU.
pub fn cuda() -> Option<&'static Cuda> {
    static CUDA: OnceLock<Option<Cuda>> = OnceLock::new();
    CUDA.get_or_init(|| {
        if !nabla::cuda::driver_present() {
            return None;
        }
        match Cuda::new() {
            Ok(c) => {
                eprintln!("CUDA device: {c:?}");
                Some(c)
            }
            Err(e) => {
                eprintln!("CUDA device did not open: {e}");
                None
            }
        }
    })
    .as_ref()
}

/// The device, or return from the test with a note.
#[macro_export]
macro_rules! device {
    () => {
        match common::cuda::cuda() {
            Some(c) => c,
            None => {
                eprintln!("no CUDA device: skipped");
                return;
            }
        }
    };
}

/// The values the device sees after storing `v` as `dtype`.
pub fn round_to(v: &[f32], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F16 => v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect(),
        DType::BF16 => v
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect(),
        _ => v.to_vec(),
    }
}

/// `v` uploaded as `dtype` (rounded on the host).
pub fn upload(c: &Cuda, v: &[f32], shape: &[usize], dtype: DType) -> CudaTensor {
    c.upload_as(v, shape, dtype).unwrap()
}
