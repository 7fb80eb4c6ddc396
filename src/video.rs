//! Video output of the text-to-video pipeline: the VAE's frames as an H.264 `.mp4` or as PNG
//! frames.
//!
//! Frames come in as the VAE output: f32 `[3, T, H, W]`, channel-first, values in [−1, 1]. Every
//! value becomes one byte exactly as the reference does it (spec §5.6; see [`to_u8`]):
//! `u8 = trunc((clamp(x, −1, 1) + 1) / 2 · 255)`.
//!
//! **MP4 backend.** [`write_mp4`] is built in: no `ffmpeg` or other program is needed. It encodes
//! with Cisco's OpenH264 (compiled from its C++ source into the binary by the `openh264` crate;
//! without its x86 assembly when `nasm` is absent at build time), writes H.264 Constrained
//! Baseline profile, 4:2:0 (`yuv420p`), BT.709 limited range (signalled in the stream), and
//! muxes it with the `mp4` crate into an `.mp4` whose index (`moov`) precedes the data ("fast
//! start"), so browsers play it at once. The reference writes with libx264 at 16 fps; the frames,
//! their count and rate match, the bitstream naturally does not.
//!
//! **PNG frames.** [`write_png_frames`] writes every frame losslessly as `frame_0000.png`, ….

use crate::error::{Error, Result};
use openh264::OpenH264API;
use openh264::Timestamp;
use openh264::encoder::{
    BitRate, Complexity, Encoder, EncoderConfig, FrameRate, IntraFramePeriod, Profile, QpRange,
    RateControlMode, UsageType, VuiConfig,
};
use openh264::formats::YUVBuffer;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Frame rate of the reference pipeline (Wan 2.1 writes its videos at 16 frames per second).
pub const DEFAULT_FPS: u32 = 16;

/// Largest frame rate [`write_mp4`] accepts.
pub const MAX_FPS: u32 = 240;

/// Largest long side of a frame OpenH264 encodes: 3840 × 2160 in either orientation.
pub const MAX_LONG_SIDE: usize = 3840;
/// Largest short side of a frame OpenH264 encodes (see [`MAX_LONG_SIDE`]).
pub const MAX_SHORT_SIDE: usize = 2160;

/// Default bitrate target in bits per pixel (per frame) when [`Mp4Options::bitrate`] is `None`:
/// 832×480 at 16 fps aims at about 2.6 Mbit/s, 1280×720 at about 5.9 Mbit/s.
pub const DEFAULT_BITS_PER_PIXEL: f64 = 0.4;

/// OpenH264 raises smaller quantizers to 12 when its rate control is on (and a 0 would reset the
/// whole range to its defaults).
const MIN_QP: u8 = 12;

/// Settings of the H.264 encoder behind [`write_mp4_with`] and [`encode_mp4_rgb8`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mp4Options {
    /// Frames per second, 1 ..= [`MAX_FPS`]; [`DEFAULT_FPS`] (16) by default.
    pub fps: u32,
    /// Target bitrate in bits per second; `None` (the default) means
    /// [`DEFAULT_BITS_PER_PIXEL`] · width · height · fps. The rate control aims at it but never
    /// uses a quantizer above [`max_qp`](Self::max_qp), so detailed content may take more.
    pub bitrate: Option<u32>,
    /// The largest quantizer the rate control may choose, 0 ..= 51 (lower: better quality and a
    /// larger file); it takes precedence over the bitrate. The default, 20, keeps fine detail
    /// (about 42 dB luma PSNR on strongly textured 832×480 test content, which then takes about
    /// 1.1 bits per pixel); simple content stays near the bitrate target with even smaller
    /// quantizers. OpenH264 uses at least 12.
    pub max_qp: u8,
    /// A keyframe every this many frames (0: only the first frame). The default, 32, is two
    /// seconds at 16 fps, so a browser can seek.
    pub keyframe_interval: u32,
}

