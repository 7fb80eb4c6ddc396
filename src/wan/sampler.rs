//! Flow-matching samplers of the Wan 2.1 text-to-video pipeline (spec §5.3–5.5): the sigma /
//! timestep schedules, classifier-free guidance, UniPC (order 2, B(h) = expm1(−h) "bh2",
//! predict-x0, corrector on every step after the first, lower-order final step) and DPM-Solver++ 2M
//! (midpoint).
//!
//! Everything here runs on the CPU. The reference keeps its sigmas in float32 and does every scalar
//! coefficient of a step and the per-element update in float32; this module mirrors that operation
//! by operation (same association, no fused multiply-add) so that whole trajectories match the golden
//! vectors to about 1e-6. The special sigmas (σ = 1 on the first DPM++ step, σ = 0 after the last
//! step of both solvers) are handled by explicit branches; no infinity enters the arithmetic.
//!
//! ```
//! use nabla::wan::sampler::{Sampler, Solver, guidance};
//! # fn main() -> nabla::Result<()> {
//! let mut sampler = Sampler::new(Solver::UniPc, 10, 5.0)?;
//! let mut x = vec![0.3f32; 8]; // the initial noise
//! let (mut v, mut cond, mut uncond) = (vec![0f32; 8], vec![0f32; 8], vec![0f32; 8]);
//! for i in 0..sampler.steps() {
//!     let t = sampler.timesteps()[i] as f32; // fed to the DiT
//!     for k in 0..8 {
//!         cond[k] = 0.5 * x[k] + 0.001 * t; // stand-ins for the two DiT calls
//!         uncond[k] = -0.25 * x[k];
//!     }
//!     guidance(&uncond, &cond, 5.0, &mut v)?;
//!     sampler.step(i, &v, &mut x)?;
//! }
//! # Ok(()) }
//! ```

use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// `num_train_timesteps` of every Wan 2.1 model: timestep = trunc(σ · 1000).
pub const NUM_TRAIN_TIMESTEPS: usize = 1000;

/// The largest accepted number of sampling steps (far above any useful value; it bounds the
/// schedule's allocation).
pub const MAX_STEPS: usize = 100_000;

/// The first UniPC sigma before shifting: `float32(0.999)` taken as a float64
/// (0.9990000128746033), the first sigma of the 1000-step training schedule.
const UNIPC_SIGMA_MAX: f32 = 0.999;

/// A flow-matching solver of the reference pipeline (`--sample_solver`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Solver {
    /// `unipc` (the default): UniPC multistep, order 2, bh2, predict-x0, UniC corrector,
    /// lower-order final step (spec §5.4).
    UniPc,
    /// `dpm++`: DPM-Solver++ 2M, midpoint, first order on the first and the last step (spec §5.5).
    DpmPp,
}

impl Solver {
    /// The reference's name of the solver: `unipc` or `dpm++`.
    pub fn name(self) -> &'static str {
        match self {
            Solver::UniPc => "unipc",
            Solver::DpmPp => "dpm++",
        }
    }
}

impl fmt::Display for Solver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Solver {
    type Err = Error;

    /// Parses the reference's names `unipc` and `dpm++` (exactly, as `--sample_solver` takes them).
    fn from_str(s: &str) -> Result<Solver> {
        match s {
            "unipc" => Ok(Solver::UniPc),
            "dpm++" => Ok(Solver::DpmPp),
            _ => Err(Error::Invalid(format!(
                "unknown sampling solver {s:?}: the accepted solvers are `unipc` (the default) and `dpm++`"
            ))),
        }
    }
}

/// The sampling schedule of `N` steps (spec §5.3).
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    /// `[N]` integer timesteps fed to the DiT, `trunc(1000 · σ_i)` with σ_i in float64.
    pub timesteps: Vec<i64>,
    /// `[N + 1]` sigmas as float32, `σ_0 .. σ_{N−1}` then the final 0.
    pub sigmas: Vec<f32>,
}

