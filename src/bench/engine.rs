//! The engine shared by `bench` and `demo`: receiver + pipeline + egress, fed phase by phase by
//! an open-loop feeder, with the collector and submitter threads between the dataflow and the
//! egress.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use crossbeam_channel::{Receiver as Channel, Sender};
use hdrhistogram::Histogram;
use streamdest_operators::export::Encoded;
use streamdest_operators::input::{Epoch, EpochInput};
use streamdest_operators::plan::Plan;

use super::report::{Breakdown, EgressTotals, LoadReport, Percentiles, PhaseReport, round2};
use super::resources::{cpu_times, proc_status_mib, thread_cpu};
use crate::egress::{Egress, EgressOptions, Export};
use crate::events::{EpochBuilder, Update, parse_line};
use crate::pipeline::{ExportStream, Pipeline, PipelineConfig};
use crate::receiver::{Receiver, ReceiverOptions};
use crate::synth::{Synth, Updates};

/// A histogram of microseconds.
pub(super) fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 1 h at 3 significant digits; larger values saturate. Constant, valid bounds.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant histogram bounds are valid")
}

/// Locks `m`, also when a panicking thread poisoned it.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The ingest sequence number an `Idempotency-Key` ends with (`…-{seq:x}`).
fn seq_of_key(key: &str) -> Option<u64> {
    let (_, hex) = key.rsplit_once('-')?;
    u64::from_str_radix(hex, 16).ok()
}

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
    /// A phase of `total` events from sequence number `base`, the first `warmup` not measured,
    /// scheduled at `rate` events/s from `t0_us`; the measured window spans their schedule.
    fn new(t0_us: u64, rate: f64, base: u64, warmup: u64, total: u64) -> Self {
        let mut phase = PhaseState {
            t0_us,
            rate,
            base,
            warmup,
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
        phase.window_start_us = phase.scheduled_us(warmup);
        phase
            .window_end_us
            .store(phase.scheduled_us(total), Ordering::Relaxed);
        phase
    }

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
                ..Default::default()
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
        let phase = Arc::new(PhaseState::new(t0_us, spec.rate, base, warmup_n, total));
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
                order_keys: e.order_keys,
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
}
