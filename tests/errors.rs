//! Bad input gives `Err` with a message that says what is wrong, never a panic, and leaves no
//! GPU error behind (nothing invalid reaches the device).

mod common;

use common::gpu;
use nabla::nabla::{MaskStages, mask_from_pooled, record_estimate_mask};
use nabla::{
    BlockGrid, BlockMask, Error, Gpu, SparseAlgo, Tensor, block_sparse_attention, dense_attention,
    estimate_mask, from_fractal, to_fractal,
};

/// Unwraps the error, checks it is a `Shape`/`Invalid`/... as `kind` says, that its message has
/// every needle, and that the GPU recorded no error on the way.
#[track_caller]
fn expect_err<T: std::fmt::Debug>(
    what: &str,
    r: nabla::Result<T>,
    is_kind: fn(&Error) -> bool,
    needles: &[&str],
) -> Error {
    let e = match r {
        Ok(v) => panic!("{what}: expected an error, got Ok({v:?})"),
        Err(e) => e,
    };
    assert!(is_kind(&e), "{what}: unexpected error kind {e:?}");
    let msg = e.to_string();
    for n in needles {
        assert!(msg.contains(n), "{what}: message {msg:?} lacks {n:?}");
    }
    if let Err(g) = gpu().check() {
        panic!("{what}: a GPU error was raised although the input was rejected: {g}");
    }
    eprintln!("{what}: {msg}");
    e
}

fn shape(e: &Error) -> bool {
    matches!(e, Error::Shape(_))
}
fn invalid(e: &Error) -> bool {
    matches!(e, Error::Invalid(_))
}
fn too_large(e: &Error) -> bool {
    matches!(e, Error::TooLarge { .. })
}

fn zeros(g: &Gpu, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    g.upload_f32(&vec![0.0; n], shape).unwrap()
}

fn nabla07() -> SparseAlgo {
    "nabla-0.7".parse().unwrap()
}

#[test]
fn mask_sequence_not_multiple_of_block() {
    let g = gpu();
    let grid = BlockGrid::new(1, 1, 2).unwrap();
    let q = zeros(g, &[1, 2, 100, 64]);
    let k = zeros(g, &[1, 2, 100, 64]);
    expect_err(
        "estimate_mask S=100",
        estimate_mask(g, &q, &k, grid, &nabla07()),
        shape,
        &["sequence length 100", "multiple of the 64-token block"],
    );
}

#[test]
fn attention_ragged_sequence_needs_matching_mask() {
    let g = gpu();
    // S = 100 is fine (ragged tail), but it makes 2 blocks: a 3-block mask is refused
    let q = zeros(g, &[1, 2, 100, 64]);
    let full3 = BlockMask::full(g, 3).unwrap();
    expect_err(
        "attention S=100 with a 3-block mask",
        block_sparse_attention(g, &q, &q, &q, &full3),
        shape,
        &[
            "block mask is 3x3 blocks",
            "100 queries and 100 keys make 2x2 blocks",
        ],
    );
    dense_attention(g, &q, &q, &q).unwrap();
    let empty = zeros(g, &[1, 2, 0, 64]);
    expect_err(
        "dense attention S=0",
        dense_attention(g, &empty, &empty, &empty),
        shape,
        &["at least one query and one key", "got 0 and 0"],
    );
}

#[test]
fn q_and_k_of_different_shapes() {
    let g = gpu();
    let grid = BlockGrid::new(1, 1, 2).unwrap();
    let s = grid.tokens();
    let q = zeros(g, &[1, 2, s, 64]);
    let k = zeros(g, &[1, 1, s, 64]);
    expect_err(
        "estimate_mask q/k shapes",
        estimate_mask(g, &q, &k, grid, &nabla07()),
        shape,
        &["[1, 2, 128, 64]", "[1, 1, 128, 64]", "same shape"],
    );
    let full = BlockMask::full(g, grid.blocks()).unwrap();
    expect_err(
        "attention k shape",
        block_sparse_attention(g, &q, &k, &q, &full),
        shape,
        &["attention k", "[1, 1, 128, 64]", "[1, 2, 128, 64]"],
    );
    expect_err(
        "attention v shape",
        block_sparse_attention(g, &q, &q, &k, &full),
        shape,
        &["attention v"],
    );
    // same shape, different dtype
    let ku32 = g.upload_u32(&vec![0; 2 * s * 64], &[1, 2, s, 64]).unwrap();
    expect_err(
        "attention k dtype",
        block_sparse_attention(g, &q, &ku32, &q, &full),
        shape,
        &["attention k", "U32", "F32"],
    );
    expect_err(
        "estimate_mask k dtype",
        estimate_mask(g, &q, &ku32, grid, &nabla07()),
        shape,
        &["f32 or both f16"],
    );
    // q not 4-D
    let q3 = zeros(g, &[2, s, 64]);
    expect_err(
        "estimate_mask 3-D q",
        estimate_mask(g, &q3, &q3, grid, &nabla07()),
        shape,
        &["[B, H, S, D]", "[2, 128, 64]"],
    );
    expect_err(
        "attention 3-D q",
        block_sparse_attention(g, &q3, &q3, &q3, &full),
        shape,
        &["[B, H, S, D]", "[2, 128, 64]"],
    );
}

