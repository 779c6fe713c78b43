//! `streamdest bench` and `streamdest demo` through the real binary: the bench's JSON report
//! is self-consistent (counts add up, percentiles ordered, something was achieved) — timings
//! are not checked, this machine is shared — and the demo runs to its summary.

use std::process::Command;

use serde_json::Value;

fn streamdest() -> Command {
    Command::new(env!("CARGO_BIN_EXE_streamdest"))
}

fn u(v: &Value, path: &str) -> u64 {
    v.pointer(path)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{path} is not an unsigned integer in {v}"))
}

fn f(v: &Value, path: &str) -> f64 {
    v.pointer(path)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{path} is not a number in {v}"))
}

fn assert_ordered(v: &Value, path: &str) {
    let p = |q: &str| f(v, &format!("{path}/{q}"));
    let (p50, p95, p99, p999, max) = (p("p50"), p("p95"), p("p99"), p("p999"), p("max"));
    assert!(
        p50 <= p95 && p95 <= p99 && p99 <= p999 && p999 <= max,
        "{path}: percentiles out of order: {p50} {p95} {p99} {p999} {max}"
    );
    assert!(p50 >= 0.0, "{path}: negative latency");
}

#[test]
fn bench_json_report_is_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let output = streamdest()
        .args([
            "bench",
            "--profiles",
            "2000",
            "--rate",
            "500",
            "--duration",
            "3",
            "--warmup",
            "1",
            "--workers",
            "1",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "bench failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("| offered ev/s |"), "no table:\n{stdout}");
    assert!(stdout.contains("where the time goes"), "{stdout}");

    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();

    // The load: two fragments per profile.
    assert_eq!(u(&report, "/load/events"), 4000);
    assert_eq!(u(&report, "/params/profiles"), 2000);

    // Every export ended one way or the other, and the endpoint saw each delivery.
    let exports = u(&report, "/egress/exports");
    let delivered = u(&report, "/egress/delivered");
    let dead = u(&report, "/egress/dead_lettered");
    assert_eq!(delivered + dead, exports, "{report}");
    assert_eq!(u(&report, "/egress/pending"), 0);
    assert!(exports > 0);
    assert!(u(&report, "/receiver_requests") >= delivered);

    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    assert_eq!(f(run, "/rate_offered"), 500.0);
    assert_eq!(u(run, "/events_scheduled"), 1500);
    assert_eq!(u(run, "/events_pushed"), 1500);
    assert_eq!(u(run, "/events_dropped"), 0);
    assert_eq!(run["aborted"], Value::Bool(false));
    assert!(f(run, "/achieved_events_per_s") > 0.0);
    assert!(f(run, "/achieved_exports_per_s") > 0.0);

    // Latency: one sample per export of a measured event; the phase's exports are a subset of
    // the egress's (the warm-up's come on top).
    let measured = u(run, "/exports");
    assert!(measured > 0);
    assert_eq!(u(run, "/latency_ms/count"), measured);
    assert!(measured + u(run, "/receipts_warmup") <= exports);
    assert_eq!(
        u(run, "/receipts_unmatched"),
        0,
        "Idempotency-Key no longer ends in the sequence number"
    );
    assert_ordered(run, "/latency_ms");
    for stage in [
        "ingest_wait",
        "dataflow_per_epoch",
        "queue_before_egress",
        "egress",
    ] {
        assert_ordered(run, &format!("/breakdown_ms/{stage}"));
        assert!(
            u(run, &format!("/breakdown_ms/{stage}/count")) > 0,
            "{stage}"
        );
    }
    assert_eq!(u(run, "/breakdown_ms/ingest_wait/count"), 1500);
    assert!(f(&report, "/resources/peak_rss_mib") > 0.0);
    assert!(f(&report, "/resources/cpu_user_s") + f(&report, "/resources/cpu_sys_s") > 0.0);
}

#[test]
fn bench_refuses_bad_flags() {
    let output = streamdest()
        .args(["bench", "--rate", "0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--rate"), "{stderr}");
}

#[test]
fn demo_runs_and_summarises() {
    let output = streamdest()
        .args(["demo", "--seconds", "3"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("summary"), "{stdout}");
    assert!(stdout.contains("exports delivered"), "{stdout}");
    assert!(stdout.contains("event → endpoint"), "{stdout}");
    assert!(
        stdout.contains("Idempotency-Key"),
        "no sample request:\n{stdout}"
    );
    assert!(stderr.contains("events in"), "no progress line:\n{stderr}");
}
