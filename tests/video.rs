//! Video output: byte conversion as the reference does it, PNG frames that round-trip exactly,
//! and an H.264 `.mp4` that parses back (frame count, size, fast start, Baseline profile) and
//! DECODES (OpenH264's decoder) to frames close to the input. Bad input gives errors, no panic.
//! No GPU needed.

use nabla::Error;
use nabla::video::{
    DEFAULT_FPS, Mp4Options, encode_mp4_rgb8, frames_to_rgb8, to_u8, write_mp4, write_mp4_with,
    write_png_frames,
};
use openh264::decoder::Decoder;
use openh264::formats::YUVSource;
use std::path::{Path, PathBuf};

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("video-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A moving colour gradient f32 `[3, T, H, W]` in about [−1.05, 1.05] (so clamping is exercised).
fn gradient_clip(t: usize, h: usize, w: usize) -> Vec<f32> {
    let mut v = vec![0f32; 3 * t * h * w];
    for c in 0..3 {
        for f in 0..t {
            for y in 0..h {
                for x in 0..w {
                    let (fx, fy, ft) = (x as f32 / w as f32, y as f32 / h as f32, f as f32);
                    let val = match c {
                        0 => 2.1 * ((fx + 0.05 * ft).fract() - 0.5).abs() * 2.0 - 1.05,
                        1 => (std::f32::consts::TAU * (fy + 0.5 * fx) - 0.4 * ft).sin() * 0.9,
                        _ => 1.05 - 2.1 * (0.5 * fx + 0.5 * fy),
                    };
                    v[((c * t + f) * h + y) * w + x] = val;
                }
            }
        }
    }
    v
}

/// A hash of a lattice point, uniform in [0, 1).
fn hash2(x: i64, y: i64, s: u64) -> f32 {
    let mut z = (x as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (y as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
}

/// Smooth value noise in [0, 1).
fn vnoise(x: f32, y: f32, s: u64) -> f32 {
    let (xi, yi) = (x.floor() as i64, y.floor() as i64);
    let (fx, fy) = (x - x.floor(), y - y.floor());
    let (sx, sy) = (fx * fx * (3.0 - 2.0 * fx), fy * fy * (3.0 - 2.0 * fy));
    let a = hash2(xi, yi, s) * (1.0 - sx) + hash2(xi + 1, yi, s) * sx;
    let b = hash2(xi, yi + 1, s) * (1.0 - sx) + hash2(xi + 1, yi + 1, s) * sx;
    a * (1.0 - sy) + b * sy
}

/// Natural-looking clip: fractal value noise (detail in luma, smooth colour), panning.
fn natural_clip(t: usize, h: usize, w: usize) -> Vec<f32> {
    let mut v = vec![0f32; 3 * t * h * w];
    for f in 0..t {
        for y in 0..h {
            for x in 0..w {
                let (px, py) = (x as f32 + 1.5 * f as f32, y as f32 + 0.7 * f as f32);
                let mut l = 0.0;
                let mut amp = 0.5;
                let mut sc = 1.0 / 64.0;
                for o in 0..6 {
                    l += amp * (vnoise(px * sc, py * sc, o) - 0.5);
                    amp *= 0.6;
                    sc *= 2.0;
                }
                // A second layer moving the other way (non-rigid motion), and hard edges.
                let (qx, qy) = (x as f32 - 2.0 * f as f32, y as f32);
                l += 0.25 * (vnoise(qx / 6.0, qy / 6.0, 11) - 0.5);
                if vnoise(qx / 40.0, qy / 40.0, 5) > 0.6 {
                    l += 0.2;
                }
                let cb = vnoise(px / 96.0, py / 96.0, 77) - 0.5;
                let cr = vnoise(px / 80.0, py / 80.0, 99) - 0.5;
                let rgb = [l + 0.8 * cr, l - 0.3 * cr - 0.2 * cb, l + 0.9 * cb];
                for c in 0..3 {
                    v[((c * t + f) * h + y) * w + x] = 2.0 * rgb[c];
                }
            }
        }
    }
    v
}

/// Top-level MP4 boxes: (type, size).
fn top_boxes(buf: &[u8]) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at + 8 <= buf.len() {
        let mut size = u32::from_be_bytes(buf[at..at + 4].try_into().unwrap()) as u64;
        if size == 1 {
            size = u64::from_be_bytes(buf[at + 8..at + 16].try_into().unwrap());
        } else if size == 0 {
            size = (buf.len() - at) as u64;
        }
        out.push((
            String::from_utf8_lossy(&buf[at + 4..at + 8]).into_owned(),
            size,
        ));
        at += size as usize;
    }
    assert_eq!(at, buf.len(), "boxes do not tile the file");
    out
}

/// The decoded video: I420 planes per frame (tightly packed).
struct Decoded {
    w: usize,
    h: usize,
    frames: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)>,
}

fn copy_plane(src: &[u8], stride: usize, w: usize, h: usize) -> Vec<u8> {
    (0..h)
        .flat_map(|y| &src[y * stride..y * stride + w])
        .copied()
        .collect()
}

/// Parses an `.mp4` with the `mp4` crate, checks the track, and decodes every sample.
fn parse_and_decode(bytes: &[u8], t: usize, h: usize, w: usize, fps: u32) -> Decoded {
    let mut reader =
        mp4::Mp4Reader::read_header(std::io::Cursor::new(bytes), bytes.len() as u64).unwrap();
    assert_eq!(reader.tracks().len(), 1, "one video track");
    let (&id, track) = reader.tracks().iter().next().unwrap();
    assert_eq!(track.track_type().unwrap(), mp4::TrackType::Video);
    assert_eq!(track.media_type().unwrap(), mp4::MediaType::H264);
    assert_eq!((track.width() as usize, track.height() as usize), (w, h));
    assert_eq!(track.sample_count() as usize, t, "frame count");
    assert!(
        (track.frame_rate() - f64::from(fps)).abs() < 1e-6,
        "fps {}",
        track.frame_rate()
    );
    let want_ms = (t as u64 * 1000) / u64::from(fps);
    let got_ms = track.duration().as_millis() as u64;
    assert!(
        got_ms.abs_diff(want_ms) <= 1,
        "duration {got_ms} ms, want {want_ms}"
    );
    let movie_ms = reader.duration().as_millis() as u64;
    assert!(
        movie_ms.abs_diff(want_ms) <= 1,
        "movie duration {movie_ms} ms, want {want_ms}"
    );
    assert_eq!(reader.moov.mvhd.next_track_id, 2, "mvhd next_track_id");
    assert_eq!(track.trak.tkhd.flags & 3, 3, "track enabled and in movie");
    assert_eq!(track.trak.tkhd.volume.value(), 0, "video track volume");
    let profile = track.video_profile().unwrap();
    assert_eq!(profile, mp4::AvcProfile::AvcBaseline, "profile");
    let sps = track.sequence_parameter_set().unwrap().to_vec();
    let pps = track.picture_parameter_set().unwrap().to_vec();
    assert_eq!(sps[0] & 0x1f, 7);
    assert_eq!(pps[0] & 0x1f, 8);
    assert_eq!(sps[1], 66, "profile_idc 66 (Baseline)");

    let mut decoder = Decoder::new().unwrap();
    let mut annexb = Vec::new();
    for ps in [&sps, &pps] {
        annexb.extend_from_slice(&[0, 0, 0, 1]);
        annexb.extend_from_slice(ps);
    }
    assert!(decoder.decode(&annexb).unwrap().is_none());
    let mut frames = Vec::new();
    let mut keyframes = 0;
    for s in 1..=t as u32 {
        let sample = reader.read_sample(id, s).unwrap().expect("sample present");
        assert_eq!(
            sample.start_time,
            u64::from(s - 1) * 1000,
            "sample {s} start"
        );
        keyframes += usize::from(sample.is_sync);
        // AVC length-prefixed NAL units → Annex B.
        let data = &sample.bytes[..];
        let mut annexb = Vec::new();
        let mut at = 0;
        while at < data.len() {
            let n = u32::from_be_bytes(data[at..at + 4].try_into().unwrap()) as usize;
            assert!(at + 4 + n <= data.len(), "NAL length overruns sample {s}");
            annexb.extend_from_slice(&[0, 0, 0, 1]);
            annexb.extend_from_slice(&data[at + 4..at + 4 + n]);
            at += 4 + n;
        }
        let pic = decoder
            .decode(&annexb)
            .unwrap_or_else(|e| panic!("decoding sample {s}: {e}"))
            .unwrap_or_else(|| panic!("sample {s} gave no picture"));
        let (dw, dh) = pic.dimensions();
        assert_eq!((dw, dh), (w, h), "decoded size");
        let (sy, su, sv) = pic.strides();
        frames.push((
            copy_plane(pic.y(), sy, w, h),
            copy_plane(pic.u(), su, w / 2, h / 2),
            copy_plane(pic.v(), sv, w / 2, h / 2),
        ));
    }
    assert!(keyframes >= 1 && reader.read_sample(id, 1).unwrap().unwrap().is_sync);
    Decoded { w, h, frames }
}

/// BT.709 limited range YUV → RGB, written here independently of the library.
fn yuv_to_rgb(y: u8, u: u8, v: u8) -> [f64; 3] {
    let yy = (f64::from(y) - 16.0) * 255.0 / 219.0;
    let cb = (f64::from(u) - 128.0) * 255.0 / 224.0;
    let cr = (f64::from(v) - 128.0) * 255.0 / 224.0;
    let (kr, kb) = (0.2126, 0.0722);
    let kg = 1.0 - kr - kb;
    let r = yy + 2.0 * (1.0 - kr) * cr;
    let b = yy + 2.0 * (1.0 - kb) * cb;
    let g = (yy - kr * r - kb * b) / kg;
    [r, g, b].map(|c| c.clamp(0.0, 255.0))
}

fn psnr(mse: f64) -> f64 {
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

/// (RGB PSNR over the whole clip, worst per-frame RGB PSNR, luma PSNR against BT.709 luma of
/// the input).
fn compare(dec: &Decoded, rgb: &[u8]) -> (f64, f64, f64) {
    let (w, h) = (dec.w, dec.h);
    let (mut se_all, mut se_y, mut worst) = (0f64, 0f64, f64::INFINITY);
    for (f, (yp, up, vp)) in dec.frames.iter().enumerate() {
        let mut se = 0f64;
        for y in 0..h {
            for x in 0..w {
                let i = y * w + x;
                let c = (y / 2) * (w / 2) + x / 2;
                let got = yuv_to_rgb(yp[i], up[c], vp[c]);
                let want = &rgb[(f * h * w + i) * 3..(f * h * w + i) * 3 + 3];
                for k in 0..3 {
                    se += (got[k] - f64::from(want[k])).powi(2);
                }
                let luma = 16.0
                    + 219.0 / 255.0
                        * (0.2126 * f64::from(want[0])
                            + 0.7152 * f64::from(want[1])
                            + 0.0722 * f64::from(want[2]));
                se_y += (f64::from(yp[i]) - luma).powi(2);
            }
        }
        worst = worst.min(psnr(se / (3 * w * h) as f64));
        se_all += se;
    }
    let n = (dec.frames.len() * w * h) as f64;
    (psnr(se_all / (3.0 * n)), worst, psnr(se_y / n))
}

#[test]
fn to_u8_matches_the_reference_conversion() {
    assert_eq!(to_u8(-1.0), 0);
    assert_eq!(to_u8(1.0), 255);
    assert_eq!(to_u8(0.0), 127, "127.5 truncates");
    assert_eq!(to_u8(-7.0), 0, "clamped");
    assert_eq!(to_u8(3.5), 255, "clamped");
    assert_eq!(to_u8(f32::NAN), 0);
    assert_eq!(to_u8(0.999), 254, "254.87 truncates");
    // Every value against the formula written out, in f32 as torch computes it.
    for i in -1100..=1100 {
        let x = i as f32 / 1000.0;
        let want = ((x.clamp(-1.0, 1.0) + 1.0) / 2.0 * 255.0).floor() as u8;
        assert_eq!(to_u8(x), want, "x = {x}");
    }
}

#[test]
fn rgb8_is_frame_major_and_interleaved() {
    // [3, T=2, H=1, W=2]: value encodes (c, t, x).
    let (t, h, w) = (2, 1, 2);
    let mut f = vec![0f32; 3 * t * h * w];
    for c in 0..3 {
        for ti in 0..t {
            for x in 0..w {
                f[(c * t + ti) * w + x] = -1.0 + 2.0 * (c * 4 + ti * 2 + x) as f32 / 255.0;
            }
        }
    }
    let rgb = frames_to_rgb8(&f, t, h, w).unwrap();
    for ti in 0..t {
        for x in 0..w {
            for c in 0..3 {
                let want = to_u8(f[(c * t + ti) * w + x]);
                assert_eq!(rgb[(ti * w + x) * 3 + c], want);
            }
        }
    }
}

#[test]
fn png_frames_round_trip_exactly() {
    let (t, h, w) = (9, 64, 128);
    let frames = gradient_clip(t, h, w);
    let dir = scratch("png").join("sub/dir");
    let paths = write_png_frames(&dir, &frames, t, h, w).unwrap();
    assert_eq!(paths.len(), t);
    let rgb = frames_to_rgb8(&frames, t, h, w).unwrap();
    for (i, p) in paths.iter().enumerate() {
        assert_eq!(p.file_name().unwrap(), format!("frame_{i:04}.png").as_str());
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(p).unwrap()));
        let mut reader = dec.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (w as u32, h as u32));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        assert_eq!(
            &buf[..info.buffer_size()],
            &rgb[i * 3 * h * w..(i + 1) * 3 * h * w]
        );
    }
}

