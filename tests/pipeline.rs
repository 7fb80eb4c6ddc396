//! The text-to-video pipeline end to end on the demo's tiny random-weight models (any adapter,
//! the software Vulkan driver in CI), kept small: 128×128, 5 frames, 2 steps. Also progress,
//! cancellation, STA's dense first steps, and the errors for bad inputs and checkpoints.

mod common;

use common::gpu;
use nabla::SparseAlgo;
use nabla::wan::WeightPrecision;
use nabla::wan::pipeline::{
    GenerateOptions, Pipeline, Progress, Stage, Task, check_checkpoint_dir, files, is_cancelled,
    parse_size, plan, write_demo_checkpoint,
};
use openh264::decoder::Decoder;
use openh264::formats::YUVSource;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One pipeline per test binary would need a `'static` borrow; the demo builds in well under a
/// second, so each test builds its own, serialised to keep the software driver's threads free.
static LOCK: Mutex<()> = Mutex::new(());

fn tmp_dir(tag: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("pipeline_tests")
        .join(format!("{}_{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn small(prompt: &str) -> GenerateOptions {
    GenerateOptions {
        size: (128, 128),
        frame_num: 5,
        steps: 2,
        ..GenerateOptions::demo(prompt)
    }
}

/// Parses an `.mp4` and decodes every frame: returns (frames, width, height).
fn decode_mp4(bytes: &[u8]) -> (usize, usize, usize) {
    let mut reader =
        mp4::Mp4Reader::read_header(std::io::Cursor::new(bytes), bytes.len() as u64).unwrap();
    let (&id, track) = reader.tracks().iter().next().expect("a track");
    assert_eq!(track.media_type().unwrap(), mp4::MediaType::H264);
    let (w, h) = (track.width() as usize, track.height() as usize);
    let n = track.sample_count() as usize;
    let sps = track.sequence_parameter_set().unwrap().to_vec();
    let pps = track.picture_parameter_set().unwrap().to_vec();
    let mut dec = Decoder::new().unwrap();
    let mut head = Vec::new();
    for ps in [&sps, &pps] {
        head.extend_from_slice(&[0, 0, 0, 1]);
        head.extend_from_slice(ps);
    }
    assert!(dec.decode(&head).unwrap().is_none());
    let mut decoded = 0;
    for s in 1..=n as u32 {
        let sample = reader.read_sample(id, s).unwrap().unwrap();
        let data = &sample.bytes[..];
        let mut annexb = Vec::new();
        let mut at = 0;
        while at < data.len() {
            let len = u32::from_be_bytes(data[at..at + 4].try_into().unwrap()) as usize;
            annexb.extend_from_slice(&[0, 0, 0, 1]);
            annexb.extend_from_slice(&data[at + 4..at + 4 + len]);
            at += 4 + len;
        }
        let pic = dec.decode(&annexb).unwrap().expect("a picture per sample");
        assert_eq!(pic.dimensions(), (w, h));
        decoded += 1;
    }
    (decoded, w, h)
}

#[test]
fn demo_end_to_end_writes_a_decodable_mp4() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut pipe = Pipeline::demo(gpu()).unwrap();
    assert_eq!(pipe.task(), Task::Demo);
    let opts = small("a cat walks on the grass");
    let mut events = Vec::new();
    let video = pipe
        .generate(&opts, |p| {
            events.push(p);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(
        (video.frames, video.height, video.width),
        (5, 128, 128),
        "video shape"
    );
    assert_eq!(video.data.len(), 3 * 5 * 128 * 128);
    assert!(video.data.iter().all(|x| (-1.0..=1.0).contains(x)));
    assert!(!video.prompt_truncated);
    assert_eq!(video.plan.latent, (2, 16, 16));
    assert_eq!(video.plan.blocks, Some(2));
    assert_eq!(video.timings.steps.len(), 2);
    // not a constant image: the random models still produce structure-free but varied pixels
    let mean = video.data.iter().sum::<f32>() / video.data.len() as f32;
    assert!(video.data.iter().any(|x| (x - mean).abs() > 1e-3));
    let saturated = video.data.iter().filter(|x| x.abs() >= 1.0).count();
    eprintln!(
        "video mean {mean}, saturated {saturated} of {}",
        video.data.len()
    );
    assert!(saturated * 2 < video.data.len(), "mostly clipped pixels");

    let stages: Vec<&Progress> = events
        .iter()
        .filter(|p| !matches!(p, Progress::Note(_)))
        .collect();
    assert!(matches!(stages[0], Progress::Stage(Stage::Encode)));
    assert!(matches!(stages[1], Progress::Stage(Stage::Denoise)));
    assert!(matches!(
        stages[2],
        Progress::Step {
            step: 1,
            steps: 2,
            sparse: true,
            ..
        }
    ));
    assert!(matches!(stages[3], Progress::Step { step: 2, .. }));
    assert!(matches!(stages[4], Progress::Stage(Stage::Decode)));

    let out = tmp_dir("e2e").join("demo.mp4");
    let info = video.write_mp4(&out).unwrap();
    assert_eq!((info.frames, info.width, info.height), (5, 128, 128));
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(decode_mp4(&bytes), (5, 128, 128));
}

#[test]
fn cancellation_truncation_and_sta_dense_steps() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut pipe = Pipeline::demo(gpu()).unwrap();

    // cancel after the first step: an error that says so, and no further events
    let mut steps_seen = 0;
    let e = pipe
        .generate(&small("a dog runs"), |p| {
            if let Progress::Step { .. } = p {
                steps_seen += 1;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        })
        .unwrap_err();
    assert!(is_cancelled(&e), "{e}");
    assert!(e.to_string().contains("cancelled"), "{e}");
    assert_eq!(steps_seen, 1);

    // a prompt longer than the text length (64 for the demo) is cut, with a note; STA-only
    // runs dense for the first 12 steps (stopped before the VAE to stay cheap)
    let long = "the cat ".repeat(80);
    let opts = GenerateOptions {
        steps: 13,
        sparse_algo: Some("sta-3-3-3".parse::<SparseAlgo>().unwrap()),
        ..small(&long)
    };
    let mut notes = Vec::new();
    let mut sparse = Vec::new();
    let e = pipe
        .generate(&opts, |p| match p {
            Progress::Note(n) => {
                notes.push(n);
                ControlFlow::Continue(())
            }
            Progress::Step { sparse: s, .. } => {
                sparse.push(s);
                ControlFlow::Continue(())
            }
            Progress::Stage(Stage::Decode) => ControlFlow::Break(()),
            Progress::Stage(_) => ControlFlow::Continue(()),
        })
        .unwrap_err();
    assert!(is_cancelled(&e));
    assert!(
        notes
            .iter()
            .any(|n| n.contains("prompt") && n.contains("cut")),
        "{notes:?}"
    );
    let mut want = vec![false; 12];
    want.push(true);
    assert_eq!(sparse, want);

    // the pipeline still works after a cancelled run
    let v = pipe
        .generate(
            &GenerateOptions {
                steps: 1,
                sparse_algo: None,
                solver: "dpm++".parse().unwrap(),
                ..small("a bird")
            },
            |_| ControlFlow::Continue(()),
        )
        .unwrap();
    assert_eq!((v.frames, v.height, v.width), (5, 128, 128));
    assert!(v.plan.blocks.is_none());

    // the same seed gives the same video, another seed another one
    let opts = GenerateOptions {
        steps: 1,
        seed: 7,
        ..small("a bird")
    };
    let a = pipe.generate(&opts, |_| ControlFlow::Continue(())).unwrap();
    let b = pipe.generate(&opts, |_| ControlFlow::Continue(())).unwrap();
    assert_eq!(a.data, b.data, "same seed, same video");
    let c = pipe
        .generate(&GenerateOptions { seed: 8, ..opts }, |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_ne!(a.data, c.data, "another seed, another video");
}

#[test]
fn plans_and_bad_options() {
    // the reference's crop with sparse attention, none when dense
    let mut o = GenerateOptions::new(Task::T2v14B, "x");
    let p = plan(Task::T2v14B, &o).unwrap();
    assert_eq!(p.size, (1280, 640));
    assert_eq!(p.latent, (21, 80, 160));
    assert_eq!(p.tokens, 67_200);
    assert_eq!(p.blocks, Some(1050));
    assert!(
        p.notes.iter().any(|n| n.contains("1280*640")),
        "{:?}",
        p.notes
    );
    o.size = (832, 480);
    assert_eq!(plan(Task::T2v14B, &o).unwrap().size, (768, 384));
    o.sparse_algo = None;
    let p = plan(Task::T2v14B, &o).unwrap();
    assert_eq!((p.size, p.tokens, p.blocks), ((832, 480), 32_760, None));
    assert!(p.notes.is_empty());
    // untrained size: a note, not an error
    o.size = (1280, 720);
    let p = plan(Task::T2v1_3B, &o).unwrap();
    assert!(
        p.notes.iter().any(|n| n.contains("not one")),
        "{:?}",
        p.notes
    );

    // frame count 4k+1
    o.frame_num = 80;
    let e = plan(Task::T2v14B, &o).unwrap_err().to_string();
    assert!(
        e.contains("4k+1") && e.contains("77") && e.contains("81"),
        "{e}"
    );
    o.frame_num = 0;
    assert!(plan(Task::T2v14B, &o).is_err());
    o.frame_num = 81;
    // dense sizes must be multiples of 16; sparse ones at least 128 px
    o.size = (100, 100);
    assert!(plan(Task::Demo, &o).unwrap_err().to_string().contains("16"));
    o.sparse_algo = Some(SparseAlgo::Nabla { thr: 0.7 });
    assert!(
        plan(Task::Demo, &o)
            .unwrap_err()
            .to_string()
            .contains("128")
    );

    // tasks and sizes
    let e = "t2v-7B".parse::<Task>().unwrap_err().to_string();
    assert!(e.contains("t2v-7B") && e.contains("t2v-14B") && e.contains("t2v-1.3B"));
    assert_eq!("T2V-1.3b".parse::<Task>().unwrap(), Task::T2v1_3B);
    assert_eq!(parse_size("1280*720").unwrap(), (1280, 720));
    assert_eq!(parse_size("832x480").unwrap(), (832, 480));
    for bad in ["1280", "a*b", "0*720", "1280*"] {
        assert!(parse_size(bad).is_err(), "{bad}");
    }
}

#[test]
fn missing_checkpoint_files_are_named() {
    let dir = tmp_dir("ckpt");
    // nothing there: every file is named
    let e = check_checkpoint_dir(&dir).unwrap_err().to_string();
    for f in [
        files::DIT_SINGLE,
        files::T5_PTH,
        files::VAE_PTH,
        files::TOKENIZER,
    ] {
        assert!(e.contains(f), "{f} not in {e}");
    }
    // with the DiT and the tokenizer present, only the others are named
    std::fs::write(dir.join(files::DIT_SINGLE), b"").unwrap();
    std::fs::create_dir_all(dir.join("google/umt5-xxl")).unwrap();
    std::fs::write(dir.join(files::TOKENIZER), b"{}").unwrap();
    let e = check_checkpoint_dir(&dir).unwrap_err().to_string();
    assert!(
        e.contains(files::T5_PTH) && e.contains(files::VAE_PTH),
        "{e}"
    );
    assert!(!e.contains("the DiT") && !e.contains("tokenizer"), "{e}");

    // the pipeline reports the same before loading anything
    let e = Pipeline::from_checkpoint_dir(gpu(), &dir, Task::T2v1_3B)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains(files::VAE_PTH), "{e}");
    let e = Pipeline::from_checkpoint_dir(gpu(), dir.join("nope"), Task::T2v14B)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("nope") && e.contains("not a directory"), "{e}");
    assert!(Pipeline::from_checkpoint_dir(gpu(), &dir, Task::Demo).is_err());
}

#[test]
fn checkpoint_directory_path_matches_the_demo() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmp_dir("demockpt");
    write_demo_checkpoint(&dir).unwrap();
    check_checkpoint_dir(&dir).unwrap();
    let opts = GenerateOptions {
        steps: 1,
        seed: 3,
        ..small("a red bird")
    };
    // the checkpoint path (config.json, DiT safetensors, umT5, VAE, tokenizer.json) gives the
    // demo's video bit for bit
    let from_dir = {
        let mut p =
            Pipeline::from_checkpoint_dir_with(gpu(), &dir, Task::Demo, WeightPrecision::F32)
                .unwrap();
        assert_eq!(p.dit_config().dim, 128);
        p.generate(&opts, |_| ControlFlow::Continue(())).unwrap()
    };
    let demo = Pipeline::demo(gpu())
        .unwrap()
        .generate(&opts, |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(from_dir.data, demo.data);

    // the wrong task for the weights
    let e = Pipeline::from_checkpoint_dir(gpu(), &dir, Task::T2v1_3B)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--task") || e.contains("config"), "{e}");

    // a missing VAE is named
    std::fs::remove_file(dir.join(files::VAE_SAFETENSORS)).unwrap();
    let e = Pipeline::from_checkpoint_dir(gpu(), &dir, Task::Demo)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains(files::VAE_PTH), "{e}");
}

/// A minimal `torch.save`-style `.pth` (zip, protocol-2 pickle of an OrderedDict of f32
/// tensors, one storage each) of every tensor of a safetensors file.
fn safetensors_to_pth(src: &Path, dst: &Path) {
    use std::io::Write;
    let f = nabla::io::TensorFile::open(src).unwrap();
    let names = f.names().unwrap();
    let mut p: Vec<u8> = vec![0x80, 2];
    let s = |p: &mut Vec<u8>, x: &str| {
        p.push(b'X');
        p.extend_from_slice(&(x.len() as u32).to_le_bytes());
        p.extend_from_slice(x.as_bytes());
    };
    let int = |p: &mut Vec<u8>, x: usize| {
        p.push(b'J');
        p.extend_from_slice(&(x as i32).to_le_bytes());
    };
    let od = b"ccollections\nOrderedDict\n";
    p.extend_from_slice(od);
    p.extend_from_slice(b")R(");
    let mut storages = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let r = f.raw(name).unwrap();
        assert_eq!(r.dtype, safetensors::Dtype::F32);
        let key = i.to_string();
        s(&mut p, name);
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        s(&mut p, "storage");
        p.extend_from_slice(b"ctorch\nFloatStorage\n");
        s(&mut p, &key);
        s(&mut p, "cpu");
        int(&mut p, r.data.len() / 4);
        p.extend_from_slice(b"tQ");
        int(&mut p, 0);
        p.push(b'(');
        for &d in &r.shape {
            int(&mut p, d);
        }
        p.push(b't');
        p.push(b'(');
        let mut stride = vec![1usize; r.shape.len()];
        for k in (0..r.shape.len().saturating_sub(1)).rev() {
            stride[k] = stride[k + 1] * r.shape[k + 1];
        }
        for &d in &stride {
            int(&mut p, d);
        }
        p.push(b't');
        p.push(0x89);
        p.extend_from_slice(od);
        p.extend_from_slice(b")RtR");
        storages.push((key, r.data.to_vec()));
    }
    p.extend_from_slice(b"u.");
    let file = std::fs::File::create(dst).unwrap();
    let mut z = zip::ZipWriter::new(file);
    let o =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", o).unwrap();
    z.write_all(&p).unwrap();
    z.start_file("archive/byteorder", o).unwrap();
    z.write_all(b"little").unwrap();
    for (key, bytes) in &storages {
        z.start_file(format!("archive/data/{key}"), o).unwrap();
        z.write_all(bytes).unwrap();
    }
    z.start_file("archive/version", o).unwrap();
    z.write_all(b"3\n").unwrap();
    z.finish().unwrap();
}

#[test]
fn pth_text_encoder_and_vae_are_read() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmp_dir("pthckpt");
    write_demo_checkpoint(&dir).unwrap();
    for (st, pth) in [
        (files::T5_SAFETENSORS, files::T5_PTH),
        (files::VAE_SAFETENSORS, files::VAE_PTH),
    ] {
        safetensors_to_pth(&dir.join(st), &dir.join(pth));
        std::fs::remove_file(dir.join(st)).unwrap();
    }
    let opts = GenerateOptions {
        steps: 1,
        seed: 5,
        ..small("snow")
    };
    let from_pth = {
        let mut p =
            Pipeline::from_checkpoint_dir_with(gpu(), &dir, Task::Demo, WeightPrecision::F32)
                .unwrap();
        p.generate(&opts, |_| ControlFlow::Continue(())).unwrap()
    };
    // the encoder was converted once next to its .pth; the VAE was read in memory
    assert!(dir.join(files::T5_SAFETENSORS).is_file());
    assert!(!dir.join(files::VAE_SAFETENSORS).exists());
    let demo = Pipeline::demo(gpu())
        .unwrap()
        .generate(&opts, |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(from_pth.data, demo.data);
}
