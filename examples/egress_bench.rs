//! Egress throughput benchmark: a local hyper receiver on 127.0.0.1, N exports pushed through
//! the [`Egress`] at several `maxInFlight` settings, then `wrk` against the same receiver for
//! the ceiling this machine allows.
//!
//! ```text
//! cargo run --release --example egress_bench -- [--exports N] [--profiles P]
//!     [--in-flight 64,256] [--payload-bytes B] [--wrk-seconds S] [--no-wrk]
//! ```
//! See `scripts/egress_bench.sh`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use streamdest::config::Destination;
use streamdest::egress::{Egress, EgressOptions, Export};

struct Args {
    exports: usize,
    profiles: usize,
    in_flight: Vec<usize>,
    payload_bytes: usize,
    wrk_seconds: u64,
    wrk: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        exports: 200_000,
        profiles: 20_000,
        in_flight: vec![64, 256],
        payload_bytes: 512,
        wrk_seconds: 5,
        wrk: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: String| {
            v.parse::<usize>()
                .map_err(|_| format!("{flag}: not a number: {v}"))
        };
        match flag.as_str() {
            "--exports" => args.exports = number(value()?)?,
            "--profiles" => args.profiles = number(value()?)?.max(1),
            "--payload-bytes" => args.payload_bytes = number(value()?)?,
            "--wrk-seconds" => args.wrk_seconds = number(value()?)? as u64,
            "--in-flight" => {
                args.in_flight = value()?
                    .split(',')
                    .map(|s| {
                        s.trim()
                            .parse::<usize>()
                            .map_err(|_| format!("--in-flight: {s}"))
                    })
                    .collect::<Result<_, _>>()?
            }
            "--no-wrk" => args.wrk = false,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

/// Answers every request `200 {}` after reading its body; counts requests.
async fn receiver() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the receiver");
    let addr = listener.local_addr().expect("receiver address");
    let count = Arc::new(AtomicU64::new(0));
    let counter = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let counter = counter.clone();
                    async move {
                        let _ = req.into_body().collect().await;
                        counter.fetch_add(1, Ordering::Relaxed);
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, count)
}

fn payload(bytes: usize, profile: usize, epoch: u64) -> Bytes {
    let head = format!("{{\"profile\":\"email:p{profile}@x\",\"epoch\":{epoch},\"pad\":\"");
    let pad = bytes.saturating_sub(head.len() + 2);
    Bytes::from(format!("{head}{}\"}}", "x".repeat(pad)))
}

async fn run_egress(addr: SocketAddr, args: &Args, max_in_flight: usize) -> Result<(), String> {
    let destination: Destination = serde_json::from_value(serde_json::json!({
        "id": "bench", "endpoint": format!("http://{addr}/ingest"), "headers": "x-bench:1",
        "delivery": {"maxInFlight": max_in_flight, "timeoutMs": 10_000}
    }))
    .map_err(|e| e.to_string())?;
    let egress = Egress::new(
        vec![destination],
        None,
        EgressOptions {
            queue_capacity: 65_536,
            ..Default::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let payloads: Vec<Bytes> = (0..args.profiles.min(args.exports).max(1))
        .map(|p| payload(args.payload_bytes, p, 0))
        .collect();
    let start = Instant::now();
    for i in 0..args.exports {
        let profile = i % args.profiles;
        let epoch = (i / args.profiles) as u64;
        let export = Export {
            destination: "bench".into(),
            profile: format!("email:p{profile}@x"),
            order_keys: Vec::new(),
            epoch,
            idempotency_key: format!("bench-{profile}-{epoch}"),
            payload: payloads[profile % payloads.len()].clone(),
        };
        egress.submit(export).await.map_err(|e| e.to_string())?;
    }
    egress.drain().await;
    let elapsed = start.elapsed();
    let stats = egress.stats();
    let rate = args.exports as f64 / elapsed.as_secs_f64();
    println!(
        "egress maxInFlight={max_in_flight}: {} exports in {:.2} s = {:.0} exports/s; latency (submit→delivered, incl. queueing) p50 {:.2} ms p99 {:.2} ms; delivered {} dead-lettered {} retried {}",
        args.exports,
        elapsed.as_secs_f64(),
        rate,
        stats.latency.value_at_quantile(0.5) as f64 / 1000.0,
        stats.latency.value_at_quantile(0.99) as f64 / 1000.0,
        stats.delivered,
        stats.dead_lettered,
        stats.retried
    );
    println!("RESULT egress {max_in_flight} {rate:.0}");
    Ok(())
}

/// The transport alone (same pooled hyper client, `n` concurrent request loops, no egress
/// machinery): what the egress could reach in this process.
async fn run_raw(addr: SocketAddr, args: &Args, n: usize) -> Result<f64, String> {
    let transport = streamdest::egress::Transport::new();
    let body = payload(args.payload_bytes, 0, 0);
    let next = Arc::new(AtomicU64::new(0));
    let total = args.exports as u64;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (transport, body, next) = (transport.clone(), body.clone(), next.clone());
        let uri: hyper::Uri = format!("http://{addr}/ingest")
            .parse()
            .map_err(|_| "bad uri".to_string())?;
        tasks.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let request = Request::post(uri.clone())
                    .header("content-type", "application/json")
                    .body(Full::new(body.clone()))
                    .map_err(|e| e.to_string())?;
                let x = transport
                    .send(request, Duration::from_secs(10), 65536)
                    .await
                    .map_err(|e| e.to_string())?;
                if !x.response.status().is_success() {
                    return Err(format!("status {}", x.response.status()));
                }
            }
            Ok::<(), String>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    let rate = total as f64 / start.elapsed().as_secs_f64();
    println!("transport only, {n} concurrent: {rate:.0} requests/s");
    println!("RESULT raw {n} {rate:.0}");
    Ok(rate)
}

fn run_wrk(
    addr: SocketAddr,
    connections: usize,
    seconds: u64,
    body: &Bytes,
) -> Result<f64, String> {
    let script = std::env::temp_dir().join(format!("egress_bench_{}.lua", std::process::id()));
    let body = String::from_utf8_lossy(body)
        .replace('\\', "\\\\")
        .replace('"', "\\\"");
    std::fs::write(
        &script,
        format!("wrk.method = \"POST\"\nwrk.body = \"{body}\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.headers[\"x-bench\"] = \"1\"\n"),
    )
    .map_err(|e| e.to_string())?;
    let threads = connections.min(2);
    let output = std::process::Command::new("wrk")
        .args([
            "-t",
            &threads.to_string(),
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{seconds}s"),
            "--latency",
            "-s",
        ])
        .arg(&script)
        .arg(format!("http://{addr}/ingest"))
        .output()
        .map_err(|e| format!("cannot run wrk: {e}"))?;
    let _ = std::fs::remove_file(&script);
    let text = String::from_utf8_lossy(&output.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| {
            format!(
                "no Requests/sec in wrk output:\n{text}{}",
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
    let p50 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("50%"))
        .map(str::trim)
        .unwrap_or("?");
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(str::trim)
        .unwrap_or("?");
    println!(
        "wrk -c{connections} -t{threads} {seconds}s: {rps:.0} requests/s; latency p50 {p50} p99 {p99}"
    );
    println!("RESULT wrk {connections} {rps:.0}");
    Ok(rps)
}

fn main() -> Result<(), String> {
    let args = parse_args()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (addr, received) = runtime.block_on(receiver());
    println!(
        "receiver on {addr}; {} exports over {} profiles, {} B payloads, {} cores",
        args.exports,
        args.profiles,
        args.payload_bytes,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let mut egress_rates = Vec::new();
    for &n in &args.in_flight {
        let before = received.load(Ordering::Relaxed);
        let start = Instant::now();
        runtime.block_on(run_egress(addr, &args, n))?;
        egress_rates.push((n, args.exports as f64 / start.elapsed().as_secs_f64()));
        let got = received.load(Ordering::Relaxed) - before;
        if got != args.exports as u64 {
            return Err(format!(
                "the receiver got {got} requests, expected {}",
                args.exports
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for &n in &args.in_flight {
        runtime.block_on(run_raw(addr, &args, n))?;
    }
    if args.wrk {
        let body = payload(args.payload_bytes, 0, 0);
        for (n, egress_rate) in egress_rates {
            let wrk_rate = run_wrk(addr, n, args.wrk_seconds, &body)?;
            println!(
                "ratio egress/wrk at {n} connections: {:.2}",
                egress_rate / wrk_rate
            );
        }
    }
    Ok(())
}
