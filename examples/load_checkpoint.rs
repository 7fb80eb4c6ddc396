//! Load a Wan 2.1 DiT checkpoint (official or diffusers layout, single file or shards) and run
//! one forward on a random latent.
//!
//! ```sh
//! cargo run --release --example load_checkpoint -- /path/to/Wan2.1-T2V-1.3B 1.3b
//! ```

use nabla::wan::{Checkpoint, Dit, DitInput, WanConfig, WeightPrecision, WgpuBackend};
use nabla::{Gpu, SparseAlgo};

fn main() -> nabla::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = args.first().ok_or_else(|| {
        nabla::Error::Invalid(
            "usage: load_checkpoint <checkpoint dir or .safetensors> [1.3b|14b]".into(),
        )
    })?;
    let base = match args.get(1).map(String::as_str) {
        Some("14b") => WanConfig::t2v_14b(),
        _ => WanConfig::t2v_1_3b(),
    };
    let ck = Checkpoint::open(dir, &base)?;
    println!(
        "{:?} layout, {} file(s), config {:?}",
        ck.layout,
        ck.files().len(),
        ck.config
    );
    let gpu = Gpu::new()?;
    let mut be = WgpuBackend::new(&gpu);
    let mut dit = Dit::load(&mut be, &ck, WeightPrecision::BF16)?;
    let c = dit.config().clone();
    let (t, h, w) = (3, 32, 32); // a 256x256, 9-frame video
    let latent = nabla::synth::noise(1, c.in_dim * t * h * w, 1.0);
    let context = nabla::synth::noise(2, 8 * c.text_dim, 0.5);
    let input = DitInput {
        latent: &latent,
        shape: (t, h, w),
        t: 999.0,
        context: &context,
    };
    let algo: SparseAlgo = "nabla-0.7".parse()?;
    let v = dit.forward(&mut be, &input, Some(&algo), None)?;
    let rms = (v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
    println!("velocity [{}, {t}, {h}, {w}], rms {rms:.4}", c.out_dim);
    Ok(())
}
