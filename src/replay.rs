//! `streamdest replay`: pushes a history of events through the dataflow, `--batch` events an
//! epoch, and hands every completed epoch's exports on: to standard output as JSON lines
//! (`--dry-run`) or to the egress.
//!
//! A malformed line stops the feed: the events before it (its epoch's too) are processed and
//! their exports handed on, then the error names the file and line.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use streamdest_operators::export::Encoded;
use streamdest_operators::input::Epoch;
use streamdest_operators::plan::Plan;

use crate::events::{EpochBuilder, Update, parse_line};
use crate::pipeline::{Cluster, ExportStream, Pipeline, PipelineConfig};

/// Where the events come from.
#[derive(Clone, Debug)]
pub enum Source {
    Stdin,
    File(PathBuf),
}

impl Source {
    pub fn parse(arg: &str) -> Source {
        if arg == "-" {
            Source::Stdin
        } else {
            Source::File(PathBuf::from(arg))
        }
    }

    fn name(&self) -> String {
        match self {
            Source::Stdin => "stdin".into(),
            Source::File(p) => p.display().to_string(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ReplayOptions {
    pub source: Source,
    pub workers: usize,
    pub batch: usize,
    pub cluster: Option<Cluster>,
}

/// What a replay did.
#[derive(Clone, Debug, Default)]
pub struct FeedSummary {
    pub events: u64,
    pub epochs: u64,
    pub exports: u64,
    pub elapsed: Duration,
    /// The malformed line that stopped the feed, as `FILE:LINE: reason`.
    pub error: Option<String>,
}

/// Something that takes each completed epoch's exports, in epoch order.
pub trait ExportHandler: Send + 'static {
    fn epoch(&mut self, epoch: Epoch, exports: Vec<Encoded>) -> anyhow::Result<()>;
}

/// `--dry-run`: one JSON object a line on standard output.
pub struct DryRun {
    plan: Arc<Plan>,
    out: std::io::BufWriter<std::io::Stdout>,
}

impl DryRun {
    pub fn new(plan: Arc<Plan>) -> Self {
        DryRun {
            plan,
            out: std::io::BufWriter::with_capacity(1 << 16, std::io::stdout()),
        }
    }
}

/// Standard output was closed by its reader (`replay --dry-run | head`): nothing more can be
/// written, and the replay stops.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed by its reader")]
pub struct OutputClosed;

fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        OutputClosed.into()
    } else {
        anyhow::Error::new(e).context("writing to standard output")
    }
}

impl ExportHandler for DryRun {
    fn epoch(&mut self, _epoch: Epoch, exports: Vec<Encoded>) -> anyhow::Result<()> {
        for e in exports {
            let destination = &self.plan.destinations[e.destination as usize].id;
            // The payload is JSON text already: written as it is, not parsed again.
            writeln!(
                self.out,
                "{{\"destination\":{},\"profile\":{},\"payload\":{}}}",
                serde_json::Value::from(destination.as_str()),
                serde_json::Value::from(e.profile.as_str()),
                e.payload
            )
            .map_err(stdout_error)?;
        }
        self.out.flush().map_err(stdout_error)?;
        Ok(())
    }
}

/// Discards exports, counting them (benchmarks).
pub struct Discard;

impl ExportHandler for Discard {
    fn epoch(&mut self, _epoch: Epoch, _exports: Vec<Encoded>) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Runs the replay: feeds every event, lets `handler` take every epoch, returns the summary.
pub fn replay<H: ExportHandler>(
    plan: Arc<Plan>,
    options: &ReplayOptions,
    handler: H,
) -> anyhow::Result<(FeedSummary, H)> {
    let reader: Box<dyn BufRead> = match &options.source {
        Source::Stdin => Box::new(std::io::BufReader::new(std::io::stdin())),
        Source::File(path) => Box::new(std::io::BufReader::with_capacity(
            1 << 20,
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
        )),
    };
    let name = options.source.name();
    let lines = reader.lines().enumerate().map(move |(i, line)| {
        line.map_err(|e| format!("{name}:{}: {e}", i + 1))
            .map(|l| (i + 1, l))
    });
    let updates = {
        let name = options.source.name();
        let plan = plan.clone();
        let mut seq = 0u64;
        lines.filter_map(move |line| match line {
            Err(e) => Some(Err(e)),
            Ok((_, text)) if text.trim().is_empty() => None,
            Ok((number, text)) => {
                seq += 1;
                let now = chrono::Utc::now().timestamp_micros();
                Some(
                    parse_line(&text)
                        .and_then(|event| Update::resolve(&plan, event, seq, now))
                        .map_err(|e| format!("{name}:{number}: {e}")),
                )
            }
        })
    };
    feed(
        plan,
        options.workers,
        options.cluster.clone(),
        options.batch,
        updates,
        handler,
        Some(Progress::new()),
    )
}

/// The live progress of a replay on stderr: one line rewritten in place on a terminal (twice a
/// second), one line every few seconds when stderr is a file or a pipe.
pub struct Progress {
    started: Instant,
    last: Instant,
    every: Duration,
    terminal: bool,
    shown: bool,
}

impl Progress {
    pub fn new() -> Progress {
        use std::io::IsTerminal as _;
        let terminal = std::io::stderr().is_terminal();
        let now = Instant::now();
        Progress {
            started: now,
            last: now,
            every: if terminal {
                Duration::from_millis(500)
            } else {
                Duration::from_secs(5)
            },
            terminal,
            shown: false,
        }
    }

