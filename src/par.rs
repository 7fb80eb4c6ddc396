//! Host-side loops over large tensors on all CPU cores (random weights, 16-bit conversions,
//! checkpoint decoding: a Wan 14B model has 14·10⁹ values).

/// Calls `f(first, chunk)` for consecutive chunks of `out` on scoped threads, one chunk per
/// core (at least 2¹⁶ elements each); `first` is the index of the chunk's first element, so
/// the result never depends on the number of cores.
pub(crate) fn for_chunks<T: Send>(out: &mut [T], f: impl Fn(usize, &mut [T]) + Sync) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = out.len().div_ceil(threads).max(1 << 16);
    std::thread::scope(|sc| {
        for (ci, part) in out.chunks_mut(chunk).enumerate() {
            let f = &f;
            sc.spawn(move || f(ci * chunk, part));
        }
    });
}
