//! `--max`: the highest offered rate whose p99 stays under `--p99-ms`, by doubling then
//! bisecting short trials.

use std::time::Duration;

use super::args::{BenchArgs, secs};
use super::engine::{Engine, PhaseSpec};
use super::report::{MaxReport, PhaseReport};
use super::table::one_line;

/// Runs the `--max` trials on `engine` (after the `--rate` phases).
pub(super) fn search_max(engine: &mut Engine, args: &BenchArgs) -> anyhow::Result<MaxReport> {
    let bound = args.p99_ms;
    let abort_lag = Duration::from_secs_f64((4.0 * bound / 1000.0).max(1.0));
    let mut trials: Vec<PhaseReport> = Vec::new();
    let mut trial = |engine: &mut Engine, rate: f64| -> anyhow::Result<bool> {
        eprintln!("bench: --max trial at {rate:.0} events/s");
        let report = engine.run_phase(
            &PhaseSpec {
                rate,
                warmup: secs(args.max_warmup),
                duration: secs(args.max_duration),
                abort_lag: Some(abort_lag),
                p99_bound_ms: bound,
            },
            |_| {},
        )?;
        eprintln!("bench:   {}", one_line(&report));
        let passed = report.passed;
        trials.push(report);
        Ok(passed)
    };
    let mut lo = 0.0f64;
    let mut hi: Option<f64> = None;
    let mut rate = args.max_start;
    for _ in 0..8 {
        if trial(engine, rate)? {
            lo = rate;
            rate *= 2.0;
        } else {
            hi = Some(rate);
            break;
        }
    }
    if let Some(mut hi) = hi {
        for _ in 0..5 {
            if hi - lo <= (0.05 * hi).max(250.0) {
                break;
            }
            let mid = ((lo + hi) / 2.0 / 100.0).round() * 100.0;
            if trial(engine, mid)? {
                lo = mid;
            } else {
                hi = mid;
            }
        }
    }
    let best = trials
        .iter()
        .filter(|t| t.passed && t.rate_offered == lo)
        .map(|t| t.achieved_exports_per_s)
        .next()
        .unwrap_or(0.0);
    Ok(MaxReport {
        p99_bound_ms: bound,
        best_rate: lo,
        best_exports_per_s: best,
        trials,
    })
}