    /// Shows the counts if it is time to.
    fn tick(&mut self, events: u64, epochs: u64, exports: u64) {
        let now = Instant::now();
        if now.duration_since(self.last) < self.every {
            return;
        }
        self.last = now;
        let secs = now.duration_since(self.started).as_secs_f64();
        let line = format!(
            "replay: {events} events, {epochs} epochs, {exports} exports, {:.0} events/s, {secs:.0} s",
            events as f64 / secs.max(1e-9)
        );
        if self.terminal {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
        self.shown = true;
    }

    /// Ends the in-place line, so that what follows starts on its own.
    fn finish(&self) {
        if self.terminal && self.shown {
            eprintln!();
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

/// Feeds `updates` through a fresh pipeline, `batch` to an epoch.
pub fn feed<H: ExportHandler>(
    plan: Arc<Plan>,
    workers: usize,
    cluster: Option<Cluster>,
    batch: usize,
    updates: impl Iterator<Item = Result<Update, String>>,
    handler: H,
    mut progress: Option<Progress>,
) -> anyhow::Result<(FeedSummary, H)> {
    let mut handler = handler;
    let started = Instant::now();
    let config = PipelineConfig {
        workers,
        cluster,
        ..Default::default()
    };
    let (mut pipeline, stream) = Pipeline::start(plan, config)?;
    let exported = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let exported_by_consumer = exported.clone();
    let consumer = std::thread::Builder::new()
        .name("exports".into())
        .spawn(move || -> anyhow::Result<(u64, H)> {
            let mut stream: ExportStream = stream;
            let mut count = 0;
            while let Some((epoch, exports)) = stream.next_epoch() {
                count += exports.len() as u64;
                exported_by_consumer.store(count, std::sync::atomic::Ordering::Relaxed);
                handler.epoch(epoch, exports)?;
                stream.ack(epoch);
            }
            Ok((count, handler))
        })
        .context("starting the export thread")?;

    let batch = batch.max(1);
    let mut builder = EpochBuilder::new(pipeline.peers());
    let mut summary = FeedSummary::default();
    // A push fails only when the export thread stopped; its own error says why.
    let mut failure = None;
    for update in updates {
        match update {
            Ok(update) => {
                builder.add(update);
                summary.events += 1;
                if let Some(p) = progress.as_mut() {
                    p.tick(
                        summary.events,
                        pipeline.next_epoch(),
                        exported.load(std::sync::atomic::Ordering::Relaxed),
                    );
                }
                if builder.events() >= batch
                    && let Err(e) = pipeline.push(builder.finish())
                {
                    failure = Some(e);
                    break;
                }
            }
            Err(e) => {
                summary.error = Some(e);
                break;
            }
        }
    }
    if failure.is_none()
        && builder.events() > 0
        && let Err(e) = pipeline.push(builder.finish())
    {
        failure = Some(e);
    }
    summary.epochs = pipeline.next_epoch();
    if let Some(p) = &progress {
        p.finish();
    }
    let finished = pipeline.finish();
    let (exports, handler) = consumer
        .join()
        .map_err(|_| anyhow!("the export thread panicked"))??;
    finished?;
    if let Some(e) = failure {
        return Err(e);
    }
    summary.exports = exports;
    summary.elapsed = started.elapsed();
    Ok((summary, handler))
}

/// Delivery: each export goes to the egress, in epoch order (the egress keeps per-profile order).
pub struct Deliver {
    plan: Arc<Plan>,
    egress: crate::egress::Egress,
}

impl Deliver {
    pub fn new(plan: Arc<Plan>, egress: crate::egress::Egress) -> Self {
        Deliver { plan, egress }
    }
}

impl ExportHandler for Deliver {
    fn epoch(&mut self, epoch: Epoch, exports: Vec<Encoded>) -> anyhow::Result<()> {
        for e in exports {
            let export = crate::egress::Export {
                destination: self.plan.destinations[e.destination as usize].id.clone(),
                profile: e.profile,
                order_keys: e.order_keys,
                epoch,
                idempotency_key: e.idempotency_key,
                payload: bytes::Bytes::from(e.payload),
            };
            // Blocks while the egress intake is full: backpressure to the dataflow.
            self.egress.submit_blocking(export)?;
        }
        Ok(())
    }
}
