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

/// A dead endpoint: failures are logged as JSON lines (`--log-format json`), rate-limited to a
/// summary per destination, naming the profile and `Idempotency-Key`, with no Rust `Debug`
/// wrappers in the fields.
#[test]
fn a_dead_endpoint_gives_a_few_json_warnings_not_one_per_export() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port(); // closed again: connections are refused
    let config = serde_json::json!({
        "mergePolicies": [{"id": "mp", "attributeMerge": "timestampOrdered", "identityStitching": "privateGraph"}],
        "audiences": [{"id": "all", "mergePolicy": "mp", "rule": "true"}],
        "destinations": [{"id": "d", "name": "Dead", "endpoint": format!("http://127.0.0.1:{port}/"),
                          "audiences": [{"id": "all"}],
                          "delivery": {"maxRetries": 0, "timeoutMs": 500}}]
    });
    let config_path = dir.path().join("config.json");
    std::fs::write(&config_path, config.to_string()).expect("write config");
    let mut events = String::new();
    for i in 0..40 {
        events.push_str(&format!(
            "{{\"type\":\"fragment\",\"dataset\":\"crm\",\"id\":\"c{i}\",\"timestamp\":\"2024-05-01T10:00:00Z\",\"identityMap\":{{\"email\":[{{\"id\":\"p{i}@x.org\"}}]}}}}\n"
        ));
    }
    let events_path = dir.path().join("events.ndjson");
    std::fs::write(&events_path, events).expect("write events");
    let data = dir.path().join("data");
    let out = streamdest(
        &[
            "--log-format",
            "json",
            "replay",
            "--config",
            config_path.to_str().expect("utf-8"),
            "--events",
            events_path.to_str().expect("utf-8"),
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--summary-json",
            dir.path().join("summary.json").to_str().expect("utf-8"),
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("dead-lettered 40"), "{stderr}");
    // The summary names each destination and where the dead letters are, also as JSON.
    assert!(
        stderr.contains("  destination d: exports 40, delivered 0"),
        "{stderr}"
    );
    assert!(
        stderr.contains("streamdest dead-letters list --data-dir"),
        "{stderr}"
    );
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("summary.json")).expect("summary written"),
    )
    .expect("summary JSON");
    assert_eq!(summary["destinations"]["d"]["deadLettered"], 40);
    assert_eq!(summary["events"], 40);
    let warnings: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["level"] == "WARN")
        .collect();
    assert!(
        (1..=2).contains(&warnings.len()),
        "40 failures, {} warnings:\n{stderr}",
        warnings.len()
    );
    let fields = &warnings[0]["fields"];
    assert_eq!(fields["destination"], "d");
    assert!(
        fields["idempotency_key"]
            .as_str()
            .is_some_and(|k| !k.is_empty()),
        "{fields}"
    );
    assert!(
        fields["profile"]
            .as_str()
            .is_some_and(|p| p.starts_with("email:")),
        "{fields}"
    );
    assert_eq!(fields["last_status"], "none");
    assert!(!stderr.contains("Some("), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "no colour codes into a pipe");
}

/// A fragment for profile `p{i}@x.org`, first name John: one export each with
/// `examples/config.json`.
fn john(i: usize) -> String {
    format!(
        r#"{{"type":"fragment","dataset":"crm","id":"c{i}","timestamp":"2024-05-01T10:00:00Z","identityMap":{{"email":[{{"id":"p{i}@x.org"}}]}},"attributes":{{"person":{{"name":{{"firstName":"John"}}}}}}}}"#
    )
}

/// Sends `signal` to the child.
fn signal(child: &std::process::Child, signal: i32) {
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(rc, 0, "kill");
}

/// Waits up to `timeout` for the child to exit; kills it (and returns `None`) after that.
fn wait_within(
    child: &mut std::process::Child,
    timeout: std::time::Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Collects a pipe's lines on a thread.
fn collect_lines(
    pipe: impl std::io::Read + Send + 'static,
) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use std::io::BufRead as _;
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            sink.lock().expect("lock").push(line);
        }
    });
    lines
}

