//! `streamdest run`: the long-running service (SPEC §5–§7).
//!
//! ```text
//!  HTTP API ─► sequencer ─► write-ahead log ─► feeder ─► dataflow ─► hand-off ─► egress ─► endpoints
//!  (api)       (order,       (durable before     (epochs,   (Pipeline)  (skips what      │
//!               epochs)       the 2xx)            control)               was acked)      └─► acks.log
//! ```
//!
//! Stages, each a module: [`sequencer`] (each accepted request becomes one log record, in the
//! order changes take effect), [`control`] and [`layout`] (the configuration as data: a
//! change is a control epoch of the dataflow, with stable indices), [`record`] (the log's
//! records), [`feeder`] (log → epochs → dataflow; exports → egress), [`acks`] (the keys of
//! finished exports), [`backend`] (what the API's requests mean).
//!
//! # Durability and restart
//!
//! A request is answered once its record is `fsync`ed. At start the log is replayed from its
//! beginning through a fresh dataflow: the same records form the same epochs and so the same
//! exports with the same `Idempotency-Key`s; the ones recorded in `acks.log` (delivered or
//! dead-lettered) are skipped, the others are sent. The configuration file's objects are then
//! applied as if PUT, where they differ from what the log built.
//!
//! Restart time and disk use are bounded by the state, not the history: every so many log
//! records the service writes a [`snapshot`] (inputs, records, outbox) and deletes the log
//! behind it; a restart loads the snapshot and replays only the log after it.
//!
//! # Shutdown
//!
//! `SIGTERM` or `SIGINT`: intake stops (503), requests in flight finish, exports not yet
//! started are withdrawn (they go out after the next start), deliveries in flight get until
//! 10 s after the signal, finished keys are flushed, and the process exits 0.

pub mod acks;
pub mod backend;
pub mod control;
pub mod feeder;
pub mod layout;
pub mod record;
pub mod sequencer;
pub mod snapshot;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

use crate::api::{ApiOptions, ApiToken};
use crate::config::{Config, ObjectKind};
use crate::egress::{Egress, EgressOptions, OutcomeCallback};
use crate::pipeline::{Pipeline, PipelineConfig};
use crate::storage::DeadLetterStore;
use crate::storage::wal::{Wal, WalOptions};

use control::{Control, ControlChange};
use sequencer::{Sequencer, SequencerOptions};

/// How long deliveries in flight may take to finish, from the signal (SPEC §7: exit within
/// 10 s; the rest of the budget is for flushing and stopping the runtime).
const SHUTDOWN_WITHIN: Duration = Duration::from_secs(8);

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub config: PathBuf,
    pub workers: usize,
    pub listen: String,
    pub data_dir: PathBuf,
    pub api_token: Option<String>,
    pub max_body: u64,
    pub max_wal_bytes: Option<u64>,
    /// A snapshot every this many log records (or 256 MiB of log).
    pub snapshot_records: u64,
    /// The log's segment size (default 64 MiB).
    pub segment_bytes: Option<u64>,
}