impl Default for Mp4Options {
    fn default() -> Self {
        Mp4Options {
            fps: DEFAULT_FPS,
            bitrate: None,
            max_qp: 20,
            keyframe_interval: 32,
        }
    }
}

/// What [`write_mp4`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Mp4Info {
    /// The file written.
    pub path: PathBuf,
    /// Number of frames (T).
    pub frames: usize,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Frames per second.
    pub fps: u32,
    /// Duration in seconds (`frames / fps`).
    pub duration_s: f64,
    /// File size in bytes.
    pub bytes: u64,
    /// Number of keyframes (IDR pictures).
    pub keyframes: usize,
    /// The RFC 6381 codec string for HTML `<video>`/`<source type=…>`, e.g. `avc1.42c01e`
    /// (`42` = Baseline profile, `c0` = constrained, `1e` = level 3.0).
    pub codec: String,
}

/// One value of the VAE output as a byte, exactly as the reference converts it:
/// `trunc((clamp(x, −1, 1) + 1) / 2 · 255)`, computed in f32. NaN becomes 0.
#[inline]
pub fn to_u8(x: f32) -> u8 {
    // `as u8` truncates toward zero, like torch's `.type(torch.uint8)` on values inside
    // [0, 255]; it maps NaN to 0.
    ((x.clamp(-1.0, 1.0) + 1.0) / 2.0 * 255.0) as u8
}

const F32_LAYOUT: &str = "f32 [3, T, H, W] (channel-first)";
const U8_LAYOUT: &str = "u8 [T, H, W, 3] (interleaved RGB)";

/// Checks that `len` values hold `T` frames of `H×W` in `layout` and returns `T·H·W`.
fn check_frames(len: usize, t: usize, h: usize, w: usize, layout: &str) -> Result<usize> {
    if t == 0 || h == 0 || w == 0 {
        return Err(Error::shape(format!(
            "a video needs at least one frame of at least 1×1 pixels, got T={t}, H={h}, W={w}"
        )));
    }
    let pixels = t
        .checked_mul(h)
        .and_then(|x| x.checked_mul(w))
        .filter(|x| x.checked_mul(3).is_some())
        .ok_or_else(|| Error::shape(format!("a video of T={t}, H={h}, W={w} is too large")))?;
    let expected = 3 * pixels;
    if len != expected {
        let frame = 3 * h * w;
        let hint = if len > 0 && len.is_multiple_of(frame) {
            format!(" (that many values would be T = {} frames)", len / frame)
        } else {
            String::new()
        };
        return Err(Error::shape(format!(
            "video frames must be {layout} with T={t}, H={h}, W={w}, that is {expected} values, \
             but the buffer has {len}{hint}"
        )));
    }
    Ok(pixels)
}

/// Frame `i` of the checked f32 `[3, T, H, W]` buffer as interleaved RGB bytes into `out`.
fn frame_rgb8(frames: &[f32], t: usize, hw: usize, i: usize, out: &mut [u8]) {
    for c in 0..3 {
        let plane = &frames[(c * t + i) * hw..(c * t + i + 1) * hw];
        for (dst, &x) in out[c..].iter_mut().step_by(3).zip(plane) {
            *dst = to_u8(x);
        }
    }
}

/// Converts VAE frames f32 `[3, T, H, W]` in [−1, 1] to interleaved bytes `[T, H, W, 3]` (RGB),
/// each value through [`to_u8`].
///
/// Errors ([`Error::Shape`]) when `frames.len() != 3·T·H·W` or a size is zero.
pub fn frames_to_rgb8(frames: &[f32], t: usize, h: usize, w: usize) -> Result<Vec<u8>> {
    let pixels = check_frames(frames.len(), t, h, w, F32_LAYOUT)?;
    let mut rgb = vec![0u8; 3 * pixels];
    for (i, out) in rgb.chunks_exact_mut(3 * h * w).enumerate() {
        frame_rgb8(frames, t, h * w, i, out);
    }
    Ok(rgb)
}

