//! Shared by `tests/triggers.rs` and `tests/stitching.rs`: runs the real binary,
//! `streamdest replay --config C --events E --dry-run`, on a configuration and an event history
//! written to a temporary directory, and parses what it prints.
//!
//! Each test binary uses a subset.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};

/// What one replay printed.
pub struct Replay {
    /// Every standard-output line, parsed: `{"destination","profile","payload"}`.
    pub exports: Vec<Value>,
    pub stderr: String,
    /// The exit status (`None` when killed by a signal).
    pub code: Option<i32>,
    /// Where the events file was written (errors name it).
    pub events_path: PathBuf,
}

/// Replays `events` (the file's exact text) under `config` with the extra `args`.
pub fn replay_text(config: &Value, events: &str, args: &[&str]) -> Replay {
    let dir = tempfile::tempdir().expect("creating a temporary directory");
    let config_path = dir.path().join("config.json");
    let events_path = dir.path().join("events.ndjson");
    std::fs::write(&config_path, serde_json::to_string_pretty(config).unwrap())
        .expect("writing the config");
    std::fs::write(&events_path, events).expect("writing the events");
    let output = Command::new(env!("CARGO_BIN_EXE_streamdest"))
        .arg("replay")
        .arg("--config")
        .arg(&config_path)
        .arg("--events")
        .arg(&events_path)
        .arg("--dry-run")
        .args(args)
        .output()
        .expect("running streamdest");
    let stdout = String::from_utf8(output.stdout).expect("stdout is UTF-8");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let exports = stdout
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {line}\n{stderr}"))
        })
        .collect();
    Replay {
        exports,
        stderr,
        code: output.status.code(),
        events_path,
    }
}

/// The NDJSON text of `events`, one a line.
pub fn ndjson(events: &[Value]) -> String {
    events.iter().map(|e| format!("{e}\n")).collect()
}

/// Replays `events` and returns the exports, asserting that the replay succeeded.
pub fn replay(config: &Value, events: &[Value], args: &[&str]) -> Vec<Value> {
    let run = replay_text(config, &ndjson(events), args);
    assert_eq!(
        run.code,
        Some(0),
        "replay failed; stderr:\n{}\nexports so far:\n{}",
        run.stderr,
        pretty(&run.exports)
    );
    run.exports
}

pub fn pretty(values: &[Value]) -> String {
    values
        .iter()
        .map(|v| serde_json::to_string_pretty(v).unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Asserts the exact list of exports (each compared as a JSON value: key order is irrelevant).
#[track_caller]
pub fn assert_exports(actual: &[Value], expected: &[Value]) {
    if actual != expected {
        let first = actual
            .iter()
            .zip(expected)
            .position(|(a, e)| a != e)
            .unwrap_or(actual.len().min(expected.len()));
        panic!(
            "exports differ (first difference at index {first}; {} actual, {} expected)\n\
             --- actual ---\n{}\n--- expected ---\n{}",
            actual.len(),
            expected.len(),
            pretty(actual),
            pretty(expected)
        );
    }
}

/// Like [`assert_exports`], ignoring the order (for exports that tie on destination and profile).
#[track_caller]
pub fn assert_exports_unordered(actual: &[Value], expected: &[Value]) {
    let sorted = |v: &[Value]| {
        let mut v: Vec<Value> = v.to_vec();
        v.sort_by_key(|x| x.to_string());
        v
    };
    assert_exports(&sorted(actual), &sorted(expected));
}

/// `2024-05-01T10:00:SSZ`: event timestamps, and the `lastQualificationTime` they give.
pub fn t(seconds: u32) -> String {
    assert!(seconds < 60);
    format!("2024-05-01T10:00:{seconds:02}Z")
}

/// A fragment upsert.
pub fn frag(dataset: &str, id: &str, ts: &str, identity_map: Value, attributes: Value) -> Value {
    json!({"type": "fragment", "dataset": dataset, "id": id, "timestamp": ts,
           "identityMap": identity_map, "attributes": attributes})
}

/// A fragment delete.
pub fn delete(dataset: &str, id: &str, ts: &str) -> Value {
    json!({"type": "fragmentDelete", "dataset": dataset, "id": id, "timestamp": ts})
}

/// An upload: `add` and `remove` are `(namespace, id)` pairs.
pub fn upload(audience: &str, ts: &str, add: &[(&str, &str)], remove: &[(&str, &str)]) -> Value {
    let list = |ids: &[(&str, &str)]| -> Vec<Value> {
        ids.iter()
            .map(|(ns, id)| json!({"namespace": ns, "id": id}))
            .collect()
    };
    json!({"type": "uploadMembers", "audience": audience, "timestamp": ts,
           "add": list(add), "remove": list(remove)})
}

/// `{"email":[{"id": id}]}`.
pub fn email(id: &str) -> Value {
    json!({"email": [{"id": id}]})
}

/// One line of `--dry-run` output.
pub fn export(destination: &str, profile: &str, payload: Value) -> Value {
    json!({"destination": destination, "profile": profile, "payload": payload})
}

/// A `segmentMembership.ups` entry with both include flags off.
pub fn realized(lqt: &str) -> Value {
    json!({"lastQualificationTime": lqt, "status": "realized"})
}

pub fn exited(lqt: &str) -> Value {
    json!({"lastQualificationTime": lqt, "status": "exited"})
}
