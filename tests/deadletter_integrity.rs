//! The dead-letter store never loses an entry (SPEC §4, §5 `dead-letters`), end to end with
//! the real binary and real files:
//!
//! - a corrupt record is reported (path, byte offset) and skipped, the intact records before
//!   and after it are kept, and `dead-letters list` exits 2;
//! - opening the store for writing never shortens the log in place: it keeps the original as
//!   `deadletters.log.corrupt-<ms>` and renames a clean rewrite over it;
//! - `dead-letters list|redrive` on a data directory that does not exist is an error;
//! - a replay whose dead letters cannot all be written (a file-size limit, as on a full disk)
//!   says how many were NOT stored, writes them to standard output, and exits non-zero.

mod support;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};
use streamdest::config::{Auth, Delivery};
use streamdest::storage::{DeadLetterStore, DestinationSettings, NewDeadLetter, StoreError};
use support::{Reply, Run, TestServer};

const RUN_TIMEOUT: Duration = Duration::from_secs(60);
const LOG: &str = "deadletters.log";
const MAGIC_LEN: usize = 8;
const FRAME_HEADER: usize = 8;

/// Runs `streamdest ARGS` in `dir` (output through pipes, which no file-size limit touches),
/// optionally under `RLIMIT_FSIZE = fsize_limit` with `SIGXFSZ` ignored, so that writes past
/// the limit fail with `EFBIG` as they would with `ENOSPC` on a full disk.
fn streamdest(dir: &Path, args: &[&str], fsize_limit: Option<u64>) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_streamdest"));
    command
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(limit) = fsize_limit {
        limit_file_size(&mut command, limit);
    }
    let mut child = command.spawn().expect("spawn streamdest");
    let mut stdout = child.stdout.take().expect("stdout pipe");
    let mut stderr = child.stderr.take().expect("stderr pipe");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = support::wait_or_kill(&mut child, RUN_TIMEOUT);
    let run = Run {
        code: status.and_then(|s| s.code()),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    };
    assert!(
        status.is_some(),
        "streamdest {args:?} ran past {RUN_TIMEOUT:?}: {}",
        run.describe()
    );
    run
}