#[test]
fn mp4_parses_back_and_decodes_close_to_the_input() {
    let (t, h, w) = (9, 64, 128);
    let frames = gradient_clip(t, h, w);
    let path = scratch("mp4").join("clip.mp4");
    let info = write_mp4(&path, &frames, t, h, w, DEFAULT_FPS).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    eprintln!("{info:?}");
    assert_eq!(info.path, path);
    assert_eq!(info.bytes, bytes.len() as u64);
    assert_eq!(
        (info.frames, info.width, info.height, info.fps),
        (t, 128, 64, 16)
    );
    assert!((info.duration_s - 9.0 / 16.0).abs() < 1e-12);
    assert!(info.codec.starts_with("avc1.42"), "codec {}", info.codec);
    assert!(info.keyframes >= 1);
    // Replacing an existing file works and leaves no temporary file behind.
    let again = write_mp4(&path, &frames, t, h, w, DEFAULT_FPS).unwrap();
    assert_eq!(again, info);
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["clip.mp4"]);

    // ftyp, then moov before mdat ("fast start"): browsers can play before the end arrives.
    let names: Vec<String> = top_boxes(&bytes).into_iter().map(|b| b.0).collect();
    assert_eq!(names.first().map(String::as_str), Some("ftyp"));
    let moov = names.iter().position(|n| n == "moov").expect("moov");
    let mdat = names.iter().position(|n| n == "mdat").expect("mdat");
    assert!(moov < mdat, "boxes {names:?}");

    let dec = parse_and_decode(&bytes, t, h, w, DEFAULT_FPS);
    let rgb = frames_to_rgb8(&frames, t, h, w).unwrap();
    let (all, worst, luma) = compare(&dec, &rgb);
    eprintln!(
        "gradient {w}×{h}×{t}: {} bytes, RGB PSNR {all:.2} dB (worst frame {worst:.2}), \
         luma PSNR {luma:.2} dB",
        bytes.len()
    );
    assert!(
        all > 30.0 && worst > 30.0,
        "RGB PSNR {all:.2} / {worst:.2} dB"
    );
    assert!(luma > 35.0, "luma PSNR {luma:.2} dB");
}

