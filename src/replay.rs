//! `streamdest replay`: pushes a history of events through the dataflow, `--batch` events an
//! epoch, and hands every completed epoch's exports on: to standard output as JSON lines
//! (`--dry-run`) or to the egress.
//!
//! A malformed line stops the feed: the events before it (its epoch's too) are processed and
//! their exports handed on, then the error names the file and line.
//!
//! An [`Interrupt`] (the first `SIGINT` or `SIGTERM`, once [`Interrupt::install`]ed) stops the
//! feed the same way: the lines already taken are processed and handed on, nothing more is
//! read, and [`FeedSummary::interrupted`] says where it stopped. The input is read on a thread
//! of its own, so a feed waiting on a quiet pipe notices the interrupt at once.

use std::cell::Cell;
use std::io::{BufRead, Read, Write};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

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

    /// `stdin`, or the file's path.
    pub fn name(&self) -> String {
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
    /// When it is triggered, the replay stops reading (see [`Interrupt`]).
    pub interrupt: Interrupt,
}

/// The signal that interrupted a replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Interrupt,
    Terminate,
}

impl Signal {
    /// `SIGINT` or `SIGTERM`.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Interrupt => "SIGINT",
            Signal::Terminate => "SIGTERM",
        }
    }

    /// The exit status of a process this signal stopped, as shells report it: 128 + the
    /// signal's number (130 for `SIGINT`, 143 for `SIGTERM`).
    pub fn exit_status(self) -> u8 {
        match self {
            Signal::Interrupt => 130,
            Signal::Terminate => 143,
        }
    }

    fn code(self) -> u8 {
        match self {
            Signal::Interrupt => 1,
            Signal::Terminate => 2,
        }
    }

    fn from_code(code: u8) -> Option<Signal> {
        match code {
            1 => Some(Signal::Interrupt),
            2 => Some(Signal::Terminate),
            _ => None,
        }
    }
}

/// A request to stop reading, shared between whoever asks (a signal handler) and the feed,
/// which checks it before each line. Cheap to clone; the default is never triggered.
#[derive(Clone, Debug, Default)]
pub struct Interrupt {
    /// 0: not triggered; else [`Signal::code`] of the first signal.
    state: Arc<AtomicU8>,
}

impl Interrupt {
    pub fn new() -> Interrupt {
        Interrupt::default()
    }