#[test]
fn sequence_not_matching_grid() {
    let g = gpu();
    let grid = BlockGrid::new(3, 2, 2).unwrap();
    let q = zeros(g, &[1, 1, 128, 64]);
    expect_err(
        "estimate_mask grid",
        estimate_mask(g, &q, &q, grid, &nabla07()),
        shape,
        &["sequence length 128", "3x2x2", "768 tokens"],
    );
    // the STA-only path checks the shapes too, although it never reads q/k
    expect_err(
        "estimate_mask grid sta",
        estimate_mask(g, &q, &q, grid, &"sta-11-3-3".parse().unwrap()),
        shape,
        &["sequence length 128", "3x2x2"],
    );
}

#[test]
fn attention_head_dim_48() {
    let g = gpu();
    let q = zeros(g, &[1, 1, 64, 48]);
    let full = BlockMask::full(g, 1).unwrap();
    expect_err(
        "attention d=48",
        block_sparse_attention(g, &q, &q, &q, &full),
        shape,
        &["head_dim 48", "64 or 128"],
    );
    expect_err(
        "dense attention d=48",
        dense_attention(g, &q, &q, &q),
        shape,
        &["head_dim 48", "64 or 128"],
    );
}

#[test]
fn mask_head_dim_24() {
    let g = gpu();
    let grid = BlockGrid::new(1, 1, 1).unwrap();
    let q = zeros(g, &[1, 1, 64, 24]);
    expect_err(
        "estimate_mask d=24",
        estimate_mask(g, &q, &q, grid, &nabla07()),
        shape,
        &["head_dim 24", "multiple of 16"],
    );
    let qa = zeros(g, &[1, 1, 24]);
    expect_err(
        "mask_from_pooled d=24",
        mask_from_pooled(g, &qa, &qa, grid, &nabla07()),
        shape,
        &["head_dim 24", "multiple of 16"],
    );
}

#[test]
fn mask_nb_not_matching_sequence() {
    let g = gpu();
    let q = zeros(g, &[1, 2, 3 * 64, 64]);
    let full = BlockMask::full(g, 2).unwrap();
    expect_err(
        "attention mask nb",
        block_sparse_attention(g, &q, &q, &q, &full),
        shape,
        &[
            "block mask is 2x2 blocks",
            "192 queries and 192 keys make 3x3 blocks",
        ],
    );
    // record_estimate_mask checks its output lists against q/k
    let grid = BlockGrid::new(1, 1, 3).unwrap();
    let stages = MaskStages::alloc(g, 2, 3, 64).unwrap();
    let wrong = BlockMask::alloc(g, 2, 2).unwrap();
    let mut b = g.batch();
    expect_err(
        "record_estimate_mask output nb",
        record_estimate_mask(&mut b, &q, &q, grid, &nabla07(), &stages, &wrong),
        shape,
        &["2 heads of 2 blocks", "need 2 of 3"],
    );
    let small = MaskStages::alloc(g, 2, 2, 64).unwrap();
    let out = BlockMask::alloc(g, 2, 3).unwrap();
    expect_err(
        "record_estimate_mask stages",
        record_estimate_mask(&mut b, &q, &q, grid, &nabla07(), &small, &out),
        shape,
        &["scratch"],
    );
    drop(b);
    g.check().unwrap();
}