/// Checks the step count and the shift shared by [`schedule`] and [`Sampler::new`].
fn check_args(steps: usize, shift: f64) -> Result<()> {
    if steps == 0 {
        return Err(Error::Invalid(
            "the number of sampling steps must be at least 1 (the reference default is 50)".into(),
        ));
    }
    if steps > MAX_STEPS {
        return Err(Error::Invalid(format!(
            "{steps} sampling steps is more than the supported {MAX_STEPS} (the reference default is 50)"
        )));
    }
    if !(shift.is_finite() && shift > 0.0) {
        return Err(Error::Invalid(format!(
            "the sigma shift must be a finite number > 0, got {shift} (the reference default is 5.0)"
        )));
    }
    Ok(())
}

/// The sigma / timestep schedule of `solver` for `steps` steps and sigma shift `shift`, exactly as
/// the reference computes it (spec §5.3), in float64 until the final rounding:
///
/// * UniPC: `u_i = linspace(float32(0.999), 0, N+1)[i]`, i < N;
/// * DPM++: `u_i = linspace(1, 0, N+1)[i]`, i < N (so σ_0 = 1 and t_0 = 1000);
/// * both: `σ_i = shift·u_i / (1 + (shift−1)·u_i)`, `t_i = trunc(1000·σ_i)`, sigmas stored as
///   float32 with a final 0 appended.
///
/// `linspace` is numpy's: `u_i = i·((stop − start)/N) + start`.
///
/// Errors: `steps` = 0 or above [`MAX_STEPS`], `shift` not finite or ≤ 0.
pub fn schedule(solver: Solver, steps: usize, shift: f64) -> Result<Schedule> {
    check_args(steps, shift)?;
    let start = match solver {
        Solver::UniPc => UNIPC_SIGMA_MAX as f64,
        Solver::DpmPp => 1.0,
    };
    let delta = (0.0 - start) / steps as f64;
    let mut timesteps = Vec::with_capacity(steps);
    let mut sigmas = Vec::with_capacity(steps + 1);
    for i in 0..steps {
        let u = i as f64 * delta + start;
        let sigma = shift * u / (1.0 + (shift - 1.0) * u);
        timesteps.push((sigma * NUM_TRAIN_TIMESTEPS as f64) as i64);
        sigmas.push(sigma as f32);
    }
    sigmas.push(0.0);
    Ok(Schedule { timesteps, sigmas })
}

/// Classifier-free guidance in float32: `out = uncond + scale·(cond − uncond)`, elementwise and in
/// that order of operations (spec §5.2).
///
/// Errors: the three buffers differ in length.
pub fn guidance(uncond: &[f32], cond: &[f32], scale: f32, out: &mut [f32]) -> Result<()> {
    if uncond.len() != cond.len() || out.len() != cond.len() {
        return Err(Error::shape(format!(
            "guidance: uncond ({}), cond ({}) and out ({}) must have the same length",
            uncond.len(),
            cond.len(),
            out.len()
        )));
    }
    for ((o, &u), &c) in out.iter_mut().zip(uncond).zip(cond) {
        *o = u + scale * (c - u);
    }
    Ok(())
}

/// `λ(σ) = ln(1 − σ) − ln σ` in float32 for 0 < σ < 1.
fn lambda(sigma: f32) -> f32 {
    (1.0 - sigma).ln() - sigma.ln()
}

/// The corrector (UniC) applied at the start of a UniPC step, before the predictor. Element-wise,
/// with `m` = m_i (this step), `m1` = m_{i−1}, `m2` = m_{i−2} and `xc` the previous step's corrected
/// sample xc_{i−1}:
/// `base = c0·xc − c1·m1`, then `xc_i = base − c2·(ρ0·((m2 − m1)/rk) + ρ1·(m − m1))`
/// (order 1: `xc_i = base − c2·(0.5·(m − m1))`).
#[derive(Clone, Copy, Debug)]
enum Corrector {
    /// Step 0: no corrector, xc_0 = x_0.
    None,
    /// After a first-order predictor.
    Order1 { c0: f32, c1: f32, c2: f32 },
    /// After a second-order predictor.
    Order2 {
        c0: f32,
        c1: f32,
        c2: f32,
        rk: f32,
        rho0: f32,
        rho1: f32,
    },
}