/// Writes every frame of f32 `[3, T, H, W]` VAE output (values in [−1, 1]) as an 8-bit RGB PNG
/// `frame_0000.png`, `frame_0001.png`, … into `dir` (created if missing), losslessly, with the
/// bytes of [`frames_to_rgb8`]. Any size works, odd ones too. Returns the paths in frame order.
///
/// Errors: wrong buffer length or zero size ([`Error::Shape`]); a directory that cannot be created
/// or a file that cannot be written ([`Error::File`]).
pub fn write_png_frames(
    dir: impl AsRef<Path>,
    frames: &[f32],
    t: usize,
    h: usize,
    w: usize,
) -> Result<Vec<PathBuf>> {
    let dir = dir.as_ref();
    check_frames(frames.len(), t, h, w, F32_LAYOUT)?;
    let (Ok(w32), Ok(h32)) = (u32::try_from(w), u32::try_from(h)) else {
        return Err(Error::shape(format!("{w}×{h} is too large for PNG")));
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::file(dir, format!("cannot create the frame directory: {e}")))?;
    let digits = (t.saturating_sub(1).checked_ilog10().unwrap_or(0) as usize + 1).max(4);
    let mut frame = vec![0u8; 3 * h * w];
    let mut paths = Vec::with_capacity(t);
    for i in 0..t {
        frame_rgb8(frames, t, h * w, i, &mut frame);
        let path = dir.join(format!("frame_{i:0digits$}.png"));
        let fail = |e: &dyn std::fmt::Display| Error::file(&path, format!("cannot write PNG: {e}"));
        let file = std::fs::File::create(&path).map_err(|e| fail(&e))?;
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w32, h32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(|e| fail(&e))?;
        writer.write_image_data(&frame).map_err(|e| fail(&e))?;
        writer.finish().map_err(|e| fail(&e))?;
        paths.push(path);
    }
    Ok(paths)
}

/// Writes f32 `[3, T, H, W]` VAE output (values in [−1, 1]) as an H.264 `.mp4` at `fps` frames
/// per second with the default [`Mp4Options`]; [`DEFAULT_FPS`] (16) is the reference rate.
///
/// Built in, no external program: OpenH264 (Constrained Baseline, yuv420p, BT.709 limited range)
/// and a fast-start MP4 that plays in browsers; see the [module documentation](self). Missing
/// parent directories of `path` are created; an existing file is replaced only once the new
/// video is complete (it is written to a hidden `.NAME.partial` next to it, then renamed).
///
/// Errors: wrong buffer length, zero, odd (4:2:0 needs an even width and height) or too large
/// (beyond 3840×2160) sizes ([`Error::Shape`]); a bad `fps` ([`Error::Invalid`]); a path that
/// cannot be written ([`Error::File`], before any encoding).
pub fn write_mp4(
    path: impl AsRef<Path>,
    frames: &[f32],
    t: usize,
    h: usize,
    w: usize,
    fps: u32,
) -> Result<Mp4Info> {
    let opts = Mp4Options {
        fps,
        ..Mp4Options::default()
    };
    write_mp4_with(path, frames, t, h, w, &opts)
}

/// [`write_mp4`] with explicit encoder settings (errors also for `max_qp > 51` or a zero
/// bitrate).
pub fn write_mp4_with(
    path: impl AsRef<Path>,
    frames: &[f32],
    t: usize,
    h: usize,
    w: usize,
    opts: &Mp4Options,
) -> Result<Mp4Info> {
    let path = path.as_ref();
    check_frames(frames.len(), t, h, w, F32_LAYOUT)?;
    check_mp4_params(h, w, opts)?;
    let (bytes, stream) = write_replacing(path, || {
        encode(t, h, w, opts, |i, out| frame_rgb8(frames, t, h * w, i, out))
    })?;
    Ok(Mp4Info {
        path: path.to_path_buf(),
        frames: t,
        width: w as u32,
        height: h as u32,
        fps: opts.fps,
        duration_s: t as f64 / f64::from(opts.fps),
        bytes,
        keyframes: stream.keyframes,
        codec: stream.codec,
    })
}