#[test]
fn mask_heads_neither_one_nor_bh() {
    let g = gpu();
    let q = zeros(g, &[1, 2, 64, 64]);
    let mask = BlockMask::from_lists(g, &[1, 1, 1], &[0, 0, 0], 3, 1).unwrap();
    expect_err(
        "attention mask heads",
        block_sparse_attention(g, &q, &q, &q, &mask),
        shape,
        &["3 heads", "1 (shared) or B·H = 2"],
    );
    // 1 and B·H are both fine
    let one = BlockMask::from_lists(g, &[1], &[0], 1, 1).unwrap();
    block_sparse_attention(g, &q, &q, &q, &one).unwrap();
    let two = BlockMask::from_lists(g, &[1, 1], &[0, 0], 2, 1).unwrap();
    block_sparse_attention(g, &q, &q, &q, &two).unwrap();
    g.check().unwrap();
}

#[test]
fn from_lists_rejects_bad_lists() {
    let g = gpu();
    // nb = 2: counts [2 heads * 2 rows], indices [2 * 2 * 2]
    let good_idx = [0, 1, 0, 1, 1, 0, 0, 0];
    BlockMask::from_lists(g, &[2, 2, 1, 0], &good_idx, 2, 2).unwrap();
    expect_err(
        "from_lists count > Nb",
        BlockMask::from_lists(g, &[2, 3, 1, 0], &good_idx, 2, 2),
        shape,
        &["row 1", "count 3", "more than Nb = 2"],
    );
    expect_err(
        "from_lists index >= Nb",
        BlockMask::from_lists(g, &[2, 2, 1, 0], &[0, 1, 0, 2, 1, 0, 0, 0], 2, 2),
        shape,
        &["row 1", "key block 2", "indices must be < Nb = 2"],
    );
    // an out-of-range index past the count is not read, so it is allowed
    BlockMask::from_lists(g, &[1, 1, 1, 0], &[0, 9, 1, 9, 1, 9, 9, 9], 2, 2).unwrap();
    expect_err(
        "from_lists duplicate",
        BlockMask::from_lists(g, &[2, 2, 1, 0], &[0, 1, 1, 1, 1, 0, 0, 0], 2, 2),
        shape,
        &["row 1", "key block 1 twice", "at most once"],
    );
    // any order within a row is accepted and stored ascending (the tensor-core attention's pair
    // form merges two rows' lists)
    let m = BlockMask::from_lists(g, &[2, 2, 1, 0], &[1, 0, 0, 1, 1, 0, 0, 0], 2, 2).unwrap();
    let idx = g.read_u32(m.indices()).unwrap();
    assert_eq!(&idx[0..2], &[0, 1], "row 0 stored ascending");
    assert_eq!(&idx[2..4], &[0, 1]);
    assert_eq!(idx[4], 1);
    assert_eq!(m.to_dense(g).unwrap(), vec![1, 1, 1, 1, 0, 1, 0, 0]);
    expect_err(
        "from_lists lengths",
        BlockMask::from_lists(g, &[2, 2, 1], &good_idx, 2, 2),
        shape,
        &["need 4 counts and 8 indices, got 3 and 8"],
    );
    expect_err(
        "from_dense length",
        BlockMask::from_dense(g, &[1, 0, 1], 1, 2),
        shape,
        &["3 entries", "= 4"],
    );
    g.check().unwrap();
}