/// The update from x_i (or xc_i) to x_{i+1}, with `m` = m_i and `m1` = m_{i−1}.
#[derive(Clone, Copy, Debug)]
enum Update {
    /// σ_{i+1} = 0: x_{i+1} = m_i (λ = +∞, e^{−h} = 0, α = 1).
    Final,
    /// `x ← c0·x − c1·m` (UniPC order 1, DPM++ first order).
    First { c0: f32, c1: f32 },
    /// UniPC order 2: `x ← (c0·x − c1·m) − c2·(0.5·((m1 − m)/rk))`.
    UniP2 { c0: f32, c1: f32, c2: f32, rk: f32 },
    /// DPM++ 2M: `x ← (c0·x − c1·m) − c2·(inv_r0·(m − m1))`.
    Dpm2 {
        c0: f32,
        c1: f32,
        c2: f32,
        inv_r0: f32,
    },
}

/// Scalars of one step, computed once from the schedule.
#[derive(Clone, Copy, Debug)]
struct StepPlan {
    /// σ_i, for m_i = x_i − σ_i·v_i.
    sigma: f32,
    corrector: Corrector,
    update: Update,
}

/// UniPC's shared scalars for the move from sigma index `s0` to sigma index `t` (both finite λ):
/// `(c0, c1, c2, h, hh, B)` with `c0 = σ_t/σ_s0`, `c1 = α_t·φ`, `c2 = α_t·B`, φ = B = expm1(−h).
fn unipc_scalars(sig: &[f32], lam: &[f32], t: usize, s0: usize) -> (f32, f32, f32, f32, f32, f32) {
    let (sigma_t, sigma_s0) = (sig[t], sig[s0]);
    let alpha_t = 1.0 - sigma_t;
    let h = lam[t] - lam[s0];
    let hh = -h;
    let h_phi_1 = hh.exp_m1();
    let b_h = hh.exp_m1();
    (
        sigma_t / sigma_s0,
        alpha_t * h_phi_1,
        alpha_t * b_h,
        h,
        hh,
        b_h,
    )
}

/// Solves `[[1, 1], [rk, 1]]·ρ = [b1, b2]` as LAPACK `sgesv` does (LU with partial pivoting,
/// reciprocal-pivot scaling), in float32.
fn solve_rho(rk: f32, b1: f32, b2: f32) -> (f32, f32) {
    // Multiplications and divisions by the unit entries of R are exact and left out.
    if rk.abs() > 1.0 {
        // Pivot on rk: rows swapped, [[rk, 1], [1, 1]]·ρ = [b2, b1].
        let l21 = 1.0 / rk;
        let u22 = 1.0 - l21;
        let rho1 = (b1 - l21 * b2) / u22;
        let rho0 = (b2 - rho1) / rk;
        (rho0, rho1)
    } else {
        let u22 = 1.0 - rk;
        let rho1 = (b2 - rk * b1) / u22;
        let rho0 = b1 - rho1;
        (rho0, rho1)
    }
}

