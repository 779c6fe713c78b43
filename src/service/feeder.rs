//! The feeder and the hand-off: the write-ahead log, read in order, becomes the dataflow's
//! epochs; the dataflow's exports go to the egress.
//!
//! ```text
//!  log (durable records) ─► feeder ─► Pipeline ─► ExportStream ─► hand-off ─► Egress
//!                            │ control: plan, destination changes ──────┘ (at their epoch)
//! ```
//!
//! The feeder reads only what is durable, so the backlog of a slow endpoint stays on disk: when
//! the egress is full the hand-off blocks, the pipeline's window fills, the feeder stops
//! reading, and the log grows instead of memory. After a restart the feeder reads the log from
//! its start; the hand-off drops the exports whose key is in the acknowledgement log
//! ([`super::acks`]) and sends the others again, with the same key.
//!
//! A control change is applied to the dataflow at its own epoch ([`Pipeline::push_control`]);
//! the destination it changes is changed in the egress when the hand-off reaches that epoch,
//! so exports of earlier epochs still go out under the settings they were made with, and a
//! backfill finds its destination ready.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use streamdest_operators::input::Epoch;
use streamdest_operators::plan::Plan;

use crate::config::{Destination, ObjectKind};
use crate::egress::{Egress, Export};
use crate::events::{EpochBuilder, Update, parse_line};
use crate::pipeline::{ExportStream, Pipeline};
use crate::storage::wal::Wal;

use super::control::{Control, ControlChange};
use super::record::{Body, Entry, control_seq, event_seq};
use super::sequencer::Sequencer;

/// An epoch is closed once it has been open this long.
pub const EPOCH_TIME: Duration = Duration::from_millis(5);

/// What the hand-off must do to the egress before an epoch's exports.
#[derive(Debug)]
pub struct EgressChange {
    /// Destination ids by index, from this epoch on.
    pub ids: Vec<String>,
    pub action: Option<DestinationAction>,
}

#[derive(Debug)]
pub enum DestinationAction {
    Upsert(Box<Destination>),
    Remove(String),
}

/// Control changes waiting for the hand-off, by epoch.
pub type Pending = Arc<Mutex<BTreeMap<Epoch, EgressChange>>>;

/// Counters the metrics show.
#[derive(Debug, Default)]
pub struct FeedStats {
    /// The log position the feeder has read up to.
    pub position: AtomicU64,
    pub epochs: AtomicU64,
    pub events: AtomicU64,
    /// Events the feeder could not apply (an upload to an audience deleted meanwhile).
    pub skipped: AtomicU64,
}

/// The feeder's state.
pub struct Feeder {
    pub wal: Arc<Wal>,
    pub sequencer: Arc<Sequencer>,
    pub pipeline: Pipeline,
    pub pending: Pending,
    pub stats: Arc<FeedStats>,
    pub stop: Arc<AtomicBool>,
}

struct Open {
    epoch: u64,
    seen: Instant,
    /// The sequencer closed it: flush once the log has been read up to here.
    close_at: Option<u64>,
}

impl Feeder {
    /// Runs until `stop` is set or the pipeline stops.
    pub fn run(mut self) -> anyhow::Result<()> {
        let mut control = Control::default();
        let mut plan: Arc<Plan> = Arc::new(control.plan()?);
        let mut builder = EpochBuilder::new(self.pipeline.peers());
        let mut position = self.wal.first_position();
        let mut open: Option<Open> = None;
        while !self.stop.load(Ordering::Acquire) {
            let durable = self.wal.next_position();
            if position < durable {
                let reader = self.wal.read_from(position)?;
                for record in reader.take((durable - position) as usize) {
                    let (at, bytes) = record?;
                    let entry = Entry::decode(at, &bytes)?;
                    if open.as_ref().is_some_and(|o| o.epoch != entry.epoch) {
                        self.flush(&mut builder)?;
                        open = None;
                    }
                    match entry.body {
                        Body::Events(events) => {
                            open.get_or_insert_with(|| Open {
                                epoch: entry.epoch,
                                seen: Instant::now(),
                                close_at: None,
                            });
                            self.add_events(&plan, &mut builder, at, entry.at, &events);
                        }
                        Body::Control(change) => {
                            plan = self.apply(&mut control, &change, entry.at, at)?;
                        }
                    }
                    position = at + 1;
                    self.stats.position.store(position, Ordering::Relaxed);
                    if self.stop.load(Ordering::Acquire) {
                        return Ok(());
                    }
                }
            }
            if let Some(o) = open.as_mut() {
                if o.close_at.is_none() && o.seen.elapsed() >= EPOCH_TIME {
                    o.close_at = self.sequencer.close(o.epoch);
                }
                if o.close_at.is_some_and(|end| position >= end) {
                    self.flush(&mut builder)?;
                    open = None;
                }
            }
            let wait = match &open {
                Some(o) => EPOCH_TIME
                    .saturating_sub(o.seen.elapsed())
                    .max(Duration::from_micros(200)),
                None => Duration::from_millis(50),
            };
            if self.wal.next_position() == position {
                std::thread::park_timeout(wait);
            }
        }
        Ok(())
    }

