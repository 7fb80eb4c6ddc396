//! Embedding the text-to-video pipeline: build a [`Pipeline`] once, generate with a progress
//! callback (which could cancel by returning `Break`), write the mp4.
//!
//! ```text
//! cargo run --release --example generate                       # tiny random-weight demo models
//! cargo run --release --example generate -- <ckpt_dir> t2v-1.3B "a cat on the grass"
//! ```

use nabla::Gpu;
use nabla::wan::pipeline::{GenerateOptions, Pipeline, Progress, Task, is_cancelled};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

fn main() -> nabla::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let gpu = Gpu::new()?;
    let (mut pipe, opts) = match args.as_slice() {
        [] => {
            eprintln!("demo models (random weights: the video is noise-like)");
            let opts = GenerateOptions {
                size: (128, 128),
                frame_num: 9,
                steps: 4,
                ..GenerateOptions::demo("a cat walks on the grass")
            };
            (Pipeline::demo(&gpu)?, opts)
        }
        [dir, task, prompt] => {
            let task: Task = task.parse()?;
            let opts = GenerateOptions {
                steps: 30,
                ..GenerateOptions::new(task, prompt.clone())
            };
            (Pipeline::from_checkpoint_dir(&gpu, dir, task)?, opts)
        }
        _ => {
            eprintln!("usage: generate [<ckpt_dir> <t2v-14B|t2v-1.3B> <prompt>]");
            std::process::exit(2);
        }
    };

    // give up if the sampling loop would take longer than an hour (an example of cancelling)
    let budget = Duration::from_secs(3600);
    let start = Instant::now();
    let result = pipe.generate(&opts, |p| {
        match p {
            Progress::Note(n) => eprintln!("note: {n}"),
            Progress::Stage(s) => eprintln!("{s:?} ..."),
            Progress::Step { step, steps, .. } => {
                let eta = start.elapsed() / step as u32 * (steps - step) as u32;
                eprintln!("step {step}/{steps}, ETA {:.0} s", eta.as_secs_f64());
                if start.elapsed() + eta > budget {
                    return ControlFlow::Break(());
                }
            }
        }
        ControlFlow::Continue(())
    });
    let video = match result {
        Err(e) if is_cancelled(&e) => {
            eprintln!("stopped: it would take more than {budget:?}");
            return Ok(());
        }
        r => r?,
    };
    let info = video.write_mp4("example.mp4")?;
    println!(
        "wrote {} ({}x{}, {} frames) in {:.1} s",
        info.path.display(),
        info.width,
        info.height,
        info.frames,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
