//! `streamdest replay` (without `--dry-run`) and `streamdest dead-letters list|redrive`, end to
//! end (SPEC §4–5): the real binary against a scriptable HTTP server on 127.0.0.1.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use support::{Recorded, Reply, Run, TestServer};

/// A run of the binary that takes longer than this is a hang (each test stays far below).
const RUN_TIMEOUT: Duration = Duration::from_secs(30);
const TOKEN: &str = "s3cr3t-replay-token";
const PATH: &str = "/v1/profiles?fixed=1";
/// The endpoint's own query, then `queryParameters`, in order.
const TARGET: &str = "/v1/profiles?fixed=1&source=aep&env=test";

static RUNS: AtomicUsize = AtomicUsize::new(0);

/// Runs `streamdest ARGS` in `dir`, stdout and stderr into files there, killed after
/// [`RUN_TIMEOUT`].
fn streamdest(dir: &Path, args: &[&str]) -> Run {
    let n = RUNS.fetch_add(1, Ordering::SeqCst);
    let out_path = dir.join(format!("run-{n}.stdout"));
    let err_path = dir.join(format!("run-{n}.stderr"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_streamdest"))
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn streamdest");
    let status = support::wait_or_kill(&mut child, RUN_TIMEOUT);
    let run = Run {
        code: status.and_then(|s| s.code()),
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    };
    assert!(
        status.is_some(),
        "streamdest {args:?} ran past {RUN_TIMEOUT:?}: {}",
        run.describe()
    );
    run
}

/// A multi-thread runtime for the test server; the binary runs on the test thread.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A config with one merge policy, one rule audience (`firstName = "John"`) and one
/// destination `d1` posting to `server` (bearer auth, custom headers, query parameters).
fn write_config(dir: &Path, server: &TestServer, delivery: Value) -> PathBuf {
    let config = json!({
        "mergePolicies": [{"id": "mp", "attributeMerge": "timestampOrdered",
                           "identityStitching": "privateGraph"}],
        "audiences": [{"id": "johns", "name": "First name equals John", "mergePolicy": "mp",
                       "rule": "person.name.firstName = \"John\"",
                       "createdAt": 1648553325000_i64, "updatedAt": 1648553330000_i64}],
        "destinations": [{
            "id": "d1",
            "name": "D1",
            "endpoint": server.url(PATH),
            "queryParameters": "source=aep&env=test",
            "headers": "x-api-version:2, x-team : growth",
            "auth": {"type": "bearer", "token": TOKEN},
            "includeSegmentNames": true,
            "includeSegmentTimestamps": true,
            "audiences": [{"id": "johns", "mappingCreatedAt": 1649856570000_i64,
                           "mappingUpdatedAt": 1649856570000_i64}],
            "attributes": ["person.name.firstName", "person.name.lastName",
                           "personalEmail.address", "loyalty.points"],
            "delivery": delivery,
        }],
    });
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    path
}

fn write_events(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let path = dir.join(name);
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(&path, text).unwrap();
    path
}

fn ts(minute: usize) -> String {
    format!("2024-05-01T{:02}:{:02}:00Z", minute / 60 % 24, minute % 60)
}

/// An upsert of `crm/{id}` for `email` with a first name and loyalty points.
fn crm(id: &str, email: &str, first: &str, points: usize, minute: usize) -> String {
    json!({"type": "fragment", "dataset": "crm", "id": id, "timestamp": ts(minute),
           "identityMap": {"email": [{"id": email, "primary": true}]},
           "attributes": {"person": {"name": {"firstName": first, "lastName": "Doe"}},
                          "loyalty": {"points": points}}})
    .to_string()
}

/// The profile a payload belongs to: its smallest `(namespace, id)`, `"namespace:id"`.
fn profile_of(payload: &Value) -> String {
    let map = payload["identityMap"]
        .as_object()
        .unwrap_or_else(|| panic!("payload without identityMap: {payload}"));
    let (ns, id) = map
        .iter()
        .flat_map(|(ns, ids)| {
            ids.as_array()
                .into_iter()
                .flatten()
                .map(move |e| (ns.clone(), e["id"].as_str().unwrap_or_default().to_string()))
        })
        .min()
        .unwrap_or_else(|| panic!("empty identityMap: {payload}"));
    format!("{ns}:{id}")
}

/// `value` with every object's keys sorted, as a string: a canonical form for multisets.
fn canonical(value: &Value) -> String {
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let entries: BTreeMap<&String, Value> =
                    m.iter().map(|(k, v)| (k, sorted(v))).collect();
                Value::Object(entries.into_iter().map(|(k, v)| (k.clone(), v)).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    sorted(value).to_string()
}

fn multiset<'a>(payloads: impl IntoIterator<Item = &'a Value>) -> Vec<String> {
    let mut all: Vec<String> = payloads.into_iter().map(canonical).collect();
    all.sort();
    all
}

/// Payloads grouped by profile, in the order given.
fn per_profile<'a>(payloads: impl IntoIterator<Item = &'a Value>) -> BTreeMap<String, Vec<Value>> {
    let mut map: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for p in payloads {
        map.entry(profile_of(p)).or_default().push(p.clone());
    }
    map
}

/// One line of `replay --dry-run`.
struct DryExport {
    profile: String,
    payload: Value,
}

/// `replay --dry-run` on the same input; checks each line names `d1` and the payload's profile.
fn dry_run(dir: &Path, config: &Path, events: &Path, extra: &[&str]) -> (Run, Vec<DryExport>) {
    let mut args = vec![
        "replay",
        "--config",
        config.to_str().unwrap(),
        "--events",
        events.to_str().unwrap(),
        "--dry-run",
    ];
    args.extend_from_slice(extra);
    let run = streamdest(dir, &args);
    let exports: Vec<DryExport> = run
        .json_lines()
        .into_iter()
        .map(|line| {
            assert_eq!(line["destination"], "d1", "{line}");
            let profile = line["profile"].as_str().expect("profile").to_string();
            let payload = line["payload"].clone();
            assert_eq!(
                profile,
                profile_of(&payload),
                "dry-run profile vs payload: {line}"
            );
            DryExport { profile, payload }
        })
        .collect();
    (run, exports)
}

/// `replay` (delivering) with `--data-dir`.
fn replay(dir: &Path, config: &Path, events: &Path, data: &Path, extra: &[&str]) -> Run {
    let mut args = vec![
        "replay",
        "--config",
        config.to_str().unwrap(),
        "--events",
        events.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    streamdest(dir, &args)
}

fn dead_letters(dir: &Path, action: &str, data: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["dead-letters", action, "--data-dir", data.to_str().unwrap()];
    args.extend_from_slice(extra);
    streamdest(dir, &args)
}

/// The counts of the delivery summary on stderr.
#[derive(Debug, PartialEq, Eq)]
struct Summary {
    exports: u64,
    delivered: u64,
    retried: u64,
    dead_lettered: u64,
}

fn summary(run: &Run) -> Summary {
    let line = run
        .stderr
        .lines()
        .find(|l| l.starts_with("replay:") && l.contains("dead-lettered"))
        .unwrap_or_else(|| panic!("no delivery summary: {}", run.describe()));
    for part in ["delivery latency ms", "p50 ", "p95 ", "p99 ", "max "] {
        assert!(line.contains(part), "summary without {part:?}: {line}");
    }
    let count = |label: &str| -> u64 {
        let at = line
            .find(label)
            .unwrap_or_else(|| panic!("summary without {label:?}: {line}"));
        line[at + label.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap_or_else(|_| panic!("no number after {label:?}: {line}"))
    };
    Summary {
        exports: count("exports "),
        delivered: count("delivered "),
        retried: count("retried "),
        dead_lettered: count("dead-lettered "),
    }
}

fn key(r: &Recorded) -> String {
    r.header("idempotency-key")
        .unwrap_or_else(|| panic!("request #{} without Idempotency-Key", r.seq))
}

/// Every request is a POST to the configured target with the configured headers.
fn assert_request_shape(r: &Recorded) {
    assert_eq!(r.method, "POST", "request #{}", r.seq);
    assert_eq!(r.target, TARGET, "request #{}", r.seq);
    let bearer = format!("Bearer {TOKEN}");
    assert_eq!(r.header("authorization").as_deref(), Some(bearer.as_str()));
    assert_eq!(r.header("x-api-version").as_deref(), Some("2"));
    assert_eq!(r.header("x-team").as_deref(), Some("growth"));
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    assert!(!key(r).is_empty(), "empty Idempotency-Key");
    assert!(
        r.json().is_object(),
        "body is not a JSON object: {}",
        r.body_str()
    );
}

/// The example history plus two more profiles (one a member, one not).
fn example_events() -> Vec<String> {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/replay/events.ndjson");
    let mut lines: Vec<String> = std::fs::read_to_string(&example)
        .unwrap_or_else(|e| panic!("{}: {e}", example.display()))
        .lines()
        .map(str::to_string)
        .collect();
    lines.push(crm("c-2", "ann@acme.com", "John", 5, 600));
    lines.push(crm("c-3", "bob@acme.com", "Bob", 7, 601));
    lines.push(crm("c-2", "ann@acme.com", "John", 6, 602));
    lines.push(crm("c-3", "bob@acme.com", "John", 8, 603));
    lines
}

#[test]
fn replay_delivers_what_dry_run_prints() {
    let rt = runtime();
    let server = rt.block_on(TestServer::always(Reply::ok()));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &server, json!({"timeoutMs": 2000}));
    let events = write_events(dir.path(), "events.ndjson", &example_events());

    let (dry, expected) = dry_run(dir.path(), &config, &events, &[]);
    dry.assert_code(0, "dry run");
    assert!(
        expected.len() >= 6,
        "too few exports to compare: {}",
        dry.stdout
    );
    assert_eq!(server.count(), 0, "--dry-run sent requests");

    let data = dir.path().join("data");
    let run = replay(dir.path(), &config, &events, &data, &[]);
    run.assert_code(0, "replay");
    let n = expected.len() as u64;
    assert_eq!(
        summary(&run),
        Summary {
            exports: n,
            delivered: n,
            retried: 0,
            dead_lettered: 0
        },
        "{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains(TOKEN),
        "the token leaked: {}",
        run.stderr
    );

    let requests = server.requests();
    assert_eq!(requests.len(), expected.len(), "one request per export");
    requests.iter().for_each(assert_request_shape);
    let keys: BTreeSet<String> = requests.iter().map(key).collect();
    assert_eq!(
        keys.len(),
        requests.len(),
        "Idempotency-Keys are not distinct"
    );

    let received: Vec<Value> = requests.iter().map(Recorded::json).collect();
    assert_eq!(
        per_profile(&received),
        per_profile(expected.iter().map(|e| &e.payload)),
        "per-profile payload sequences differ from --dry-run"
    );
    assert_eq!(
        multiset(&received),
        multiset(expected.iter().map(|e| &e.payload))
    );

    // Nothing was dead-lettered.
    let list = dead_letters(dir.path(), "list", &data, &[]);
    list.assert_code(0, "list");
    assert_eq!(list.stdout.trim(), "", "dead letters after a clean replay");
}

/// A replay (`maxRetries` 1) whose endpoint answers 503 until `up` is set, already checked:
/// every export dead-lettered after two attempts and listed.
struct Failing {
    dir: tempfile::TempDir,
    data: PathBuf,
    server: TestServer,
    up: Arc<AtomicBool>,
    expected: Vec<DryExport>,
}

fn replay_against_failing_endpoint(rt: &tokio::runtime::Runtime) -> Failing {
    let up = Arc::new(AtomicBool::new(false));
    let gate = up.clone();
    let server = rt.block_on(TestServer::start(move |_| {
        if gate.load(Ordering::SeqCst) {
            Reply::ok()
        } else {
            Reply::Status(503)
        }
    }));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &server,
        json!({"maxRetries": 1, "timeoutMs": 300}),
    );
    let events = write_events(dir.path(), "events.ndjson", &example_events());
    let (dry, expected) = dry_run(dir.path(), &config, &events, &[]);
    dry.assert_code(0, "dry run");
    let n = expected.len();
    assert!(n >= 6);

    let data = dir.path().join("data");
    let run = replay(dir.path(), &config, &events, &data, &[]);
    run.assert_code(0, "replay against a failing endpoint");
    let s = summary(&run);
    assert_eq!(s.exports, n as u64, "{}", run.stderr);
    assert_eq!(s.delivered, 0, "{}", run.stderr);
    assert_eq!(s.dead_lettered, n as u64, "{}", run.stderr);
    assert_eq!(s.retried, n as u64, "one retry each: {}", run.stderr);
    // Retries by cause: in the per-destination summary, and in aggregate in the log at the
    // default level (the first at once).
    assert!(
        run.stderr.contains(&format!("retried {n} (HTTP 503: {n})")),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("attempts failed and are retried")
            && run.stderr.contains("HTTP 503: 1"),
        "{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains(TOKEN),
        "the token leaked: {}",
        run.stderr
    );

    // Two attempts per export, with the same key; different exports, different keys.
    let requests = server.requests();
    assert_eq!(requests.len(), 2 * n, "maxRetries 1: two attempts each");
    requests.iter().for_each(assert_request_shape);
    let mut by_key: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for r in &requests {
        by_key.entry(key(r)).or_default().push(r.json());
    }
    assert_eq!(by_key.len(), n, "one key per export");
    for (k, bodies) in &by_key {
        assert_eq!(bodies.len(), 2, "key {k}");
        assert_eq!(
            bodies[0], bodies[1],
            "a retry changed the payload (key {k})"
        );
    }

    // `list`: one line per export, in per-profile order, with attempts 2 and lastStatus 503.
    let list = dead_letters(dir.path(), "list", &data, &[]);
    list.assert_code(0, "list");
    let entries = list.json_lines();
    assert_eq!(entries.len(), n, "{}", list.stdout);
    for e in &entries {
        assert_eq!(e["destination"], "d1", "{e}");
        assert_eq!(e["attempts"], 2, "{e}");
        assert_eq!(e["lastStatus"], 503, "{e}");
        assert!(
            e["lastError"].as_str().is_some_and(|s| !s.is_empty()),
            "{e}"
        );
        assert_eq!(
            e["profile"].as_str(),
            Some(profile_of(&e["payload"]).as_str()),
            "{e}"
        );
        let text = e.to_string();
        assert!(!text.contains(TOKEN), "the token leaked into list: {text}");
    }
    let listed: Vec<Value> = entries.iter().map(|e| e["payload"].clone()).collect();
    assert_eq!(
        per_profile(&listed),
        per_profile(expected.iter().map(|e| &e.payload))
    );
    let mut listed_profiles: Vec<&str> = entries
        .iter()
        .filter_map(|e| e["profile"].as_str())
        .collect();
    let mut dry_profiles: Vec<&str> = expected.iter().map(|e| e.profile.as_str()).collect();
    listed_profiles.sort_unstable();
    dry_profiles.sort_unstable();
    assert_eq!(
        listed_profiles, dry_profiles,
        "list profiles vs --dry-run profiles"
    );
    let filtered = dead_letters(dir.path(), "list", &data, &["--destination", "d1"]);
    filtered.assert_code(0, "list --destination d1");
    assert_eq!(filtered.json_lines().len(), n);
    let other = dead_letters(dir.path(), "list", &data, &["--destination", "nope"]);
    other.assert_code(0, "list --destination nope");
    assert_eq!(other.stdout.trim(), "");

    Failing {
        dir,
        data,
        server,
        up,
        expected,
    }
}

#[test]
fn failing_endpoint_dead_letters_then_redrive_delivers_with_the_same_keys() {
    let rt = runtime();
    let f = replay_against_failing_endpoint(&rt);
    let n = f.expected.len();
    let failed = f.server.requests();
    let failed_keys: BTreeSet<String> = failed.iter().map(key).collect();

    f.up.store(true, Ordering::SeqCst);
    let redrive = dead_letters(f.dir.path(), "redrive", &f.data, &[]);
    redrive.assert_code(0, "redrive against a healthy endpoint");
    assert!(!redrive.stderr.contains(TOKEN), "{}", redrive.stderr);

    let resent: Vec<Recorded> = f.server.requests().split_off(failed.len());
    assert_eq!(resent.len(), n, "one request per entry");
    resent.iter().for_each(assert_request_shape);
    let resent_keys: Vec<String> = resent.iter().map(key).collect();
    assert_eq!(
        resent_keys.iter().cloned().collect::<BTreeSet<_>>(),
        failed_keys,
        "redrive must reuse the Idempotency-Keys"
    );
    assert_eq!(resent_keys.len(), failed_keys.len(), "a key was sent twice");
    // Same key, same payload.
    for r in &resent {
        let first = failed.iter().find(|f| key(f) == key(r)).unwrap();
        assert_eq!(r.json(), first.json(), "key {}", key(r));
    }
    let received: Vec<Value> = resent.iter().map(Recorded::json).collect();
    assert_eq!(
        per_profile(&received),
        per_profile(f.expected.iter().map(|e| &e.payload)),
        "redrive must keep per-profile order"
    );

    let list = dead_letters(f.dir.path(), "list", &f.data, &[]);
    list.assert_code(0, "list after redrive");
    assert_eq!(
        list.stdout.trim(),
        "",
        "delivered entries must leave the store"
    );
    // A second redrive has nothing to do.
    let again = dead_letters(f.dir.path(), "redrive", &f.data, &[]);
    again.assert_code(0, "redrive of an empty store");
    assert_eq!(f.server.count(), failed.len() + n);
}

#[test]
fn redrive_that_fails_again_exits_1_and_adds_up_attempts() {
    let rt = runtime();
    let f = replay_against_failing_endpoint(&rt);
    let n = f.expected.len();
    let before = f.server.count();

    let redrive = dead_letters(f.dir.path(), "redrive", &f.data, &[]);
    redrive.assert_code(1, "redrive against a still-failing endpoint");
    let resent = f.server.requests().split_off(before);
    assert_eq!(resent.len(), 2 * n, "one more round of maxRetries 1");
    resent.iter().for_each(assert_request_shape);

    let list = dead_letters(f.dir.path(), "list", &f.data, &[]);
    list.assert_code(0, "list");
    let entries = list.json_lines();
    assert_eq!(entries.len(), n, "failed entries stay: {}", list.stdout);
    for e in &entries {
        assert_eq!(e["attempts"], 4, "attempts add up: {e}");
        assert_eq!(e["lastStatus"], 503, "{e}");
    }
    let listed: Vec<Value> = entries.iter().map(|e| e["payload"].clone()).collect();
    assert_eq!(
        multiset(&listed),
        multiset(f.expected.iter().map(|e| &e.payload))
    );

    // `--destination` of another destination touches nothing and succeeds.
    let other = dead_letters(f.dir.path(), "redrive", &f.data, &["--destination", "nope"]);
    other.assert_code(0, "redrive --destination nope");
    assert_eq!(f.server.count(), before + 2 * n);
}

#[test]
fn exports_of_one_profile_arrive_in_epoch_order_one_at_a_time() {
    const FIRST_DELAY: Duration = Duration::from_millis(400);
    const DELAY: Duration = Duration::from_millis(60);
    const UPDATES: usize = 6;
    let rt = runtime();
    // Profile A's requests are slow, its first one very slow; profile B's are answered at once.
    let seen_a = Arc::new(AtomicUsize::new(0));
    let server = {
        let seen_a = seen_a.clone();
        rt.block_on(TestServer::start(move |r| {
            if profile_of(&r.json()) != "email:a@acme.com" {
                return Reply::ok();
            }
            let delay = if seen_a.fetch_add(1, Ordering::SeqCst) == 0 {
                FIRST_DELAY
            } else {
                DELAY
            };
            Reply::Delay(delay, Box::new(Reply::ok()))
        }))
    };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &server, json!({"timeoutMs": 2000}));
    let mut lines = Vec::new();
    for i in 1..=UPDATES {
        lines.push(crm("c-a", "a@acme.com", "John", i, 2 * i));
        lines.push(crm("c-b", "b@acme.com", "John", 100 + i, 2 * i + 1));
    }
    let events = write_events(dir.path(), "events.ndjson", &lines);
    let (dry, expected) = dry_run(dir.path(), &config, &events, &[]);
    dry.assert_code(0, "dry run");
    assert_eq!(expected.len(), 2 * UPDATES, "{}", dry.stdout);

    let run = replay(dir.path(), &config, &events, &dir.path().join("data"), &[]);
    run.assert_code(0, "replay");
    let s = summary(&run);
    assert_eq!((s.exports, s.delivered, s.dead_lettered), (12, 12, 0));

    let requests = server.requests();
    assert_eq!(requests.len(), 2 * UPDATES);
    requests.iter().for_each(assert_request_shape);
    let of = |email: &str| -> Vec<&Recorded> {
        let profile = format!("email:{email}");
        requests
            .iter()
            .filter(|r| profile_of(&r.json()) == profile)
            .collect()
    };
    let (a, b) = (of("a@acme.com"), of("b@acme.com"));
    let points = |rs: &[&Recorded]| -> Vec<u64> {
        rs.iter()
            .map(|r| r.json()["loyalty"]["points"].as_u64().expect("points"))
            .collect()
    };
    assert_eq!(
        points(&a),
        (1..=UPDATES as u64).collect::<Vec<_>>(),
        "A out of epoch order"
    );
    assert_eq!(
        points(&b),
        (101..=100 + UPDATES as u64).collect::<Vec<_>>(),
        "B out of epoch order"
    );
    // Never two of A at once: each request of A arrives only after the previous one was
    // answered, i.e. at least its delay later.
    for (i, pair) in a.windows(2).enumerate() {
        let delay = if i == 0 { FIRST_DELAY } else { DELAY };
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(
            gap >= delay,
            "A's export {} was sent {gap:?} after export {}, before its {delay:?} answer",
            i + 2,
            i + 1
        );
    }
    let received: Vec<Value> = requests.iter().map(Recorded::json).collect();
    assert_eq!(
        per_profile(&received),
        per_profile(expected.iter().map(|e| &e.payload))
    );
}

