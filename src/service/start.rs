//! The stages of `run`'s start and stop, in the order [`super::run`] calls them: check the
//! options, open the log, restore the snapshot, rebuild the accepted configuration, start the
//! egress and the dataflow (seeding it from the snapshot), serve until a signal or a failure,
//! and drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

use crate::api::{ApiOptions, ApiToken};
use crate::config::Config;
use crate::egress::{Egress, EgressOptions, OutcomeCallback};
use crate::pipeline::{ExportStream, Pipeline, PipelineConfig};
use crate::storage::DeadLetterStore;
use crate::storage::wal::{DEFAULT_SEGMENT_BYTES, Wal, WalOptions};

use super::acks::{self, AckLog};
use super::backend::Service;
use super::control::Control;
use super::feeder::{self, Feeder, Start};
use super::sequencer::{self, Sequencer, SequencerOptions};
use super::snapshot::{self, Snapshot};
use super::{RunOptions, feeder::Pending};

/// How long deliveries in flight may take to finish, from the signal (SPEC §7: exit within
/// 10 s; the rest of the budget is for flushing and stopping the runtime).
const SHUTDOWN_WITHIN: Duration = Duration::from_secs(8);

/// Reads and checks the configuration file (its `{"env": …}` secrets must be set) and the
/// options; creates the data directory.
pub fn check(options: &RunOptions) -> anyhow::Result<Config> {
    let file_config = Config::from_file(&options.config).map_err(|e| anyhow!("{e}"))?;
    file_config.unset_secrets().map_err(|e| anyhow!("{e}"))?;
    let segment_bytes = options.segment_bytes.unwrap_or(DEFAULT_SEGMENT_BYTES);
    if let Some(budget) = options.max_wal_bytes
        && budget < 2 * segment_bytes
    {
        bail!(
            "--max-log-bytes {budget} is below two log segments ({} bytes): the current segment is never deleted, so intake could stop for good",
            2 * segment_bytes
        );
    }
    create_private_dir(&options.data_dir)
        .with_context(|| format!("creating the data directory {}", options.data_dir.display()))?;
    Ok(file_config)
}

/// Opens the write-ahead log (cutting a torn tail; a corrupt record stops the start).
pub fn open_log(options: &RunOptions) -> anyhow::Result<Arc<Wal>> {
    let mut wal_options = WalOptions::default();
    if let Some(bytes) = options.segment_bytes {
        wal_options.segment_bytes = bytes;
    }
    let (wal, recovery) = Wal::open(options.data_dir.join("wal"), wal_options)?;
    if let Some(torn) = &recovery.torn_tail {
        tracing::warn!(segment = %torn.segment.display(), offset = torn.offset, bytes = torn.bytes, "cut an incomplete last write of the log");
    }
    Ok(Arc::new(wal))
}

/// Reads the snapshot, if any: where the feeder starts (configuration, inputs, position).
pub fn restore(
    options: &RunOptions,
    wal: &Wal,
    began: Instant,
) -> anyhow::Result<(Start, Option<Snapshot>)> {
    let snapshot = snapshot::read(&options.data_dir)?;
    let mut start = Start {
        began: Some(began),
        ..Default::default()
    };
    if let Some(s) = &snapshot {
        start.control = Control::from_parts(&s.inputs.config, s.inputs.layout.clone())
            .context("the snapshot's configuration")?;
        start.position = s.inputs.position;
        start.last_log_epoch = s.inputs.next_log_epoch.checked_sub(1);
        start.fragments = s
            .inputs
            .fragments
            .iter()
            .map(|f| (f.key(), f.clone()))
            .collect();
        start.uploads = s.inputs.uploads.iter().copied().collect();
        if wal.first_position() > start.position {
            bail!(
                "the log starts at position {} but the snapshot ends at {}: records are missing",
                wal.first_position(),
                start.position
            );
        }
    }
    Ok((start, snapshot))
}

/// The sequencer, on the configuration the snapshot and the log after it accepted.
pub fn sequencer(
    options: &RunOptions,
    wal: &Arc<Wal>,
    start: &Start,
) -> anyhow::Result<Arc<Sequencer>> {
    let recovered = sequencer::recover(
        wal,
        start.position,
        start.control.clone(),
        start.last_log_epoch.map_or(0, |e| e + 1),
    )?;
    Ok(Arc::new(Sequencer::new(
        wal.clone(),
        recovered,
        SequencerOptions {
            max_wal_bytes: options.max_wal_bytes,
            ..Default::default()
        },
    )?))
}

/// The egress with the dead-letter store, recording every finished export's key; and the keys
/// recorded before this start.
pub fn egress(
    runtime: &tokio::runtime::Runtime,
    options: &RunOptions,
) -> anyhow::Result<(Egress, AckLog, std::collections::HashSet<String>)> {
    let store = Arc::new(DeadLetterStore::open(&options.data_dir).with_context(|| {
        format!(
            "opening the dead-letter store in {}",
            options.data_dir.display()
        )
    })?);
    let (ack_log, done) = acks::open(&options.data_dir)?;
    let _guard = runtime.enter();
    let acks = ack_log.clone();
    let on_outcome: OutcomeCallback =
        Arc::new(move |export, _| acks.record(&export.idempotency_key));
    let egress = Egress::new(
        Vec::new(),
        Some(store),
        EgressOptions {
            on_outcome: Some(on_outcome),
            track_unfinished: true,
            ..Default::default()
        },
    )?;
    Ok((egress, ack_log, done))
}