/// Encodes interleaved 8-bit RGB frames `[T, H, W, 3]` (for example from [`frames_to_rgb8`]) into
/// the bytes of an `.mp4` file, as [`write_mp4_with`] does.
///
/// Errors as [`write_mp4_with`], without the file errors.
pub fn encode_mp4_rgb8(
    rgb: &[u8],
    t: usize,
    h: usize,
    w: usize,
    opts: &Mp4Options,
) -> Result<Vec<u8>> {
    check_frames(rgb.len(), t, h, w, U8_LAYOUT)?;
    check_mp4_params(h, w, opts)?;
    let n = 3 * h * w;
    let (bytes, _) = encode(t, h, w, opts, |i, out| {
        out.copy_from_slice(&rgb[i * n..(i + 1) * n]);
    })?;
    Ok(bytes)
}

fn check_mp4_params(h: usize, w: usize, opts: &Mp4Options) -> Result<()> {
    if !h.is_multiple_of(2) || !w.is_multiple_of(2) {
        return Err(Error::shape(format!(
            "H.264 in yuv420p needs an even width and height, got {w}×{h} (W×H); crop or pad the \
             frames to even sizes (the pipeline's sizes are multiples of 128)"
        )));
    }
    if w.max(h) > MAX_LONG_SIDE || w.min(h) > MAX_SHORT_SIDE {
        return Err(Error::shape(format!(
            "the H.264 encoder (OpenH264) handles at most {MAX_LONG_SIDE}×{MAX_SHORT_SIDE} or \
             {MAX_SHORT_SIDE}×{MAX_LONG_SIDE}, got {w}×{h} (W×H)"
        )));
    }
    if opts.fps == 0 || opts.fps > MAX_FPS {
        return Err(Error::Invalid(format!(
            "video frame rate must be 1 ..= {MAX_FPS} frames per second, got {}",
            opts.fps
        )));
    }
    if opts.max_qp > 51 {
        return Err(Error::Invalid(format!(
            "H.264 quantizer max_qp must be 0 ..= 51, got {}",
            opts.max_qp
        )));
    }
    if opts.bitrate == Some(0) {
        return Err(Error::Invalid(
            "video bitrate must be positive (or None for the default)".into(),
        ));
    }
    Ok(())
}