#[test]
fn textured_mp4_decodes_well() {
    // 256×128 (multiples of 128 like the pipeline), 17 frames, options other than the default.
    let (t, h, w) = (17, 128, 256);
    let frames = natural_clip(t, h, w);
    let rgb = frames_to_rgb8(&frames, t, h, w).unwrap();
    let opts = Mp4Options {
        fps: 24,
        keyframe_interval: 8,
        ..Mp4Options::default()
    };
    let start = std::time::Instant::now();
    let bytes = encode_mp4_rgb8(&rgb, t, h, w, &opts).unwrap();
    let secs = start.elapsed().as_secs_f64();
    let dec = parse_and_decode(&bytes, t, h, w, 24);
    let (all, worst, luma) = compare(&dec, &rgb);
    eprintln!(
        "natural {w}×{h}×{t}: {} bytes ({:.2} bits/pixel), encoded in {secs:.2} s, RGB PSNR \
         {all:.2} dB (worst frame {worst:.2}), luma PSNR {luma:.2} dB",
        bytes.len(),
        bytes.len() as f64 * 8.0 / (t * h * w) as f64
    );
    assert!(
        all > 30.0 && worst > 30.0,
        "RGB PSNR {all:.2} / {worst:.2} dB"
    );
    assert!(luma > 33.0, "luma PSNR {luma:.2} dB");

    // The same through the file writer gives the same bytes (deterministic encoder).
    let path = scratch("mp4-opts").join("a/b/clip.mp4");
    let info = write_mp4_with(&path, &frames, t, h, w, &opts).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert!(
        info.keyframes >= 3,
        "a keyframe every 8 frames: {}",
        info.keyframes
    );
}