#[test]
fn malformed_line_stops_after_delivering_the_lines_before_it() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let lines = vec![
        crm("c-1", "one@acme.com", "John", 1, 1),
        crm("c-2", "two@acme.com", "John", 2, 2),
        crm("c-1", "one@acme.com", "John", 3, 3),
        r#"{"type":"fragment","dataset":"crm","#.to_string(),
        crm("c-9", "after@acme.com", "John", 9, 9),
    ];
    let events = write_events(dir.path(), "broken.ndjson", &lines);
    let at_line = format!("{}:4:", events.display());

    for batch in ["1", "2"] {
        let server = rt.block_on(TestServer::always(Reply::ok()));
        let config = write_config(dir.path(), &server, json!({"timeoutMs": 2000}));
        let (dry, expected) = dry_run(dir.path(), &config, &events, &["--batch", batch]);
        dry.assert_code(1, "dry run of a malformed file");
        assert_eq!(expected.len(), 3, "batch {batch}: {}", dry.stdout);

        let data = dir.path().join(format!("data-{batch}"));
        let run = replay(dir.path(), &config, &events, &data, &["--batch", batch]);
        run.assert_code(1, &format!("replay --batch {batch} of a malformed file"));
        assert!(
            run.stderr.contains(&at_line),
            "batch {batch}: the error must name {at_line:?}: {}",
            run.stderr
        );
        let s = summary(&run);
        assert_eq!(
            (s.exports, s.delivered, s.dead_lettered),
            (3, 3, 0),
            "batch {batch}: {}",
            run.stderr
        );
        let requests = server.requests();
        requests.iter().for_each(assert_request_shape);
        let received: Vec<Value> = requests.iter().map(Recorded::json).collect();
        assert_eq!(
            per_profile(&received),
            per_profile(expected.iter().map(|e| &e.payload)),
            "batch {batch}: the exports before the bad line must be delivered"
        );
        assert!(
            received
                .iter()
                .all(|p| profile_of(p) != "email:after@acme.com"),
            "batch {batch}: a line after the bad one was delivered"
        );
    }
}