/// Writes the bytes that `make` returns to `path` through a temporary file next to it, renamed
/// at the end, and returns their length and `make`'s other result. A failure leaves neither a
/// partial video nor a damaged older file. The temporary file is created before `make` runs, so
/// an unwritable path fails before a slow encode.
fn write_replacing<T>(
    path: &Path,
    make: impl FnOnce() -> Result<(Vec<u8>, T)>,
) -> Result<(u64, T)> {
    if path.is_dir() {
        return Err(Error::file(
            path,
            "is a directory; give the video a file name such as out.mp4",
        ));
    }
    let Some(name) = path.file_name() else {
        return Err(Error::file(
            path,
            "has no file name; give one such as out.mp4",
        ));
    };
    let parent = path.parent().unwrap_or(Path::new(""));
    if !parent.as_os_str().is_empty() {
        std::fs::create_dir_all(parent).map_err(|e| {
            Error::file(
                path,
                format!("cannot create the directory of the video: {e}"),
            )
        })?;
    }
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".partial");
    let tmp = parent.join(tmp_name);
    let mut file = std::fs::File::create(&tmp)
        .map_err(|e| Error::file(path, format!("cannot create the video file: {e}")))?;
    let result = make().and_then(|(bytes, extra)| {
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| Error::file(path, format!("cannot write the video: {e}")))?;
        Ok((bytes.len() as u64, extra))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Facts about an encoded stream that [`Mp4Info`] reports.
struct StreamInfo {
    keyframes: usize,
    codec: String,
}

/// One encoded frame: AVC (length-prefixed) NAL units.
struct Sample {
    data: Vec<u8>,
    sync: bool,
    /// Duration in frames (more than 1 only if the encoder skipped the following frames).
    frames: u32,
}

/// `T` frames → complete `.mp4` bytes; `frame(i, out)` writes frame `i` as interleaved RGB
/// (`3·H·W` bytes) into `out`. Sizes and options are already checked.
fn encode(
    t: usize,
    h: usize,
    w: usize,
    opts: &Mp4Options,
    mut frame: impl FnMut(usize, &mut [u8]),
) -> Result<(Vec<u8>, StreamInfo)> {
    let enc_err = |e: openh264::Error| Error::Invalid(format!("H.264 encoder (OpenH264): {e}"));
    let bitrate = opts.bitrate.unwrap_or_else(|| {
        let bps = DEFAULT_BITS_PER_PIXEL * (w * h) as f64 * f64::from(opts.fps);
        bps.clamp(100_000.0, 200_000_000.0) as u32
    });
    let config = EncoderConfig::new()
        .profile(Profile::Baseline)
        .usage_type(UsageType::CameraVideoRealTime)
        .rate_control_mode(RateControlMode::Quality)
        .bitrate(BitRate::from_bps(bitrate))
        .max_frame_rate(FrameRate::from_hz(opts.fps as f32))
        .qp(QpRange::new(MIN_QP.min(opts.max_qp), opts.max_qp))
        .complexity(Complexity::High)
        .skip_frames(false)
        .intra_frame_period(IntraFramePeriod::from_num_frames(opts.keyframe_interval))
        .vui(VuiConfig::bt709());
    let mut encoder =
        Encoder::with_api_config(OpenH264API::from_source(), config).map_err(enc_err)?;
    // OpenH264 initializes on the first frame and prints its parameter warnings to stderr then,
    // e.g. that the bitrate cannot be held without skipping frames (intended: every frame is
    // kept, `max_qp` bounds the quality loss). Keep its error messages only.
    let mut trace_level: i32 = 1; // WELS_LOG_ERROR
    // SAFETY: ENCODER_OPTION_TRACE_LEVEL (25) may be set before initialization (OpenH264's
    // `SetOption` accepts it then); the encoder reads one 32-bit integer through the pointer,
    // which is valid for the duration of the call. It changes no encoding parameter.
    let _ = unsafe {
        encoder
            .raw_api()
            .set_option(25, (&raw mut trace_level).cast())
    };

    let mut rgb = vec![0u8; 3 * h * w];
    let mut sps: Option<Vec<u8>> = None;
    let mut pps: Option<Vec<u8>> = None;
    let mut samples: Vec<Sample> = Vec::with_capacity(t);
    for i in 0..t {
        frame(i, &mut rgb);
        let buf = YUVBuffer::from_vec(rgb_to_i420(&rgb, w, h), w, h);
        let ms = i as u64 * 1000 / u64::from(opts.fps);
        let stream = encoder
            .encode_at(&buf, Timestamp::from_millis(ms))
            .map_err(|e| Error::Invalid(format!("H.264 encoder (OpenH264), frame {i}: {e}")))?;
        let mut sample = Sample {
            data: Vec::new(),
            sync: false,
            frames: 1,
        };
        for layer in (0..stream.num_layers()).filter_map(|l| stream.layer(l)) {
            for nal in (0..layer.nal_count()).filter_map(|n| layer.nal_unit(n)) {
                let nal = strip_start_code(nal);
                let Some(&header) = nal.first() else {
                    continue;
                };
                match header & 0x1f {
                    7 => set_parameter_set(&mut sps, nal, "sequence")?,
                    8 => set_parameter_set(&mut pps, nal, "picture")?,
                    kind @ 1..=6 => {
                        sample.sync |= kind == 5;
                        let len = u32::try_from(nal.len())
                            .map_err(|_| Error::Invalid("H.264 NAL unit over 4 GiB".into()))?;
                        sample.data.extend_from_slice(&len.to_be_bytes());
                        sample.data.extend_from_slice(nal);
                    }
                    // Access unit delimiters, SVC extensions, filler: not needed in MP4.
                    _ => {}
                }
            }
        }
        if sample.data.is_empty() {
            // A skipped frame (frame skipping is off, so this should not happen): show the
            // previous picture one frame longer.
            let Some(prev) = samples.last_mut() else {
                return Err(Error::Invalid(
                    "H.264 encoder (OpenH264) produced no picture for the first frame".into(),
                ));
            };
            prev.frames += 1;
        } else {
            samples.push(sample);
        }
    }
    let (Some(sps), Some(pps)) = (sps, pps) else {
        return Err(Error::Invalid(
            "H.264 encoder (OpenH264) produced no sequence/picture parameter sets".into(),
        ));
    };
    if sps.len() < 4 {
        return Err(Error::Invalid(format!(
            "H.264 encoder (OpenH264) produced a {}-byte sequence parameter set",
            sps.len()
        )));
    }
    let codec = format!("avc1.{:02x}{:02x}{:02x}", sps[1], sps[2], sps[3]);
    let keyframes = samples.iter().filter(|s| s.sync).count();
    let bytes = mux(samples, &sps, &pps, w, h, opts.fps)?;
    Ok((bytes, StreamInfo { keyframes, codec }))
}

fn set_parameter_set(slot: &mut Option<Vec<u8>>, nal: &[u8], what: &str) -> Result<()> {
    match slot {
        None => *slot = Some(nal.to_vec()),
        Some(prev) if prev.as_slice() == nal => {}
        Some(_) => {
            return Err(Error::Invalid(format!(
                "H.264 encoder (OpenH264) changed its {what} parameter set mid-stream, which one \
                 MP4 sample description cannot hold"
            )));
        }
    }
    Ok(())
}

/// Removes an Annex B start code (`00 00 01` or `00 00 00 01`) from the front of a NAL unit.
fn strip_start_code(nal: &[u8]) -> &[u8] {
    let zeros = nal.iter().take_while(|&&b| b == 0).count();
    if zeros >= 2 && nal.get(zeros) == Some(&1) {
        &nal[zeros + 1..]
    } else {
        nal
    }
}

/// Interleaved RGB → planar I420 (BT.709, limited range 16–235/16–240, rounded). Chroma is the
/// mean of each 2×2 block (width and height are even).
fn rgb_to_i420(rgb: &[u8], w: usize, h: usize) -> Vec<u8> {
    const KR: f32 = 0.2126;
    const KB: f32 = 0.0722;
    const KG: f32 = 1.0 - KR - KB;
    const YS: f32 = 219.0 / 255.0;
    const CS: f32 = 224.0 / 255.0;
    let (cw, ch) = (w / 2, h / 2);
    let mut out = vec![0u8; w * h + 2 * cw * ch];
    let (y_plane, uv) = out.split_at_mut(w * h);
    let (u_plane, v_plane) = uv.split_at_mut(cw * ch);
    let q = |v: f32| (v + 0.5).clamp(0.0, 255.0) as u8;
    for (dst, px) in y_plane.iter_mut().zip(rgb.chunks_exact(3)) {
        let luma = KR * f32::from(px[0]) + KG * f32::from(px[1]) + KB * f32::from(px[2]);
        *dst = q(16.0 + YS * luma);
    }
    for cy in 0..ch {
        for cx in 0..cw {
            let mut s = [0u32; 3];
            for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                let p = ((2 * cy + dy) * w + 2 * cx + dx) * 3;
                for (acc, &v) in s.iter_mut().zip(&rgb[p..p + 3]) {
                    *acc += u32::from(v);
                }
            }
            let [r, g, b] = s.map(|v| v as f32 / 4.0);
            let luma = KR * r + KG * g + KB * b;
            u_plane[cy * cw + cx] = q(128.0 + CS * (b - luma) / (2.0 * (1.0 - KB)));
            v_plane[cy * cw + cx] = q(128.0 + CS * (r - luma) / (2.0 * (1.0 - KR)));
        }
    }
    out
}