#[track_caller]
fn expect_err<T: std::fmt::Debug>(
    r: nabla::Result<T>,
    is_kind: fn(&Error) -> bool,
    needles: &[&str],
) {
    let e = r.expect_err("expected an error");
    assert!(is_kind(&e), "unexpected error kind {e:?}");
    let msg = e.to_string();
    for n in needles {
        assert!(msg.contains(n), "message {msg:?} lacks {n:?}");
    }
}

#[test]
fn bad_input_gives_clear_errors() {
    let shape = |e: &Error| matches!(e, Error::Shape(_));
    let invalid = |e: &Error| matches!(e, Error::Invalid(_));
    let file = |e: &Error| matches!(e, Error::File { .. });
    let dir = scratch("errors");
    let out = dir.join("x.mp4");
    let (t, h, w) = (2, 64, 128);
    let frames = gradient_clip(t, h, w);

    // Wrong buffer length, with a hint when it is a whole number of frames.
    expect_err(
        write_mp4(&out, &frames[1..], t, h, w, 16),
        shape,
        &["f32 [3, T, H, W]", "T=2, H=64, W=128", "49152", "49151"],
    );
    expect_err(
        write_mp4(&out, &frames, 4, h, w, 16),
        shape,
        &["T=4, H=64, W=128", "T = 2 frames"],
    );
    expect_err(
        write_png_frames(&dir, &frames[..7], t, h, w),
        shape,
        &["T=2, H=64, W=128"],
    );
    expect_err(
        frames_to_rgb8(&frames, t, h, 0),
        shape,
        &["at least one frame"],
    );
    expect_err(write_mp4(&out, &[], 0, h, w, 16), shape, &["T=0"]);

    // Odd sizes.
    let odd = vec![0f32; 3 * 2 * 63 * 128];
    expect_err(
        write_mp4(&out, &odd, 2, 63, 128, 16),
        shape,
        &["even", "128×63"],
    );
    let odd = vec![0f32; 3 * 2 * 64 * 127];
    expect_err(
        write_mp4(&out, &odd, 2, 64, 127, 16),
        shape,
        &["even", "127×64"],
    );
    assert!(!out.exists(), "a failed call leaves no file");
    // Odd sizes are fine for PNG.
    assert_eq!(
        write_png_frames(dir.join("odd"), &odd, 2, 64, 127)
            .unwrap()
            .len(),
        2
    );

    // Too large for OpenH264, bad fps / options.
    let rgb = vec![0u8; 3 * 2 * 3842];
    expect_err(
        encode_mp4_rgb8(&rgb, 1, 2, 3842, &Mp4Options::default()),
        shape,
        &["3840", "3842×2"],
    );
    expect_err(
        encode_mp4_rgb8(&rgb[1..], 1, 2, 3842, &Mp4Options::default()),
        shape,
        &["u8 [T, H, W, 3]"],
    );
    expect_err(
        write_mp4(&out, &frames, t, h, w, 0),
        invalid,
        &["frame rate", "got 0"],
    );
    let bad_qp = Mp4Options {
        max_qp: 60,
        ..Mp4Options::default()
    };
    expect_err(
        write_mp4_with(&out, &frames, t, h, w, &bad_qp),
        invalid,
        &["max_qp"],
    );
    let bad_rate = Mp4Options {
        bitrate: Some(0),
        ..Mp4Options::default()
    };
    expect_err(
        write_mp4_with(&out, &frames, t, h, w, &bad_rate),
        invalid,
        &["bitrate"],
    );

    // Unwritable paths: a directory in place of the file, a file in place of a directory.
    expect_err(
        write_mp4(&dir, &frames, t, h, w, 16),
        file,
        &["video-errors", "is a directory"],
    );
    let plain = dir.join("plain.txt");
    std::fs::write(&plain, b"x").unwrap();
    expect_err(
        write_mp4(plain.join("x.mp4"), &frames, t, h, w, 16),
        file,
        &["plain.txt", "directory"],
    );
    expect_err(
        write_png_frames(&plain, &frames, t, h, w),
        file,
        &["plain.txt", "frame directory"],
    );
}