/// Runs the service until a signal; `Ok` after a clean shutdown.
pub fn run(options: RunOptions) -> anyhow::Result<()> {
    let began = Instant::now();
    let file_config = Config::from_file(&options.config).map_err(|e| anyhow!("{e}"))?;
    file_config.unset_secrets().map_err(|e| anyhow!("{e}"))?;
    create_private_dir(&options.data_dir)
        .with_context(|| format!("creating the data directory {}", options.data_dir.display()))?;
    let segment_bytes = options
        .segment_bytes
        .unwrap_or(crate::storage::wal::DEFAULT_SEGMENT_BYTES);
    if let Some(budget) = options.max_wal_bytes
        && budget < 2 * segment_bytes
    {
        bail!(
            "--max-log-bytes {budget} is below two log segments ({} bytes): the current segment is never deleted, so intake could stop for good",
            2 * segment_bytes
        );
    }

    let mut wal_options = WalOptions::default();
    if let Some(bytes) = options.segment_bytes {
        wal_options.segment_bytes = bytes;
    }
    let (wal, recovery) = Wal::open(options.data_dir.join("wal"), wal_options)?;
    if let Some(torn) = &recovery.torn_tail {
        tracing::warn!(segment = %torn.segment.display(), offset = torn.offset, bytes = torn.bytes, "cut an incomplete last write of the log");
    }
    let wal = Arc::new(wal);
    let started = Instant::now();
    let mut snapshot = snapshot::read(&options.data_dir)?;
    let mut start = feeder::Start {
        began: Some(began),
        ..Default::default()
    };
    if let Some(s) = &snapshot {
        let layout = s.inputs.layout.clone();
        start.control = Control::from_parts(&s.inputs.config, layout)
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
    let recovered = sequencer::recover(
        &wal,
        start.position,
        start.control.clone(),
        start.last_log_epoch.map_or(0, |e| e + 1),
    )?;
    let sequencer = Arc::new(Sequencer::new(
        wal.clone(),
        recovered,
        SequencerOptions {
            max_wal_bytes: options.max_wal_bytes,
            ..Default::default()
        },
    )?);

    let store = Arc::new(DeadLetterStore::open(&options.data_dir).with_context(|| {
        format!(
            "opening the dead-letter store in {}",
            options.data_dir.display()
        )
    })?);
    let (ack_log, done) = acks::open(&options.data_dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let egress = {
        let _guard = runtime.enter();
        let acks = ack_log.clone();
        let on_outcome: OutcomeCallback =
            Arc::new(move |export, _| acks.record(&export.idempotency_key));
        Egress::new(
            Vec::new(),
            Some(store),
            EgressOptions {
                on_outcome: Some(on_outcome),
                track_unfinished: true,
                ..Default::default()
            },
        )?
    };

    // The dataflow starts on the snapshot's plan (or the empty one); the log's control
    // changes build the rest.
    let first_plan = Arc::new(start.control.clone().plan()?);
    let (mut pipeline, stream) = Pipeline::start(
        first_plan,
        PipelineConfig {
            workers: options.workers,
            ..Default::default()
        },
    )?;
    let pending = feeder::Pending::default();
    if let Some(s) = snapshot.as_mut() {
        // Epoch 0: the destinations and the outbox; the records. Epoch 1: the inputs.
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
        let (seeds, load) = feeder::load_epochs(pipeline.peers(), s);
        pipeline.push(seeds)?;
        pipeline.push(load)?;
    }
    drop(snapshot);
    // A stage that stops with an error stops the service (exit status 1): what was accepted
    // is in the log and goes out after the next start.
    let (fatal_tx, mut fatal_rx) = tokio::sync::watch::channel::<Option<String>>(None);
    let fatal = Arc::new(fatal_tx);
    let report = |stage: &'static str| {
        let fatal = fatal.clone();
        move |e: &anyhow::Error| {
            tracing::error!(error = %format!("{e:#}"), "the {stage} stopped");
            fatal.send_replace(Some(format!("the {stage} stopped: {e:#}")));
        }
    };
    let exported = Arc::new(AtomicU64::new(0));
    let hand_off = feeder::spawn_hand_off(
        feeder::HandOff {
            stream,
            egress: egress.clone(),
            pending: pending.clone(),
            done,
            exported,
            wal: wal.clone(),
            acks: ack_log.clone(),
            data_dir: options.data_dir.clone(),
        },
        report("hand-off"),
    )?;
    let feed_stats = Arc::new(feeder::FeedStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = feeder::Feeder {
        wal: wal.clone(),
        sequencer: sequencer.clone(),
        pipeline,
        pending,
        stats: feed_stats.clone(),
        stop: stop.clone(),
        start,
        snapshots: feeder::SnapshotPolicy {
            records: options.snapshot_records.max(1),
            ..Default::default()
        },
    };
    let feeder_failed = report("feeder");
    let feeder_thread = std::thread::Builder::new()
        .name("feeder".into())
        .spawn(move || {
            if let Err(e) = feeder.run() {
                feeder_failed(&e);
            }
        })
        .context("starting the feeder")?;
    sequencer.set_feeder(feeder_thread.thread().clone());

    let accepting = Arc::new(AtomicBool::new(true));
    let service = Arc::new(backend::Service {
        sequencer: sequencer.clone(),
        egress: egress.clone(),
        feed: feed_stats.clone(),
        accepting: accepting.clone(),
    });
    let api_token = match &options.api_token {
        Some(t) => Some(ApiToken::new(t.clone()).ok_or_else(|| anyhow!("--api-token is empty"))?),
        None => None,
    };

    runtime.block_on(async {
        apply_file(&sequencer, &file_config).await?;
        let listener = tokio::net::TcpListener::bind(&options.listen)
            .await
            .with_context(|| format!("listening on {}", options.listen))?;
        let address: SocketAddr = listener.local_addr()?;
        eprintln!(
            "streamdest: listening on http://{address} (data directory {}, log positions {}..{}, read in {:.1}s)",
            options.data_dir.display(),
            wal.first_position(),
            wal.next_position(),
            started.elapsed().as_secs_f64()
        );
        let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<Instant>();
        let accepting_flag = accepting.clone();
        let mut failed = fatal_rx.clone();
        let shutdown = async move {
            let at = tokio::select! {
                at = signal() => at,
                _ = failed.wait_for(Option::is_some) => Instant::now(),
            };
            accepting_flag.store(false, Ordering::Release);
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
        let signalled = signalled_rx.await.unwrap_or_else(|_| Instant::now());
        eprintln!("streamdest: stopping");
        stop.store(true, Ordering::Release);
        feeder_thread.thread().unpark();
        egress.close();
        let withdrawn = egress.cancel_queued();
        let left = SHUTDOWN_WITHIN.saturating_sub(signalled.elapsed());
        let drained = tokio::time::timeout(left, egress.drain()).await.is_ok();
        ack_log.flush();
        eprintln!(
            "streamdest: stopped; {} exports not started and {} not finished go out after the next start",
            withdrawn.len(),
            if drained { 0 } else { egress.pending() }
        );
        anyhow::Ok(())
    })?;
    // Tasks still delivering are abandoned (their exports go out after the next start).
    runtime.shutdown_timeout(Duration::from_millis(500));
    drop(hand_off);
    match fatal_rx.borrow_and_update().clone() {
        Some(reason) => Err(anyhow!("{reason}")),
        None => Ok(()),
    }
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

/// Applies the configuration file's objects as if PUT, where they differ from the accepted
/// state (timestamps the file leaves out are not a difference).
async fn apply_file(sequencer: &Sequencer, file: &Config) -> anyhow::Result<()> {
    let mut changes = Vec::new();
    sequencer.with_control(|control| {
        let accepted = control.config();
        for p in &file.merge_policies {
            if accepted.merge_policy(&p.id) != Some(p) {
                changes.push((
                    ObjectKind::MergePolicy,
                    p.id.clone(),
                    serde_json::to_string(p),
                ));
            }
        }
        for a in &file.audiences {
            let mut a = a.clone();
            if let Some(old) = accepted.audience(&a.id) {
                a.created_at = a.created_at.or(old.created_at);
                a.updated_at = a.updated_at.or(old.updated_at);
            }
            if accepted.audience(&a.id) != Some(&a) {
                changes.push((
                    ObjectKind::Audience,
                    a.id.clone(),
                    serde_json::to_string(&a),
                ));
            }
        }
        for d in &file.destinations {
            let mut d = d.clone();
            if let Some(old) = accepted.destination(&d.id) {
                for m in &mut d.audiences {
                    if let Some(o) = old.audiences.iter().find(|o| o.id == m.id) {
                        m.mapping_created_at = m.mapping_created_at.or(o.mapping_created_at);
                        m.mapping_updated_at = m.mapping_updated_at.or(o.mapping_updated_at);
                    }
                }
            }
            if accepted.destination(&d.id) != Some(&d) {
                changes.push((
                    ObjectKind::Destination,
                    d.id.clone(),
                    serde_json::to_string(&d),
                ));
            }
        }
    });
    for (kind, id, object) in changes {
        let object = object.context("encoding a configuration object")?;
        sequencer
            .control(ControlChange::Put {
                kind,
                id: id.clone(),
                object,
            })
            .await
            .map_err(|e| anyhow!("{} {id:?} of the configuration file: {e}", kind.as_str()))?;
    }
    Ok(())
}