    fn add_events(
        &self,
        plan: &Plan,
        builder: &mut EpochBuilder,
        position: u64,
        at: i64,
        events: &[String],
    ) {
        for (index, text) in events.iter().enumerate() {
            let seq = event_seq(position, index);
            match parse_line(text).and_then(|e| Update::resolve(plan, e, seq, at)) {
                Ok(update) => builder.add(update),
                Err(e) => {
                    // Validated when accepted; an upload to an audience deleted since is
                    // all that can fail here.
                    self.stats.skipped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(position, index, error = %e, "event skipped");
                }
            }
        }
        self.stats
            .events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
    }

    fn flush(&mut self, builder: &mut EpochBuilder) -> anyhow::Result<()> {
        if builder.events() > 0 {
            self.pipeline.push(builder.finish())?;
            self.stats.epochs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Applies a logged control change: a control epoch for the dataflow, and the destination
    /// change queued for the hand-off.
    fn apply(
        &mut self,
        control: &mut Control,
        change: &ControlChange,
        at: i64,
        position: u64,
    ) -> anyhow::Result<Arc<Plan>> {
        let applied = match control.apply(change, at, control_seq(position)) {
            Ok(applied) => applied,
            Err(e) => {
                tracing::warn!(position, error = %e, "a logged control change no longer applies");
                return Ok(Arc::new(control.plan()?));
            }
        };
        let action = match change {
            ControlChange::Put {
                kind: ObjectKind::Destination,
                id,
                ..
            } => control
                .config()
                .destination(id)
                .map(|d| DestinationAction::Upsert(Box::new(d.clone()))),
            ControlChange::Delete {
                kind: ObjectKind::Destination,
                id,
            } => Some(DestinationAction::Remove(id.clone())),
            _ => None,
        };
        let epoch = self.pipeline.next_epoch();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                epoch,
                EgressChange {
                    ids: control.destination_ids(),
                    action,
                },
            );
        self.pipeline.push_control(applied.plan.clone())?;
        self.stats.epochs.fetch_add(1, Ordering::Relaxed);
        Ok(applied.plan)
    }
}

/// The hand-off: every completed epoch's exports to the egress, in epoch order, except the
/// ones finished before a restart.
pub fn hand_off(
    mut stream: ExportStream,
    egress: Egress,
    pending: Pending,
    mut done: HashSet<String>,
    exported: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let mut ids: Vec<String> = Vec::new();
    while let Some((epoch, exports)) = stream.next_epoch() {
        let change = pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&epoch);
        if let Some(change) = change {
            ids = change.ids;
            match change.action {
                Some(DestinationAction::Upsert(d)) => {
                    if let Err(e) = egress.upsert_destination(&d) {
                        tracing::error!(destination = %d.id, error = %e, "destination not usable");
                    }
                }
                Some(DestinationAction::Remove(id)) => {
                    egress.remove_destination(&id);
                }
                None => {}
            }
        }
        for e in exports {
            if !done.is_empty() && done.remove(&e.idempotency_key) {
                continue;
            }
            let Some(destination) = ids.get(e.destination as usize).cloned() else {
                continue;
            };
            let key = e.idempotency_key;
            let export = Export {
                destination,
                profile: e.profile,
                order_keys: e.order_keys,
                epoch,
                idempotency_key: key.clone(),
                payload: bytes::Bytes::from(e.payload),
            };
            exported.fetch_add(1, Ordering::Relaxed);
            match egress.submit_blocking(export) {
                Ok(()) => {}
                Err(crate::egress::EgressError::Closed) => return Ok(()),
                Err(e) => {
                    // The destination could not be set up (logged above): it is not sent now,
                    // and not recorded either, so it goes out after a restart that fixes it.
                    tracing::warn!(error = %e, key, "export not handed to the egress");
                }
            }
        }
        stream.ack(epoch);
    }
    Ok(())
}

/// Starts the hand-off thread.
pub fn spawn_hand_off(
    stream: ExportStream,
    egress: Egress,
    pending: Pending,
    done: HashSet<String>,
    exported: Arc<AtomicU64>,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
    std::thread::Builder::new()
        .name("hand-off".into())
        .spawn(move || hand_off(stream, egress, pending, done, exported))
        .context("starting the hand-off thread")
}