#[cfg(target_os = "linux")]
fn limit_file_size(command: &mut Command, limit: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only async-signal-safe calls (signal, setrlimit) are made,
    // on values owned by the closure; nothing is allocated.
    unsafe {
        command.pre_exec(move || {
            if libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR {
                return Err(std::io::Error::last_os_error());
            }
            let limit = libc::rlimit {
                rlim_cur: limit as libc::rlim_t,
                rlim_max: limit as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn limit_file_size(_command: &mut Command, _limit: u64) {
    panic!("file-size limits are only set up on Linux");
}

/// Opens the store for writing in this (multi-threaded) test process. The `flock` rides on
/// the lock file's descriptor, which a child that another test is spawning at that moment
/// holds too between its fork and its exec (close-on-exec closes it only then): a store just
/// closed here can look locked for that instant, so `Locked` is retried briefly.
fn open_store(dir: &Path) -> DeadLetterStore {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match DeadLetterStore::open(dir) {
            Ok(store) => return store,
            Err(StoreError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("opening the store in {}: {e}", dir.display()),
        }
    }
}

fn letter(profile: &str, url: &str) -> NewDeadLetter {
    NewDeadLetter {
        destination: DestinationSettings {
            id: "d".into(),
            request_url: url.into(),
            headers: vec![("x-team".into(), "growth".into())],
            auth: Auth::None,
            delivery: Delivery {
                max_retries: 0,
                timeout_ms: 2000,
                ..Delivery::default()
            },
            tls: None,
        },
        profile: profile.into(),
        epoch: 1,
        idempotency_key: format!("key-{profile}"),
        payload: Bytes::from(json!({"p": profile}).to_string()),
        attempts: 3,
        last_status: Some(503),
        last_error: "HTTP 503 Service Unavailable".into(),
        last_response_body: None,
    }
}

/// A store in `dir` with entries `email:a`, `email:b`, `email:c` (one `put` record each);
/// returns the byte ranges of the three frames.
fn three_records(dir: &Path, url: &str) -> Vec<(usize, usize)> {
    let store = open_store(dir);
    for p in ["email:a", "email:b", "email:c"] {
        store.put(letter(p, url)).unwrap();
    }
    drop(store);
    let bytes = std::fs::read(dir.join(LOG)).unwrap();
    let mut frames = Vec::new();
    let mut pos = MAGIC_LEN;
    while pos < bytes.len() {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        frames.push((pos, pos + FRAME_HEADER + len));
        pos += FRAME_HEADER + len;
    }
    assert_eq!(frames.len(), 3, "one frame per put");
    frames
}

fn flip(path: &Path, offset: usize, mask: u8) -> Vec<u8> {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset] ^= mask;
    std::fs::write(path, &bytes).unwrap();
    bytes
}

fn profiles(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e["profile"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn list(dir: &Path, data: &Path) -> Run {
    streamdest(
        dir,
        &["dead-letters", "list", "--data-dir", data.to_str().unwrap()],
        None,
    )
}

fn corrupt_copies(data: &Path) -> Vec<PathBuf> {
    let mut copies: Vec<PathBuf> = std::fs::read_dir(data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("deadletters.log.corrupt-"))
        })
        .collect();
    copies.sort();
    copies
}

#[test]
fn a_flipped_byte_in_the_first_of_three_records_is_reported_and_the_others_are_listed() {
    // A byte of the first record's body, then (afresh) a byte of its length field.
    for (what, within, mask) in [("body", FRAME_HEADER + 20, 0x01_u8), ("length", 1, 0x04)] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let frames = three_records(&data, "http://127.0.0.1:1/");
        let log = data.join(LOG);
        let original = flip(&log, frames[0].0 + within, mask);

        let run = list(dir.path(), &data);
        assert_eq!(
            profiles(&run.json_lines()),
            ["email:b", "email:c"],
            "{what}: the records after the corrupt one are listed: {}",
            run.describe()
        );
        run.assert_code(2, &format!("{what}: list of a log with a corrupt record"));
        assert!(
            run.stderr.contains(&log.display().to_string()),
            "{what}: the warning names the file: {}",
            run.stderr
        );
        assert!(
            run.stderr.contains("byte offset 8"),
            "{what}: the warning names the offset of the first record: {}",
            run.stderr
        );
        // `list` changes nothing.
        assert_eq!(std::fs::read(&log).unwrap(), original, "{what}");
        assert!(corrupt_copies(&data).is_empty(), "{what}");
    }
}

#[test]
fn a_corrupt_record_in_the_middle_keeps_the_records_before_and_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let frames = three_records(&data, "http://127.0.0.1:1/");
    flip(&data.join(LOG), frames[1].0 + FRAME_HEADER + 30, 0x20);
    let run = list(dir.path(), &data);
    run.assert_code(2, "list");
    assert_eq!(profiles(&run.json_lines()), ["email:a", "email:c"]);
    assert!(
        run.stderr.contains(&format!("byte offset {}", frames[1].0)),
        "{}",
        run.stderr
    );
}

#[test]
fn opening_for_write_never_shortens_the_log_and_keeps_the_corrupt_original() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = rt.block_on(TestServer::always(Reply::Status(503)));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let frames = three_records(&data, &server.url("/in"));
    let log = data.join(LOG);
    let original = flip(&log, frames[0].0 + FRAME_HEADER + 20, 0x01);
    // A handle on the original file: an in-place truncation would show through it.
    let mut held = File::open(&log).unwrap();

    let redrive = streamdest(
        dir.path(),
        &[
            "dead-letters",
            "redrive",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        None,
    );
    redrive.assert_code(1, "redrive against a failing endpoint");
    assert_eq!(server.count(), 2, "the two intact entries were re-sent");

    let mut seen = Vec::new();
    held.seek(SeekFrom::Start(0)).unwrap();
    held.read_to_end(&mut seen).unwrap();
    assert_eq!(seen.len(), original.len(), "the log was shortened in place");
    assert_eq!(seen, original, "the original log was modified in place");
    let copies = corrupt_copies(&data);
    assert_eq!(copies.len(), 1, "one copy of the corrupt original");
    assert_eq!(std::fs::read(&copies[0]).unwrap(), original);
    assert!(
        redrive.stderr.contains(&copies[0].display().to_string()),
        "the log names the copy: {}",
        redrive.stderr
    );

    // The rewritten log is clean and holds both intact entries, attempts added up.
    let after = list(dir.path(), &data);
    after.assert_code(0, "list of the rewritten log");
    let entries = after.json_lines();
    assert_eq!(profiles(&entries), ["email:b", "email:c"]);
    assert!(entries.iter().all(|e| e["attempts"] == 4), "{entries:?}");

    // The same through the library: a writer reopening the clean log changes nothing.
    let len = std::fs::metadata(&log).unwrap().len();
    let store = open_store(&data);
    assert_eq!(store.len(), 2);
    assert!(store.damage().is_empty());
    drop(store);
    assert_eq!(std::fs::metadata(&log).unwrap().len(), len);
    assert_eq!(corrupt_copies(&data).len(), 1);
}

#[test]
fn a_writer_keeps_the_records_after_a_corrupt_one_and_appends_after_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let frames = three_records(&data, "http://127.0.0.1:1/");
    let original = flip(&data.join(LOG), frames[0].0 + 2, 0x10);
    {
        let store = open_store(&data);
        let damage = store.damage();
        assert_eq!(damage.len(), 1, "{damage:?}");
        assert_eq!(damage[0].offset, frames[0].0 as u64);
        assert_eq!(damage[0].bytes, (frames[0].1 - frames[0].0) as u64);
        assert!(damage[0].is_corrupt());
        let copy = store.preserved_copy().expect("a copy of the original");
        assert_eq!(std::fs::read(&copy).unwrap(), original);
        store.put(letter("email:d", "http://127.0.0.1:1/")).unwrap();
    }
    let store = DeadLetterStore::open_read_only(&data).unwrap();
    assert!(store.damage().is_empty(), "{:?}", store.damage());
    let listed: Vec<String> = store.list(None).into_iter().map(|e| e.profile).collect();
    assert_eq!(listed, ["email:b", "email:c", "email:d"]);
}

#[test]
fn list_and_redrive_of_a_data_dir_that_does_not_exist_fail_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    for action in ["list", "redrive"] {
        let run = streamdest(
            dir.path(),
            &[
                "dead-letters",
                action,
                "--data-dir",
                missing.to_str().unwrap(),
            ],
            None,
        );
        run.assert_code(1, &format!("dead-letters {action} of a missing data dir"));
        assert!(
            run.stderr.contains(&missing.display().to_string())
                && run.stderr.contains("does not exist"),
            "{action}: the error names the directory: {}",
            run.describe()
        );
        assert_eq!(run.stdout.trim(), "", "{action}");
        assert!(!missing.exists(), "{action} created the data dir");
    }
    // A data dir that exists but holds no log yet is an empty store.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let run = list(dir.path(), &empty);
    run.assert_code(0, "list of an empty data dir");
    assert_eq!(run.stdout.trim(), "");
    let run = streamdest(
        dir.path(),
        &[
            "dead-letters",
            "redrive",
            "--data-dir",
            empty.to_str().unwrap(),
        ],
        None,
    );
    run.assert_code(0, "redrive of an empty data dir");
}

