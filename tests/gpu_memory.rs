//! `Gpu::memory_in_use` (wgpu's allocator report) and the wgpu DiT layer's
//! `Backend::memory_in_use`: a 64 MiB tensor raises the figure by at least 64 MiB while it
//! lives, and dropping it (after the GPU has used it) and polling lowers it again.
//!
//! Backends that write no allocator report (Metal, GL) answer `None`; the test then says so and
//! passes, except on Vulkan and DX12, which must answer.
//!
//! `Gpu::memory_info` (Vulkan's device-local heap and budget): present on Vulkan, free ≤ total,
//! and the 64 MiB tensor lowers `free`. The Wan DiT refuses weights that cannot fit before it
//! uploads any, with an error naming what it needs and what the device has; its planned weight
//! bytes are what it uploads.

mod common;

use common::gpu;
use nabla::wan::{Backend, Dit, WanConfig, WeightPrecision, WgpuBackend, planned_weight_bytes};
use nabla::{DType, Error};

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

/// The figures are process-wide: every test of this file holds this lock, so no other test's
/// uploads come and go between a test's two readings.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// This file's lock (a test that panicked while holding it does not poison the others).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits for all submitted GPU work (so that dropped resources can be released).
fn wait_idle() {
    gpu()
        .device()
        .poll(wgpu::PollType::wait_indefinitely())
        .expect("device poll");
}

/// One test function: the figures are process-wide, so the steps must not run concurrently
/// with each other (nor with the other tests: [`serial`]).
#[test]
fn memory_in_use_follows_a_64_mib_tensor() {
    let _serial = serial();
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
    let info_before = memory_info();

    // a 64 MiB tensor, written and read back so that the GPU really used it
    let words = (BYTES / 4) as usize;
    let t = g.empty(&[words], DType::U32).unwrap();
    g.fill_u32(&t, 0xdead_beef);
    let back = g.read_u32(&t).unwrap();
    assert_eq!(back.len(), words);
    assert!(back.iter().all(|&x| x == 0xdead_beef));
    drop(back);
    if let (Some((free0, total)), Some((free1, _))) = (info_before, memory_info()) {
        assert!(
            free1 + BYTES / 2 <= free0,
            "a live 64 MiB tensor lowered the free memory only from {free0} to {free1} bytes \
             (heap {total})"
        );
    }
    let with = in_use().expect("the report was there a moment ago");
    eprintln!("in use with the tensor: {with} bytes");
    // wgpu may release some of its own small buffers counted in `before` (a CI run saw
    // 131 120 of 655 688 bytes go): up to 1 MiB of them may leave between the readings
    let released = before.min(MIB);
    assert!(
        with + released >= before + BYTES,
        "a live 64 MiB tensor raised memory_in_use by only {} bytes ({before} -> {with})",
        with as i64 - before as i64
    );
    // the wgpu DiT layer answers the same figure through the trait
    let be = WgpuBackend::new(g);
    let via_trait = be
        .memory_in_use()
        .expect("the wgpu layer forwards the report");
    assert!(
        via_trait + released >= before + BYTES,
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

/// `(free, total)` after checking it is sane, or `None` where the backend has no answer (it
/// must have one on Vulkan).
fn memory_info() -> Option<(u64, u64)> {
    let g = gpu();
    let v = g.memory_info();
    match v {
        Some((free, total)) => {
            eprintln!("memory_info: {free} of {total} bytes free");
            assert!(total > 0, "a device-local heap of 0 bytes");
            assert!(free <= total, "{free} bytes free of a {total}-byte heap");
        }
        None => {
            assert!(
                !g.caps().backend.to_lowercase().contains("vulkan"),
                "memory_info is None on Vulkan ({})",
                g.caps().name
            );
            eprintln!("NOT TESTED: {} has no memory size query", g.caps().backend);
        }
    }
    v
}

/// What `Dit::from_source` uploads is what `planned_weight_bytes` predicts, at both
/// precisions.
#[test]
fn planned_weight_bytes_are_the_uploaded_bytes() {
    let _serial = serial();
    let cfg = nabla::wan::pipeline::demo_dit_config();
    for p in [WeightPrecision::F32, WeightPrecision::BF16] {
        let mut be = WgpuBackend::new(gpu());
        let dit = Dit::random(&mut be, &cfg, p, 7).unwrap();
        assert_eq!(
            dit.weight_bytes(),
            planned_weight_bytes(&cfg, p),
            "{p:?}: uploaded vs planned"
        );
    }
}

/// A DiT whose weights exceed the device's memory is refused before any upload, naming the
/// bytes it needs and the bytes free.
#[test]
fn dit_weights_beyond_the_device_are_refused_up_front() {
    let _serial = serial();
    let g = gpu();
    let Some((free, total)) = memory_info() else {
        return;
    };
    // the 14B model's layers, as many as it takes to pass the whole heap
    let mut cfg = WanConfig::t2v_14b();
    cfg.num_layers = 1;
    let one = planned_weight_bytes(&cfg, WeightPrecision::BF16);
    cfg.num_layers = 2;
    let per_layer = planned_weight_bytes(&cfg, WeightPrecision::BF16) - one;
    cfg.num_layers = (total / per_layer) as usize + 2;
    let need = planned_weight_bytes(&cfg, WeightPrecision::BF16);
    assert!(need > total);
    let mut be = WgpuBackend::new(g);
    let t0 = std::time::Instant::now();
    let r = Dit::random(&mut be, &cfg, WeightPrecision::BF16, 1);
    match r {
        Err(Error::OutOfMemory {
            needed, available, ..
        }) => {
            assert_eq!(needed, need);
            let a = available.expect("the free bytes are known here");
            // `free` moves only by the other tests' tensors (64 MiB) in between
            assert!(
                a <= total && a + 256 * MIB >= free,
                "available {a}, free {free}, heap {total}"
            );
        }
        Err(e) => panic!("expected an out-of-memory refusal, got: {e}"),
        Ok(_) => panic!("{need} bytes of weights were accepted on a {total}-byte heap"),
    }
    let msg = Dit::random(&mut be, &cfg, WeightPrecision::BF16, 1)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("DiT weights") && msg.contains("GB") && msg.contains("free"),
        "message: {msg}"
    );
    // refused before generating or uploading anything (that would take minutes at this size)
    assert!(t0.elapsed().as_secs() < 30, "took {:?}", t0.elapsed());
}