/// The dataflow, on the snapshot's plan (or the empty one; the log's control changes build
/// the rest). From a snapshot: epoch 0 seeds the records (and, for the hand-off, sets up the
/// destinations and re-sends the outbox), epoch 1 loads the inputs.
pub fn dataflow(
    options: &RunOptions,
    start: &Start,
    snapshot: Option<Snapshot>,
    pending: &Pending,
) -> anyhow::Result<(Pipeline, ExportStream)> {
    let first_plan = Arc::new(start.control.clone().plan()?);
    let (mut pipeline, stream) = Pipeline::start(
        first_plan,
        PipelineConfig {
            workers: options.workers,
            ..Default::default()
        },
    )?;
    if let Some(mut s) = snapshot {
        let actions = start
            .control
            .config()
            .destinations
            .iter()
            .map(|d| feeder::DestinationAction::Upsert(Box::new(d.clone())))
            .collect();
        let outbox = std::mem::take(&mut s.outbox)
            .into_iter()
            .map(Into::into)
            .collect();
        pending.lock().unwrap_or_else(|p| p.into_inner()).insert(
            0,
            feeder::EgressChange {
                ids: start.control.destination_ids(),
                actions,
                outbox,
                snapshot: None,
            },
        );
        let (seeds, load) = feeder::load_epochs(pipeline.peers(), &mut s);
        drop(s);
        pipeline.push(seeds)?;
        pipeline.push(load)?;
    }
    Ok((pipeline, stream))
}

/// Starts the feeder thread; `failed` hears of the error it stops with, if any.
pub fn spawn_feeder(
    feeder: Feeder,
    failed: impl FnOnce(&anyhow::Error) + Send + 'static,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("feeder".into())
        .spawn(move || {
            if let Err(e) = feeder.run() {
                failed(&e);
            }
        })
        .context("starting the feeder")
}

/// The first failure of a stage; it stops the service.
#[derive(Clone)]
pub struct Fatal {
    tx: Arc<tokio::sync::watch::Sender<Option<String>>>,
}

impl Default for Fatal {
    fn default() -> Self {
        Fatal {
            tx: Arc::new(tokio::sync::watch::channel(None).0),
        }
    }
}

impl Fatal {
    /// What a stage calls with the error it stops with.
    pub fn report(&self, stage: &'static str) -> impl FnOnce(&anyhow::Error) + Send + 'static {
        let tx = self.tx.clone();
        move |e: &anyhow::Error| {
            tracing::error!(error = %format!("{e:#}"), "the {stage} stopped");
            tx.send_replace(Some(format!("the {stage} stopped: {e:#}")));
        }
    }

    async fn happened(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(Option::is_some).await;
    }

    /// `Err` with the failure, if a stage failed.
    pub fn result(&self) -> anyhow::Result<()> {
        match self.tx.borrow().clone() {
            Some(reason) => Err(anyhow!("{reason}")),
            None => Ok(()),
        }
    }
}

/// Serves the API until SIGTERM/SIGINT or a stage's failure; then intake answers 503 and the
/// requests in flight finish. Returns when the signal (or failure) came.
pub async fn serve(
    options: &RunOptions,
    wal: &Wal,
    service: Arc<Service>,
    fatal: &Fatal,
    began: Instant,
) -> anyhow::Result<Instant> {
    let listener = tokio::net::TcpListener::bind(&options.listen)
        .await
        .with_context(|| format!("listening on {}", options.listen))?;
    let address: SocketAddr = listener.local_addr()?;
    eprintln!(
        "streamdest: listening on http://{address} (data directory {}, log positions {}..{}, read in {:.1}s)",
        options.data_dir.display(),
        wal.first_position(),
        wal.next_position(),
        began.elapsed().as_secs_f64()
    );
    let api_token = match &options.api_token {
        Some(t) => Some(ApiToken::new(t.clone()).ok_or_else(|| anyhow!("--api-token is empty"))?),
        None => None,
    };
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<Instant>();
    let accepting = service.accepting.clone();
    let fatal = fatal.clone();
    let shutdown = async move {
        let at = tokio::select! {
            at = signal() => at,
            () = fatal.happened() => Instant::now(),
        };
        accepting.store(false, std::sync::atomic::Ordering::Release);
        let _ = signalled_tx.send(at);
    };
    crate::api::serve(
        listener,
        service,
        ApiOptions {
            max_body: options.max_body,
            api_token,
            ..Default::default()
        },
        shutdown,
    )
    .await
    .context("serving the API")?;
    Ok(signalled_rx.await.unwrap_or_else(|_| Instant::now()))
}

/// The stop: exports not yet started are withdrawn (they go out after the next start),
/// deliveries in flight get until [`SHUTDOWN_WITHIN`] after the signal, and the finished
/// exports' keys are flushed.
pub async fn drain(egress: &Egress, acks: &AckLog, signalled: Instant) {
    egress.close();
    let withdrawn = egress.cancel_queued();
    let left = SHUTDOWN_WITHIN.saturating_sub(signalled.elapsed());
    let drained = tokio::time::timeout(left, egress.drain()).await.is_ok();
    acks.flush();
    eprintln!(
        "streamdest: stopped; {} exports not started and {} not finished go out after the next start",
        withdrawn.len(),
        if drained { 0 } else { egress.pending() }
    );
}

/// Creates `dir` (and its parents) if missing; a new data directory is private (0700).
fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Waits for SIGTERM or SIGINT; returns when it came.
async fn signal() -> Instant {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    Instant::now()
}
