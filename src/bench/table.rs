//! The human-readable report: the one-line phase summaries and the tables on stdout.

use std::io::Write;

use super::report::{BenchReport, Percentiles, PhaseReport};

/// A phase in one line, for the progress on stderr.
pub(super) fn one_line(r: &PhaseReport) -> String {
    format!(
        "offered {:.0}/s achieved {:.0} ev/s, {:.0} exports/s; latency p50 {:.1} p99 {:.1} max {:.1} ms; backlog {}{}; cpu {:.2} cores{}",
        r.rate_offered,
        r.achieved_events_per_s,
        r.achieved_exports_per_s,
        r.latency_ms.p50,
        r.latency_ms.p99,
        r.latency_ms.max,
        r.backlog_events,
        if r.aborted {
            " (aborted: fell behind)"
        } else {
            ""
        },
        r.cpu_cores,
        if r.passed { "" } else { " — FAIL" },
    )
}

fn ms_cell(p: &Percentiles) -> String {
    format!("{:.1} / {:.1} / {:.1}", p.p50, p.p99, p.max)
}

/// Writes the human-readable report.
pub(super) fn print_table(r: &BenchReport, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "streamdest bench: {} profiles, {} audiences, relevant {}, {} workers, batch {} ms, maxInFlight {}",
        r.params.profiles,
        r.params.audiences,
        r.params.relevant,
        r.params.workers,
        r.params.batch_ms,
        r.params.max_in_flight
    )?;
    writeln!(
        out,
        "machine: {} cores, load average {} at start, {} at end",
        r.machine.cores, r.machine.loadavg_start, r.machine.loadavg_end
    )?;
    writeln!(
        out,
        "initial load: {} events in {:.1} s ({:.0} events/s), {} exports discarded, RSS after {:.0} MiB",
        r.load.events,
        r.load.seconds,
        r.load.events_per_s,
        r.load.exports_discarded,
        r.load.rss_mib_after
    )?;
    let mut rows: Vec<(&str, &PhaseReport)> = r.runs.iter().map(|p| ("", p)).collect();
    if let Some(max) = &r.max {
        rows.extend(max.trials.iter().map(|p| ("max trial", p)));
    }
    writeln!(out)?;
    writeln!(
        out,
        "| offered ev/s | achieved ev/s | exports/s | p50 ms | p95 ms | p99 ms | p99.9 ms | max ms | backlog | CPU cores | |"
    )?;
    writeln!(
        out,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )?;
    for (label, p) in &rows {
        let l = &p.latency_ms;
        writeln!(
            out,
            "| {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.2} | {}{}{} |",
            p.rate_offered,
            p.achieved_events_per_s,
            p.achieved_exports_per_s,
            l.p50,
            l.p95,
            l.p99,
            l.p999,
            l.max,
            p.backlog_events,
            p.cpu_cores,
            label,
            if p.aborted { " aborted" } else { "" },
            if p.passed { " ok" } else { " FAIL" },
        )?;
    }
    writeln!(out)?;
    writeln!(out, "where the time goes (ms, p50 / p99 / max):")?;
    writeln!(
        out,
        "| offered ev/s | ingest wait | dataflow per epoch | queue before egress | egress (HTTP) | events/epoch |"
    )?;
    writeln!(out, "|---:|---|---|---|---|---:|")?;
    for (_, p) in &rows {
        let b = &p.breakdown_ms;
        writeln!(
            out,
            "| {:.0} | {} | {} | {} | {} | {:.0} |",
            p.rate_offered,
            ms_cell(&b.ingest_wait),
            ms_cell(&b.dataflow_per_epoch),
            ms_cell(&b.queue_before_egress),
            ms_cell(&b.egress),
            p.events_per_epoch
        )?;
    }
    writeln!(out)?;
    if let Some(max) = &r.max {
        writeln!(
            out,
            "max: {:.0} events/s offered with p99 ≤ {} ms ({:.0} exports/s)",
            max.best_rate, max.p99_bound_ms, max.best_exports_per_s
        )?;
    }
    writeln!(
        out,
        "egress: {} exports, {} delivered, {} dead-lettered, {} retried; endpoint received {} requests",
        r.egress.exports,
        r.egress.delivered,
        r.egress.dead_lettered,
        r.egress.retried,
        r.receiver_requests
    )?;
    writeln!(
        out,
        "resources: CPU {:.1} s user + {:.1} s system; peak RSS {:.0} MiB",
        r.resources.cpu_user_s, r.resources.cpu_sys_s, r.resources.peak_rss_mib
    )?;
    Ok(())
}
