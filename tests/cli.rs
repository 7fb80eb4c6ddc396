//! The `nabla generate` and `nabla demo` commands through the built binary: a tiny demo run
//! writes an mp4 of the frame count and size asked for, and bad input fails with messages that
//! name the problem (unknown task, frame count, missing checkpoint files).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn nabla(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nabla"))
        .args(args)
        .output()
        .expect("running the nabla binary")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tmp_dir(tag: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("cli_tests")
        .join(format!("{}_{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn demo_writes_the_requested_mp4() {
    let out = tmp_dir("demo").join("tiny.mp4");
    let o = nabla(&[
        "demo",
        "--size",
        "128*128",
        "--frame-num",
        "5",
        "--sample-steps",
        "2",
        "--mask-stats",
        "--save-file",
        out.to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "demo failed:\n{err}");
    assert!(err.contains("RANDOM WEIGHTS") && err.contains("not a trained model"));
    assert!(err.contains("timings:") && err.contains("decode"), "{err}");
    assert!(err.contains("memory:"), "{err}");
    assert!(err.contains("mask density"), "{err}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("wrote"));
    let bytes = std::fs::read(&out).expect("the mp4 exists");
    let reader =
        mp4::Mp4Reader::read_header(std::io::Cursor::new(&bytes), bytes.len() as u64).unwrap();
    let track = reader.tracks().values().next().expect("a video track");
    assert_eq!(track.sample_count(), 5, "frames");
    assert_eq!((track.width(), track.height()), (128, 128));
}

#[test]
fn generate_rejects_bad_input_clearly() {
    let empty = tmp_dir("empty");
    let dir = empty.to_str().unwrap();

    let o = nabla(&[
        "generate",
        "--task",
        "t2v-7B",
        "--ckpt-dir",
        dir,
        "--prompt",
        "x",
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("unknown task") && e.contains("t2v-1.3B"), "{e}");

    let o = nabla(&[
        "generate",
        "--task",
        "t2v-1.3B",
        "--ckpt-dir",
        dir,
        "--prompt",
        "x",
        "--frame-num",
        "80",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("4k+1"), "{}", stderr(&o));

    let o = nabla(&[
        "generate",
        "--task",
        "t2v-1.3B",
        "--ckpt-dir",
        dir,
        "--prompt",
        "x",
        "--sparse-algo",
        "nabla-2",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("nabla-2"), "{}", stderr(&o));

    // an empty checkpoint directory: every missing file is named
    let o = nabla(&[
        "generate",
        "--task",
        "t2v-1.3B",
        "--ckpt-dir",
        dir,
        "--prompt",
        "x",
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    for f in [
        "diffusion_pytorch_model.safetensors",
        "models_t5_umt5-xxl-enc-bf16.pth",
        "Wan2.1_VAE.pth",
        "tokenizer.json",
    ] {
        assert!(e.contains(f), "{f} not in {e}");
    }

    let o = nabla(&["generate", "--task", "t2v-1.3B", "--ckpt-dir", dir]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--prompt"), "{}", stderr(&o));
}

#[test]
fn help_says_how_the_video_is_written() {
    for cmd in ["generate", "demo"] {
        let o = nabla(&[cmd, "--help"]);
        assert!(o.status.success());
        let h = String::from_utf8_lossy(&o.stdout);
        assert!(h.contains("H.264") && h.contains("OpenH264"), "{h}");
        for flag in [
            "--size",
            "--frame-num",
            "--prompt",
            "--negative-prompt",
            "--sparse-algo",
            "--sample-solver",
            "--sample-steps",
            "--sample-shift",
            "--sample-guide-scale",
            "--base-seed",
            "--save-file",
        ] {
            assert!(h.contains(flag), "{cmd} --help lacks {flag}");
        }
    }
    let h = String::from_utf8_lossy(&nabla(&["generate", "--help"]).stdout).into_owned();
    assert!(h.contains("--task") && h.contains("--ckpt-dir"));
}

#[test]
fn generate_runs_a_demo_checkpoint_directory() {
    let dir = tmp_dir("ckpt");
    let ckpt = dir.join("demo-ckpt");
    let o = nabla(&["demo", "--write-checkpoint", ckpt.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.join("gen.mp4");
    let o = nabla(&[
        "generate",
        "--task",
        "demo",
        "--ckpt-dir",
        ckpt.to_str().unwrap(),
        "--prompt",
        "a cat",
        "--size",
        "128*128",
        "--frame-num",
        "5",
        "--sample-steps",
        "1",
        "--sparse-algo",
        "none",
        "--save-file",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("dense attention"), "{}", stderr(&o));
    let bytes = std::fs::read(&out).expect("the mp4 exists");
    let reader =
        mp4::Mp4Reader::read_header(std::io::Cursor::new(&bytes), bytes.len() as u64).unwrap();
    let track = reader.tracks().values().next().expect("a video track");
    assert_eq!(track.sample_count(), 5);
    assert_eq!((track.width(), track.height()), (128, 128));
}

/// `--png-frames` writes every frame and `--mask-heatmaps` one PNG per layer and reported step.
#[test]
fn demo_writes_png_frames_and_mask_heatmaps() {
    let dir = std::env::temp_dir().join(format!("nabla-cli-png-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nabla"))
        .args([
            "demo",
            "--size",
            "128*128",
            "--frame-num",
            "5",
            "--sample-steps",
            "2",
            "--quiet",
        ])
        .arg("--save-file")
        .arg(dir.join("v.mp4"))
        .arg("--png-frames")
        .arg(dir.join("frames"))
        .arg("--mask-heatmaps")
        .arg(dir.join("masks"))
        .output()
        .expect("run nabla demo");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let frames: Vec<_> = std::fs::read_dir(dir.join("frames")).unwrap().collect();
    assert_eq!(frames.len(), 5, "one PNG per frame");
    let first = dir.join("frames").join("frame_0000.png");
    let dec = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&first).unwrap(),
    ));
    let info = dec.read_info().unwrap().info().clone();
    assert_eq!((info.width, info.height), (128, 128));
    // two DiT layers x two reported steps (first sparse step and last step)
    let masks: Vec<_> = std::fs::read_dir(dir.join("masks")).unwrap().collect();
    assert_eq!(masks.len(), 4, "mask heatmaps");
}

/// `nabla mask`: densities per head, a shared STA mask, the heatmap, and `--backend cuda` in a
/// build without the CUDA layer refused with a message that says how to get it.
#[test]
fn mask_command_prints_densities_and_writes_a_heatmap() {
    let dir = tmp_dir("mask");
    for (algo, shared) in [("nabla-0.7", false), ("sta-3-3-3", true)] {
        let png = dir.join(format!("{algo}.png"));
        let o = nabla(&[
            "mask",
            "--grid",
            "3,16,24",
            "--heads",
            "2",
            "--head-dim",
            "64",
            "--sparse-algo",
            algo,
            "--backend",
            "wgpu",
            "--png",
            png.to_str().unwrap(),
        ]);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(o.status.success(), "{algo}: {}", stderr(&o));
        assert!(out.contains("= 18 blocks"), "{out}");
        let heads = out.lines().filter(|l| l.starts_with("head ")).count();
        assert_eq!(heads, if shared { 1 } else { 2 }, "{out}");
        assert_eq!(
            out.contains("one mask shared by all 2 heads"),
            shared,
            "{out}"
        );
        let mean: f64 = out
            .lines()
            .find_map(|l| l.strip_prefix("mean density "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("mean density line");
        assert!(mean > 0.0 && mean <= 1.0, "{out}");
        assert!(std::fs::metadata(&png).unwrap().len() > 0);
    }
    if !cfg!(feature = "cuda") {
        let o = nabla(&["mask", "--grid", "3,16,24", "--backend", "cuda"]);
        assert!(!o.status.success());
        assert!(stderr(&o).contains("--features cuda"), "{}", stderr(&o));
    }
}

/// `bench attention` on the wgpu layer times the mask with its pooling fused into the RoPE +
/// head split (a small custom shape, so it runs on the software driver in seconds).
#[test]
fn bench_attention_times_the_fused_pooling() {
    let json = tmp_dir("bench").join("attn.json");
    let o = nabla(&[
        "bench",
        "attention",
        "--shape",
        "1,2,128,64",
        "--sparse-algo",
        "nabla-0.5,sta-1-1-1",
        "--reps",
        "1",
        "--dense-reps",
        "0",
        "--json",
        json.to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "bench failed:\n{err}");
    assert!(err.contains("mask stages: pool"), "{err}");
    assert!(
        err.contains("mask with pooling fused into RoPE")
            && err.contains("rope+pool")
            && err.contains("scores, softmax, threshold, lists"),
        "{err}"
    );
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = doc["mask_fused_pooling"].as_array().expect("fused rows");
    assert_eq!(rows.len(), 1, "one NABLA algorithm: {rows:?}");
    assert_eq!(rows[0]["algo"], "nabla-0.5");
    for k in ["rope_ms", "rope_pool_ms", "prepooled_mask_ms"] {
        let v = rows[0][k].as_f64().unwrap_or(f64::NAN);
        assert!(v.is_finite() && v > 0.0, "{k} = {v}");
    }
}

#[test]
fn bench_gemm_times_only_the_shapes_asked_for() {
    let json = tmp_dir("gemm").join("gemm.json");
    let o = nabla(&[
        "bench",
        "gemm",
        "--kernels",
        "portable",
        "--shapes",
        " 1.3B QKVO ",
        "--tokens",
        "64",
        "--reps",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "bench failed:\n{}", stderr(&o));
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = doc["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 1, "one shape, one kernel: {rows:?}");
    assert_eq!(rows[0]["shape"], "1.3B qkvo 1536->1536");
    assert_eq!(rows[0]["m"], 64);
    let ms = rows[0]["ms"].as_f64().unwrap_or(f64::NAN);
    assert!(ms.is_finite() && ms > 0.0, "ms = {ms}");

    let bad = nabla(&["bench", "gemm", "--kernels", "portable", "--shapes", "nope"]);
    let err = stderr(&bad);
    assert!(!bad.status.success(), "an unknown shape must fail");
    assert!(
        err.contains("--shapes \"nope\" matches none") && err.contains("square 4096"),
        "{err}"
    );
}

/// `NABLA_FEATURES_OFF` opens the device without the features it names (`info` shows them off)
/// and refuses a name it does not know, listing the valid ones.
#[test]
fn features_off_are_honoured_and_checked() {
    let run = |off: &str| {
        Command::new(env!("CARGO_BIN_EXE_nabla"))
            .args(["selftest", "--backend", "wgpu", "--seed", "3"])
            .env("NABLA_FEATURES_OFF", off)
            .output()
            .expect("running the nabla binary")
    };
    let o = run("bogus");
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("NABLA_FEATURES_OFF") && e.contains("\"bogus\"") && e.contains("i16, subgroups"),
        "{e}"
    );
    let o = Command::new(env!("CARGO_BIN_EXE_nabla"))
        .arg("info")
        .env("NABLA_FEATURES_OFF", "i16, Subgroups")
        .output()
        .expect("running the nabla binary");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", stderr(&o));
    let line = |key: &str| {
        out.lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key:?} line in {out}"))
            .to_string()
    };
    assert!(line("shader i16").ends_with("no"), "{out}");
    assert!(line("subgroups").contains(" no "), "{out}");
}
