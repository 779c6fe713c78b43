//! `streamdest run` over HTTP: acknowledged ingest rate and end-to-end export latency.
//!
//! ```text
//! cargo build --release && cargo bench --bench service -- [--events N] [--connections C]
//!     [--qualify F] [--rate R] [--latency-events N] [--workers W] [--phase a|b|both]
//! ```
//!
//! The release binary is `$STREAMDEST_BIN`, else `streamdest` next to this bench's own
//! directory (`target/release/streamdest`). Each phase starts it on a fresh temporary data
//! directory, with a destination pointing at an endpoint inside this process that answers 200
//! and records when each profile's export arrived.
//!
//! (a) Ingest: `--connections` keep-alive connections post `--events` events (100 a request,
//!     NDJSON) as fast as the 202s come back (each after the request's `fsync`); a fraction
//!     `--qualify` (default 0.1) of the events qualify for the mapped audience. Reported: the
//!     acknowledged rate, the request latency, and how long the exports took to arrive.
//! (b) Latency: requests of 100 events at a fixed offered rate `--rate` (events/s, default
//!     10,000), every event qualifying; per event, the time from its request's send to its
//!     export's arrival at the endpoint: p50, p99, max, and the rate achieved.

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;

const EVENTS_PER_REQUEST: usize = 100;

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("STREAMDEST_BIN") {
        return PathBuf::from(bin);
    }
    // target/release/deps/service-HASH → target/release/streamdest
    let exe = std::env::current_exe().expect("the bench's own path");
    exe.parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("streamdest"))
        .expect("the bench's target directory")
}

/// Receipt times by event index, for the phase running now.
struct Receipts {
    /// The profile id prefix of this phase's events.
    prefix: String,
    at: Vec<Option<Instant>>,
    duplicates: usize,
    foreign: usize,
}

#[derive(Clone)]
struct Endpoint {
    addr: SocketAddr,
    receipts: Arc<Mutex<Receipts>>,
    received: Arc<AtomicUsize>,
}

impl Endpoint {
    fn start(runtime: &tokio::runtime::Runtime) -> Endpoint {
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the endpoint");
        let addr = listener.local_addr().expect("endpoint address");
        let endpoint = Endpoint {
            addr,
            receipts: Arc::new(Mutex::new(Receipts {
                prefix: String::new(),
                at: Vec::new(),
                duplicates: 0,
                foreign: 0,
            })),
            received: Arc::default(),
        };
        let e = endpoint.clone();
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let e = e.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let e = e.clone();
                        async move {
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            e.record(&body, Instant::now());
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        endpoint
    }

    fn record(&self, body: &[u8], now: Instant) {
        self.received.fetch_add(1, Ordering::Relaxed);
        let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let email = value["identityMap"]["email"][0]["id"]
            .as_str()
            .unwrap_or_default();
        let mut r = self.receipts.lock().expect("receipts");
        let index = email
            .strip_prefix(r.prefix.as_str())
            .and_then(|s| s.strip_suffix("@x"))
            .and_then(|s| s.parse::<usize>().ok());
        match index {
            Some(i) if i < r.at.len() => {
                if r.at[i].is_some() {
                    r.duplicates += 1;
                } else {
                    r.at[i] = Some(now);
                }
            }
            _ => r.foreign += 1,
        }
    }

    fn reset(&self, prefix: &str, events: usize) {
        let mut r = self.receipts.lock().expect("receipts");
        r.prefix = prefix.to_string();
        r.at = vec![None; events];
        r.duplicates = 0;
        r.foreign = 0;
        self.received.store(0, Ordering::Relaxed);
    }

    fn url(&self) -> String {
        format!("http://{}/d1", self.addr)
    }
}

/// A running `streamdest run` on a temporary data directory.
struct Service {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Service {
    fn start(endpoint: &Endpoint, workers: Option<u16>) -> Service {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config = json!({
            "mergePolicies": [{"id": "p", "attributeMerge": "timestampOrdered", "identityStitching": "privateGraph"}],
            "audiences": [{"id": "johns", "mergePolicy": "p", "rule": "person.name.firstName = \"John\""}],
            "destinations": [{"id": "d1", "name": "d1", "endpoint": endpoint.url(),
                "audiences": [{"id": "johns"}], "attributes": ["person.name.firstName"]}]
        });
        let config_path = dir.path().join("config.json");
        std::fs::write(&config_path, config.to_string()).expect("write the config");
        let bin = binary();
        let mut command = Command::new(&bin);
        command
            .args(["run", "--config"])
            .arg(&config_path)
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .env_remove("STREAMDEST_API_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(w) = workers {
            command.args(["--workers", &w.to_string()]);
        }
        let mut child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "starting {} ({e}); build it with `cargo build --release` or set STREAMDEST_BIN",
                bin.display()
            )
        });
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if !sent
                    && let Some(rest) = line.split("listening on http://").nth(1)
                    && let Some(addr) = rest.split_whitespace().next()
                    && let Ok(addr) = addr.parse::<SocketAddr>()
                {
                    let _ = tx.send(addr);
                    sent = true;
                } else if !line.contains("listening") {
                    eprintln!("  [streamdest] {line}");
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("streamdest listening within 30 s");
        Service {
            child,
            addr,
            _dir: dir,
        }
    }