/// Samples → fast-start `.mp4` bytes (one AVC video track).
fn mux(
    samples: Vec<Sample>,
    sps: &[u8],
    pps: &[u8],
    w: usize,
    h: usize,
    fps: u32,
) -> Result<Vec<u8>> {
    use mp4::{
        AvcConfig, FourCC, MediaConfig, Mp4Config, Mp4Sample, Mp4Writer, TrackConfig, TrackType,
    };
    // Ticks per frame; the time scale is fps·TICKS per second.
    const TICKS: u32 = 1000;
    let mux_err = |e: mp4::Error| Error::Invalid(format!("MP4 muxer: {e}"));
    let config = Mp4Config {
        major_brand: FourCC::from(*b"isom"),
        minor_version: 512,
        compatible_brands: [b"isom", b"iso2", b"avc1", b"mp41"]
            .into_iter()
            .map(|b| FourCC::from(*b))
            .collect(),
        // The movie's time scale equals the track's, so that all durations are exact.
        timescale: fps * TICKS,
    };
    let mut writer =
        Mp4Writer::write_start(std::io::Cursor::new(Vec::new()), &config).map_err(mux_err)?;
    writer
        .add_track(&TrackConfig {
            track_type: TrackType::Video,
            timescale: fps * TICKS,
            language: "und".into(),
            media_conf: MediaConfig::AvcConfig(AvcConfig {
                width: w as u16,
                height: h as u16,
                seq_param_set: sps.to_vec(),
                pic_param_set: pps.to_vec(),
            }),
        })
        .map_err(mux_err)?;
    let mut start = 0u64;
    for s in samples {
        let duration = s.frames * TICKS;
        let sample = Mp4Sample {
            start_time: start,
            duration,
            rendering_offset: 0,
            is_sync: s.sync,
            bytes: s.data.into(),
        };
        writer.write_sample(1, &sample).map_err(mux_err)?;
        start += u64::from(duration);
    }
    writer.write_end().map_err(mux_err)?;
    faststart(writer.into_writer().into_inner())
}

