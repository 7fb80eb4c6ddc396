//! The flow-matching samplers (UniPC, DPM++) against the `scheduler` cases of the golden set in
//! `NABLA_GOLDEN_DIR` (default `../shared/golden`), driven by `manifest.json`: solver, steps, shift,
//! guidance scale, the toy models and the tolerances all come from it. Plus the reference schedules
//! quoted in spec §5.3 and the error paths. CPU only.

use nabla::io::TensorFile;
use nabla::wan::sampler::{
    MAX_STEPS, NUM_TRAIN_TIMESTEPS, Sampler, Schedule, Solver, guidance, schedule,
};
use serde_json::Value;
use std::path::PathBuf;

fn golden_dir() -> PathBuf {
    match std::env::var("NABLA_GOLDEN_DIR") {
        Ok(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/golden"),
    }
}

fn manifest() -> Value {
    let p = golden_dir().join("manifest.json");
    let text = std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e} (set NABLA_GOLDEN_DIR)", p.display()));
    let m: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert_eq!(m["format"], "golden-vectors/1", "unknown golden format");
    m
}

/// Elementwise tolerance `(atol, rtol)` of a manifest tensor entry; `exact` gives zeros.
fn tolerance(case: &Value, name: &str) -> (f64, f64) {
    let t = entry(case, name);
    let tol = &t["tolerance"];
    if tol == "exact" {
        return (0.0, 0.0);
    }
    let atol = tol["atol"]
        .as_f64()
        .unwrap_or_else(|| panic!("tolerance of {name}: {tol}"));
    (atol, tol["rtol"].as_f64().unwrap_or(0.0))
}

fn entry<'a>(case: &'a Value, name: &str) -> &'a Value {
    case["tensors"]
        .as_array()
        .expect("tensors")
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("{}: no tensor {name} in the manifest", case["name"]))
}

fn manifest_shape(case: &Value, name: &str) -> Vec<usize> {
    entry(case, name)["shape"]
        .as_array()
        .expect("shape")
        .iter()
        .map(|d| d.as_u64().expect("shape entry") as usize)
        .collect()
}

/// Worst case over a comparison: the largest absolute error and the largest error as a fraction
/// of the allowed `atol + rtol·|expected|`.
#[derive(Clone, Copy, Default, Debug)]
struct Worst {
    abs: f64,
    frac: f64,
}

impl Worst {
    fn merge(&mut self, o: Worst) {
        self.abs = self.abs.max(o.abs);
        self.frac = self.frac.max(o.frac);
    }
}

fn check(what: &str, got: &[f32], want: &[f32], (atol, rtol): (f64, f64)) -> Worst {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut w = Worst::default();
    for (k, (&g, &e)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}[{k}]: {g}");
        let err = (g as f64 - e as f64).abs();
        let allowed = atol + rtol * (e as f64).abs();
        assert!(
            err <= allowed,
            "{what}[{k}]: got {g}, expected {e}, |err| {err:.3e} > {allowed:.3e} (atol {atol}, rtol {rtol})"
        );
        w.abs = w.abs.max(err);
        if allowed > 0.0 {
            w.frac = w.frac.max(err / allowed);
        }
    }
    w
}

