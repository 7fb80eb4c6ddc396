//! `nabla mask`: estimate a block mask on synthetic or given Q/K, print densities, write a PNG.

use nabla::io::TensorFile;
use nabla::synth::{Role, structured};
use nabla::{BlockGrid, Error, Gpu, Result, SparseAlgo, Tensor, estimate_mask};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct MaskArgs {
    /// Patch-token grid F,H,W (frames, rows, columns; H and W multiples of 8), e.g. 21,40,80.
    #[arg(long)]
    grid: String,
    /// Attention heads (ignored with --qk, which gives them).
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Head dimension of synthetic Q/K.
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    /// nabla-<thr>, sta-<wT>-<wH>-<wW> or nabla-<thr>_sta-<wT>-<wH>-<wW>.
    #[arg(long, default_value = "nabla-0.7")]
    sparse_algo: String,
    /// A safetensors file with `q` and `k` [B, H, S, D] or [H, S, D] in fractal order
    /// (f32, f16 or bf16). Without it, structured synthetic Q/K are used.
    #[arg(long)]
    qk: Option<PathBuf>,
    /// Where to write the heatmap (one panel per head, white = attended block).
    #[arg(long, default_value = "nabla-mask.png")]
    png: PathBuf,
    /// Seed of the synthetic Q/K.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Device layer: auto (CUDA where built in and available), wgpu or cuda.
    #[arg(long, value_enum, default_value = "auto")]
    backend: super::layer::BackendArg,
}

fn parse_grid(s: &str) -> Result<(usize, usize, usize)> {
    let v: Vec<usize> = s
        .split(',')
        .map(|x| x.trim().parse())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::Invalid(format!("--grid {s:?} must be three integers F,H,W")))?;
    match v.as_slice() {
        [f, h, w] => Ok((*f, *h, *w)),
        _ => Err(Error::Invalid(format!(
            "--grid {s:?} must be three integers F,H,W"
        ))),
    }
}

/// Q and K on the host: `(q, k, shape [B, H, S, D])`.
type HostQk = (Vec<f32>, Vec<f32>, Vec<usize>);

fn load_qk(path: &PathBuf) -> Result<HostQk> {
    let f = TensorFile::open(path)?;
    let mut out = Vec::new();
    for name in ["q", "k"] {
        let (v, mut shape) = f.f32(name)?;
        if shape.len() == 3 {
            shape.insert(0, 1);
        }
        if shape.len() != 4 {
            return Err(Error::file(
                path.clone(),
                format!("{name} must be [B, H, S, D] or [H, S, D], got {shape:?}"),
            ));
        }
        out.push((v, shape));
    }
    let (k, ks) = out.pop().expect("k");
    let (q, qs) = out.pop().expect("q");
    if ks != qs {
        return Err(Error::file(
            path.clone(),
            format!("q {qs:?} and k {ks:?} must have the same shape"),
        ));
    }
    Ok((q, k, qs))
}

/// The dense `[mask heads, Nb, Nb]` mask and its head count, on the wgpu layer.
fn mask_wgpu(qk: &HostQk, grid: BlockGrid, algo: &SparseAlgo) -> Result<(Vec<u8>, usize, String)> {
    let gpu = Gpu::new()?;
    let q: Tensor = gpu.upload_f32(&qk.0, &qk.2)?;
    let k: Tensor = gpu.upload_f32(&qk.1, &qk.2)?;
    let mask = estimate_mask(&gpu, &q, &k, grid, algo)?;
    Ok((mask.to_dense(&gpu)?, mask.heads(), gpu.caps().name.clone()))
}

