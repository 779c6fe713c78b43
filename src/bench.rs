//! `streamdest bench`: the whole pipeline — synthetic events → dataflow → egress → a local
//! HTTP endpoint — in one process, at a fixed offered rate, with event-to-receipt latency.
//!
//! # What runs
//!
//! * an in-process [`Receiver`] (hyper, HTTP/1.1 keep-alive, `127.0.0.1:0`) that answers
//!   `200` and timestamps every request once its body is read;
//! * the dataflow ([`Pipeline`], `--workers` timely threads) fed by this thread;
//! * the [`Egress`] (one destination pointing at the receiver, `--max-in-flight` slots) on a
//!   tokio runtime shared with the receiver;
//! * a *collector* thread that takes completed epochs from the [`ExportStream`] and a
//!   *submitter* thread that hands their exports to the egress.
//!
//! # Phases
//!
//! 1. **Initial load** (not timed as part of the latency): two fragments per profile, in big
//!    epochs (`--load-batch` events), generated and parsed on a helper thread. The exports the
//!    load produces are counted and discarded — they would be a one-off backfill, not the
//!    steady state this measures.
//! 2. **Measured phases**, one per `--rate` (and the trials of `--max`): an *open-loop* feeder.
//!    Event `i` of a phase is *scheduled* at `t0 + i / rate`; every `--batch-ms` the feeder
//!    takes every event whose time has come (at most `--load-batch`), parses and resolves it
//!    and pushes it as one epoch. A stall therefore makes the next epochs bigger and their
//!    events later — it does not slow the schedule down (no coordinated omission). The first
//!    `--warmup` seconds of a phase are excluded from the figures.
//!
//! # Latency: from the `Idempotency-Key`
//!
//! Event `i` of a phase gets the ingest sequence number `base + i`. An export's
//! `Idempotency-Key` ends in `-{seq:x}`, the largest sequence number among the events for that
//! profile in the epoch (`streamdest_operators::export::encode`). When the receiver gets a
//! request it parses that suffix, computes the event's scheduled time from `i` alone and
//! records `receipt − scheduled` in a histogram: no map from exports to events, no per-event
//! bookkeeping, one mutex-protected histogram update per request. When several events for one
//! profile fall into one epoch they give one export, measured from the newest of them (the
//! older ones are at most one epoch, `--batch-ms` plus catch-up, older); with far more
//! profiles than events per epoch this is rare. Requests whose key does not parse are counted
//! as `unmatched` (a non-zero count means the key format changed).
//!
//! # Where the time goes
//!
//! Each measured event's latency is split into stages, each with its own histogram:
//! `ingest_wait` (scheduled → its epoch pushed: batching and dataflow backpressure),
//! `dataflow_per_epoch` (push → the epoch completed at the [`ExportStream`]),
//! `queue_before_egress` (completed → accepted by [`Egress::submit`], per export), and `egress`
//! (submit → delivered: waiting for the profile's previous export and a `maxInFlight` slot,
//! plus the HTTP round trip; the egress's own histogram).
//!
//! `--max` searches the highest offered rate whose p99 stays under `--p99-ms`: short trials
//! (`--max-duration`) doubling from `--max-start` until one fails, then bisecting. A trial is
//! cut short once the feeder lags its schedule by more than `max(1 s, 4 × --p99-ms)`; a
//! `--rate` phase once it lags by more than `--max-lag` (its unpushed events are reported as
//! `events_dropped`, and the phase fails).

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use crossbeam_channel::{Receiver as Channel, Sender};
use hdrhistogram::Histogram;
use serde::Serialize;
use streamdest_operators::export::Encoded;
use streamdest_operators::input::{Epoch, EpochInput};
use streamdest_operators::plan::Plan;

use crate::egress::{Egress, EgressOptions, Export};
use crate::events::{EpochBuilder, Update, parse_line};
use crate::pipeline::{ExportStream, Pipeline, PipelineConfig};
use crate::receiver::{Receiver, ReceiverOptions};
use crate::synth::{Synth, Updates};

/// `streamdest bench` options.
#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// Synthetic profiles, each loaded as two fragments (CRM and web) sharing an email.
    #[arg(long, default_value_t = 100_000)]
    pub profiles: u64,
    /// Rule audiences, all mapped to the destination.
    #[arg(long, default_value_t = 20)]
    pub audiences: usize,
    /// Share of update events that write mapped attributes or can move a membership (the
    /// rest write an unmapped attribute and export nothing).
    #[arg(long, default_value_t = 0.5)]
    pub relevant: f64,
    /// Offered rate, events/s. A comma-separated list runs one measured phase per rate, in
    /// order, after a single initial load.
    #[arg(long, value_delimiter = ',', default_value = "10000")]
    pub rate: Vec<f64>,
    /// Measured seconds per phase.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds at the offered rate before measuring, per phase.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Dataflow worker threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Epoch length of the open-loop feeder, in milliseconds.
    #[arg(long, default_value_t = 5.0)]
    pub batch_ms: f64,
    /// The destination's `delivery.maxInFlight`.
    #[arg(long, default_value_t = 256)]
    pub max_in_flight: usize,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// After the `--rate` phases, search the highest rate whose p99 stays under `--p99-ms`.
    #[arg(long)]
    pub max: bool,
    /// The p99 latency bound for `--max`, in milliseconds.
    #[arg(long, default_value_t = 50.0)]
    pub p99_ms: f64,
    /// Measured seconds of each `--max` trial.
    #[arg(long, default_value_t = 5.0)]
    pub max_duration: f64,
    /// Warm-up seconds of each `--max` trial.
    #[arg(long, default_value_t = 1.0)]
    pub max_warmup: f64,
    /// The first rate `--max` tries (then doubles).
    #[arg(long, default_value_t = 5000.0)]
    pub max_start: f64,
    /// Cut a `--rate` phase short once the feeder lags its schedule by more than SECS (the
    /// phase is reported as aborted, with the events never pushed).
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub max_lag: f64,
    /// Events per epoch of the initial load; also the largest catch-up epoch.
    #[arg(long, default_value_t = 20_000)]
    pub load_batch: usize,
    /// Epochs the feeder may run ahead of the egress hand-off.
    #[arg(long, default_value_t = 64)]
    pub window: u64,
    /// Seed of the synthetic population and update stream.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Only run the receiver for SECS seconds (for `wrk`): prints its URL, then the count.
    #[arg(long, value_name = "SECS")]
    pub serve_only: Option<f64>,
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