/// A toy velocity model `v(x, t) = a·x + b·t` from the manifest: either a string such as
/// `"v_cond(x, t) = 0.5 * x + 0.001 * t"` or an object `{"a": .., "b": ..}`. Returns `a` as the
/// float32 the tensor product uses and `b` as the float64 scalar.
fn toy_model(v: &Value) -> (f32, f64) {
    if let (Some(a), Some(b)) = (v["a"].as_f64(), v["b"].as_f64()) {
        return (a as f32, b);
    }
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("toy model {v}: neither a string nor {{a, b}}"));
    let rhs = s
        .rsplit('=')
        .next()
        .unwrap()
        .replace(char::is_whitespace, "");
    // Split into signed terms at + / − that are not an exponent sign.
    let mut terms = Vec::new();
    let mut cur = String::new();
    for c in rhs.chars() {
        let exp_sign = cur.ends_with(['e', 'E'])
            && cur[..cur.len() - 1].ends_with(|d: char| d.is_ascii_digit() || d == '.');
        if (c == '+' || c == '-') && !cur.is_empty() && !exp_sign && !cur.ends_with('*') {
            terms.push(std::mem::take(&mut cur));
        }
        cur.push(c);
    }
    terms.push(cur);
    let (mut a, mut b) = (0f64, 0f64);
    for term in terms {
        let (sign, body) = match term.strip_prefix('-') {
            Some(r) => (-1.0, r),
            None => (1.0, term.trim_start_matches('+')),
        };
        let mut coef = sign;
        let mut var = None;
        for f in body.split('*') {
            match f {
                "x" | "t" => {
                    assert!(
                        var.is_none(),
                        "toy model {s:?}: term {term:?} is not linear"
                    );
                    var = Some(f);
                }
                num => {
                    coef *= num
                        .parse::<f64>()
                        .unwrap_or_else(|_| panic!("toy model {s:?}: cannot read {num:?}"))
                }
            }
        }
        match var {
            Some("x") => a += coef,
            Some("t") => b += coef,
            _ => panic!("toy model {s:?}: constant term {term:?} is not of the form a·x + b·t"),
        }
    }
    (a as f32, b)
}

#[test]
fn toy_model_parser() {
    let p = |s: &str| toy_model(&Value::String(s.into()));
    assert_eq!(p("v_cond(x, t) = 0.5 * x + 0.001 * t"), (0.5, 0.001));
    assert_eq!(
        p("v_uncond(x, t) = -0.25 * x + 0.0002 * t"),
        (-0.25, 0.0002)
    );
    assert_eq!(p("v(x,t) = x - 2e-4*t"), (1.0, -2e-4));
    assert_eq!(p("v(x,t) = 1.5e+0 * x - t"), (1.5, -1.0));
}