/// Builds the per-step scalars; rejects schedules that are degenerate in float32.
fn plan(solver: Solver, steps: usize, shift: f64, sig: &[f32]) -> Result<Vec<StepPlan>> {
    let n = steps;
    // Degenerate schedules: the reference would divide by zero or mix infinities into NaNs.
    let first_finite = match solver {
        Solver::UniPc => 0,
        Solver::DpmPp => 1,
    };
    if let Some(i) = (0..n).find(|&i| !(sig[i].is_finite() && sig[i] <= 1.0)) {
        return Err(Error::Invalid(format!(
            "{solver} with {steps} steps and shift {shift}: sigma {i} is {} (float64 cancellation \
             in the shift formula); use a larger shift",
            sig[i]
        )));
    }
    if let Some(i) = (0..n).find(|&i| sig[i] <= 0.0) {
        return Err(Error::Invalid(format!(
            "{solver} with {steps} steps and shift {shift}: sigma {i} rounds to 0 in float32; \
             use a larger shift"
        )));
    }
    if let Some(i) = (first_finite..n).find(|&i| sig[i] >= 1.0) {
        return Err(Error::Invalid(format!(
            "{solver} with {steps} steps and shift {shift}: sigma {i} rounds to 1 in float32; \
             use a smaller shift"
        )));
    }
    // λ_i for i < N (λ_0 of DPM++ with σ_0 = 1 is −∞ and never read).
    let lam: Vec<f32> = sig[..n]
        .iter()
        .map(|&s| {
            if s < 1.0 {
                lambda(s)
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    if let Some(i) =
        (first_finite.max(1)..n).find(|&i| !(sig[i] < sig[i - 1] && lam[i] > lam[i - 1]))
    {
        return Err(Error::Invalid(format!(
            "{solver} with {steps} steps and shift {shift}: sigmas {} and {i} coincide in float32; \
             use fewer steps or a smaller shift",
            i - 1
        )));
    }
    let mut plans = Vec::with_capacity(n);
    for i in 0..n {
        let last = i + 1 == n;
        let (corrector, update) = match solver {
            Solver::UniPc => {
                // Corrector with the previous step's predictor order p_{i−1}.
                let corrector = if i == 0 {
                    Corrector::None
                } else {
                    let (c0, c1, c2, h, hh, b_h) = unipc_scalars(sig, &lam, i, i - 1);
                    if i == 1 {
                        Corrector::Order1 { c0, c1, c2 }
                    } else {
                        let rk = (lam[i - 2] - lam[i - 1]) / h;
                        let h_phi_1 = hh.exp_m1();
                        let h_phi_k = h_phi_1 / hh - 1.0;
                        let b1 = h_phi_k / b_h;
                        let h_phi_k = h_phi_k / hh - 0.5;
                        let b2 = h_phi_k * 2.0 / b_h;
                        let (rho0, rho1) = solve_rho(rk, b1, b2);
                        Corrector::Order2 {
                            c0,
                            c1,
                            c2,
                            rk,
                            rho0,
                            rho1,
                        }
                    }
                };
                let update = if last {
                    Update::Final
                } else {
                    let (c0, c1, c2, h, _, _) = unipc_scalars(sig, &lam, i + 1, i);
                    if i == 0 {
                        Update::First { c0, c1 }
                    } else {
                        let rk = (lam[i - 1] - lam[i]) / h;
                        Update::UniP2 { c0, c1, c2, rk }
                    }
                };
                (corrector, update)
            }
            Solver::DpmPp => {
                let update = if last {
                    Update::Final
                } else {
                    let (sigma_t, sigma_s0) = (sig[i + 1], sig[i]);
                    let alpha_t = 1.0 - sigma_t;
                    let c0 = sigma_t / sigma_s0;
                    // e^{−h} − 1, with h = +∞ when σ_s0 = 1 (λ_s0 = −∞).
                    let (h, em1) = if sigma_s0 >= 1.0 {
                        (f32::INFINITY, -1.0)
                    } else {
                        let h = lam[i + 1] - lam[i];
                        (h, (-h).exp() - 1.0)
                    };
                    let c1 = alpha_t * em1;
                    // Second order needs a previous step with finite λ; after σ = 1 the ratio
                    // r0 is +∞ and D1 = 0, i.e. first order.
                    if i == 0 || sig[i - 1] >= 1.0 {
                        Update::First { c0, c1 }
                    } else {
                        let h0 = lam[i] - lam[i - 1];
                        let r0 = h0 / h;
                        Update::Dpm2 {
                            c0,
                            c1,
                            c2: 0.5 * c1,
                            inv_r0: 1.0 / r0,
                        }
                    }
                };
                (Corrector::None, update)
            }
        };
        plans.push(StepPlan {
            sigma: sig[i],
            corrector,
            update,
        });
    }
    Ok(plans)
}

/// A stateful flow-matching sampler over one trajectory: call [`Sampler::step`] for i = 0..N−1
/// with the guided velocity the DiT returned for `timesteps()[i]` and the current latent, which it
/// replaces by the next one. After step N−1 the latent is the denoised x_0.
///
/// The multistep history (m_{i−1}, m_{i−2} and, for UniPC, the corrected sample) lives inside the
/// sampler; its buffers are allocated on step 0 of the first trajectory and reused afterwards.
#[derive(Clone)]
pub struct Sampler {
    solver: Solver,
    shift: f64,
    schedule: Schedule,
    plans: Vec<StepPlan>,
    /// The step [`Sampler::step`] expects next.
    next: usize,
    /// Latent length of the current trajectory (set by step 0).
    len: usize,
    /// Data predictions: `m[0]` = m_{i−1}, `m[1]` = m_{i−2} after a step, `m[2]` scratch.
    m: [Vec<f32>; 3],
    /// UniPC: the corrected sample xc_{i−1} the next corrector starts from.
    last_sample: Vec<f32>,
}

impl fmt::Debug for Sampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sampler")
            .field("solver", &self.solver)
            .field("steps", &self.steps())
            .field("shift", &self.shift)
            .field("next", &self.next)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl Sampler {
    /// A sampler for `steps` steps with sigma shift `shift` (reference defaults: 50 and 5.0).
    ///
    /// Errors: those of [`schedule`], and schedules that are degenerate in float32 (a sigma that
    /// rounds to 1 where the solver needs a finite λ, or two equal sigmas), which only extreme
    /// shifts or step counts produce.
    pub fn new(solver: Solver, steps: usize, shift: f64) -> Result<Sampler> {
        let schedule = schedule(solver, steps, shift)?;
        let plans = plan(solver, steps, shift, &schedule.sigmas)?;
        Ok(Sampler {
            solver,
            shift,
            schedule,
            plans,
            next: 0,
            len: 0,
            m: [Vec::new(), Vec::new(), Vec::new()],
            last_sample: Vec::new(),
        })
    }

    /// The solver.
    pub fn solver(&self) -> Solver {
        self.solver
    }

    /// The number of steps N.
    pub fn steps(&self) -> usize {
        self.schedule.timesteps.len()
    }

    /// The sigma shift.
    pub fn shift(&self) -> f64 {
        self.shift
    }

    /// The `[N]` integer timesteps to feed the DiT, in step order.
    pub fn timesteps(&self) -> &[i64] {
        &self.schedule.timesteps
    }

    /// The `[N + 1]` float32 sigmas, last 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }

    /// The whole schedule.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// The step index [`Sampler::step`] expects next (N once the trajectory is complete).
    pub fn next_step(&self) -> usize {
        self.next
    }

    /// Forgets the current trajectory (the buffers are kept); the next call must be step 0.
    /// Calling step 0 does the same implicitly.
    pub fn reset(&mut self) {
        self.next = 0;
        self.len = 0;
    }

    /// Step `i`: `model_output` is the (guided) velocity v_i the DiT returned for `sample` = x_i at
    /// `timesteps()[i]`; `sample` is replaced by x_{i+1} (x_N = the denoised latent after the last
    /// step). Steps must come in order 0, 1, …, N−1; step 0 starts a new trajectory.
    ///
    /// Errors: `i` out of range or out of order, `model_output` and `sample` of different lengths,
    /// empty, or of a length other than the trajectory's step 0. The latent is left unchanged then.
    pub fn step(&mut self, i: usize, model_output: &[f32], sample: &mut [f32]) -> Result<()> {
        let n = self.steps();
        if i >= n {
            return Err(Error::Invalid(format!(
                "sampler step {i} is out of range: this {} schedule has {n} steps (0..{n})",
                self.solver
            )));
        }
        if i != 0 && i != self.next {
            return Err(Error::Invalid(format!(
                "sampler step {i} called out of order: the next step is {} (steps run 0, 1, …, {}; \
                 step 0 starts a new trajectory)",
                self.next,
                n - 1
            )));
        }
        let len = sample.len();
        if model_output.len() != len || len == 0 {
            return Err(Error::shape(format!(
                "sampler step {i}: model output ({}) and latent ({len}) must have the same, non-zero length",
                model_output.len()
            )));
        }
        if i != 0 && len != self.len {
            return Err(Error::shape(format!(
                "sampler step {i}: latent has {len} elements, but this trajectory started with {}",
                self.len
            )));
        }
        if i == 0 {
            self.len = len;
            for b in self
                .m
                .iter_mut()
                .chain(std::iter::once(&mut self.last_sample))
            {
                b.resize(len, 0.0);
            }
        }
        let p = self.plans[i];

        // m_i = x_i − σ_i·v_i into the scratch buffer.
        {
            let m = &mut self.m[2];
            for ((m, &x), &v) in m.iter_mut().zip(sample.iter()).zip(model_output) {
                *m = x - p.sigma * v;
            }
        }

        // UniC corrector: xc_i from xc_{i−1}, m_i, m_{i−1}, m_{i−2}; the model is not re-run.
        {
            let [m1, m2, m0] = &self.m;
            let xc = &self.last_sample;
            match p.corrector {
                Corrector::None => {}
                Corrector::Order1 { c0, c1, c2 } => {
                    for k in 0..len {
                        let base = c0 * xc[k] - c1 * m1[k];
                        let d1_t = m0[k] - m1[k];
                        sample[k] = base - c2 * (0.5 * d1_t);
                    }
                }
                Corrector::Order2 {
                    c0,
                    c1,
                    c2,
                    rk,
                    rho0,
                    rho1,
                } => {
                    for k in 0..len {
                        let base = c0 * xc[k] - c1 * m1[k];
                        let d1 = (m2[k] - m1[k]) / rk;
                        let corr_res = rho0 * d1;
                        let d1_t = m0[k] - m1[k];
                        sample[k] = base - c2 * (corr_res + rho1 * d1_t);
                    }
                }
            }
        }

        // History shift: m_i becomes m[0], m_{i−1} m[1]; the oldest buffer is the next scratch.
        self.m.rotate_right(1);
        if self.solver == Solver::UniPc {
            self.last_sample.copy_from_slice(sample);
        }

        // Predictor / solver update.
        let [m0, m1, _] = &self.m;
        match p.update {
            Update::Final => sample.copy_from_slice(m0),
            Update::First { c0, c1 } => {
                for (x, &m) in sample.iter_mut().zip(m0.iter()) {
                    *x = c0 * *x - c1 * m;
                }
            }
            Update::UniP2 { c0, c1, c2, rk } => {
                for ((x, &m), &mp) in sample.iter_mut().zip(m0.iter()).zip(m1.iter()) {
                    let base = c0 * *x - c1 * m;
                    let d1 = (mp - m) / rk;
                    *x = base - c2 * (0.5 * d1);
                }
            }
            Update::Dpm2 { c0, c1, c2, inv_r0 } => {
                for ((x, &m), &mp) in sample.iter_mut().zip(m0.iter()).zip(m1.iter()) {
                    let d1 = inv_r0 * (m - mp);
                    *x = (c0 * *x - c1 * m) - c2 * d1;
                }
            }
        }
        self.next = i + 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solver_names_round_trip() {
        for s in [Solver::UniPc, Solver::DpmPp] {
            assert_eq!(s.name().parse::<Solver>().unwrap(), s);
        }
        let e = "euler".parse::<Solver>().unwrap_err().to_string();
        assert!(e.contains("unipc") && e.contains("dpm++"), "{e}");
    }

    #[test]
    fn lu_solve_matches_closed_form() {
        for &(rk, b1, b2) in &[
            (-0.9f32, 0.3f32, 0.2f32),
            (-1.3, 0.4, -0.1),
            (0.5, 1.0, 2.0),
        ] {
            let (r0, r1) = solve_rho(rk, b1, b2);
            assert!((r0 + r1 - b1).abs() < 1e-6);
            assert!((rk * r0 + r1 - b2).abs() < 1e-6);
        }
    }
}
