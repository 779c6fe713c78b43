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
//! finished exports), [`snapshot`] (the state, so that the log behind it can go), [`backend`]
//! (what the API's requests mean); `start` holds the steps of a start and a stop, which
//! [`run`] composes.
//!
//! # Durability and restart
//!
//! A request is answered once its record is `fsync`ed. At start the latest snapshot is loaded
//! and the log after it is replayed through a fresh dataflow: the same records form the same
//! epochs and so the same exports with the same `Idempotency-Key`s; the ones recorded in
//! `acks.log` (delivered or dead-lettered) are skipped, the others are sent. The configuration file's objects are then
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
//! 8 s after the signal, finished keys are flushed, and the process exits 0 (within 10 s).

pub mod acks;
pub mod backend;
pub mod control;
pub mod feeder;
pub mod layout;
pub mod record;
pub mod sequencer;
pub mod snapshot;
mod start;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};

use crate::config::{Config, ObjectKind};

use control::ControlChange;
use sequencer::Sequencer;

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
    let file_config = start::check(&options)?;
    let wal = start::open_log(&options)?;
    let (start, snapshot) = start::restore(&options, &wal, began)?;
    let sequencer = start::sequencer(&options, &wal, &start)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (egress, acks, done) = start::egress(&runtime, &options)?;
    let pending = feeder::Pending::default();
    let (pipeline, stream) = start::dataflow(&options, &start, snapshot, &pending)?;

    // A stage that stops with an error stops the service (exit status 1): what was accepted
    // is in the log and goes out after the next start.
    let fatal = start::Fatal::default();
    let feed_stats = Arc::new(feeder::FeedStats::default());
    let hand_off = feeder::spawn_hand_off(
        feeder::HandOff {
            stream,
            egress: egress.clone(),
            pending: pending.clone(),
            done,
            exported: Arc::new(AtomicU64::new(0)),
            wal: wal.clone(),
            acks: acks.clone(),
            data_dir: options.data_dir.clone(),
            stats: feed_stats.clone(),
        },
        fatal.report("hand-off"),
    )?;
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
    let feeder_thread = start::spawn_feeder(feeder, fatal.report("feeder"))?;
    sequencer.set_feeder(feeder_thread.thread().clone());

    let service = Arc::new(backend::Service {
        sequencer: sequencer.clone(),
        egress: egress.clone(),
        feed: feed_stats,
        accepting: Arc::new(AtomicBool::new(true)),
    });
    runtime.block_on(async {
        apply_file(&sequencer, &file_config).await?;
        let signalled = start::serve(&options, &wal, service, &fatal, began).await?;
        eprintln!("streamdest: stopping");
        stop.store(true, Ordering::Release);
        feeder_thread.thread().unpark();
        start::drain(&egress, &acks, signalled).await;
        anyhow::Ok(())
    })?;
    // Tasks still delivering are abandoned (their exports go out after the next start).
    runtime.shutdown_timeout(Duration::from_millis(500));
    drop(hand_off);
    fatal.result()
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