/// A box: four-character type, start, header length and end (exclusive) in the buffer.
struct BoxRef {
    kind: [u8; 4],
    start: usize,
    header: usize,
    end: usize,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

fn malformed() -> Error {
    Error::Invalid("the MP4 muxer wrote a malformed box".into())
}

/// The boxes directly inside `buf[start..end]`.
fn child_boxes(buf: &[u8], start: usize, end: usize) -> Result<Vec<BoxRef>> {
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        if end - at < 8 {
            return Err(malformed());
        }
        let kind = [buf[at + 4], buf[at + 5], buf[at + 6], buf[at + 7]];
        let (size, header) = match be32(buf, at) {
            0 => (end - at, 8),
            1 if end - at >= 16 => (
                usize::try_from(be64(buf, at + 8)).map_err(|_| malformed())?,
                16,
            ),
            s => (s as usize, 8),
        };
        if size < header || size > end - at {
            return Err(malformed());
        }
        out.push(BoxRef {
            kind,
            start: at,
            header,
            end: at + size,
        });
        at += size;
    }
    Ok(out)
}

/// Moves `moov` in front of `mdat`, so that players can start before the whole file is loaded,
/// shifting the chunk offsets; see [`patch_moov`].
fn faststart(buf: Vec<u8>) -> Result<Vec<u8>> {
    let top = child_boxes(&buf, 0, buf.len())?;
    let find = |k: &[u8; 4]| top.iter().position(|b| &b.kind == k);
    let (Some(mdat), Some(moov)) = (find(b"mdat"), find(b"moov")) else {
        return Err(Error::Invalid(
            "the MP4 muxer wrote no mdat or moov box".into(),
        ));
    };
    if moov < mdat {
        return Ok(buf);
    }
    let mut moov_bytes = buf[top[moov].start..top[moov].end].to_vec();
    let shift = moov_bytes.len() as u64;
    patch_moov(&mut moov_bytes, shift)?;
    let mut out = Vec::with_capacity(buf.len());
    for (i, b) in top.iter().enumerate() {
        if i == mdat {
            out.extend_from_slice(&moov_bytes);
        }
        if i != moov {
            out.extend_from_slice(&buf[b.start..b.end]);
        }
    }
    Ok(out)
}