/// Percentiles of one histogram, in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    /// From a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| (us as f64 / 1000.0 * 1000.0).round() / 1000.0;
        Percentiles {
            count: h.len(),
            mean: (h.mean() / 1000.0 * 1000.0).round() / 1000.0,
            p50: ms(h.value_at_quantile(0.5)),
            p95: ms(h.value_at_quantile(0.95)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// Where the time of a measured event goes, stage by stage (milliseconds).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Breakdown {
    /// Scheduled time → its epoch pushed into the dataflow (per event).
    pub ingest_wait: Percentiles,
    /// Epoch pushed → completed at the export stream (per epoch).
    pub dataflow_per_epoch: Percentiles,
    /// Epoch completed → export accepted by the egress (per export).
    pub queue_before_egress: Percentiles,
    /// Submitted → delivered, HTTP round trip included (per export; the egress's histogram).
    pub egress: Percentiles,
}

/// One measured phase at one offered rate.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PhaseReport {
    pub rate_offered: f64,
    pub warmup_s: f64,
    pub duration_s: f64,
    /// Events scheduled in the measured window.
    pub events_scheduled: u64,
    /// Of those, pushed into the dataflow.
    pub events_pushed: u64,
    /// Epochs of the whole phase (warm-up included) and their mean size.
    pub epochs: u64,
    pub events_per_epoch: f64,
    /// Events whose epoch completed in the dataflow during the measured window, per second.
    pub achieved_events_per_s: f64,
    /// Exports for measured events received by the endpoint.
    pub exports: u64,
    /// Requests received by the endpoint during the measured window, per second.
    pub achieved_exports_per_s: f64,
    /// Scheduled time of each event → receipt of its export at the endpoint.
    pub latency_ms: Percentiles,
    pub breakdown_ms: Breakdown,
    /// Events scheduled more than two epoch lengths ago but not yet pushed, when the schedule
    /// ended.
    pub backlog_events: u64,
    /// The largest such backlog during the phase.
    pub max_backlog_events: u64,
    /// The phase was cut short because the feeder lagged too far (`--max-lag`, or in a
    /// `--max` trial `max(1 s, 4 × --p99-ms)`).
    pub aborted: bool,
    /// Scheduled events never pushed (only when aborted).
    pub events_dropped: u64,
    /// Process CPU seconds (user + system) from the start of the window until drained.
    pub cpu_s: f64,
    /// `cpu_s` per wall-clock second: cores busy on average.
    pub cpu_cores: f64,
    /// CPU seconds spent generating the synthetic JSON (the load generator, not streamdest).
    pub generator_cpu_s: f64,
    /// Receipts of warm-up exports, and of requests whose key gave no sequence number.
    pub receipts_warmup: u64,
    pub receipts_unmatched: u64,
    /// p99 under the bound, no backlog, and at least 90 % of the offered rate achieved.
    pub passed: bool,
}

/// The initial load.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadReport {
    pub profiles: u64,
    pub events: u64,
    pub epochs: u64,
    pub seconds: f64,
    pub events_per_s: f64,
    /// Exports the load produced; discarded, not sent.
    pub exports_discarded: u64,
    pub rss_mib_after: f64,
}

/// The `--max` search.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MaxReport {
    pub p99_bound_ms: f64,
    /// The highest offered rate that passed (0 when none did).
    pub best_rate: f64,
    /// That trial's achieved exports/s.
    pub best_exports_per_s: f64,
    pub trials: Vec<PhaseReport>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct EgressTotals {
    pub exports: u64,
    pub delivered: u64,
    pub dead_lettered: u64,
    pub retried: u64,
    pub pending: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Resources {
    pub cpu_user_s: f64,
    pub cpu_sys_s: f64,
    pub peak_rss_mib: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub loadavg_start: String,
    pub loadavg_end: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Params {
    pub profiles: u64,
    pub audiences: usize,
    pub relevant: f64,
    pub workers: usize,
    pub batch_ms: f64,
    pub max_in_flight: usize,
    pub window: u64,
    pub load_batch: usize,
    pub seed: u64,
}

/// The whole report, as written by `--json`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BenchReport {
    pub command: String,
    pub date: String,
    pub machine: Machine,
    pub params: Params,
    pub load: LoadReport,
    pub runs: Vec<PhaseReport>,
    pub max: Option<MaxReport>,
    pub egress: EgressTotals,
    /// Requests the endpoint received (retries included).
    pub receiver_requests: u64,
    pub resources: Resources,
}

// ---------------------------------------------------------------------------------------------
// Measurement helpers
// ---------------------------------------------------------------------------------------------

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 1 h at 3 significant digits; larger values saturate. Constant, valid bounds.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant histogram bounds are valid")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The ingest sequence number an `Idempotency-Key` ends with (`…-{seq:x}`).
pub fn seq_of_key(key: &str) -> Option<u64> {
    let (_, hex) = key.rsplit_once('-')?;
    u64::from_str_radix(hex, 16).ok()
}

/// Process CPU time (user, system) in seconds.
pub fn cpu_times() -> (f64, f64) {
    // SAFETY: `getrusage` only writes into the zeroed struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a `rusage`, RUSAGE_SELF is always valid.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return (0.0, 0.0);
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(usage.ru_utime), secs(usage.ru_stime))
}

