//! `streamdest bench` itself: the initial load, the `--rate` phases, `--max`, then the report.

use std::time::Duration;

use anyhow::Context;

use super::args::{BenchArgs, secs, validate};
use super::engine::{Engine, EngineOptions, PhaseSpec};
use super::max_search::search_max;
use super::report::{BenchReport, Machine, Params, Resources, round2};
use super::resources::{cpu_times, loadavg, peak_rss_mib, proc_status_mib};
use super::serve_only::serve_only;
use super::table::{one_line, print_table};
use crate::synth::Synth;

/// Runs `streamdest bench`: prints the table, writes `--json`.
pub fn run(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    if let Some(seconds) = args.serve_only {
        serve_only(seconds)?;
        return Ok(BenchReport::default());
    }
    validate(args)?;
    let loadavg_start = loadavg();
    let synth = Synth {
        profiles: args.profiles,
        audiences: args.audiences,
        relevant: args.relevant,
        seed: args.seed,
    };
    let mut engine = Engine::start(EngineOptions {
        synth,
        workers: args.workers,
        batch: Duration::from_secs_f64(args.batch_ms / 1000.0),
        window: args.window,
        max_in_flight: args.max_in_flight,
        load_batch: args.load_batch,
        keep_sample: false,
    })?;
    eprintln!(
        "bench: loading {} profiles ({} events, epochs of {})",
        args.profiles,
        args.profiles * 2,
        args.load_batch
    );
    let load = engine.load(|done, total, elapsed| {
        eprintln!(
            "bench: load {done}/{total} events, {:.1} s, {:.0} events/s, RSS {:.0} MiB",
            elapsed.as_secs_f64(),
            done as f64 / elapsed.as_secs_f64().max(1e-9),
            proc_status_mib("VmRSS:")
        );
    })?;

    let mut runs = Vec::new();
    for &rate in &args.rate {
        let spec = PhaseSpec {
            rate,
            warmup: secs(args.warmup),
            duration: secs(args.duration),
            abort_lag: Some(secs(args.max_lag)),
            p99_bound_ms: args.p99_ms,
        };
        eprintln!(
            "bench: {rate:.0} events/s for {} s (+{} s warm-up)",
            args.duration, args.warmup
        );
        let report = engine.run_phase(&spec, |_| {})?;
        eprintln!("bench:   {}", one_line(&report));
        runs.push(report);
    }
    let max = if args.max {
        Some(search_max(&mut engine, args)?)
    } else {
        None
    };

    let egress = engine.egress_totals();
    let receiver_requests = engine.receiver_requests();
    engine.finish()?;
    let (user, sys) = cpu_times();
    let report = BenchReport {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        machine: Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            loadavg_start,
            loadavg_end: loadavg(),
        },
        params: Params {
            profiles: args.profiles,
            audiences: args.audiences,
            relevant: args.relevant,
            workers: args.workers,
            batch_ms: args.batch_ms,
            max_in_flight: args.max_in_flight,
            window: args.window,
            load_batch: args.load_batch,
            seed: args.seed,
        },
        load,
        runs,
        max,
        egress,
        receiver_requests,
        resources: Resources {
            cpu_user_s: round2(user),
            cpu_sys_s: round2(sys),
            peak_rss_mib: round2(peak_rss_mib()),
        },
    };
    print_table(&report, &mut std::io::stdout().lock())?;
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}
