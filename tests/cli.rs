//! The command line a person uses (issue #9): verdicts, refusals and closed pipes, run as real
//! processes.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn example_config() -> PathBuf {
    root().join("examples/config.json")
}

fn streamdest(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_streamdest"));
    command.args(args).env_remove("ANALYTICS_SECRET");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("run streamdest")
}

#[test]
fn validate_ends_with_a_verdict_and_refuses_unset_secrets() {
    let config = example_config();
    let config = config.to_str().expect("utf-8 path");
    let ok = streamdest(
        &["validate", "--config", config],
        &[("ANALYTICS_SECRET", "s3cr3t")],
    );
    assert!(ok.status.success());
    let stderr = String::from_utf8_lossy(&ok.stderr);
    assert_eq!(
        stderr.lines().last(),
        Some("ok: 2 merge policies, 2 audiences, 1 destination")
    );
    let shown = String::from_utf8_lossy(&ok.stdout);
    assert!(!shown.contains("s3cr3t"));

    let unset = streamdest(&["validate", "--config", config], &[]);
    assert_eq!(unset.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&unset.stderr);
    assert!(
        stderr.contains(
            "destinations[0].auth.clientSecret.env: the environment variable ANALYTICS_SECRET is not set"
        ),
        "{stderr}"
    );
    // A delivering replay refuses before reading an event; a dry run needs no secret.
    let events = root().join("examples/replay/events.ndjson");
    let events = events.to_str().expect("utf-8 path");
    let replay = streamdest(&["replay", "--config", config, "--events", events], &[]);
    assert_eq!(replay.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&replay.stderr).contains("ANALYTICS_SECRET is not set"));
    let dry = streamdest(
        &[
            "replay",
            "--config",
            config,
            "--events",
            events,
            "--dry-run",
        ],
        &[],
    );
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
}

#[test]
fn workers_are_bounded_with_a_clear_message() {
    let config = example_config();
    let config = config.to_str().expect("utf-8 path");
    for bad in ["0", "1000"] {
        let out = streamdest(
            &[
                "replay",
                "--config",
                config,
                "--events",
                "-",
                "--workers",
                bad,
                "--dry-run",
            ],
            &[],
        );
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("invalid value '{bad}' for '--workers")),
            "{stderr}"
        );
        assert!(stderr.contains("1..=256"), "{stderr}");
    }
}

/// Reads a few bytes of the command's standard output, closes it, and returns how the
/// command ended and what it said on stderr.
fn close_early(args: &[&str], stdin: Option<&[u8]>, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_streamdest"));
    command
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("start streamdest");
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }
    let mut stdout = child.stdout.take().expect("stdout");
    let mut head = [0u8; 10];
    stdout.read_exact(&mut head).expect("some output");
    drop(stdout);
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_closed_standard_output_ends_quietly() {
    let config = example_config();
    let config = config.to_str().expect("utf-8 path");
    let (code, stderr) = close_early(
        &["validate", "--config", config],
        None,
        &[("ANALYTICS_SECRET", "x")],
    );
    // `validate`'s output is small enough to be written before the pipe closes, or not.
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // Many exports: the pipe closes while the replay is still writing.
    let mut events = Vec::new();
    for i in 0..20_000 {
        writeln!(
            events,
            r#"{{"type":"fragment","dataset":"crm","id":"c{i}","timestamp":"2024-05-01T10:00:00Z","identityMap":{{"email":[{{"id":"p{i}@x.org"}}]}},"attributes":{{"person":{{"name":{{"firstName":"John","lastName":"L{i}"}}}}}}}}"#
        )
        .expect("write");
    }
    let (code, stderr) = close_early(
        &[
            "replay",
            "--config",
            config,
            "--events",
            "-",
            "--dry-run",
            "--batch",
            "100",
        ],
        Some(&events),
        &[],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("channel"),
        "{stderr}"
    );
}
