//! The occupancy probe (`nabla::gpu::occupancy`, `nabla bench occupancy`): its kernel computes
//! exactly what the CPU reference does (chain end value xor a word of its workgroup array), at
//! workgroup arrays smaller and larger than the workgroup, 64 and 128 invocations, chains of 0
//! and 37 steps, and a grid that wraps past the per-dimension limit; the output is poisoned
//! first so an unwritten element fails. Bad configurations are refused with errors naming the
//! value and the range. How long it takes is for the benchmark, not checked here.

mod common;

use common::{assert_words_equal, gpu};
use nabla::gpu::occupancy::{Probe, measure};
use nabla::{DType, Error};

fn run(p: Probe) -> Vec<u32> {
    let g = gpu();
    let n = (p.groups * p.invocations) as usize;
    let out = g
        .upload_u32(&vec![0xdead_beef; n], &[n])
        .expect("upload poison");
    let mut b = g.batch();
    p.record(&mut b, &out).expect("record");
    b.submit().expect("submit");
    g.read_u32(&out).expect("read")
}

#[test]
fn probe_matches_reference() {
    for (bytes, invocations, iters, groups) in [
        (64, 64, 0, 3),
        (64, 128, 37, 5),
        (4096, 128, 37, 7),
        (8192 + 16, 64, 1, 2),
    ] {
        let p = Probe {
            bytes,
            invocations,
            iters,
            groups,
        };
        assert_words_equal(&format!("{p:?}"), &run(p), &p.reference());
    }
}

#[test]
fn probe_wraps_a_grid_past_the_dimension_limit() {
    let max = gpu().caps().max_workgroups_per_dim;
    // two rows of the grid: the second row's groups carry on the numbering
    let p = Probe {
        bytes: 256,
        invocations: 64,
        iters: 3,
        groups: 2 * max,
    };
    if (p.groups as u64) * 64 * 4 > 256 << 20 {
        eprintln!("skipped: {} workgroups need a large output", p.groups);
        return;
    }
    assert_eq!(run(p), p.reference());
}

#[test]
fn bad_probes_are_refused() {
    let g = gpu();
    let out = g.empty(&[128], DType::U32).expect("alloc");
    let ok = Probe {
        bytes: 256,
        invocations: 64,
        iters: 1,
        groups: 2,
    };
    let limit = g.device().limits().max_compute_workgroup_storage_size;
    for (p, needle) in [
        (Probe { bytes: 0, ..ok }, "positive multiple of 4"),
        (Probe { bytes: 258, ..ok }, "positive multiple of 4"),
        (
            Probe {
                bytes: limit + 4,
                ..ok
            },
            "limit",
        ),
        (
            Probe {
                invocations: 0,
                ..ok
            },
            "invocations per workgroup",
        ),
        (Probe { groups: 0, ..ok }, "at least one workgroup"),
        (Probe { groups: 3, ..ok }, "need 192 u32"),
    ] {
        let mut b = g.batch();
        let e = p
            .record(&mut b, &out)
            .expect_err("a bad probe must be refused");
        assert!(
            matches!(e, Error::Invalid(_) | Error::Shape(_)),
            "{p:?}: unexpected error kind {e:?}"
        );
        assert!(e.to_string().contains(needle), "{p:?}: {e}");
    }
    // the good one records
    let mut b = g.batch();
    ok.record(&mut b, &out).expect("a good probe records");
}

#[test]
fn measure_reports_every_size_in_order() {
    let g = gpu();
    if !g.caps().timestamps {
        eprintln!("skipped: no timestamp queries on {}", g.caps().name);
        return;
    }
    let rows = measure(g, &[64, 1024], 64, 10, 4, 1).expect("measure");
    assert_eq!(rows.iter().map(|r| r.bytes).collect::<Vec<_>>(), [64, 1024]);
    assert!(
        rows.iter().all(|r| r.ms.is_finite() && r.ms >= 0.0),
        "{rows:?}"
    );
}