#[test]
fn golden_schedulers() {
    let m = manifest();
    let cases: Vec<&Value> = m["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .filter(|c| c["kind"] == "scheduler")
        .collect();
    assert!(!cases.is_empty(), "manifest has no scheduler case");
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let cfg = &case["config"];
        let solver: Solver = cfg["solver"]
            .as_str()
            .expect("config.solver")
            .parse()
            .unwrap();
        let steps = cfg["steps"].as_u64().expect("config.steps") as usize;
        let shift = cfg["shift"].as_f64().expect("config.shift");
        let guide = cfg["guide_scale"].as_f64().expect("config.guide_scale") as f32;
        if let Some(ntt) = cfg["num_train_timesteps"].as_u64() {
            assert_eq!(
                ntt as usize, NUM_TRAIN_TIMESTEPS,
                "{name}: num_train_timesteps"
            );
        }
        let (a_c, b_c) = toy_model(&cfg["cond_model"]);
        let (a_u, b_u) = toy_model(&cfg["uncond_model"]);
        let f = TensorFile::open(golden_dir().join(case["file"].as_str().unwrap())).unwrap();

        let mut sampler = Sampler::new(solver, steps, shift).unwrap();

        // Timesteps: exact.
        let (want_t, shape) = f.i64("timesteps").unwrap();
        assert_eq!(
            shape,
            manifest_shape(case, "timesteps"),
            "{name}: timesteps shape"
        );
        assert_eq!(
            tolerance(case, "timesteps"),
            (0.0, 0.0),
            "{name}: timesteps tolerance"
        );
        assert_eq!(sampler.timesteps(), &want_t[..], "{name}: timesteps");

        // Sigmas.
        let (want_s, shape) = f.f32("sigmas").unwrap();
        assert_eq!(
            shape,
            manifest_shape(case, "sigmas"),
            "{name}: sigmas shape"
        );
        assert_eq!(shape, [steps + 1], "{name}: sigmas length");
        let ws = check(
            &format!("{name}.sigmas"),
            sampler.sigmas(),
            &want_s,
            tolerance(case, "sigmas"),
        );

        // Trajectory.
        let (noise, nshape) = f.f32("noise").unwrap();
        assert_eq!(nshape, manifest_shape(case, "noise"), "{name}: noise shape");
        let len: usize = nshape.iter().product();
        let (latents, lshape) = f.f32("latents").unwrap();
        assert_eq!(
            lshape,
            manifest_shape(case, "latents"),
            "{name}: latents shape"
        );
        assert_eq!(lshape[0], steps + 1, "{name}: latents rows");
        let (outputs, oshape) = f.f32("model_outputs").unwrap();
        assert_eq!(
            oshape,
            manifest_shape(case, "model_outputs"),
            "{name}: outputs shape"
        );
        assert_eq!(oshape[0], steps, "{name}: model_outputs rows");
        assert_eq!(
            &latents[..len],
            &noise[..],
            "{name}: latents[0] is the noise"
        );
        let tol_x = tolerance(case, "latents");
        let tol_v = tolerance(case, "model_outputs");

        let mut x = noise.clone();
        let (mut cond, mut uncond, mut v) = (vec![0f32; len], vec![0f32; len], vec![0f32; len]);
        let (mut wx, mut wv) = (Worst::default(), Worst::default());
        for i in 0..steps {
            // The reference forms b·t from Python floats (float64) and adds it to the float32
            // tensor a·x: this reproduces the stored model outputs bit for bit from stored latents.
            let t = sampler.timesteps()[i] as f64;
            let (bt_c, bt_u) = ((b_c * t) as f32, (b_u * t) as f32);
            for k in 0..len {
                cond[k] = a_c * x[k] + bt_c;
                uncond[k] = a_u * x[k] + bt_u;
            }
            guidance(&uncond, &cond, guide, &mut v).unwrap();
            wv.merge(check(
                &format!("{name}.model_outputs[{i}]"),
                &v,
                &outputs[i * len..(i + 1) * len],
                tol_v,
            ));
            sampler.step(i, &v, &mut x).unwrap();
            wx.merge(check(
                &format!("{name}.latents[{}]", i + 1),
                &x,
                &latents[(i + 1) * len..(i + 2) * len],
                tol_x,
            ));
        }
        assert_eq!(sampler.next_step(), steps);
        eprintln!(
            "{name} ({solver}, {steps} steps, shift {shift}, guide {guide}): ok; max abs err: \
             sigmas {:.2e}, model_outputs {:.2e}, latents {:.2e} (tolerance {tol_x:?}; worst \
             fraction of the allowed error {:.3})",
            ws.abs,
            wv.abs,
            wx.abs,
            wv.frac.max(wx.frac)
        );
    }
}

// ---- spec §5.3 reference schedules ------------------------------------------------------------

const UNIPC_50_5: [i64; 50] = [
    999, 995, 991, 987, 982, 978, 973, 968, 963, 957, 952, 946, 940, 934, 927, 920, 913, 906, 898,
    890, 882, 873, 863, 854, 843, 833, 821, 809, 796, 783, 768, 753, 737, 720, 701, 681, 660, 636,
    611, 584, 555, 522, 487, 448, 405, 356, 302, 241, 172, 92,
];

const DPMPP_50_5: [i64; 50] = [
    1000, 995, 991, 987, 982, 978, 973, 968, 963, 957, 952, 946, 940, 934, 927, 921, 913, 906, 898,
    890, 882, 873, 864, 854, 844, 833, 821, 809, 797, 783, 769, 753, 737, 720, 701, 681, 660, 637,
    612, 585, 555, 523, 487, 448, 405, 357, 303, 241, 172, 92,
];

/// The spec quotes sigmas to 8 decimals.
fn assert_close(what: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (k, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= 1e-8 + 1e-7 * w.abs(),
            "{what}[{k}]: {g} vs {w}"
        );
    }
}

fn check_ends(s: &Schedule, head: &[f64], tail: &[f64]) {
    let n = s.sigmas.len();
    assert_close("sigma head", &s.sigmas[..head.len()], head);
    assert_close("sigma tail", &s.sigmas[n - tail.len()..], tail);
}