/// A deterministic history over a dozen people: upserts that flip membership, web fragments
/// that stitch pairs of people together through a shared phone, and deletes.
fn mixed_events() -> Vec<String> {
    let mut state: u64 = 0x5eed_1234_abcd_0042;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    const PEOPLE: usize = 12;
    let (mut crm_up, mut web_up) = ([false; PEOPLE], [false; PEOPLE]);
    let mut lines = Vec::new();
    for k in 0..60 {
        let u = next() % PEOPLE;
        let email = format!("u{u}@acme.com");
        let action = next() % 10;
        let line = match action {
            6 | 7 => {
                web_up[u] = true;
                json!({"type": "fragment", "dataset": "web", "id": format!("w-{u}"),
                       "timestamp": ts(k),
                       "identityMap": {"email": [{"id": email}],
                                       "phone": [{"id": format!("p{}", u / 2)}]},
                       "attributes": {"personalEmail": {"address": email},
                                      "loyalty": {"points": k}}})
                .to_string()
            }
            8 if crm_up[u] => {
                crm_up[u] = false;
                json!({"type": "fragmentDelete", "dataset": "crm", "id": format!("c-{u}"),
                       "timestamp": ts(k)})
                .to_string()
            }
            9 if web_up[u] => {
                web_up[u] = false;
                json!({"type": "fragmentDelete", "dataset": "web", "id": format!("w-{u}"),
                       "timestamp": ts(k)})
                .to_string()
            }
            _ => {
                crm_up[u] = true;
                let first = if next() % 3 == 0 { "Jane" } else { "John" };
                crm(&format!("c-{u}"), &email, first, k, k)
            }
        };
        lines.push(line);
    }
    lines
}

