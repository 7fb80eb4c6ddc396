//! The read-bandwidth probe (`nabla::gpu::bandwidth`, `nabla bench bandwidth`): its kernel
//! computes exactly what the CPU reference does (the xor of the 16-byte words each invocation
//! visits) on fresh random sources, for working sets smaller and larger than the dispatch,
//! zero, one and several rounds, 64 and 256 invocations, and a grid that wraps past the
//! per-dimension limit; the output is poisoned first so an unwritten element fails. Bad
//! configurations are refused with errors naming the value and what would be right. The speed
//! is for the benchmark, not checked here.

mod common;

use common::{assert_words_equal, gpu};
use nabla::gpu::bandwidth::{Probe, measure};
use nabla::{DType, Error};

/// Runs `p` on a fresh random source of `src_words` u32 and returns (got, want).
fn run(p: Probe, src_words: usize, seed: u64) -> (Vec<u32>, Vec<u32>) {
    let g = gpu();
    let mut s = seed;
    let data: Vec<u32> = (0..src_words)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (s >> 32) as u32
        })
        .collect();
    let src = g.upload_u32(&data, &[src_words]).expect("upload source");
    let n = p.threads() as usize;
    let out = g
        .upload_u32(&vec![0xdead_beef; n], &[n])
        .expect("upload poison");
    let mut b = g.batch();
    p.record(&mut b, &src, &out).expect("record");
    b.submit().expect("submit");
    (g.read_u32(&out).expect("read"), p.reference(&data))
}

#[test]
fn probe_matches_reference() {
    for (i, (words, invocations, groups, rounds)) in [
        (1, 64, 1, 1),     // one word: every load reads it
        (64, 64, 3, 0),    // no rounds: zeros written
        (64, 64, 3, 1),    // a window smaller than the dispatch: loads wrap
        (4096, 64, 5, 3),  // larger than the dispatch
        (1024, 256, 2, 5), // 256 invocations
        (8192, 256, 7, 2), // a window in a larger source (the rest never read)
    ]
    .into_iter()
    .enumerate()
    {
        let p = Probe {
            words,
            invocations,
            groups,
            rounds,
        };
        let (got, want) = run(p, (words as usize * 4).max(4 * 8192), 17 + i as u64);
        assert_words_equal(&format!("{p:?}"), &got, &want);
    }
}

#[test]
fn probe_wraps_a_grid_past_the_dimension_limit() {
    let max = gpu().caps().max_workgroups_per_dim;
    let p = Probe {
        words: 512,
        invocations: 64,
        groups: 2 * max,
        rounds: 1,
    };
    if p.threads() * 4 > 256 << 20 {
        eprintln!("skipped: {} workgroups need a large output", p.groups);
        return;
    }
    let (got, want) = run(p, 2048, 99);
    assert_words_equal(&format!("{p:?}"), &got, &want);
}

#[test]
fn bad_probes_are_refused() {
    let g = gpu();
    let src = g.empty(&[1024], DType::U32).expect("alloc");
    let out = g.empty(&[128], DType::U32).expect("alloc");
    let ok = Probe {
        words: 256,
        invocations: 64,
        groups: 2,
        rounds: 1,
    };
    for (p, needle) in [
        (Probe { words: 0, ..ok }, "power of two"),
        (Probe { words: 96, ..ok }, "power of two"),
        (Probe { words: 512, ..ok }, "need 2048 u32"),
        (
            Probe {
                invocations: 0,
                ..ok
            },
            "invocations per workgroup",
        ),
        (Probe { groups: 0, ..ok }, "at least one"),
        (Probe { groups: 3, ..ok }, "need 192 u32"),
    ] {
        let mut b = g.batch();
        let e = p
            .record(&mut b, &src, &out)
            .expect_err("a bad probe must be refused");
        assert!(
            matches!(e, Error::Invalid(_) | Error::Shape(_)),
            "{p:?}: unexpected error kind {e:?}"
        );
        assert!(e.to_string().contains(needle), "{p:?}: {e}");
    }
    let mut b = g.batch();
    ok.record(&mut b, &src, &out).expect("a good probe records");
}

#[test]
fn measure_reports_every_size_in_order() {
    let g = gpu();
    if !g.caps().timestamps {
        eprintln!("skipped: no timestamp queries");
        return;
    }
    let sizes = [4096u64, 1 << 16];
    let rows = measure(g, &sizes, 1 << 20, 64, 8, 2).expect("measure");
    assert_eq!(rows.len(), 2);
    for (r, &b) in rows.iter().zip(&sizes) {
        assert_eq!(r.bytes, b);
        assert!(r.ms > 0.0 && r.gbps > 0.0 && r.gbps.is_finite(), "{r:?}");
    }
    for bad in [8u64, 3 << 10] {
        assert!(
            measure(g, &[bad], 1 << 20, 64, 8, 1).is_err(),
            "{bad} accepted"
        );
    }
    // an empty dispatch is an error, not a division by zero
    for (invocations, groups) in [(0, 8), (64, 0)] {
        let e = measure(g, &[4096], 1 << 20, invocations, groups, 1)
            .expect_err("an empty dispatch must be refused");
        assert!(e.to_string().contains("at least one"), "{e}");
    }
}
