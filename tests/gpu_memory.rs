//! `Gpu::memory_in_use` (wgpu's allocator report) and the wgpu DiT layer's
//! `Backend::memory_in_use`: a 64 MiB tensor raises the figure by at least 64 MiB while it
//! lives, and dropping it (after the GPU has used it) and polling lowers it again.
//!
//! Backends that write no allocator report (Metal, GL) answer `None`; the test then says so and
//! passes, except on Vulkan and DX12, which must answer.

mod common;

use common::gpu;
use nabla::DType;
use nabla::wan::{Backend, WgpuBackend};

const MIB: u64 = 1 << 20;
/// The tensor's size: 64 MiB of f32.
const BYTES: u64 = 64 * MIB;

/// The current figure, or `None` after explaining why (and failing where a report is due).
fn in_use() -> Option<u64> {
    let g = gpu();
    let v = g.memory_in_use();
    if v.is_none() {
        let backend = g.caps().backend.to_lowercase();
        assert!(
            !backend.contains("vulkan") && !backend.contains("dx12"),
            "memory_in_use is None on {} ({}), whose backend writes an allocator report",
            g.caps().name,
            g.caps().backend
        );
        eprintln!(
            "NOT TESTED: {} ({}) writes no allocator report, so memory_in_use is None",
            g.caps().name,
            g.caps().backend
        );
    }
    v
}

/// Waits for all submitted GPU work (so that dropped resources can be released).
fn wait_idle() {
    gpu()
        .device()
        .poll(wgpu::PollType::wait_indefinitely())
        .expect("device poll");
}

/// One test function: the figures are process-wide, so the steps must not run concurrently
/// with each other.
#[test]
fn memory_in_use_follows_a_64_mib_tensor() {
    let g = gpu();
    // warm up: pipeline-free staging and readback paths, so their own buffers come and go first
    let warm = g.upload_u32(&[1, 2, 3, 4], &[4]).unwrap();
    assert_eq!(g.read_u32(&warm).unwrap(), [1, 2, 3, 4]);
    drop(warm);
    wait_idle();
    let Some(before) = in_use() else {
        return;
    };
    eprintln!("in use before: {before} bytes");

    // a 64 MiB tensor, written and read back so that the GPU really used it
    let words = (BYTES / 4) as usize;
    let t = g.empty(&[words], DType::U32).unwrap();
    g.fill_u32(&t, 0xdead_beef);
    let back = g.read_u32(&t).unwrap();
    assert_eq!(back.len(), words);
    assert!(back.iter().all(|&x| x == 0xdead_beef));
    drop(back);
    let with = in_use().expect("the report was there a moment ago");
    eprintln!("in use with the tensor: {with} bytes");
    assert!(
        with >= before + BYTES,
        "a live 64 MiB tensor raised memory_in_use by only {} bytes ({before} -> {with})",
        with as i64 - before as i64
    );
    // the wgpu DiT layer answers the same figure through the trait
    let be = WgpuBackend::new(g);
    let via_trait = be
        .memory_in_use()
        .expect("the wgpu layer forwards the report");
    assert!(
        via_trait >= before + BYTES,
        "Backend::memory_in_use of the wgpu layer gave {via_trait} bytes with the tensor live \
         ({before} before it)"
    );

    drop(t);
    wait_idle();
    let after = in_use().expect("the report was there a moment ago");
    eprintln!("in use after dropping it and polling: {after} bytes");
    assert!(
        after + BYTES <= with,
        "dropping the 64 MiB tensor lowered memory_in_use by only {} bytes ({with} -> {after})",
        with as i64 - after as i64
    );
    assert!(
        after < before + BYTES,
        "after the drop {after} bytes are in use, not back near the {before} before the tensor"
    );
    let via_trait = be
        .memory_in_use()
        .expect("the wgpu layer forwards the report");
    assert!(
        via_trait + BYTES <= with,
        "Backend::memory_in_use of the wgpu layer still gives {via_trait} bytes after the drop"
    );
}