#[test]
fn two_workers_deliver_the_same_payloads_as_one() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let events = write_events(dir.path(), "mixed.ndjson", &mixed_events());

    let mut delivered: Vec<(String, Vec<Value>)> = Vec::new();
    let mut dry_payloads = None;
    for workers in ["1", "2"] {
        let server = rt.block_on(TestServer::always(Reply::ok()));
        let config = write_config(dir.path(), &server, json!({"timeoutMs": 2000}));
        if dry_payloads.is_none() {
            let (dry, expected) = dry_run(dir.path(), &config, &events, &["--batch", "2"]);
            dry.assert_code(0, "dry run");
            dry_payloads = Some(expected.into_iter().map(|e| e.payload).collect::<Vec<_>>());
        }
        let data = dir.path().join(format!("data-{workers}"));
        let run = replay(
            dir.path(),
            &config,
            &events,
            &data,
            &["--workers", workers, "--batch", "2"],
        );
        run.assert_code(0, &format!("replay --workers {workers}"));
        let requests = server.requests();
        let s = summary(&run);
        assert_eq!(
            (s.exports, s.delivered, s.dead_lettered),
            (requests.len() as u64, requests.len() as u64, 0),
            "--workers {workers}: {}",
            run.stderr
        );
        requests.iter().for_each(assert_request_shape);
        let keys: BTreeSet<String> = requests.iter().map(key).collect();
        assert_eq!(
            keys.len(),
            requests.len(),
            "--workers {workers}: keys not distinct"
        );
        delivered.push((
            workers.to_string(),
            requests.iter().map(Recorded::json).collect(),
        ));
    }
    let dry_payloads = dry_payloads.unwrap();
    // The history exercises exits and stitched (merged) profiles, not only upserts.
    let status = |p: &Value, wanted: &str| {
        p["segmentMembership"]["ups"]
            .as_object()
            .is_some_and(|ups| ups.values().any(|a| a["status"] == wanted))
    };
    assert!(dry_payloads.iter().any(|p| status(p, "exited")), "no exit");
    assert!(
        dry_payloads.iter().any(|p| p["identityMap"]["email"]
            .as_array()
            .is_some_and(|e| e.len() > 1)),
        "no merged profile"
    );
    assert!(
        dry_payloads.len() >= 30,
        "too few exports: {}",
        dry_payloads.len()
    );
    let (one, two) = (&delivered[0].1, &delivered[1].1);
    assert_eq!(
        multiset(one),
        multiset(&dry_payloads),
        "--workers 1 vs --dry-run"
    );
    assert_eq!(multiset(two), multiset(one), "--workers 2 vs --workers 1");
    assert_eq!(
        per_profile(two),
        per_profile(one),
        "per-profile order differs between --workers 2 and 1"
    );
}