/// This thread's CPU time in seconds.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a `timespec`; the clock id is a constant.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// A field of `/proc/self/status` in MiB (`VmRSS:`, `VmHWM:`); 0 where unavailable.
pub fn proc_status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Peak resident memory in MiB: `VmHWM`, else `ru_maxrss`.
pub fn peak_rss_mib() -> f64 {
    let hwm = proc_status_mib("VmHWM:");
    if hwm > 0.0 {
        return hwm;
    }
    // SAFETY: as in `cpu_times`.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as in `cpu_times`.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    usage.ru_maxrss as f64 / 1024.0
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

// ---------------------------------------------------------------------------------------------
// The engine: receiver + pipeline + egress, fed phase by phase
// ---------------------------------------------------------------------------------------------

/// The shape of an engine (what `bench` and `demo` choose).
#[derive(Clone, Debug)]
pub(crate) struct EngineOptions {
    pub synth: Synth,
    pub workers: usize,
    pub batch: Duration,
    pub window: u64,
    pub max_in_flight: usize,
    pub load_batch: usize,
    /// Keep the body of the first request the receiver gets (the demo shows it).
    pub keep_sample: bool,
}

/// One measured phase's parameters.
#[derive(Clone, Debug)]
pub(crate) struct PhaseSpec {
    pub rate: f64,
    pub warmup: Duration,
    pub duration: Duration,
    /// Stop scheduling once the feeder lags its schedule by more than this.
    pub abort_lag: Option<Duration>,
    pub p99_bound_ms: f64,
}

/// A live view of a running phase, for progress lines.
#[derive(Clone, Debug)]
pub(crate) struct Progress {
    /// Since the phase's first scheduled event.
    pub elapsed: Duration,
    pub events_pushed: u64,
    /// Requests the endpoint received in this phase.
    pub received: u64,
    pub latency: Percentiles,
    pub backlog: u64,
}

/// A completed epoch's push, for the collector's dataflow timing.
struct PushRecord {
    epoch: Epoch,
    pushed_us: u64,
    events: u64,
    measured: bool,
}

/// A completed epoch on its way to the egress.
struct Batch {
    epoch: Epoch,
    exports: Vec<Encoded>,
    completed_us: u64,
    measured: bool,
}

/// The clock and counters of the phase that is running.
struct PhaseState {
    t0_us: u64,
    rate: f64,
    base: u64,
    warmup: u64,
    total: u64,
    window_start_us: u64,
    window_end_us: AtomicU64,
    latency: Mutex<Histogram<u64>>,
    dataflow: Mutex<Histogram<u64>>,
    queue: Mutex<Histogram<u64>>,
    receipts: AtomicU64,
    receipts_measured: AtomicU64,
    receipts_warmup: AtomicU64,
    receipts_unmatched: AtomicU64,
    receipts_in_window: AtomicU64,
    events_completed_in_window: AtomicU64,
}

impl PhaseState {
    /// When event `i` is scheduled, µs since the engine's origin.
    fn scheduled_us(&self, i: u64) -> u64 {
        self.t0_us + (i as f64 * 1e6 / self.rate) as u64
    }

    /// How many events are scheduled at or before `now_us`.
    fn due(&self, now_us: u64) -> u64 {
        if now_us < self.t0_us {
            return 0;
        }
        let n = ((now_us - self.t0_us) as f64 * self.rate / 1e6).floor() as u64 + 1;
        n.min(self.total)
    }

    fn in_window(&self, us: u64) -> bool {
        us >= self.window_start_us && us < self.window_end_us.load(Ordering::Relaxed)
    }

    fn on_receipt(&self, key: Option<&str>, now_us: u64) {
        self.receipts.fetch_add(1, Ordering::Relaxed);
        if self.in_window(now_us) {
            self.receipts_in_window.fetch_add(1, Ordering::Relaxed);
        }
        let index = key
            .and_then(seq_of_key)
            .and_then(|seq| seq.checked_sub(self.base))
            .filter(|i| *i < self.total);
        match index {
            None => {
                self.receipts_unmatched.fetch_add(1, Ordering::Relaxed);
            }
            Some(i) if i < self.warmup => {
                self.receipts_warmup.fetch_add(1, Ordering::Relaxed);
            }
            Some(i) => {
                let latency = now_us.saturating_sub(self.scheduled_us(i)).max(1);
                lock(&self.latency).saturating_record(latency);
                self.receipts_measured.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// What the engine's threads share.
struct Shared {
    origin: Instant,
    /// False during the initial load: completed epochs are counted and discarded.
    deliver: AtomicBool,
    discarded: AtomicU64,
    /// Epochs fully handled (discarded, or every export accepted by the egress).
    handled: AtomicU64,
    /// Events of the epochs the collector has taken from the dataflow.
    completed_events: AtomicU64,
    phase: RwLock<Option<Arc<PhaseState>>>,
    failure: Mutex<Option<String>>,
    sample: Mutex<Option<(String, Bytes)>>,
}

impl Shared {
    fn now_us(&self) -> u64 {
        self.origin.elapsed().as_micros() as u64
    }

    fn phase(&self) -> Option<Arc<PhaseState>> {
        self.phase.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_phase(&self, phase: Option<Arc<PhaseState>>) {
        *self.phase.write().unwrap_or_else(|p| p.into_inner()) = phase;
    }

    fn fail(&self, error: String) {
        lock(&self.failure).get_or_insert(error);
    }
}

/// Receiver, pipeline and egress, with the feeder's state.
pub(crate) struct Engine {
    runtime: tokio::runtime::Runtime,
    receiver: Option<Receiver>,
    egress: Egress,
    plan: Arc<Plan>,
    pipeline: Option<Pipeline>,
    shared: Arc<Shared>,
    records: Option<Sender<PushRecord>>,
    collector: Option<JoinHandle<()>>,
    submitter: Option<JoinHandle<()>>,
    updates: Updates,
    builder: EpochBuilder,
    next_seq: u64,
    /// Events pushed into the dataflow so far.
    pushed_events: u64,
    options: EngineOptions,
}

const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

impl Engine {
    /// Starts the receiver, the egress and the dataflow.
    pub fn start(options: EngineOptions) -> anyhow::Result<Engine> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("streamdest-io")
            .build()
            .context("starting the tokio runtime")?;
        let shared = Arc::new(Shared {
            origin: Instant::now(),
            deliver: AtomicBool::new(false),
            discarded: AtomicU64::new(0),
            handled: AtomicU64::new(0),
            completed_events: AtomicU64::new(0),
            phase: RwLock::new(None),
            failure: Mutex::new(None),
            sample: Mutex::new(None),
        });
        let hook_shared = shared.clone();
        let keep_sample = options.keep_sample;
        let receiver = runtime
            .block_on(Receiver::start(ReceiverOptions {
                on_request: Some(Arc::new(move |parts, body, at| {
                    let key = parts
                        .headers
                        .get("idempotency-key")
                        .and_then(|v| v.to_str().ok());
                    if keep_sample {
                        let mut sample = lock(&hook_shared.sample);
                        if sample.is_none() {
                            *sample = Some((key.unwrap_or_default().to_string(), body.clone()));
                        }
                    }
                    if let Some(phase) = hook_shared.phase() {
                        let now = at.saturating_duration_since(hook_shared.origin);
                        phase.on_receipt(key, now.as_micros() as u64);
                    }
                })),
                ..Default::default()
            }))
            .context("starting the receiver on 127.0.0.1")?;

        let mut config = options.synth.config(&receiver.url("/ingest"));
        for destination in &mut config.destinations {
            destination.delivery.max_in_flight = options.max_in_flight.max(1);
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        let plan = Arc::new(
            config
                .compile(now_ms)
                .map_err(|e| anyhow!("synthetic configuration: {e}"))?,
        );
        let egress = {
            let _enter = runtime.enter();
            Egress::new(
                config.destinations.clone(),
                None,
                EgressOptions {
                    queue_capacity: 65_536,
                    ..Default::default()
                },
            )
            .context("starting the egress")?
        };
        let (pipeline, stream) = Pipeline::start(
            plan.clone(),
            PipelineConfig {
                workers: options.workers.max(1),
                cluster: None,
                window: options.window.max(1),
            },
        )?;
        let (records_tx, records_rx) = crossbeam_channel::unbounded();
        let (batches_tx, batches_rx) = crossbeam_channel::bounded(options.window.max(1) as usize);
        let collector = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("bench-collector".into())
                .spawn(move || collect(stream, records_rx, batches_tx, shared))
                .context("starting the collector thread")?
        };
        let submitter = {
            let shared = shared.clone();
            let egress = egress.clone();
            let plan = plan.clone();
            std::thread::Builder::new()
                .name("bench-submitter".into())
                .spawn(move || {
                    if let Err(e) = submit(batches_rx, &egress, &plan, &shared) {
                        shared.fail(format!("{e:#}"));
                    }
                })
                .context("starting the submitter thread")?
        };
        let peers = pipeline.peers();
        Ok(Engine {
            runtime,
            receiver: Some(receiver),
            egress,
            plan,
            pipeline: Some(pipeline),
            shared,
            records: Some(records_tx),
            collector: Some(collector),
            submitter: Some(submitter),
            updates: options.synth.updates(),
            builder: EpochBuilder::new(peers),
            next_seq: 1,
            pushed_events: 0,
            options,
        })
    }

    fn pipeline(&mut self) -> anyhow::Result<&mut Pipeline> {
        self.pipeline
            .as_mut()
            .ok_or_else(|| anyhow!("the pipeline has finished"))
    }

    fn check(&self) -> anyhow::Result<()> {
        match lock(&self.shared.failure).as_ref() {
            Some(e) => bail!("delivery stopped: {e}"),
            None => Ok(()),
        }
    }

    /// Pushes one epoch and tells the collector when; returns the push time (µs).
    fn push(
        &mut self,
        inputs: Vec<EpochInput>,
        events: u64,
        measured: bool,
    ) -> anyhow::Result<u64> {
        let pushed = self.pipeline()?.push(inputs);
        let epoch = match pushed {
            Ok(epoch) => epoch,
            Err(e) => {
                self.check()?;
                return Err(e);
            }
        };
        let pushed_us = self.shared.now_us();
        self.pushed_events += events;
        if let Some(records) = &self.records {
            let _ = records.send(PushRecord {
                epoch,
                pushed_us,
                events,
                measured,
            });
        }
        Ok(pushed_us)
    }

    /// Waits until every pushed epoch is handled and every export delivered or dead-lettered.
    fn settle(&mut self) -> anyhow::Result<()> {
        self.pipeline()?.wait_all_acked().or_else(|e| {
            self.check()?;
            Err(e)
        })?;
        let pushed = self.pipeline()?.next_epoch();
        while self.shared.handled.load(Ordering::Acquire) < pushed {
            self.check()?;
            std::thread::sleep(Duration::from_millis(1));
        }
        self.check()?;
        let egress = self.egress.clone();
        self.runtime
            .block_on(async move { tokio::time::timeout(DRAIN_TIMEOUT, egress.drain()).await })
            .map_err(|_| anyhow!("the egress did not drain within {DRAIN_TIMEOUT:?}"))
    }

    /// Loads every profile (two fragments each); the load's exports are discarded.
    pub fn load(
        &mut self,
        mut progress: impl FnMut(u64, u64, Duration),
    ) -> anyhow::Result<LoadReport> {
        self.shared.deliver.store(false, Ordering::Release);
        let start = Instant::now();
        let total = self.options.synth.profiles * 2;
        let chunk = self.options.load_batch.max(1);
        let (tx, rx) = crossbeam_channel::bounded::<Vec<Update>>(2);
        let synth = self.options.synth.clone();
        let plan = self.plan.clone();
        let first_seq = self.next_seq;
        let generator = std::thread::Builder::new()
            .name("bench-load".into())
            .spawn(move || -> anyhow::Result<u64> {
                let mut seq = first_seq;
                let mut buffer = Vec::with_capacity(chunk);
                for line in synth.initial_load() {
                    let event = parse_line(&line)
                        .map_err(|e| anyhow!("synthetic load event {seq}: {e}"))?;
                    buffer.push(Update::resolve(&plan, event, seq, 0)?);
                    seq += 1;
                    if buffer.len() >= chunk
                        && tx
                            .send(std::mem::replace(&mut buffer, Vec::with_capacity(chunk)))
                            .is_err()
                    {
                        return Ok(seq);
                    }
                }
                if !buffer.is_empty() {
                    let _ = tx.send(buffer);
                }
                Ok(seq)
            })
            .context("starting the load generator")?;
        let mut events = 0u64;
        let mut epochs = 0u64;
        let mut last_progress = Instant::now();
        let fed: anyhow::Result<()> = (|| {
            for updates in rx {
                let n = updates.len() as u64;
                for update in updates {
                    self.builder.add(update);
                }
                let inputs = self.builder.finish();
                self.push(inputs, n, false)?;
                events += n;
                epochs += 1;
                if last_progress.elapsed() >= Duration::from_secs(1) {
                    last_progress = Instant::now();
                    progress(events, total, start.elapsed());
                }
            }
            Ok(())
        })();
        let generated = generator
            .join()
            .map_err(|_| anyhow!("the load generator panicked"))?;
        fed?;
        self.next_seq = generated?;
        self.settle()?;
        progress(events, total, start.elapsed());
        let seconds = start.elapsed().as_secs_f64();
        Ok(LoadReport {
            profiles: self.options.synth.profiles,
            events,
            epochs,
            seconds: round2(seconds),
            events_per_s: (events as f64 / seconds.max(1e-9)).round(),
            exports_discarded: self.shared.discarded.load(Ordering::Relaxed),
            rss_mib_after: round2(proc_status_mib("VmRSS:")),
        })
    }

    /// Runs one open-loop phase and waits until all its exports are delivered.
    pub fn run_phase(
        &mut self,
        spec: &PhaseSpec,
        mut progress: impl FnMut(&Progress),
    ) -> anyhow::Result<PhaseReport> {
        if !(spec.rate.is_finite() && spec.rate > 0.0) {
            bail!("the rate must be a positive number of events per second");
        }
        let warmup_n = (spec.rate * spec.warmup.as_secs_f64()).round() as u64;
        let measured_n = ((spec.rate * spec.duration.as_secs_f64()).round() as u64).max(1);
        let total = warmup_n + measured_n;
        let base = self.next_seq;
        self.next_seq += total;
        let t0_us = self.shared.now_us() + 20_000;
        let batch_us = (self.options.batch.as_micros() as u64).max(100);
        let mut phase = PhaseState {
            t0_us,
            rate: spec.rate,
            base,
            warmup: warmup_n,
            total,
            window_start_us: 0,
            window_end_us: AtomicU64::new(0),
            latency: Mutex::new(new_histogram()),
            dataflow: Mutex::new(new_histogram()),
            queue: Mutex::new(new_histogram()),
            receipts: AtomicU64::new(0),
            receipts_measured: AtomicU64::new(0),
            receipts_warmup: AtomicU64::new(0),
            receipts_unmatched: AtomicU64::new(0),
            receipts_in_window: AtomicU64::new(0),
            events_completed_in_window: AtomicU64::new(0),
        };
        phase.window_start_us = phase.scheduled_us(warmup_n);
        phase
            .window_end_us
            .store(phase.scheduled_us(total), Ordering::Relaxed);
        let phase = Arc::new(phase);
        self.shared.set_phase(Some(phase.clone()));
        self.shared.deliver.store(true, Ordering::Release);

        let mut ingest = new_histogram();
        let mut generator_cpu = 0.0;
        let mut window_open: Option<(u64, (f64, f64), Histogram<u64>)> = None;
        let mut next = 0u64;
        let mut epochs = 0u64;
        let mut max_backlog = 0u64;
        let mut backlog_end: Option<u64> = None;
        let mut aborted = false;
        let mut next_progress = t0_us;
        // Work in the dataflow is bounded by events, not only epochs: at most a second of the
        // offered rate (≥ 1000 events) pushed and not completed, so a phase that falls behind
        // queues its backlog in the feeder, where the lag is seen, and drains quickly.
        let max_in_dataflow = (spec.rate as u64).max(1000);
        let max_epoch = (self.options.load_batch as u64).clamp(1, max_in_dataflow);
        let peers = self.pipeline()?.peers();
        // Flushes (epochs) start at least one batch apart; one that overran its slot (a push
        // blocked by backpressure) is followed at once by the next, with everything that came
        // due meanwhile.
        let mut target = t0_us + batch_us;
        let mut waiting_for_dataflow = false;
        loop {
            let now = self.shared.now_us();
            if target > now {
                std::thread::sleep(Duration::from_micros(target - now));
            }
            let now = self.shared.now_us();
            target = target.max(now) + batch_us;
            if window_open.is_none() && now >= phase.window_start_us {
                window_open = Some((now, cpu_times(), self.egress.stats().latency));
            }
            let due = phase.due(now);
            let stale = phase.due(now.saturating_sub(2 * batch_us));
            let backlog = stale.saturating_sub(next);
            max_backlog = max_backlog.max(backlog);
            if due == total && backlog_end.is_none() {
                backlog_end = Some(backlog);
            }
            if now >= next_progress {
                next_progress = now + 250_000;
                progress(&Progress {
                    elapsed: Duration::from_micros(now.saturating_sub(t0_us)),
                    events_pushed: next,
                    received: phase.receipts.load(Ordering::Relaxed),
                    latency: Percentiles::of(&lock(&phase.latency)),
                    backlog,
                });
            }
            if let Some(lag) = spec.abort_lag
                && due > next
                && now.saturating_sub(phase.scheduled_us(next)) > lag.as_micros() as u64
            {
                aborted = true;
                phase.window_end_us.store(now, Ordering::Relaxed);
                break;
            }
            if due <= next {
                continue;
            }
            let in_dataflow = self
                .pushed_events
                .saturating_sub(self.shared.completed_events.load(Ordering::Acquire));
            // Full: wait until half of it has completed (so the catch-up epoch is big, not
            // one small epoch per completed one), watching the lag meanwhile.
            if in_dataflow >= max_in_dataflow {
                waiting_for_dataflow = true;
            }
            if waiting_for_dataflow && in_dataflow > max_in_dataflow / 2 {
                self.check()?;
                target = now + 200;
                continue;
            }
            waiting_for_dataflow = false;
            let upto = due
                .min(next + max_epoch)
                .min(next + (max_in_dataflow - in_dataflow).max(1));
            let started = thread_cpu();
            let lines: Vec<String> = (&mut self.updates).take((upto - next) as usize).collect();
            generator_cpu += thread_cpu() - started;
            let now_event = chrono::Utc::now().timestamp_micros();
            for (k, line) in lines.iter().enumerate() {
                let seq = base + next + k as u64;
                let event = parse_line(line).map_err(|e| anyhow!("synthetic event {seq}: {e}"))?;
                self.builder
                    .add(Update::resolve(&self.plan, event, seq, now_event)?);
            }
            if self.builder.events() == 0 {
                bail!("the synthetic update stream ended");
            }
            let inputs = self.builder.finish();
            debug_assert_eq!(inputs.len(), peers);
            let pushed = self.push(inputs, upto - next, next >= warmup_n)?;
            for i in next.max(warmup_n)..upto {
                ingest.saturating_record(pushed.saturating_sub(phase.scheduled_us(i)).max(1));
            }
            next = upto;
            epochs += 1;
            if next >= total {
                break;
            }
            if upto < due {
                target = self.shared.now_us(); // the epoch was capped: the rest at once
            }
        }
        let schedule_end = self.shared.now_us();
        let (window_start, cpu_start, egress_start) = window_open
            .take()
            .unwrap_or_else(|| (schedule_end, cpu_times(), self.egress.stats().latency));
        self.settle()?;
        let finished = self.shared.now_us();
        let cpu_end = cpu_times();
        let mut egress_latency = self.egress.stats().latency;
        // Same bounds on both sides; on the impossible error, the figure includes the warm-up.
        let _ = egress_latency.subtract(&egress_start);
        self.shared.set_phase(None);

        let window_s = (phase.window_end_us.load(Ordering::Relaxed))
            .saturating_sub(phase.window_start_us)
            .max(1) as f64
            / 1e6;
        let events_pushed = next.saturating_sub(warmup_n);
        let latency = Percentiles::of(&lock(&phase.latency));
        let cpu_s = (cpu_end.0 + cpu_end.1) - (cpu_start.0 + cpu_start.1);
        let achieved_events_per_s =
            phase.events_completed_in_window.load(Ordering::Relaxed) as f64 / window_s;
        let backlog_events = backlog_end.unwrap_or(total.saturating_sub(next));
        let passed = !aborted
            && latency.count > 0
            && latency.p99 <= spec.p99_bound_ms
            && backlog_events == 0
            && achieved_events_per_s >= 0.9 * spec.rate;
        Ok(PhaseReport {
            rate_offered: spec.rate,
            warmup_s: spec.warmup.as_secs_f64(),
            duration_s: spec.duration.as_secs_f64(),
            events_scheduled: measured_n,
            events_pushed,
            epochs,
            events_per_epoch: round2(next as f64 / epochs.max(1) as f64),
            achieved_events_per_s: achieved_events_per_s.round(),
            exports: phase.receipts_measured.load(Ordering::Relaxed),
            achieved_exports_per_s: (phase.receipts_in_window.load(Ordering::Relaxed) as f64
                / window_s)
                .round(),
            latency_ms: latency,
            breakdown_ms: Breakdown {
                ingest_wait: Percentiles::of(&ingest),
                dataflow_per_epoch: Percentiles::of(&lock(&phase.dataflow)),
                queue_before_egress: Percentiles::of(&lock(&phase.queue)),
                egress: Percentiles::of(&egress_latency),
            },
            backlog_events,
            max_backlog_events: max_backlog,
            aborted,
            events_dropped: total - next,
            cpu_s: round2(cpu_s),
            cpu_cores: round2(
                cpu_s / ((finished.saturating_sub(window_start)).max(1) as f64 / 1e6),
            ),
            generator_cpu_s: round2(generator_cpu),
            receipts_warmup: phase.receipts_warmup.load(Ordering::Relaxed),
            receipts_unmatched: phase.receipts_unmatched.load(Ordering::Relaxed),
            passed,
        })
    }

    /// The egress's counters.
    pub fn egress_totals(&self) -> EgressTotals {
        let stats = self.egress.stats();
        EgressTotals {
            exports: stats.exports,
            delivered: stats.delivered,
            dead_lettered: stats.dead_lettered,
            retried: stats.retried,
            pending: stats.pending,
        }
    }

    /// The endpoint's URL.
    pub fn receiver_url(&self) -> String {
        self.receiver
            .as_ref()
            .map_or_else(String::new, |r| r.url("/ingest"))
    }

    pub fn receiver_requests(&self) -> u64 {
        self.receiver.as_ref().map_or(0, Receiver::requests)
    }

    /// The first request the receiver got: its `Idempotency-Key` and body.
    pub fn sample(&self) -> Option<(String, Bytes)> {
        lock(&self.shared.sample).clone()
    }

    /// Closes the dataflow and joins every thread.
    pub fn finish(mut self) -> anyhow::Result<()> {
        self.records = None;
        if let Some(pipeline) = self.pipeline.take() {
            pipeline.finish()?;
        }
        if let Some(collector) = self.collector.take() {
            collector
                .join()
                .map_err(|_| anyhow!("the collector thread panicked"))?;
        }
        if let Some(submitter) = self.submitter.take() {
            submitter
                .join()
                .map_err(|_| anyhow!("the submitter thread panicked"))?;
        }
        self.check()?;
        if let Some(receiver) = self.receiver.take() {
            let _enter = self.runtime.enter();
            receiver.shutdown();
        }
        Ok(())
    }
}

/// The collector: completed epochs → timing → the submitter (or discarded during the load).
/// Acknowledging only after the hand-off keeps the feeder within `window` epochs of it.
fn collect(
    mut stream: ExportStream,
    records: Channel<PushRecord>,
    batches: Sender<Batch>,
    shared: Arc<Shared>,
) {
    let mut early: Option<PushRecord> = None;
    while let Some((epoch, exports)) = stream.next_epoch() {
        let completed_us = shared.now_us();
        let record = loop {
            let r = match early.take() {
                Some(r) => r,
                None => match records.recv() {
                    Ok(r) => r,
                    Err(_) => break None,
                },
            };
            if r.epoch == epoch {
                break Some(r);
            }
            if r.epoch > epoch {
                early = Some(r);
                break None;
            }
        };
        if let Some(r) = &record {
            shared
                .completed_events
                .fetch_add(r.events, Ordering::Release);
        }
        if !shared.deliver.load(Ordering::Acquire) {
            shared
                .discarded
                .fetch_add(exports.len() as u64, Ordering::Relaxed);
            stream.ack(epoch);
            shared.handled.fetch_add(1, Ordering::Release);
            continue;
        }
        let measured = record.as_ref().is_some_and(|r| r.measured);
        if let (Some(phase), Some(r)) = (shared.phase(), &record) {
            if phase.in_window(completed_us) {
                phase
                    .events_completed_in_window
                    .fetch_add(r.events, Ordering::Relaxed);
            }
            if r.measured {
                lock(&phase.dataflow)
                    .saturating_record(completed_us.saturating_sub(r.pushed_us).max(1));
            }
        }
        let batch = Batch {
            epoch,
            exports,
            completed_us,
            measured,
        };
        if batches.send(batch).is_err() {
            break; // the submitter stopped; its error is in `shared.failure`
        }
        stream.ack(epoch);
    }
}

/// The submitter: hands every export to the egress, in epoch order.
fn submit(
    batches: Channel<Batch>,
    egress: &Egress,
    plan: &Plan,
    shared: &Shared,
) -> anyhow::Result<()> {
    let ids: Vec<String> = plan.destinations.iter().map(|d| d.id.clone()).collect();
    let mut waits = Vec::new();
    for batch in batches {
        waits.clear();
        for e in batch.exports {
            let destination = ids
                .get(e.destination as usize)
                .cloned()
                .ok_or_else(|| anyhow!("export for unknown destination index {}", e.destination))?;
            let export = Export {
                destination,
                profile: e.profile,
                epoch: batch.epoch,
                idempotency_key: e.idempotency_key,
                payload: Bytes::from(e.payload),
            };
            if let Err(export) = egress.try_submit(export)? {
                egress.submit_blocking(export)?;
            }
            if batch.measured {
                waits.push(shared.now_us().saturating_sub(batch.completed_us).max(1));
            }
        }
        if !waits.is_empty()
            && let Some(phase) = shared.phase()
        {
            let mut queue = lock(&phase.queue);
            for &w in &waits {
                queue.saturating_record(w);
            }
        }
        shared.handled.fetch_add(1, Ordering::Release);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The command
// ---------------------------------------------------------------------------------------------

fn validate(args: &BenchArgs) -> anyhow::Result<()> {
    if args.profiles == 0 {
        bail!("--profiles must be at least 1");
    }
    if !(0.0..=1.0).contains(&args.relevant) {
        bail!("--relevant must be between 0 and 1");
    }
    if args.rate.is_empty() && !args.max {
        bail!("give at least one --rate, or --max");
    }
    for &r in &args.rate {
        if !(r.is_finite() && r > 0.0 && r <= 10_000_000.0) {
            bail!("--rate {r}: must be a positive number of events per second (≤ 10M)");
        }
    }
    for (name, v) in [
        ("--duration", args.duration),
        ("--max-duration", args.max_duration),
        ("--batch-ms", args.batch_ms),
        ("--p99-ms", args.p99_ms),
        ("--max-start", args.max_start),
        ("--max-lag", args.max_lag),
    ] {
        if !(v.is_finite() && v > 0.0) {
            bail!("{name} must be a positive number");
        }
    }
    for (name, v) in [("--warmup", args.warmup), ("--max-warmup", args.max_warmup)] {
        if !(v.is_finite() && v >= 0.0) {
            bail!("{name} must be zero or more");
        }
    }
    if args.workers == 0 || args.workers > 256 {
        bail!("--workers must be between 1 and 256");
    }
    Ok(())
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.0, 1e6))
}

/// Runs `streamdest bench`: prints the table, writes `--json`.
pub fn run(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    if let Some(seconds) = args.serve_only {
        serve_only(seconds)?;
        return Ok(BenchReport::default());
    }
    validate(args)?;
    let loadavg_start = loadavg();
    let synth = Synth {
        profiles: args.profiles,
        audiences: args.audiences,
        relevant: args.relevant,
        seed: args.seed,
    };
    let mut engine = Engine::start(EngineOptions {
        synth,
        workers: args.workers,
        batch: Duration::from_secs_f64(args.batch_ms / 1000.0),
        window: args.window,
        max_in_flight: args.max_in_flight,
        load_batch: args.load_batch,
        keep_sample: false,
    })?;
    eprintln!(
        "bench: loading {} profiles ({} events, epochs of {})",
        args.profiles,
        args.profiles * 2,
        args.load_batch
    );
    let load = engine.load(|done, total, elapsed| {
        eprintln!(
            "bench: load {done}/{total} events, {:.1} s, {:.0} events/s, RSS {:.0} MiB",
            elapsed.as_secs_f64(),
            done as f64 / elapsed.as_secs_f64().max(1e-9),
            proc_status_mib("VmRSS:")
        );
    })?;

    let mut runs = Vec::new();
    for &rate in &args.rate {
        let spec = PhaseSpec {
            rate,
            warmup: secs(args.warmup),
            duration: secs(args.duration),
            abort_lag: Some(secs(args.max_lag)),
            p99_bound_ms: args.p99_ms,
        };
        eprintln!(
            "bench: {rate:.0} events/s for {} s (+{} s warm-up)",
            args.duration, args.warmup
        );
        let report = engine.run_phase(&spec, |_| {})?;
        eprintln!("bench:   {}", one_line(&report));
        runs.push(report);
    }
    let max = if args.max {
        Some(search_max(&mut engine, args)?)
    } else {
        None
    };

    let egress = engine.egress_totals();
    let receiver_requests = engine.receiver_requests();
    engine.finish()?;
    let (user, sys) = cpu_times();
    let report = BenchReport {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        machine: Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            loadavg_start,
            loadavg_end: loadavg(),
        },
        params: Params {
            profiles: args.profiles,
            audiences: args.audiences,
            relevant: args.relevant,
            workers: args.workers,
            batch_ms: args.batch_ms,
            max_in_flight: args.max_in_flight,
            window: args.window,
            load_batch: args.load_batch,
            seed: args.seed,
        },
        load,
        runs,
        max,
        egress,
        receiver_requests,
        resources: Resources {
            cpu_user_s: round2(user),
            cpu_sys_s: round2(sys),
            peak_rss_mib: round2(peak_rss_mib()),
        },
    };
    print_table(&report, &mut std::io::stdout().lock())?;
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

fn search_max(engine: &mut Engine, args: &BenchArgs) -> anyhow::Result<MaxReport> {
    let bound = args.p99_ms;
    let abort_lag = Duration::from_secs_f64((4.0 * bound / 1000.0).max(1.0));
    let mut trials: Vec<PhaseReport> = Vec::new();
    let mut trial = |engine: &mut Engine, rate: f64| -> anyhow::Result<bool> {
        eprintln!("bench: --max trial at {rate:.0} events/s");
        let report = engine.run_phase(
            &PhaseSpec {
                rate,
                warmup: secs(args.max_warmup),
                duration: secs(args.max_duration),
                abort_lag: Some(abort_lag),
                p99_bound_ms: bound,
            },
            |_| {},
        )?;
        eprintln!("bench:   {}", one_line(&report));
        let passed = report.passed;
        trials.push(report);
        Ok(passed)
    };
    let mut lo = 0.0f64;
    let mut hi: Option<f64> = None;
    let mut rate = args.max_start;
    for _ in 0..8 {
        if trial(engine, rate)? {
            lo = rate;
            rate *= 2.0;
        } else {
            hi = Some(rate);
            break;
        }
    }
    if let Some(mut hi) = hi {
        for _ in 0..5 {
            if hi - lo <= (0.05 * hi).max(250.0) {
                break;
            }
            let mid = ((lo + hi) / 2.0 / 100.0).round() * 100.0;
            if trial(engine, mid)? {
                lo = mid;
            } else {
                hi = mid;
            }
        }
    }
    let best = trials
        .iter()
        .filter(|t| t.passed && t.rate_offered == lo)
        .map(|t| t.achieved_exports_per_s)
        .next()
        .unwrap_or(0.0);
    Ok(MaxReport {
        p99_bound_ms: bound,
        best_rate: lo,
        best_exports_per_s: best,
        trials,
    })
}

fn one_line(r: &PhaseReport) -> String {
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
pub fn print_table(r: &BenchReport, out: &mut impl Write) -> std::io::Result<()> {
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

/// `--serve-only SECS`: the receiver alone, for `wrk`.
fn serve_only(seconds: f64) -> anyhow::Result<()> {
    if !(seconds.is_finite() && seconds > 0.0) {
        bail!("--serve-only needs a positive number of seconds");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let receiver = runtime
        .block_on(Receiver::start(ReceiverOptions::default()))
        .context("starting the receiver")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "receiver listening on {}", receiver.url("/ingest"))?;
    out.flush()?;
    let start = Instant::now();
    std::thread::sleep(secs(seconds));
    let requests = receiver.requests();
    writeln!(
        out,
        "receiver: {requests} requests in {:.1} s",
        start.elapsed().as_secs_f64()
    )?;
    let _enter = runtime.enter();
    receiver.shutdown();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_from_key() {
        assert_eq!(seq_of_key("00ab12cd34ef5678-1f"), Some(31));
        assert_eq!(seq_of_key("nohyphen"), None);
        assert_eq!(seq_of_key("abc-xyz"), None);
    }

    #[test]
    fn schedule_is_open_loop() {
        let phase = PhaseState {
            t0_us: 1_000_000,
            rate: 1000.0,
            base: 100,
            warmup: 10,
            total: 50,
            window_start_us: 1_010_000,
            window_end_us: AtomicU64::new(1_050_000),
            latency: Mutex::new(new_histogram()),
            dataflow: Mutex::new(new_histogram()),
            queue: Mutex::new(new_histogram()),
            receipts: AtomicU64::new(0),
            receipts_measured: AtomicU64::new(0),
            receipts_warmup: AtomicU64::new(0),
            receipts_unmatched: AtomicU64::new(0),
            receipts_in_window: AtomicU64::new(0),
            events_completed_in_window: AtomicU64::new(0),
        };
        assert_eq!(phase.due(999_999), 0);
        assert_eq!(phase.due(1_000_000), 1);
        assert_eq!(phase.due(1_004_999), 5);
        assert_eq!(phase.due(9_000_000), 50);
        assert_eq!(phase.scheduled_us(20), 1_020_000);
        // Event 120 - 100 = 20 scheduled at 1.020 s, received at 1.032 s: 12 ms.
        phase.on_receipt(Some("k-78"), 1_032_000);
        phase.on_receipt(Some("k-66"), 1_032_000); // index 2: warm-up
        phase.on_receipt(Some("k-1"), 1_032_000); // before the phase
        phase.on_receipt(None, 1_032_000);
        let latency = lock(&phase.latency);
        assert_eq!(latency.len(), 1);
        let max = latency.max();
        assert!((11_990..=12_010).contains(&max), "{max}");
        assert_eq!(phase.receipts_warmup.load(Ordering::Relaxed), 1);
        assert_eq!(phase.receipts_unmatched.load(Ordering::Relaxed), 2);
        assert_eq!(phase.receipts_in_window.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn percentiles_are_ordered() {
        let mut h = new_histogram();
        for v in 1..=10_000u64 {
            h.record(v * 3).unwrap();
        }
        let p = Percentiles::of(&h);
        assert!(p.p50 <= p.p95 && p.p95 <= p.p99 && p.p99 <= p.p999 && p.p999 <= p.max);
        assert_eq!(p.count, 10_000);
    }
}
