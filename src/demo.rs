//! `streamdest demo`: the Quick start's first command. No configuration: everything runs in
//! this process on loopback.
//!
//! A local HTTP endpoint ([`crate::receiver`]), a synthetic population (`--profiles`, four
//! rule audiences on loyalty points and first names, one destination mapping them and the
//! name and email attributes), the dataflow and the egress. After the initial load the demo
//! feeds updates at a modest open-loop rate for `--seconds`, with a live progress line on
//! standard error (events in, exports delivered, event-to-endpoint latency), then prints a
//! summary and one request exactly as the endpoint received it.
//!
//! The progress line is a plain `\r`-rewritten line when standard error is a terminal, and a
//! line every two seconds otherwise (logs, CI); no progress-bar crate is needed for one line.
//! It is the same engine as `streamdest bench` ([`crate::bench`]), with friendlier output.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::bail;

use crate::bench::{Engine, EngineOptions, PhaseSpec, Progress, peak_rss_mib};
use crate::synth::Synth;

/// `streamdest demo` options.
#[derive(clap::Args, Clone, Debug)]
pub struct DemoArgs {
    /// Seconds of live updates after the initial load.
    #[arg(long, default_value_t = 20.0)]
    pub seconds: f64,
    /// Synthetic profiles.
    #[arg(long, default_value_t = 20_000)]
    pub profiles: u64,
    /// Seconds at the same rate before the figures start (right after the load, the dataflow
    /// is still merging the load's batches and the first epochs are slow).
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Offered update events per second.
    #[arg(long, default_value_t = 2_000.0)]
    pub rate: f64,
    /// Dataflow worker threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
}

/// Runs the demo; the summary goes to standard output, progress to standard error.
pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    if !(args.seconds.is_finite() && args.seconds > 0.0 && args.seconds <= 86_400.0) {
        bail!("--seconds must be a positive number (at most a day)");
    }
    if !(args.warmup.is_finite() && (0.0..=3600.0).contains(&args.warmup)) {
        bail!("--warmup must be between 0 and 3600 seconds");
    }
    if !(args.rate.is_finite() && args.rate > 0.0 && args.rate <= 1_000_000.0) {
        bail!("--rate must be a positive number of events per second (at most 1M)");
    }
    if args.profiles == 0 || args.profiles > 10_000_000 {
        bail!("--profiles must be between 1 and 10M");
    }
    if args.workers == 0 || args.workers > 64 {
        bail!("--workers must be between 1 and 64");
    }
    let synth = Synth {
        profiles: args.profiles,
        audiences: 4,
        relevant: 0.5,
        seed: 7,
    };
    let mut engine = Engine::start(EngineOptions {
        synth,
        workers: args.workers,
        batch: Duration::from_millis(10),
        window: 64,
        max_in_flight: 64,
        load_batch: 20_000,
        keep_sample: true,
    })?;
    let terminal = std::io::stderr().is_terminal();
    eprintln!(
        "streamdest demo: an HTTP endpoint on {} (in this process), {} synthetic profiles, \
         {} dataflow workers",
        engine.receiver_url(),
        args.profiles,
        args.workers
    );
    eprintln!(
        "loading the profiles ({} events; their exports are not sent)…",
        args.profiles * 2
    );
    let load = engine.load(|_, _, _| {})?;
    eprintln!(
        "loaded in {:.1} s ({:.0} events/s). Now {:.0} update events/s: {} s of warm-up, then {} s \
         measured; half of the events touch a mapped attribute or an audience's rule:",
        load.seconds, load.events_per_s, args.rate, args.warmup, args.seconds
    );

    let mut last_line = Duration::ZERO;
    let seconds = args.seconds;
    let warmup = Duration::from_secs_f64(args.warmup);
    let report = engine.run_phase(
        &PhaseSpec {
            rate: args.rate,
            warmup,
            duration: Duration::from_secs_f64(seconds),
            abort_lag: Some(Duration::from_secs(60)),
            p99_bound_ms: 50.0,
        },
        |p: &Progress| {
            let line = if p.elapsed < warmup {
                format!(
                    "[warm-up {:>4.1} s] events in {:>8} │ exports delivered {:>8}",
                    p.elapsed.as_secs_f64(),
                    p.events_pushed,
                    p.received
                )
            } else {
                format!(
                "[{:>5.1}/{seconds} s] events in {:>8} │ exports delivered {:>8} │ latency p50 {:>6.1} ms  p99 {:>6.1} ms │ backlog {}",
                (p.elapsed - warmup).as_secs_f64().min(seconds),
                p.events_pushed,
                p.received,
                p.latency.p50,
                p.latency.p99,
                p.backlog
            )
            };
            if terminal {
                eprint!("\r{line}   ");
                let _ = std::io::stderr().flush();
            } else if p.elapsed >= last_line + Duration::from_secs(2) || p.elapsed.is_zero() {
                last_line = p.elapsed;
                eprintln!("{line}");
            }
        },
    )?;
    if terminal {
        eprintln!();
    }
    let egress = engine.egress_totals();
    let sample = engine.sample();
    engine.finish()?;

    let mut out = std::io::stdout().lock();
    let l = &report.latency_ms;
    let b = &report.breakdown_ms;
    writeln!(out, "── streamdest demo: summary ──")?;
    writeln!(
        out,
        "events in:          {} in {} s after {} s of warm-up ({:.0} events/s offered, {:.0} achieved)",
        report.events_pushed,
        report.duration_s,
        report.warmup_s,
        report.rate_offered,
        report.achieved_events_per_s
    )?;
    writeln!(
        out,
        "exports delivered:  {} of {} ({} dead-lettered, {} retried; warm-up included), {:.0} exports/s",
        egress.delivered,
        egress.exports,
        egress.dead_lettered,
        egress.retried,
        report.achieved_exports_per_s
    )?;
    writeln!(
        out,
        "event → endpoint:   p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms ({} exports)",
        l.p50, l.p95, l.p99, l.p999, l.max, l.count
    )?;
    writeln!(
        out,
        "where it goes (p50): ingest batching {:.1} ms, dataflow {:.1} ms per epoch, queue {:.1} ms, HTTP {:.1} ms",
        b.ingest_wait.p50, b.dataflow_per_epoch.p50, b.queue_before_egress.p50, b.egress.p50
    )?;
    writeln!(
        out,
        "resources:          {:.2} CPU cores while running, peak RSS {:.0} MiB",
        report.cpu_cores,
        peak_rss_mib()
    )?;
    if let Some((key, body)) = sample {
        writeln!(out)?;
        writeln!(
            out,
            "One request as the endpoint got it (POST, Content-Type: application/json, Idempotency-Key: {key}):"
        )?;
        let pretty = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| serde_json::to_string_pretty(&v).ok())
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        for line in pretty.lines().take(60) {
            writeln!(out, "  {line}")?;
        }
    }
    writeln!(out)?;
    writeln!(
        out,
        "Next: `streamdest bench --rate 10000` measures the same pipeline at a fixed rate; \
         `streamdest replay --config FILE --events FILE` runs your own configuration."
    )?;
    Ok(())
}