#[test]
fn spec_schedule_unipc_50_shift5() {
    let s = schedule(Solver::UniPc, 50, 5.0).unwrap();
    assert_eq!(s.timesteps, UNIPC_50_5);
    assert_eq!(s.sigmas.len(), 51);
    check_ends(
        &s,
        &[
            0.99979985, 0.99573237, 0.99153048, 0.98718739, 0.98269582, 0.97804803,
        ],
        &[0.24174035, 0.17226514, 0.09250686, 0.0],
    );
}

#[test]
fn spec_schedule_dpmpp_50_shift5() {
    let s = schedule(Solver::DpmPp, 50, 5.0).unwrap();
    assert_eq!(s.timesteps, DPMPP_50_5);
    assert_eq!(s.sigmas[0], 1.0, "DPM++ starts at sigma 1 exactly");
    check_ends(
        &s,
        &[
            1.0, 0.99593496, 0.99173552, 0.98739493, 0.98290598, 0.97826087,
        ],
        &[0.24193548, 0.17241380, 0.09259259, 0.0],
    );
}

#[test]
fn spec_schedule_shift3() {
    let u = schedule(Solver::UniPc, 50, 3.0).unwrap().timesteps;
    assert_eq!(&u[..5], &[999, 992, 985, 978, 971]);
    assert_eq!(&u[47..], &[160, 111, 57]);
    let d = schedule(Solver::DpmPp, 50, 3.0).unwrap().timesteps;
    assert_eq!(&d[..5], &[1000, 993, 986, 979, 971]);
    assert_eq!(&d[47..], &[160, 111, 57]);
}

#[test]
fn sampler_uses_the_schedule() {
    for solver in [Solver::UniPc, Solver::DpmPp] {
        let s = Sampler::new(solver, 20, 5.0).unwrap();
        assert_eq!(s.schedule(), &schedule(solver, 20, 5.0).unwrap());
        assert_eq!(s.steps(), 20);
        assert_eq!(s.solver(), solver);
        assert_eq!(s.shift(), 5.0);
        assert_eq!(s.sigmas()[20], 0.0);
        assert_eq!(s.timesteps().len(), 20);
    }
}

// ---- behaviour --------------------------------------------------------------------------------

/// Runs a trajectory with a fixed toy velocity field; returns (final latent, last data prediction).
fn run(sampler: &mut Sampler, x0: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut x = x0.to_vec();
    let mut v = vec![0f32; x.len()];
    let mut m = vec![0f32; x.len()];
    for i in 0..sampler.steps() {
        let t = sampler.timesteps()[i] as f32;
        let sigma = sampler.sigmas()[i];
        for k in 0..x.len() {
            v[k] = 0.7 * x[k] - 0.3 + 0.0005 * t * (k as f32 - 2.0);
            m[k] = x[k] - sigma * v[k];
        }
        sampler.step(i, &v, &mut x).unwrap();
    }
    (x, m)
}

#[test]
fn final_step_returns_the_data_prediction_and_runs_repeat() {
    let x0: Vec<f32> = (0..7).map(|k| (k as f32 * 0.37).sin()).collect();
    for solver in [Solver::UniPc, Solver::DpmPp] {
        for steps in [1, 2, 3, 10] {
            let mut s = Sampler::new(solver, steps, 5.0).unwrap();
            let (a, m) = run(&mut s, &x0);
            assert_eq!(a, m, "{solver} {steps}: x_N = m_(N-1)");
            assert!(a.iter().all(|v| v.is_finite()));
            // Step 0 starts over; the reused buffers give the same trajectory.
            let (b, _) = run(&mut s, &x0);
            assert_eq!(a, b, "{solver} {steps}: second run");
        }
    }
}