/// Quality and speed at the 832×480 pipeline size with the default options (slow in debug
/// builds, so opt-in: `cargo test --release --test video -- --ignored --nocapture`).
#[test]
#[ignore]
fn quality_at_pipeline_size() {
    let (t, h, w) = (17, 480, 832);
    let frames = natural_clip(t, h, w);
    let rgb = frames_to_rgb8(&frames, t, h, w).unwrap();
    for max_qp in [26u8, 20] {
        let opts = Mp4Options {
            max_qp,
            ..Mp4Options::default()
        };
        let start = std::time::Instant::now();
        let bytes = encode_mp4_rgb8(&rgb, t, h, w, &opts).unwrap();
        let secs = start.elapsed().as_secs_f64();
        let dec = parse_and_decode(&bytes, t, h, w, DEFAULT_FPS);
        let (all, worst, luma) = compare(&dec, &rgb);
        eprintln!(
            "natural {w}×{h}×{t}, max_qp {max_qp}: {:.3} bits/pixel, {:.1} frames/s, RGB PSNR \
             {all:.2} dB (worst frame {worst:.2}), luma PSNR {luma:.2} dB",
            bytes.len() as f64 * 8.0 / (t * h * w) as f64,
            t as f64 / secs
        );
        assert!(worst > 33.0, "RGB PSNR {worst:.2} dB");
    }
    let info = write_mp4(scratch("quality").join("q.mp4"), &frames, t, h, w, 16).unwrap();
    eprintln!("{info:?}");
}
