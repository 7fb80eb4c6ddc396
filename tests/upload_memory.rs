//! Uploads do not pile up host staging memory: wgpu keeps every `write_buffer`'s staging copy
//! until the next submission, so a model uploaded tensor by tensor (29 GB of Wan 14B weights)
//! held a second copy of all of it in host memory. `Gpu` submits and waits after every
//! 256 MiB written. Measured through the process's peak resident memory, which on a software
//! driver (CI) also holds the tensors themselves: before the fix, 1.5 GiB uploaded raised the
//! peak by 3.3 GB (the tensors plus as much staging); now by the tensors plus at most a few
//! hundred MiB. On a GPU with its own memory the bound holds trivially.

mod common;

fn rss_peak_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[test]
fn uploads_keep_staging_memory_bounded() {
    let g = common::gpu();
    let n = 16 << 20; // 64 MiB of f32 per tensor
    let count = 24;
    let before = rss_peak_bytes();
    let mut keep = Vec::new();
    for i in 0..count {
        let data = vec![i as f32; n];
        keep.push(g.upload_f32(&data, &[n]).unwrap());
    }
    // every write landed, the ones before and after each flush alike
    for i in [0, 3, 4, count / 2, count - 1] {
        let back = g.read_f32(&keep[i]).unwrap();
        assert!(
            back.iter().all(|&v| v == i as f32),
            "tensor {i} did not keep its data"
        );
    }
    let uploaded = (count * n * 4) as u64;
    let (Some(before), Some(after)) = (before, rss_peak_bytes()) else {
        eprintln!("no /proc/self/status here: the memory bound is not checked");
        return;
    };
    let grew = after.saturating_sub(before);
    eprintln!(
        "peak resident memory grew {:.2} GB for {:.2} GB uploaded",
        grew as f64 / 1e9,
        uploaded as f64 / 1e9
    );
    assert!(
        grew < uploaded + uploaded / 2,
        "uploading {uploaded} bytes raised the peak resident memory by {grew} bytes: staging \
         copies are piling up"
    );
}