/// A config with one audience (`firstName = "John"`) and one destination posting to
/// `endpoint` with no retries.
fn write_config(dir: &Path, endpoint: &str) -> PathBuf {
    let config = json!({
        "mergePolicies": [{"id": "mp", "attributeMerge": "timestampOrdered",
                           "identityStitching": "privateGraph"}],
        "audiences": [{"id": "johns", "name": "First name equals John", "mergePolicy": "mp",
                       "rule": "person.name.firstName = \"John\"",
                       "createdAt": 1648553325000_i64, "updatedAt": 1648553330000_i64}],
        "destinations": [{
            "id": "d1",
            "name": "D1",
            "endpoint": endpoint,
            "auth": {"type": "bearer", "token": "t0ken-not-for-logs"},
            "audiences": [{"id": "johns", "mappingCreatedAt": 1649856570000_i64,
                           "mappingUpdatedAt": 1649856570000_i64}],
            "attributes": ["person.name.firstName", "person.name.lastName",
                           "loyalty.points"],
            "delivery": {"maxRetries": 0, "timeoutMs": 2000},
        }],
    });
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    path
}

#[cfg(target_os = "linux")]
#[test]
fn a_replay_whose_dead_letters_do_not_fit_reports_them_and_fails() {
    const EXPORTS: usize = 200;
    const LIMIT: u64 = 48 * 1024;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = rt.block_on(TestServer::always(Reply::Status(503)));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &server.url("/in"));
    let lines: Vec<String> = (0..EXPORTS)
        .map(|i| {
            json!({"type": "fragment", "dataset": "crm", "id": format!("c-{i}"),
                   "timestamp": "2024-05-01T10:00:00Z",
                   "identityMap": {"email": [{"id": format!("u{i:03}@acme.com"), "primary": true}]},
                   "attributes": {"person": {"name": {"firstName": "John", "lastName": "Doe"}},
                                  "loyalty": {"points": i}}})
            .to_string()
        })
        .collect();
    let events = dir.path().join("events.ndjson");
    std::fs::write(&events, lines.join("\n") + "\n").unwrap();
    let data = dir.path().join("data");

    let run = streamdest(
        dir.path(),
        &[
            "replay",
            "--config",
            config.to_str().unwrap(),
            "--events",
            events.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ],
        Some(LIMIT),
    );
    assert_eq!(server.count(), EXPORTS, "{}", run.describe());
    assert_ne!(run.code, Some(0), "exports were lost: {}", run.describe());
    assert_eq!(run.code, Some(1), "{}", run.describe());
    assert!(
        !run.stderr.contains("t0ken-not-for-logs"),
        "a secret leaked: {}",
        run.stderr
    );

    let summary = run
        .stderr
        .lines()
        .find(|l| l.starts_with("replay:") && l.contains("dead-lettered"))
        .unwrap_or_else(|| panic!("no summary: {}", run.describe()));
    let count = |label: &str| -> usize {
        let at = summary
            .find(label)
            .unwrap_or_else(|| panic!("no {label:?} in {summary}"));
        summary[at + label.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap_or_else(|_| panic!("no number after {label:?}: {summary}"))
    };
    let stored = count("dead-lettered ");
    let not_stored = count("NOT STORED ");
    assert_eq!(stored + not_stored, EXPORTS, "{summary}");
    assert!(
        stored > 0,
        "some dead letters fit below the limit: {summary}"
    );
    assert!(not_stored > 0, "the limit was reached: {summary}");
    // The error names the data dir and the OS error.
    assert!(
        run.stderr.contains(&data.display().to_string()),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("File too large"),
        "the OS error is named: {}",
        run.stderr
    );

    // What is claimed stored is stored, and what is not is on standard output: nothing lost.
    let listed = list(dir.path(), &data);
    listed.assert_code(0, "list after the replay");
    let listed = profiles(&listed.json_lines());
    assert_eq!(listed.len(), stored, "stored entries vs the summary");
    let printed = run.json_lines();
    assert_eq!(printed.len(), not_stored, "unstored exports on stdout");
    for p in &printed {
        assert_eq!(p["destination"], "d1", "{p}");
        assert_eq!(p["lastStatus"], 503, "{p}");
        assert!(p["payload"].is_object(), "{p}");
    }
    let mut all: Vec<String> = listed.into_iter().chain(profiles(&printed)).collect();
    all.sort();
    all.dedup();
    assert_eq!(
        all.len(),
        EXPORTS,
        "every export is either stored or printed"
    );

    // Still full (the limit now below the log's size): a writer can open the store — the
    // rewrite that drops the torn tail waits — but records nothing, and the log is untouched.
    let log = data.join(LOG);
    let before = std::fs::read(&log).unwrap();
    let redrive = streamdest(
        dir.path(),
        &[
            "dead-letters",
            "redrive",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        Some(4096),
    );
    redrive.assert_code(1, "redrive against the failing endpoint on a full disk");
    assert_eq!(server.count(), EXPORTS + stored, "{}", redrive.describe());
    assert!(
        redrive
            .stderr
            .contains("could not rewrite the dead-letter log now"),
        "{}",
        redrive.stderr
    );
    assert_eq!(std::fs::read(&log).unwrap(), before, "the log was modified");
    let again = list(dir.path(), &data);
    again.assert_code(0, "list after the redrive");
    let entries = again.json_lines();
    assert_eq!(entries.len(), stored);
    assert!(entries.iter().all(|e| e["attempts"] == 1), "not updated");
}

/// `letter(profile, url)` for destination `destination`, with `last_status`.
fn letter_for(destination: &str, profile: &str, url: &str, status: Option<u16>) -> NewDeadLetter {
    let mut l = letter(profile, url);
    l.destination.id = destination.into();
    l.last_status = status;
    l
}

/// `streamdest dead-letters ACTION --data-dir DATA ARGS...`
fn dead_letters(dir: &Path, action: &str, data: &Path, args: &[&str]) -> Run {
    let mut all = vec!["dead-letters", action, "--data-dir", data.to_str().unwrap()];
    all.extend_from_slice(args);
    streamdest(dir, &all, None)
}

/// `(destination, profile)` of each listed entry, oldest first.
fn listed(dir: &Path, data: &Path) -> Vec<(String, String)> {
    let run = list(dir, data);
    run.assert_code(0, "list");
    run.json_lines()
        .iter()
        .map(|e| {
            (
                e["destination"].as_str().unwrap().to_string(),
                e["profile"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(d, p)| (d.to_string(), p.to_string()))
        .collect()
}

fn rfc3339_ms(v: &Value) -> i64 {
    let s = v.as_str().unwrap_or_else(|| panic!("not a string: {v}"));
    assert!(s.ends_with('Z'), "not UTC: {s}");
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("{s}: {e}"))
        .timestamp_millis()
}

#[test]
fn list_shows_the_entry_id_idempotency_key_and_failure_times() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let before = chrono::Utc::now().timestamp_millis();
    let store = open_store(&data);
    let a = store.put(letter("email:a", "http://127.0.0.1:1/")).unwrap();
    let b = store.put(letter("email:b", "http://127.0.0.1:1/")).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    // A failed redrive of b: its last failure is later than its first.
    assert!(
        store
            .update(b.id, 4, Some(400), "HTTP 400 Bad Request", None)
            .unwrap()
    );
    drop(store);
    let after = chrono::Utc::now().timestamp_millis();

    let run = list(dir.path(), &data);
    run.assert_code(0, "list");
    let entries = run.json_lines();
    assert_eq!(entries.len(), 2, "{}", run.describe());
    let keys: Vec<&str> = entries[0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "destination",
            "profile",
            "attempts",
            "lastStatus",
            "lastError",
            "lastResponseBody",
            "payload",
            "entry",
            "idempotencyKey",
            "firstFailedAt",
            "lastFailedAt"
        ]
    );
    assert_eq!(entries[0]["entry"], a.id);
    assert_eq!(entries[1]["entry"], b.id);
    assert_ne!(a.id, b.id);
    assert_eq!(entries[0]["idempotencyKey"], "key-email:a");
    assert_eq!(entries[1]["idempotencyKey"], "key-email:b");
    let (a_first, a_last) = (
        rfc3339_ms(&entries[0]["firstFailedAt"]),
        rfc3339_ms(&entries[0]["lastFailedAt"]),
    );
    assert_eq!(a_first, a_last, "never re-driven");
    assert_eq!(a_first, a.stored_at_ms);
    let (b_first, b_last) = (
        rfc3339_ms(&entries[1]["firstFailedAt"]),
        rfc3339_ms(&entries[1]["lastFailedAt"]),
    );
    assert!(b_last >= b_first + 20, "{b_first} {b_last}");
    for t in [a_first, b_first, b_last] {
        assert!(
            (before..=after).contains(&t),
            "{t} not in {before}..={after}"
        );
    }
    assert_eq!(entries[1]["attempts"], 4);
    assert_eq!(entries[1]["lastStatus"], 400);
}

#[test]
fn redrive_by_entry_and_by_profile_resends_only_those() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = rt.block_on(TestServer::always(Reply::ok()));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = open_store(&data);
    let url = server.url("/in");
    let ids: Vec<u64> = [
        ("d", "email:a"),
        ("d", "email:b"),
        ("d", "email:c"),
        ("e", "email:a"),
        ("e", "email:d"),
    ]
    .iter()
    .map(|(d, p)| store.put(letter_for(d, p, &url, Some(503))).unwrap().id)
    .collect();
    drop(store);
    let keys = || -> Vec<String> {
        server
            .requests()
            .iter()
            .map(|r| r.header("idempotency-key").unwrap_or_default())
            .collect()
    };

    // One entry by id: only it is sent (with its key) and removed.
    let run = dead_letters(
        dir.path(),
        "redrive",
        &data,
        &["--entry", &ids[1].to_string()],
    );
    run.assert_code(0, "redrive --entry");
    assert_eq!(keys(), ["key-email:b"]);
    assert_eq!(
        listed(dir.path(), &data),
        pairs(&[
            ("d", "email:a"),
            ("d", "email:c"),
            ("e", "email:a"),
            ("e", "email:d")
        ])
    );

    // A profile within one destination: the same profile elsewhere stays.
    let run = dead_letters(
        dir.path(),
        "redrive",
        &data,
        &["--profile", "email:a", "--destination", "e"],
    );
    run.assert_code(0, "redrive --profile --destination");
    assert_eq!(keys(), ["key-email:b", "key-email:a"]);
    assert_eq!(
        listed(dir.path(), &data),
        pairs(&[("d", "email:a"), ("d", "email:c"), ("e", "email:d")])
    );

    // Filters that match nothing: nothing is sent.
    let run = dead_letters(
        dir.path(),
        "redrive",
        &data,
        &["--entry", &ids[0].to_string(), "--destination", "e"],
    );
    run.assert_code(0, "redrive of no entry");
    assert_eq!(server.count(), 2);

    // --entry repeated.
    let run = dead_letters(
        dir.path(),
        "redrive",
        &data,
        &[
            "--entry",
            &ids[0].to_string(),
            "--entry",
            &ids[4].to_string(),
        ],
    );
    run.assert_code(0, "redrive --entry --entry");
    assert_eq!(server.count(), 4);
    assert_eq!(listed(dir.path(), &data), pairs(&[("d", "email:c")]));
}