/// Adds `shift` to every chunk offset (`stco`/`co64`) of a `moov` box and fixes what the `mp4`
/// crate leaves unusual: `mvhd.next_track_id` (it writes 1), the `tkhd` flags (it sets only
/// "enabled", not "in movie") and the `tkhd` volume of a video track (it writes 1.0, not 0).
fn patch_moov(moov: &mut [u8], shift: u64) -> Result<()> {
    let overflow = || Error::Invalid("MP4 chunk offset overflow".into());
    let mut stack = vec![(8usize, moov.len())];
    let mut tracks = 0u32;
    let mut mvhd = None;
    while let Some((start, end)) = stack.pop() {
        for b in child_boxes(moov, start, end)? {
            let body = b.start + b.header;
            // Full boxes: version and flags first.
            let full = b.end - body >= 4;
            match &b.kind {
                b"trak" => {
                    tracks += 1;
                    stack.push((body, b.end));
                }
                b"mdia" | b"minf" | b"stbl" => stack.push((body, b.end)),
                b"mvhd" if full => mvhd = Some((body, b.end)),
                b"tkhd" if full => {
                    let volume = body + if moov[body] == 1 { 48 } else { 36 };
                    if volume + 2 > b.end {
                        return Err(malformed());
                    }
                    moov[body + 3] |= 0x03; // track enabled | track in movie
                    moov[volume..volume + 2].copy_from_slice(&[0, 0]);
                }
                b"stco" | b"co64" => {
                    let step = if &b.kind == b"co64" { 8 } else { 4 };
                    if b.end - body < 8 {
                        return Err(malformed());
                    }
                    let n = be32(moov, body + 4) as usize;
                    if n.saturating_mul(step) > b.end - body - 8 {
                        return Err(malformed());
                    }
                    for k in 0..n {
                        let at = body + 8 + k * step;
                        if step == 8 {
                            let v = be64(moov, at).checked_add(shift).ok_or_else(overflow)?;
                            moov[at..at + 8].copy_from_slice(&v.to_be_bytes());
                        } else {
                            let v = u32::try_from(u64::from(be32(moov, at)) + shift)
                                .map_err(|_| overflow())?;
                            moov[at..at + 4].copy_from_slice(&v.to_be_bytes());
                        }
                    }
                }
                _ => {}
            }
        }
    }
    if let Some((body, end)) = mvhd {
        // Version 0: 4 (version, flags) + 16 (times, scale, duration) + 4 (rate) + 2 (volume)
        // + 10 + 36 (matrix) + 24 = 96 bytes before next_track_id; version 1 has 12 more.
        let at = body + if moov[body] == 1 { 108 } else { 96 };
        if at + 4 > end {
            return Err(malformed());
        }
        moov[at..at + 4].copy_from_slice(&(tracks + 1).to_be_bytes());
    }
    Ok(())
}