    /// Asks the replay to stop reading; only the first call counts. Returns whether it was
    /// the first.
    pub fn trigger(&self, signal: Signal) -> bool {
        self.state
            .compare_exchange(0, signal.code(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The signal that triggered it, if any.
    pub fn requested(&self) -> Option<Signal> {
        Signal::from_code(self.state.load(Ordering::Acquire))
    }

    /// Catches `SIGINT` and `SIGTERM` on `runtime` (which must have its signal driver
    /// enabled, and must live until the process exits): the first triggers this interrupt and
    /// says so on stderr; a second exits the process at once, with status 128 + its number.
    /// The handlers are in place when this returns. The thread that reads the input needs no
    /// runtime: it only checks [`Interrupt::requested`].
    pub fn install(&self, runtime: &tokio::runtime::Handle) -> anyhow::Result<()> {
        let interrupt = self.clone();
        let _guard = runtime.enter();
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut int = signal(SignalKind::interrupt()).context("catching SIGINT")?;
            let mut term = signal(SignalKind::terminate()).context("catching SIGTERM")?;
            runtime.spawn(async move {
                loop {
                    let signal = tokio::select! {
                        Some(()) = int.recv() => Signal::Interrupt,
                        Some(()) = term.recv() => Signal::Terminate,
                        else => return,
                    };
                    interrupt.on_signal(signal);
                }
            });
        }
        #[cfg(not(unix))]
        {
            runtime.spawn(async move {
                while tokio::signal::ctrl_c().await.is_ok() {
                    interrupt.on_signal(Signal::Interrupt);
                }
            });
        }
        Ok(())
    }

    fn on_signal(&self, signal: Signal) {
        if self.trigger(signal) {
            eprintln!(
                "streamdest: {}: no more input is read; finishing the exports of the events \
                 already read (press Ctrl-C again to exit at once)",
                signal.name()
            );
        } else {
            eprintln!(
                "streamdest: {} again: exiting at once; exports not yet finished were neither \
                 delivered nor dead-lettered",
                signal.name()
            );
            std::process::exit(i32::from(signal.exit_status()));
        }
    }
}

/// Where an interrupted replay stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interrupted {
    pub signal: Signal,
    /// The number (1-based) of the last input line taken; 0 when none was.
    pub after_line: u64,
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
    /// The feed stopped before the end of its input because of an [`Interrupt`].
    pub interrupted: Option<Interrupted>,
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
    let (input, finished) = read_lines(&options.source, options.interrupt.clone())?;
    let interrupt = options.interrupt.clone();
    // Set when the interrupt cut the input short: the last line taken.
    let stopped: Rc<Cell<Option<u64>>> = Rc::default();
    let lines = {
        let stopped = stopped.clone();
        let mut chunk = Vec::new().into_iter();
        let mut last = 0u64;
        std::iter::from_fn(move || {
            loop {
                if interrupt.requested().is_some() {
                    // Cut short, unless every line was already taken.
                    let complete =
                        chunk.len() == 0 && finished.load(Ordering::Acquire) && input.is_empty();
                    if !complete {
                        stopped.set(Some(last));
                    }
                    return None;
                }
                if let Some(line) = chunk.next() {
                    if let Ok((number, _)) = &line {
                        last = *number;
                    }
                    return Some(line);
                }
                match input.recv_timeout(INTERRUPT_POLL) {
                    Ok(next) => chunk = next.into_iter(),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return None,
                }
            }
        })
    };
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
    let (mut summary, handler) = feed(
        plan,
        options.workers,
        options.cluster.clone(),
        options.batch,
        updates,
        handler,
        Some(Progress::new()),
    )?;
    if let (Some(after_line), Some(signal)) = (stopped.get(), options.interrupt.requested()) {
        summary.interrupted = Some(Interrupted { signal, after_line });
    }
    Ok((summary, handler))
}

/// How often a feed waiting for input checks for an interrupt.
const INTERRUPT_POLL: Duration = Duration::from_millis(20);

/// Lines handed from the reading thread to the feed at once, at most.
const CHUNK_LINES: usize = 1024;

/// A line: its 1-based number and text, or the read error as `NAME:LINE: reason`.
type Line = Result<(u64, String), String>;

/// Reads `source` on a thread of its own, in chunks of lines: a chunk is handed on when it is
/// full or when nothing more is buffered (the next read may block, as on a quiet pipe). The
/// thread stops at the end of the input (then the flag returned is set before the last chunk
/// is sent), at a read error, when the feed hangs up, or — at its next line — when `interrupt`
/// is triggered; while blocked in a read it just waits, and dies with the process.
fn read_lines(
    source: &Source,
    interrupt: Interrupt,
) -> anyhow::Result<(Receiver<Vec<Line>>, Arc<AtomicBool>)> {
    let input: Box<dyn Read + Send> = match source {
        Source::Stdin => Box::new(std::io::stdin()),
        Source::File(path) => Box::new(
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
        ),
    };
    let name = source.name();
    let (tx, rx) = crossbeam_channel::bounded::<Vec<Line>>(4);
    let finished = Arc::new(AtomicBool::new(false));
    let at_end = finished.clone();
    std::thread::Builder::new()
        .name("replay-input".into())
        .spawn(move || {
            let mut reader = std::io::BufReader::with_capacity(1 << 20, input);
            let mut chunk = Vec::with_capacity(CHUNK_LINES);
            let mut number = 0u64;
            loop {
                let mut text = String::new();
                let read = reader.read_line(&mut text);
                if interrupt.requested().is_some() {
                    return;
                }
                let end = match read {
                    Ok(0) => {
                        at_end.store(true, Ordering::Release);
                        true
                    }
                    Ok(_) => {
                        number += 1;
                        if text.ends_with('\n') {
                            text.pop();
                            if text.ends_with('\r') {
                                text.pop();
                            }
                        }
                        chunk.push(Ok((number, text)));
                        false
                    }
                    Err(e) => {
                        chunk.push(Err(format!("{name}:{}: {e}", number + 1)));
                        true
                    }
                };
                if end || chunk.len() >= CHUNK_LINES || reader.buffer().is_empty() {
                    let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK_LINES));
                    if (!full.is_empty() && tx.send(full).is_err()) || end {
                        return;
                    }
                }
            }
        })
        .context("starting the input thread")?;
    Ok((rx, finished))
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
