//! Dataflow throughput and memory: synthetic profiles through the whole dataflow with the
//! exports discarded (they are encoded, then dropped).
//!
//! `cargo bench --bench dataflow -- [--profiles N] [--workers W] [--batch B] [--updates U]
//! [--count]` (`--count`: also print each stage's updates per event)
//!
//! Phase 1 loads every profile (two fragments each); resident memory is read after it.
//! Phase 2 times `U` update events (half of them change a mapped attribute or a membership),
//! parsed and resolved before the clock starts, so the figure is the dataflow's own rate.

use std::sync::Arc;
use std::time::Instant;

use streamdest::events::{EpochBuilder, Update, parse_line};
use streamdest::pipeline::{Pipeline, PipelineConfig};
use streamdest::synth::Synth;
use streamdest_operators::meter::Meter;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let profiles = arg("--profiles", 100_000);
    let workers = arg("--workers", 1) as usize;
    let batch = arg("--batch", 1000) as usize;
    let updates = arg("--updates", 100_000) as usize;
    let synth = Synth {
        profiles,
        audiences: 20,
        relevant: 0.5,
        seed: 7,
    };
    let plan = Arc::new(synth.config("http://127.0.0.1:9/").plan(1_700_000_000_000));

    let baseline = rss_kib("VmRSS:");
    let meter = if std::env::args().any(|a| a == "--count") {
        Meter::counting()
    } else {
        Meter::default()
    };
    let config = PipelineConfig {
        workers,
        cluster: None,
        window: 16,
        meter: meter.clone(),
    };
    let (mut pipeline, mut stream) = Pipeline::start(plan.clone(), config)?;
    let consumer = std::thread::spawn(move || {
        let mut exports = 0u64;
        while let Some((epoch, batch)) = stream.next_epoch() {
            exports += batch.len() as u64;
            stream.ack(epoch);
        }
        exports
    });

    let mut seq = 0u64;
    let mut resolve = |line: String| -> anyhow::Result<Update> {
        seq += 1;
        let event = parse_line(&line)?;
        Ok(Update::resolve(&plan, event, seq, 0)?)
    };

    // Phase 1: initial load, in epochs of 10k events.
    let load_start = Instant::now();
    let mut builder = EpochBuilder::new(pipeline.peers());
    for line in synth.initial_load() {
        builder.add(resolve(line)?);
        if builder.events() >= 10_000 {
            pipeline.push(builder.finish())?;
        }
    }
    if builder.events() > 0 {
        pipeline.push(builder.finish())?;
    }
    pipeline.wait_all_acked()?;
    let load_secs = load_start.elapsed().as_secs_f64();
    let loaded_rss = rss_kib("VmRSS:");

    let counted_at_load = meter.snapshot();

    // Phase 2: timed updates.
    let events: Vec<Update> = synth
        .updates()
        .take(updates)
        .map(&mut resolve)
        .collect::<Result<_, _>>()?;
    let start = Instant::now();
    let mut builder = EpochBuilder::new(pipeline.peers());
    for update in events {
        builder.add(update);
        if builder.events() >= batch {
            pipeline.push(builder.finish())?;
        }
    }
    if builder.events() > 0 {
        pipeline.push(builder.finish())?;
    }
    pipeline.wait_all_acked()?;
    let secs = start.elapsed().as_secs_f64();
    pipeline.finish()?;
    let exports = consumer
        .join()
        .map_err(|_| anyhow::anyhow!("consumer panicked"))?;

    let per_profile = (loaded_rss.saturating_sub(baseline) * 1024) as f64 / profiles as f64;
    let counted = meter.snapshot();
    if !counted.is_empty() {
        eprintln!("updates per event, timed phase ({updates} events, all workers):");
        let mut total = 0.0;
        for (name, n) in &counted {
            let per = (n - counted_at_load.get(name).copied().unwrap_or(0)) as f64 / updates as f64;
            if !name.starts_with("messages")
                && !name.ends_with("marks")
                && !name.contains("not arranged")
            {
                total += per;
            }
            eprintln!("  {name:<40} {per:.3}");
        }
        eprintln!("  {:<40} {total:.3}", "arrangement inputs, total");
    }
    println!(
        "{{\"profiles\":{profiles},\"workers\":{workers},\"batch\":{batch},\"updates\":{updates},\
         \"load_events_per_s\":{:.0},\"events_per_s\":{:.0},\"us_per_event\":{:.2},\"exports\":{exports},\
         \"rss_after_load_mib\":{:.1},\"bytes_per_profile\":{:.0},\"peak_rss_mib\":{:.1}}}",
        2.0 * profiles as f64 / load_secs,
        updates as f64 / secs,
        secs * 1e6 / updates as f64,
        loaded_rss as f64 / 1024.0,
        per_profile,
        rss_kib("VmHWM:") as f64 / 1024.0,
    );
    Ok(())
}
