//! NABLA on your own Q/K/V: estimate the block mask on the GPU, look at it, run block-sparse
//! attention, and compare with dense attention.
//!
//! ```sh
//! cargo run --release --example nabla_attention                 # synthetic Q/K/V
//! cargo run --release --example nabla_attention -- qkv.safetensors nabla-0.6_sta-11-3-3 21,5,10
//! ```
//! A file must hold `q`, `k`, `v` as `[B, H, S, D]` (f32/f16/bf16) in fractal (8×8 tile) token
//! order; the third argument is the block grid `T,Hb,Wb` with `T·Hb·Wb·64 = S`.

use nabla::io::TensorFile;
use nabla::synth::{Role, structured};
use nabla::{BlockGrid, Gpu, SparseAlgo, block_sparse_attention, dense_attention, estimate_mask};

fn main() -> nabla::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let algo: SparseAlgo = args.get(1).map_or("nabla-0.7", |s| s.as_str()).parse()?;
    let gpu = Gpu::new()?;
    println!("{}", gpu.caps().name);
    let (q, k, v, grid) = match args.first() {
        Some(path) => {
            let grid: BlockGrid = args
                .get(2)
                .ok_or_else(|| {
                    nabla::Error::Invalid("give the block grid T,Hb,Wb after the algorithm".into())
                })?
                .parse()?;
            let f = TensorFile::open(path)?;
            let mut t = Vec::new();
            for name in ["q", "k", "v"] {
                let (data, shape) = f.f32(name)?;
                t.push(gpu.upload_f32(&data, &shape)?);
            }
            (t[0].clone(), t[1].clone(), t[2].clone(), grid)
        }
        None => {
            let grid = BlockGrid::from_tokens(5, 32, 48)?; // 5 frames of a 384x256-px-like grid
            let (h, d) = (4, 64);
            let shape = [1, h, grid.tokens(), d];
            let up = |r| gpu.upload_f32(&structured(&grid, h, d, r, 7), &shape);
            (up(Role::Query)?, up(Role::Key)?, up(Role::Value)?, grid)
        }
    };
    let mask = estimate_mask(&gpu, &q, &k, grid, &algo)?;
    for (h, d) in mask.density_per_head(&gpu)?.iter().enumerate() {
        println!("{algo}: head {h} keeps {:.1} % of the blocks", d * 100.0);
    }
    let sparse = gpu.read_f32(&block_sparse_attention(&gpu, &q, &k, &v, &mask)?)?;
    let dense = gpu.read_f32(&dense_attention(&gpu, &q, &k, &v)?)?;
    let num: f64 = sparse
        .iter()
        .zip(&dense)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = dense.iter().map(|b| (*b as f64).powi(2)).sum();
    println!(
        "relative L2 difference sparse vs dense: {:.3e}",
        (num / den).sqrt()
    );
    Ok(())
}
