//! The options of `streamdest bench` and their validation.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;

/// `streamdest bench` options.
#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// Synthetic profiles, each loaded as two fragments (CRM and web) sharing an email.
    #[arg(long, default_value_t = 100_000)]
    pub profiles: u64,
    /// Rule audiences, all mapped to the destination.
    #[arg(long, default_value_t = 20)]
    pub audiences: usize,
    /// Share of update events that write mapped attributes or can move a membership (the
    /// rest write an unmapped attribute and export nothing).
    #[arg(long, default_value_t = 0.5)]
    pub relevant: f64,
    /// Offered rate, events/s. A comma-separated list runs one measured phase per rate, in
    /// order, after a single initial load.
    #[arg(long, value_delimiter = ',', default_value = "10000")]
    pub rate: Vec<f64>,
    /// Measured seconds per phase.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds at the offered rate before measuring, per phase.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Dataflow worker threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Epoch length of the open-loop feeder, in milliseconds.
    #[arg(long, default_value_t = 5.0)]
    pub batch_ms: f64,
    /// The destination's `delivery.maxInFlight`.
    #[arg(long, default_value_t = 256)]
    pub max_in_flight: usize,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// After the `--rate` phases, search the highest rate whose p99 stays under `--p99-ms`.
    #[arg(long)]
    pub max: bool,
    /// The p99 latency bound for `--max`, in milliseconds.
    #[arg(long, default_value_t = 50.0)]
    pub p99_ms: f64,
    /// Measured seconds of each `--max` trial.
    #[arg(long, default_value_t = 5.0)]
    pub max_duration: f64,
    /// Warm-up seconds of each `--max` trial.
    #[arg(long, default_value_t = 1.0)]
    pub max_warmup: f64,
    /// The first rate `--max` tries (then doubles).
    #[arg(long, default_value_t = 5000.0)]
    pub max_start: f64,
    /// Cut a `--rate` phase short once the feeder lags its schedule by more than SECS (the
    /// phase is reported as aborted, with the events never pushed).
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub max_lag: f64,
    /// Events per epoch of the initial load; also the largest catch-up epoch.
    #[arg(long, default_value_t = 20_000)]
    pub load_batch: usize,
    /// Epochs the feeder may run ahead of the egress hand-off.
    #[arg(long, default_value_t = 64)]
    pub window: u64,
    /// Seed of the synthetic population and update stream.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Only run the receiver for SECS seconds (for `wrk`): prints its URL, then the count.
    #[arg(long, value_name = "SECS")]
    pub serve_only: Option<f64>,
}

/// Rejects option values the bench cannot run with.
pub(super) fn validate(args: &BenchArgs) -> anyhow::Result<()> {
    if args.profiles == 0 {
        bail!("--profiles must be at least 1");
    }
    if !(0.0..=1.0).contains(&args.relevant) {
        bail!("--relevant must be between 0 and 1");
    }
    if args.rate.is_empty() && !args.max {
        bail!("give at least one --rate, or --max");
    }
    for &r in &args.rate {
        if !(r.is_finite() && r > 0.0 && r <= 10_000_000.0) {
            bail!("--rate {r}: must be a positive number of events per second (≤ 10M)");
        }
    }
    for (name, v) in [
        ("--duration", args.duration),
        ("--max-duration", args.max_duration),
        ("--batch-ms", args.batch_ms),
        ("--p99-ms", args.p99_ms),
        ("--max-start", args.max_start),
        ("--max-lag", args.max_lag),
    ] {
        if !(v.is_finite() && v > 0.0) {
            bail!("{name} must be a positive number");
        }
    }
    for (name, v) in [("--warmup", args.warmup), ("--max-warmup", args.max_warmup)] {
        if !(v.is_finite() && v >= 0.0) {
            bail!("{name} must be zero or more");
        }
    }
    if args.workers == 0 || args.workers > 256 {
        bail!("--workers must be between 1 and 256");
    }
    Ok(())
}

/// A number of seconds from the command line as a `Duration` (clamped to 0 ..= 1e6 s).
pub(super) fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.0, 1e6))
}