    fn resident_mib(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<f64>().ok())
            })
            .map(|kib| kib / 1024.0)
            .unwrap_or(0.0)
    }

    fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A keep-alive HTTP/1.1 connection posting NDJSON.
struct Connection {
    addr: SocketAddr,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Connection {
    fn open(addr: SocketAddr) -> Connection {
        let stream = TcpStream::connect(addr).expect("connect to streamdest");
        stream.set_nodelay(true).expect("nodelay");
        Connection {
            addr,
            reader: BufReader::new(stream.try_clone().expect("clone the stream")),
            writer: stream,
        }
    }

    /// Posts `body`; returns the status.
    fn post(&mut self, body: &[u8]) -> u16 {
        let head = format!(
            "POST /v1/events HTTP/1.1\r\nHost: {}\r\nContent-Type: application/x-ndjson\r\nContent-Length: {}\r\n\r\n",
            self.addr,
            body.len()
        );
        self.writer
            .write_all(head.as_bytes())
            .and_then(|()| self.writer.write_all(body))
            .expect("send a request");
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("status line");
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut length = 0usize;
        let mut chunked = false;
        loop {
            line.clear();
            self.reader.read_line(&mut line).expect("a header");
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let lower = header.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
        }
        if chunked {
            loop {
                line.clear();
                self.reader.read_line(&mut line).expect("chunk size");
                let size = usize::from_str_radix(line.trim(), 16).unwrap_or(0);
                let mut chunk = vec![0; size + 2];
                self.reader.read_exact(&mut chunk).expect("chunk");
                if size == 0 {
                    break;
                }
            }
        } else {
            let mut body = vec![0; length];
            self.reader.read_exact(&mut body).expect("response body");
        }
        status
    }
}

/// NDJSON for events `first..first + n`; event `i` qualifies when `qualifies(i)`.
fn request_body(
    prefix: &str,
    first: usize,
    n: usize,
    qualifies: impl Fn(usize) -> bool,
) -> Vec<u8> {
    let mut body = String::with_capacity(n * 200);
    for i in first..first + n {
        let name = if qualifies(i) { "John" } else { "Jane" };
        body.push_str(
            &json!({"type": "fragment", "dataset": "crm", "id": format!("{prefix}{i}"),
                    "identityMap": {"email": [{"id": format!("{prefix}{i}@x")}]},
                    "attributes": {"person": {"name": {"firstName": name}}}})
            .to_string(),
        );
        body.push('\n');
    }
    body.into_bytes()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Waits until `expected` exports arrived, or `quiet` passed without one.
fn wait_for_exports(endpoint: &Endpoint, expected: usize, quiet: Duration) -> Instant {
    let mut last = endpoint.received.load(Ordering::Relaxed);
    let mut changed = Instant::now();
    loop {
        let now = endpoint.received.load(Ordering::Relaxed);
        if now >= expected {
            return Instant::now();
        }
        if now != last {
            last = now;
            changed = Instant::now();
        } else if changed.elapsed() > quiet {
            return changed;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn ingest(
    endpoint: &Endpoint,
    events: usize,
    connections: usize,
    qualify: f64,
    workers: Option<u16>,
) {
    let requests = events.div_ceil(EVENTS_PER_REQUEST);
    let events = requests * EVENTS_PER_REQUEST;
    // Every k-th event qualifies, spread evenly.
    let every = if qualify > 0.0 {
        (1.0 / qualify).round().max(1.0) as usize
    } else {
        usize::MAX
    };
    let qualifies = move |i: usize| every != usize::MAX && i.is_multiple_of(every);
    let expected = (0..events).filter(|&i| qualifies(i)).count();
    endpoint.reset("a", events);
    let svc = Service::start(endpoint, workers);
    // Bodies built before the clock starts.
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..requests)
            .map(|r| request_body("a", r * EVENTS_PER_REQUEST, EVENTS_PER_REQUEST, qualifies))
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..connections)
        .map(|_| {
            let (bodies, next, failed, addr) =
                (bodies.clone(), next.clone(), failed.clone(), svc.addr);
            std::thread::spawn(move || {
                let mut conn = Connection::open(addr);
                let mut latencies = Vec::new();
                loop {
                    let r = next.fetch_add(1, Ordering::Relaxed);
                    if r >= bodies.len() {
                        break;
                    }
                    let sent = Instant::now();
                    if conn.post(&bodies[r]) != 202 {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    latencies.push(sent.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("client thread"))
        .collect();
    let acked_in = start.elapsed();
    let delivered_at = wait_for_exports(endpoint, expected, Duration::from_secs(30));
    let memory = svc.resident_mib();
    svc.stop();
    latencies.sort();
    let r = endpoint.receipts.lock().expect("receipts");
    let received = r.at.iter().filter(|a| a.is_some()).count();
    println!(
        "(a) ingest  | {events} events, {connections} connections, {:.0}% qualify | {:.0} events/s acknowledged ({:.1} s, {} requests not 202) | request p50 {:.1} ms p99 {:.1} ms | exports {received}/{expected} (dup {}, other {}) all in after {:.1} s | peak RSS {memory:.0} MiB",
        qualify * 100.0,
        events as f64 / acked_in.as_secs_f64(),
        acked_in.as_secs_f64(),
        failed.load(Ordering::Relaxed),
        ms(percentile(&latencies, 50.0)),
        ms(percentile(&latencies, 99.0)),
        r.duplicates,
        r.foreign,
        delivered_at.duration_since(start).as_secs_f64(),
    );
}

fn latency(
    endpoint: &Endpoint,
    events: usize,
    rate: f64,
    connections: usize,
    workers: Option<u16>,
) {
    let requests = events.div_ceil(EVENTS_PER_REQUEST);
    let events = requests * EVENTS_PER_REQUEST;
    endpoint.reset("b", events);
    let svc = Service::start(endpoint, workers);
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..requests)
            .map(|r| request_body("b", r * EVENTS_PER_REQUEST, EVENTS_PER_REQUEST, |_| true))
            .collect(),
    );
    let interval = Duration::from_secs_f64(EVENTS_PER_REQUEST as f64 / rate);
    let sent_at: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; requests]));
    let late = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + Duration::from_millis(50);
    // Request r is due at start + r·interval, on connection r mod C.
    let threads: Vec<_> = (0..connections)
        .map(|c| {
            let (bodies, sent_at, late, failed, addr) = (
                bodies.clone(),
                sent_at.clone(),
                late.clone(),
                failed.clone(),
                svc.addr,
            );
            std::thread::spawn(move || {
                let mut conn = Connection::open(addr);
                for r in (c..bodies.len()).step_by(connections) {
                    let due = start + interval * r as u32;
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    } else if now - due > Duration::from_millis(5) {
                        late.fetch_max((now - due).as_micros() as u64, Ordering::Relaxed);
                    }
                    let sent = Instant::now();
                    sent_at.lock().expect("sent_at")[r] = Some(sent);
                    if conn.post(&bodies[r]) != 202 {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    let offered_in = start.elapsed();
    wait_for_exports(endpoint, events, Duration::from_secs(30));
    let memory = svc.resident_mib();
    svc.stop();
    let sent_at = sent_at.lock().expect("sent_at");
    let r = endpoint.receipts.lock().expect("receipts");
    let mut latencies: Vec<Duration> = Vec::with_capacity(events);
    let mut last = start;
    for (i, at) in r.at.iter().enumerate() {
        if let (Some(at), Some(sent)) = (at, sent_at[i / EVENTS_PER_REQUEST]) {
            latencies.push(at.saturating_duration_since(sent));
            last = last.max(*at);
        }
    }
    latencies.sort();
    let delivered = latencies.len();
    println!(
        "(b) latency | {events} events offered at {rate:.0}/s on {connections} connections | sent in {:.1} s ({:.0} events/s; sends up to {:.1} ms late; {} requests not 202) | delivered {delivered} ({:.0} exports/s, dup {}, other {}) | send→receipt p50 {:.1} ms p99 {:.1} ms max {:.1} ms | peak RSS {memory:.0} MiB",
        offered_in.as_secs_f64(),
        events as f64 / offered_in.as_secs_f64(),
        late.load(Ordering::Relaxed) as f64 / 1000.0,
        failed.load(Ordering::Relaxed),
        delivered as f64 / last.duration_since(start).as_secs_f64().max(1e-9),
        r.duplicates,
        r.foreign,
        ms(percentile(&latencies, 50.0)),
        ms(percentile(&latencies, 99.0)),
        ms(latencies.last().copied().unwrap_or_default()),
    );
}

fn main() {
    let events: usize = arg("--events", 200_000);
    let connections: usize = arg("--connections", 8);
    let qualify: f64 = arg("--qualify", 0.1);
    let rate: f64 = arg("--rate", 10_000.0);
    let latency_events: usize = arg("--latency-events", 100_000);
    let workers: Option<u16> = std::env::args()
        .any(|a| a == "--workers")
        .then(|| arg("--workers", 1));
    let phase: String = arg("--phase", "both".to_string());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let endpoint = Endpoint::start(&runtime);
    println!(
        "streamdest run benchmark: {} (workers {}), endpoint {}",
        binary().display(),
        workers.map_or("default".to_string(), |w| w.to_string()),
        endpoint.url()
    );
    if phase == "a" || phase == "both" {
        ingest(&endpoint, events, connections.max(1), qualify, workers);
    }
    if phase == "b" || phase == "both" {
        latency(&endpoint, latency_events, rate, connections.max(1), workers);
    }
}