#[test]
fn too_large_for_a_storage_binding() {
    let g = gpu();
    let caps = g.caps();
    let limit = caps.max_storage_binding;
    eprintln!(
        "{}: max storage binding {limit} B, max buffer {} B",
        caps.name, caps.max_buffer
    );
    g.check_binding("x", limit).unwrap();
    let e = expect_err(
        "check_binding",
        g.check_binding("x", limit + 4),
        too_large,
        &[
            "tensor x",
            &format!("{} bytes", limit + 4),
            &limit.to_string(),
        ],
    );
    match e {
        Error::TooLarge {
            what,
            bytes,
            limit: l,
            adapter,
        } => {
            assert_eq!(what, "x");
            assert_eq!(bytes, limit + 4);
            assert_eq!(l, limit);
            assert_eq!(adapter, caps.name);
        }
        other => panic!("{other:?}"),
    }

    // Mask lists heads·nb·nb·4 bytes above the limit: rejected before anything is allocated.
    let nb = 64usize;
    let heads = (limit / (nb * nb * 4) as u64) as usize + 1;
    assert!((heads * nb * nb * 4) as u64 > limit);
    expect_err(
        "BlockMask::alloc",
        BlockMask::alloc(g, heads, nb),
        too_large,
        &["block-mask lists", &format!("[{heads}, {nb}, {nb}]")],
    );
    expect_err(
        "MaskStages::alloc",
        MaskStages::alloc(g, heads, nb, 64),
        too_large,
        &["block attention map"],
    );

    // The real path: pooled qa/ka are small ([BH, Nb, 16] f32) but the [BH, Nb, Nb] map is not.
    let grid = BlockGrid::new(1, 64, 64).unwrap();
    let nb = grid.blocks();
    let bh = (limit / (nb * nb * 4) as u64) as usize + 1;
    let qa_bytes = (bh * nb * 16 * 4) as u64;
    if qa_bytes <= 64 << 20 && qa_bytes <= caps.max_buffer {
        let qa = g.empty(&[bh, nb, 16], nabla::DType::F32).unwrap();
        expect_err(
            "mask_from_pooled map",
            mask_from_pooled(g, &qa, &qa, grid, &nabla07()),
            too_large,
            &["block attention map", &limit.to_string()],
        );
    } else {
        eprintln!("mask_from_pooled TooLarge case skipped: qa would be {qa_bytes} bytes");
    }
}

#[test]
fn mask_from_pooled_sta_only() {
    let g = gpu();
    let grid = BlockGrid::new(2, 2, 2).unwrap();
    let qa = zeros(g, &[1, grid.blocks(), 64]);
    expect_err(
        "mask_from_pooled sta",
        mask_from_pooled(g, &qa, &qa, grid, &"sta-11-3-3".parse().unwrap()),
        invalid,
        &["sta-11-3-3", "no NABLA threshold", "BlockMask::sta"],
    );
    // wrong pooled shapes
    let bad = zeros(g, &[1, grid.blocks() + 1, 64]);
    expect_err(
        "mask_from_pooled nb",
        mask_from_pooled(g, &bad, &bad, grid, &nabla07()),
        shape,
        &["[BH, 8, D]"],
    );
}

#[test]
fn fractal_h_not_multiple_of_8() {
    let g = gpu();
    let x = zeros(g, &[12 * 8, 4]);
    for (what, r) in [
        ("to_fractal", to_fractal(g, &x, (1, 12, 8))),
        ("from_fractal", from_fractal(g, &x, (1, 12, 8))),
    ] {
        expect_err(
            what,
            r,
            shape,
            &["fractal order", "multiples of 8", "1x12x8"],
        );
    }
    let y = zeros(g, &[8 * 12, 4]);
    expect_err(
        "to_fractal W=12",
        to_fractal(g, &y, (1, 8, 12)),
        shape,
        &["multiples of 8", "1x8x12"],
    );
    // H, W fine but the tensor does not have F·H·W rows
    let z = zeros(g, &[64, 4]);
    expect_err(
        "to_fractal rows",
        to_fractal(g, &z, (2, 8, 8)),
        shape,
        &["[128, C]", "[64, 4]"],
    );
    // rows of a non-whole number of 32-bit words
    let h = g.upload_f16(&[0.0; 64 * 3], &[64, 3]).unwrap();
    expect_err(
        "to_fractal odd f16 row",
        to_fractal(g, &h, (1, 8, 8)),
        shape,
        &["32-bit words", "6 bytes"],
    );
}

/// No adapter matching the filters: a clear error that says how to get one, exit code 1, no panic.
#[test]
fn no_matching_adapter_is_a_clear_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nabla"))
        .args([
            "mask",
            "--grid",
            "1,8,8",
            "--heads",
            "1",
            "--png",
            "/dev/null",
        ])
        .env("NABLA_ADAPTER", "no-such-gpu-xyz")
        .output()
        .expect("run nabla");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(err.contains("no GPU adapter found"), "{err}");
    assert!(err.contains("NABLA_ADAPTER=\"no-such-gpu-xyz\""), "{err}");
    assert!(err.contains("mesa-vulkan-drivers"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // and a bad backend name
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nabla"))
        .args(["info"])
        .env("NABLA_BACKEND", "opengl-es")
        .output()
        .expect("run nabla");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(
        err.contains("NABLA_BACKEND") && err.contains("vulkan, metal, dx12, gl"),
        "{err}"
    );
}