/// The same on the CUDA layer.
#[cfg(feature = "cuda")]
fn mask_cuda(
    c: &nabla::cuda::Cuda,
    qk: &HostQk,
    grid: BlockGrid,
    algo: &SparseAlgo,
) -> Result<(Vec<u8>, usize, String)> {
    use nabla::cuda::nabla as cn;
    let mask = match algo {
        SparseAlgo::Sta(w) => cn::sta_mask(c, grid, *w)?,
        _ => {
            let shape = &qk.2;
            let q = c.upload_as(&qk.0, shape, nabla::DType::F32)?;
            let k = c.upload_as(&qk.1, shape, nabla::DType::F32)?;
            let scratch = cn::MaskScratch::alloc(c, shape[0] * shape[1], grid.blocks(), shape[3])?;
            cn::estimate_mask(c, &q, &k, grid, algo, &scratch)?
        }
    };
    Ok((
        mask.to_dense(c)?,
        mask.heads,
        format!("{} (CUDA)", c.name()),
    ))
}

pub fn run(a: MaskArgs) -> Result<()> {
    let algo: SparseAlgo = a.sparse_algo.parse()?;
    let (f, h, w) = parse_grid(&a.grid)?;
    let grid = BlockGrid::from_tokens(f, h, w)?;
    let qk = match &a.qk {
        Some(p) => load_qk(p)?,
        None => {
            let s = grid.tokens();
            let q = structured(&grid, a.heads, a.head_dim, Role::Query, a.seed);
            let k = structured(&grid, a.heads, a.head_dim, Role::Key, a.seed);
            (q, k, vec![1, a.heads, s, a.head_dim])
        }
    };
    let cuda = super::layer::open(a.backend)?;
    let t0 = std::time::Instant::now();
    let (dense, mask_heads, device) = match &cuda {
        #[cfg(feature = "cuda")]
        Some(c) => mask_cuda(c, &qk, grid, &algo)?,
        #[cfg(not(feature = "cuda"))]
        Some(never) => match *never {},
        None => mask_wgpu(&qk, grid, &algo)?,
    };
    let wall = t0.elapsed().as_secs_f64() * 1e3;
    let nb = grid.blocks();
    println!(
        "device {device} | grid {f}x{h}x{w} tokens -> {}x{}x{} = {nb} blocks | {algo}",
        grid.t, grid.hb, grid.wb
    );
    let per_head: Vec<f64> = dense
        .chunks(nb * nb)
        .map(|m| m.iter().filter(|&&b| b != 0).count() as f64 / (nb * nb) as f64)
        .collect();
    for (i, d) in per_head.iter().enumerate() {
        println!("head {i:>3}  density {d:.4}");
    }
    let heads_in = qk.2[0] * qk.2[1];
    if mask_heads == 1 && heads_in > 1 {
        println!("(one mask shared by all {heads_in} heads)");
    }
    let mean = per_head.iter().sum::<f64>() / per_head.len().max(1) as f64;
    println!("mean density {mean:.4}  (uploaded, estimated and read back in {wall:.1} ms)");
    write_heatmap(&a.png, &dense, mask_heads, nb)?;
    println!("heatmap: {}", a.png.display());
    Ok(())
}

/// One panel per head (up to 16), panels in a square-ish grid, 2-pixel gray gaps.
pub fn write_heatmap(path: &PathBuf, dense: &[u8], heads: usize, nb: usize) -> Result<()> {
    let shown = heads.min(16);
    let cols = (shown as f64).sqrt().ceil() as usize;
    let rows = shown.div_ceil(cols);
    let gap = 2;
    let (wpx, hpx) = (cols * nb + (cols - 1) * gap, rows * nb + (rows - 1) * gap);
    let mut img = vec![96u8; wpx * hpx];
    for hd in 0..shown {
        let (pr, pc) = (hd / cols, hd % cols);
        for i in 0..nb {
            for j in 0..nb {
                let y = pr * (nb + gap) + i;
                let x = pc * (nb + gap) + j;
                img[y * wpx + x] = if dense[(hd * nb + i) * nb + j] != 0 {
                    255
                } else {
                    0
                };
            }
        }
    }
    let file = std::fs::File::create(path).map_err(|e| Error::file(path.clone(), e))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), wpx as u32, hpx as u32);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Eight);
    let mut wr = enc
        .write_header()
        .map_err(|e| Error::file(path.clone(), e))?;
    wr.write_image_data(&img)
        .map_err(|e| Error::file(path.clone(), e))?;
    Ok(())
}