#[test]
fn a_pure_data_field_converges_to_it() {
    // The exact velocity of a single data point, v(x) = (x − x_data)/σ, makes every data
    // prediction m_i = x_data: both solvers are exact for a constant data prediction.
    let x_data = [0.25f32, -1.5, 3.0];
    for solver in [Solver::UniPc, Solver::DpmPp] {
        let mut s = Sampler::new(solver, 12, 3.0).unwrap();
        let eps = [1.0f32, -0.5, 0.2];
        let sig0 = s.sigmas()[0];
        let mut x: Vec<f32> = (0..3)
            .map(|k| (1.0 - sig0) * x_data[k] + sig0 * eps[k])
            .collect();
        let mut v = vec![0f32; 3];
        for i in 0..s.steps() {
            let sigma = s.sigmas()[i];
            for k in 0..3 {
                v[k] = (x[k] - x_data[k]) / sigma;
            }
            s.step(i, &v, &mut x).unwrap();
        }
        for k in 0..3 {
            assert!((x[k] - x_data[k]).abs() < 1e-5, "{solver}: {x:?}");
        }
    }
}

#[test]
fn bad_inputs_are_errors() {
    for solver in [Solver::UniPc, Solver::DpmPp] {
        assert!(schedule(solver, 0, 5.0).is_err());
        assert!(Sampler::new(solver, 0, 5.0).is_err());
        assert!(Sampler::new(solver, MAX_STEPS + 1, 5.0).is_err());
        for shift in [0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(schedule(solver, 10, shift).is_err(), "shift {shift}");
            assert!(Sampler::new(solver, 10, shift).is_err(), "shift {shift}");
        }
        // Degenerate in float32: the first sigmas coincide or round to 1 / 0.
        assert!(Sampler::new(solver, 10, 1e12).is_err());
        assert!(Sampler::new(solver, 10, 1e-60).is_err());

        let mut s = Sampler::new(solver, 4, 5.0).unwrap();
        let mut x = vec![0.5f32; 6];
        let x_before = x.clone();
        // Length mismatch, empty buffers.
        assert!(s.step(0, &[0.0; 5], &mut x).is_err());
        assert!(s.step(0, &[], &mut []).is_err());
        assert_eq!(x, x_before);
        // Out of order / out of range.
        assert!(s.step(1, &[0.0; 6], &mut x).is_err());
        assert!(s.step(4, &[0.0; 6], &mut x).is_err());
        s.step(0, &[0.1; 6], &mut x).unwrap();
        assert!(s.step(2, &[0.1; 6], &mut x).is_err());
        assert!(s.step(1, &[0.1; 6], &mut x).is_ok());
        // A different latent length mid-trajectory.
        let mut y = vec![0.5f32; 8];
        assert!(s.step(2, &[0.1; 8], &mut y).is_err());
        // Reset: step 0 again works, step 2 does not.
        s.reset();
        assert_eq!(s.next_step(), 0);
        assert!(s.step(2, &[0.1; 6], &mut x).is_err());
        assert!(s.step(0, &[0.1; 8], &mut y).is_ok());
    }
    let mut out = [0f32; 3];
    assert!(guidance(&[0.0; 3], &[0.0; 2], 5.0, &mut out).is_err());
    assert!(guidance(&[0.0; 3], &[0.0; 3], 5.0, &mut [0.0; 4]).is_err());
    let e = "DPM++".parse::<Solver>().unwrap_err().to_string();
    assert!(e.contains("unipc") && e.contains("dpm++"), "{e}");
    assert_eq!("dpm++".parse::<Solver>().unwrap(), Solver::DpmPp);
    assert_eq!("unipc".parse::<Solver>().unwrap(), Solver::UniPc);
}

#[test]
fn guidance_is_uncond_plus_scaled_difference() {
    let (u, c) = ([1.0f32, -2.0, 0.5], [3.0f32, 1.0, 0.5]);
    let mut out = [0f32; 3];
    guidance(&u, &c, 5.0, &mut out).unwrap();
    assert_eq!(out, [11.0, 13.0, 0.5]);
    guidance(&u, &c, 1.0, &mut out).unwrap();
    assert_eq!(out, c);
}
