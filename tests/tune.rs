//! The tuning cache (`nabla::gpu::tune`): choices survive a reload, adapters stay apart, a bad
//! file is ignored with a reason and never panics, a failed write keeps the choice in memory.
//! And `tune_linear` where the tensor-core kernel does not run: nothing to tune, nothing stored.

mod common;

use nabla::DType;
use nabla::gpu::tune::TuneCache;
use serde_json::json;
use std::path::PathBuf;

fn temp_file(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nabla-tune-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir.join("sub").join("tune.json")
}

#[test]
fn choices_survive_a_reload_and_adapters_stay_apart() {
    let p = temp_file("reload");
    let mut a = TuneCache::new(Some(p.clone()), "gpu A".into());
    assert!(a.get("k1").is_none());
    a.put("k1", json!({"tile_rows": 256, "group": 4}));
    a.put("k2", json!(7));
    assert_eq!(a.status(), None, "a write into a new directory failed");
    let mut b = TuneCache::new(Some(p.clone()), "gpu B".into());
    assert!(b.get("k1").is_none(), "adapter B sees adapter A's entry");
    b.put("k1", json!(1));
    // a fresh cache of adapter A reads both of its entries back, and B's write kept them
    let mut a2 = TuneCache::new(Some(p.clone()), "gpu A".into());
    assert_eq!(a2.get("k1"), Some(json!({"tile_rows": 256, "group": 4})));
    assert_eq!(a2.get("k2"), Some(json!(7)));
    assert_eq!(a2.len(), 2);
    let mut b2 = TuneCache::new(Some(p.clone()), "gpu B".into());
    assert_eq!(b2.get("k1"), Some(json!(1)));
    let _ = std::fs::remove_dir_all(p.parent().unwrap().parent().unwrap());
}

#[test]
fn a_corrupt_file_is_ignored_with_a_reason() {
    let p = temp_file("corrupt");
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, b"{ not json").unwrap();
    let mut c = TuneCache::new(Some(p.clone()), "gpu".into());
    assert!(c.get("k").is_none());
    let why = c
        .status()
        .expect("the parse failure is reported")
        .to_string();
    assert!(why.contains("not a tuning cache"), "{why}");
    // the next store replaces the file with a valid one
    c.put("k", json!(3));
    let mut again = TuneCache::new(Some(p.clone()), "gpu".into());
    assert_eq!(again.get("k"), Some(json!(3)));
    assert_eq!(again.status(), None);
    let _ = std::fs::remove_dir_all(p.parent().unwrap().parent().unwrap());
}

#[test]
fn memory_only_and_unwritable_files_keep_choices_in_memory() {
    let mut m = TuneCache::new(None, "gpu".into());
    m.put("k", json!(1));
    assert_eq!(m.get("k"), Some(json!(1)));
    assert_eq!(m.status(), None);
    // a "directory" that is a file: the write fails, the value stays in memory
    let p = temp_file("unwritable");
    std::fs::create_dir_all(p.parent().unwrap().parent().unwrap()).unwrap();
    std::fs::write(p.parent().unwrap(), b"a file").unwrap();
    let mut u = TuneCache::new(Some(p.clone()), "gpu".into());
    u.put("k", json!(2));
    assert_eq!(u.get("k"), Some(json!(2)));
    assert!(u.status().is_some(), "the failed write is reported");
    let _ = std::fs::remove_dir_all(p.parent().unwrap().parent().unwrap());
}

/// Where the tensor-core kernel does not run (the software driver in CI), `tune_linear` has
/// nothing to tune; on a GPU with it, every shape gets a candidate configuration, timed, and a
/// second call takes it from the cache.
#[test]
fn tune_linear_times_candidates_only_where_the_tensor_core_kernel_runs() {
    use nabla::ops::linear::{CoopConfig, tune_linear};
    let g = common::gpu();
    let shapes = [(640usize, 256usize, 128usize), (300, 136, 64)];
    let r = tune_linear(g, &shapes, DType::BF16, DType::F32, true).unwrap();
    if g.caps().coop_subgroup().is_none() || !g.caps().timestamps {
        assert!(r.is_empty(), "tuned without a tensor-core kernel: {r:?}");
        return;
    }
    assert_eq!(r.len(), 2);
    for t in &r {
        assert!(CoopConfig::CANDIDATES.contains(&t.chosen), "{t:?}");
        assert!(
            !t.times.is_empty() && t.times.iter().all(|x| x.1 > 0.0),
            "{t:?}"
        );
        let best = t.times.iter().map(|x| x.1).fold(f64::INFINITY, f64::min);
        assert!(
            t.times.iter().any(|x| x.0 == t.chosen && x.1 == best),
            "{t:?}"
        );
    }
    let again = tune_linear(g, &shapes, DType::BF16, DType::F32, false).unwrap();
    for (a, b) in r.iter().zip(&again) {
        assert!(
            b.times.is_empty(),
            "timed again instead of taken from the cache"
        );
        assert_eq!(a.chosen, b.chosen);
    }
}