#[test]
fn purge_removes_the_matching_entries_for_good_and_needs_a_filter_or_all() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = open_store(&data);
    let url = "http://127.0.0.1:1/";
    let ids: Vec<u64> = [
        ("d", "email:a"),
        ("d", "email:b"),
        ("d", "email:c"),
        ("e", "email:a"),
        ("e", "email:d"),
    ]
    .iter()
    .map(|(d, p)| store.put(letter_for(d, p, url, Some(503))).unwrap().id)
    .collect();
    drop(store);
    let log = data.join(LOG);
    let log_text = || String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();

    // No filter and no --all: refused, nothing removed.
    let run = dead_letters(dir.path(), "purge", &data, &[]);
    run.assert_code(1, "purge without a filter");
    assert!(run.stderr.contains("--all"), "{}", run.describe());
    assert_eq!(listed(dir.path(), &data).len(), 5);

    // One entry: removed, and gone from the file (the log is rewritten without it).
    assert!(log_text().contains("key-email:b"));
    let run = dead_letters(
        dir.path(),
        "purge",
        &data,
        &["--entry", &ids[1].to_string()],
    );
    run.assert_code(0, "purge --entry");
    assert_eq!(run.stdout.trim(), "purged 1 entry");
    assert!(!log_text().contains("key-email:b"), "still on disk");
    assert_eq!(
        listed(dir.path(), &data),
        pairs(&[
            ("d", "email:a"),
            ("d", "email:c"),
            ("e", "email:a"),
            ("e", "email:d")
        ])
    );

    // A profile, then a profile within a destination, then a destination.
    let run = dead_letters(
        dir.path(),
        "purge",
        &data,
        &["--profile", "email:a", "--destination", "e"],
    );
    run.assert_code(0, "purge --profile --destination");
    assert_eq!(run.stdout.trim(), "purged 1 entry");
    assert_eq!(
        listed(dir.path(), &data),
        pairs(&[("d", "email:a"), ("d", "email:c"), ("e", "email:d")])
    );
    let run = dead_letters(dir.path(), "purge", &data, &["--destination", "d"]);
    run.assert_code(0, "purge --destination");
    assert_eq!(run.stdout.trim(), "purged 2 entries");
    assert_eq!(listed(dir.path(), &data), pairs(&[("e", "email:d")]));
    let run = dead_letters(dir.path(), "purge", &data, &["--profile", "email:zz"]);
    run.assert_code(0, "purge of nothing");
    assert_eq!(run.stdout.trim(), "purged 0 entries");

    // --all: the store is empty and the log is only its header.
    let run = dead_letters(dir.path(), "purge", &data, &["--all"]);
    run.assert_code(0, "purge --all");
    assert_eq!(run.stdout.trim(), "purged 1 entry");
    assert_eq!(std::fs::read(&log).unwrap().len(), MAGIC_LEN);
    assert!(listed(dir.path(), &data).is_empty());
    assert!(open_store(&data).is_empty());

    // A missing data dir is an error, not an empty store.
    let missing = dir.path().join("missing");
    let run = dead_letters(dir.path(), "purge", &missing, &["--all"]);
    run.assert_code(1, "purge of a missing data dir");
    assert!(!missing.exists());
}

#[test]
fn summary_counts_entries_per_destination_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let run = dead_letters(dir.path(), "summary", &data, &[]);
    run.assert_code(0, "summary of an empty store");
    let v: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(v, json!({"total": 0, "destinations": {}, "byStatus": {}}));

    let store = open_store(&data);
    let url = "http://127.0.0.1:1/";
    for (d, p, status) in [
        ("d", "email:a", Some(503)),
        ("d", "email:b", Some(503)),
        ("d", "email:c", None),
        ("e", "email:a", Some(400)),
    ] {
        store.put(letter_for(d, p, url, status)).unwrap();
    }
    drop(store);
    let run = dead_letters(dir.path(), "summary", &data, &[]);
    run.assert_code(0, "summary");
    assert_eq!(run.stdout.lines().count(), 1, "one object: {}", run.stdout);
    let v: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(
        v,
        json!({
            "total": 4,
            "destinations": {
                "d": {"total": 3, "byStatus": {"503": 2, "none": 1}},
                "e": {"total": 1, "byStatus": {"400": 1}},
            },
            "byStatus": {"400": 1, "503": 2, "none": 1},
        })
    );
}