/// Ctrl-C while `replay --dry-run` reads a slow pipe that stays open: it stops reading at once
/// (it does not wait for the next line or the end of the input), writes the exports of every
/// line it took, prints its summary saying where it stopped, and exits 130.
#[test]
fn a_first_interrupt_stops_reading_and_finishes_what_was_read() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    let config = example_config();
    let mut child = Command::new(env!("CARGO_BIN_EXE_streamdest"))
        .args(["replay", "--config"])
        .arg(&config)
        .args(["--events", "-", "--dry-run"])
        .env_remove("ANALYTICS_SECRET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start streamdest");
    let stdout = collect_lines(child.stdout.take().expect("stdout"));
    let stderr = collect_lines(child.stderr.take().expect("stderr"));

    // One line every 20 ms; after `pause`, nothing more, but the pipe stays open until `close`.
    let written = Arc::new(AtomicUsize::new(0));
    let pause = Arc::new(AtomicBool::new(false));
    let close = Arc::new(AtomicBool::new(false));
    let writer = {
        let mut pipe = child.stdin.take().expect("stdin");
        let (written, pause, close) = (written.clone(), pause.clone(), close.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !close.load(Ordering::SeqCst) {
                if !pause.load(Ordering::SeqCst) && i < 10_000 {
                    if writeln!(pipe, "{}", john(i))
                        .and_then(|()| pipe.flush())
                        .is_err()
                    {
                        break;
                    }
                    i += 1;
                    written.store(i, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    // Mid-read: some exports are out, more lines are coming.
    let deadline = Instant::now() + Duration::from_secs(30);
    while stdout.lock().expect("lock").len() < 5 {
        assert!(Instant::now() < deadline, "no exports: {:?}", stderr.lock());
        std::thread::sleep(Duration::from_millis(10));
    }
    pause.store(true, Ordering::SeqCst);
    signal(&child, libc::SIGINT);
    let at_signal = written.load(Ordering::SeqCst);
    let status = wait_within(&mut child, Duration::from_secs(15));
    close.store(true, Ordering::SeqCst);
    writer.join().expect("writer");
    std::thread::sleep(Duration::from_millis(100)); // the last lines of the pipes
    let stderr = stderr.lock().expect("lock").join("\n");
    let status = status.unwrap_or_else(|| panic!("still running with stdin open:\n{stderr}"));
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("SIGINT: no more input is read"), "{stderr}");
    assert!(
        stderr.contains("replay: interrupted by SIGINT: stopped reading after line"),
        "{stderr}"
    );

    // The summary counts the events taken; each one's export is on stdout, in order.
    let events: usize = stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix("replay: ")?
                .split_once(" events in ")?
                .0
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no summary:\n{stderr}"));
    assert!(
        (5..=at_signal).contains(&events),
        "{events} events, {at_signal} lines written before the signal"
    );
    assert!(stderr.contains(&format!("stopped reading after line {events} of stdin")));
    let profiles: Vec<String> = stdout
        .lock()
        .expect("lock")
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            v["profile"].as_str().expect("profile").to_string()
        })
        .collect();
    let expected: Vec<String> = (0..events).map(|i| format!("email:p{i}@x.org")).collect();
    assert_eq!(profiles, expected);
}

/// A second Ctrl-C does not wait for the delivery drain: the process exits at once, 130.
#[test]
fn a_second_interrupt_exits_at_once() {
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().expect("tempdir");
    // Takes connections and never answers: every export waits for its 30 s timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    silent.set_nonblocking(true).expect("nonblocking");
    let config = serde_json::json!({
        "mergePolicies": [{"id": "mp", "attributeMerge": "timestampOrdered", "identityStitching": "privateGraph"}],
        "audiences": [{"id": "all", "mergePolicy": "mp", "rule": "true"}],
        "destinations": [{"id": "d", "name": "Silent",
                          "endpoint": format!("http://{}/", silent.local_addr().expect("addr")),
                          "audiences": [{"id": "all"}],
                          "delivery": {"maxRetries": 0, "timeoutMs": 30000}}]
    });
    let config_path = dir.path().join("config.json");
    std::fs::write(&config_path, config.to_string()).expect("write config");
    let events: String = (0..3).map(|i| john(i) + "\n").collect();
    let events_path = dir.path().join("events.ndjson");
    std::fs::write(&events_path, events).expect("write events");

    let mut child = Command::new(env!("CARGO_BIN_EXE_streamdest"))
        .args(["replay", "--config"])
        .arg(&config_path)
        .arg("--events")
        .arg(&events_path)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start streamdest");
    let stderr = collect_lines(child.stderr.take().expect("stderr"));
    // Delivery has started: a request is waiting for its answer.
    let deadline = Instant::now() + Duration::from_secs(30);
    let _held = loop {
        match silent.accept() {
            Ok((stream, _)) => break stream,
            Err(_) => {
                assert!(Instant::now() < deadline, "no request: {:?}", stderr.lock());
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    };
    signal(&child, libc::SIGINT);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().expect("wait").is_none(),
        "the first interrupt lets the delivery finish: {:?}",
        stderr.lock()
    );
    let second = Instant::now();
    signal(&child, libc::SIGINT);
    let status = wait_within(&mut child, Duration::from_secs(10));
    let took = second.elapsed();
    std::thread::sleep(Duration::from_millis(100));
    let stderr = stderr.lock().expect("lock").join("\n");
    let status = status.unwrap_or_else(|| panic!("still running:\n{stderr}"));
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(stderr.contains("SIGINT again: exiting at once"), "{stderr}");
    assert!(!stderr.contains("delivered 3"), "{stderr}");
}