#[test]
fn data_dir_defaults_to_streamdest_data_in_the_working_directory() {
    let rt = runtime();
    let server = rt.block_on(TestServer::always(Reply::Status(503)));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &server,
        json!({"maxRetries": 0, "timeoutMs": 300}),
    );
    let events = write_events(
        dir.path(),
        "events.ndjson",
        &[crm("c-1", "one@acme.com", "John", 1, 1)],
    );
    let run = streamdest(
        dir.path(),
        &[
            "replay",
            "--config",
            config.to_str().unwrap(),
            "--events",
            events.to_str().unwrap(),
        ],
    );
    run.assert_code(0, "replay without --data-dir");
    let s = summary(&run);
    assert_eq!((s.exports, s.delivered, s.dead_lettered), (1, 0, 1));
    assert_eq!(server.count(), 1, "maxRetries 0: one attempt");
    let data = dir.path().join("streamdest-data");
    assert!(data.is_dir(), "no ./streamdest-data after replay");
    let list = dead_letters(dir.path(), "list", &data, &[]);
    list.assert_code(0, "list");
    let entries = list.json_lines();
    assert_eq!(entries.len(), 1, "{}", list.stdout);
    assert_eq!(entries[0]["attempts"], 1);
    assert_eq!(entries[0]["profile"], "email:one@acme.com");
    assert_eq!(entries[0]["payload"]["loyalty"]["points"], 1);
}

/// SPEC §4 (amended): the example history renames John's profile (`ecid:…` while it has its
/// ECID, `email:…` after); the later profile's exports wait for the earlier one's, however
/// slowly the endpoint answers those.
#[test]
fn exports_wait_for_earlier_exports_of_profiles_sharing_an_identity() {
    const SLOW: Duration = Duration::from_millis(300);
    let rt = runtime();
    let server = rt.block_on(TestServer::start(move |r| {
        if profile_of(&r.json()).starts_with("ecid:") {
            Reply::Delay(SLOW, Box::new(Reply::ok()))
        } else {
            Reply::ok()
        }
    }));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &server, json!({"timeoutMs": 2000}));
    let events = write_events(dir.path(), "events.ndjson", &example_events());
    let (dry, expected) = dry_run(dir.path(), &config, &events, &[]);
    dry.assert_code(0, "dry run");
    let run = replay(dir.path(), &config, &events, &dir.path().join("data"), &[]);
    run.assert_code(0, "replay");

    let requests = server.requests();
    assert_eq!(requests.len(), expected.len());
    let identities = |payload: &Value| -> BTreeSet<String> {
        payload["identityMap"]
            .as_object()
            .into_iter()
            .flatten()
            .flat_map(|(ns, ids)| {
                ids.as_array()
                    .into_iter()
                    .flatten()
                    .map(move |i| format!("{ns}:{}", i["id"].as_str().unwrap_or("")))
            })
            .collect()
    };
    // Where each expected export arrived.
    let arrival = |e: &DryExport| -> &Recorded {
        requests
            .iter()
            .find(|r| canonical(&r.json()) == canonical(&e.payload))
            .unwrap_or_else(|| panic!("not delivered: {}", e.payload))
    };
    let mut related = 0;
    for (i, earlier) in expected.iter().enumerate() {
        for later in &expected[i + 1..] {
            if identities(&earlier.payload).is_disjoint(&identities(&later.payload)) {
                continue;
            }
            related += 1;
            let (a, b) = (arrival(earlier), arrival(later));
            let answered = if earlier.profile.starts_with("ecid:") {
                SLOW
            } else {
                Duration::ZERO
            };
            assert!(
                b.at >= a.at + answered,
                "{} ({}) was sent before {} ({}) was answered",
                later.profile,
                later.payload,
                earlier.profile,
                earlier.payload
            );
        }
    }
    assert!(
        expected.iter().any(|e| e.profile.starts_with("ecid:"))
            && expected.iter().any(|e| e.profile.starts_with("email:john")),
        "the history renames the profile"
    );
    assert!(related > 0);
}
