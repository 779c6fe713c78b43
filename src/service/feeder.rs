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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use streamdest_operators::input::{
    Epoch, EpochInput, FragKey, Fragment, FragmentWrite, IdKey, Mark, UploadWrite,
};
use streamdest_operators::plan::{AudienceIdx, Plan};

use crate::config::{Destination, ObjectKind};
use crate::egress::{Egress, Export};
use crate::events::{EpochBuilder, Update, parse_line};
use crate::pipeline::{ExportStream, Pipeline};
use crate::storage::wal::Wal;

use super::acks::AckLog;
use super::control::{Control, ControlChange};
use super::record::{Body, Entry, control_seq, event_seq};
use super::sequencer::Sequencer;
use super::snapshot::{self, Inputs, OutboxEntry, Snapshot};

/// An epoch is closed once it has been open this long.
pub const EPOCH_TIME: Duration = Duration::from_millis(5);

/// What the hand-off must do before an epoch's exports.
#[derive(Debug, Default)]
pub struct EgressChange {
    /// Destination ids by index, from this epoch on.
    pub ids: Vec<String>,
    pub actions: Vec<DestinationAction>,
    /// Exports to send first (a restart's outbox).
    pub outbox: Vec<Export>,
    /// This is a snapshot epoch: write the snapshot with these inputs.
    pub snapshot: Option<Box<Inputs>>,
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
    /// The state is rebuilt: the snapshot and the log as it stood at the start have been
    /// through the dataflow and their exports handed to the egress.
    pub ready: AtomicBool,
    /// A snapshot is being written: the feeder asks for no other meanwhile (its records would
    /// be gathered for nothing).
    pub snapshot_writing: AtomicBool,
}

/// Where the feeder starts: from the beginning of the log, or from a snapshot.
#[derive(Default)]
pub struct Start {
    /// When the process started (restart times count from it).
    pub began: Option<Instant>,
    pub control: Control,
    /// The first log position to read.
    pub position: u64,
    /// The last log epoch in the snapshot, if any.
    pub last_log_epoch: Option<u64>,
    pub fragments: HashMap<FragKey, Arc<Fragment>>,
    pub uploads: HashSet<(AudienceIdx, IdKey)>,
}

/// When to take a snapshot: once replaying the log since the last one would cost about a
/// quarter of loading a snapshot — a quarter as many events as the state holds fragments (at
/// least `events`) — or after `records` log records or `bytes` of log, whichever comes first.
/// A restart then costs at most about one and a quarter loads of the state, however long the
/// history; snapshots, each written whole, cost about four states' worth of writing per
/// state's worth of events.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotPolicy {
    pub records: u64,
    pub bytes: u64,
    pub events: u64,
}

impl Default for SnapshotPolicy {
    fn default() -> Self {
        SnapshotPolicy {
            records: 20_000,
            bytes: 256 << 20,
            events: 50_000,
        }
    }
}

/// The feeder's state.
pub struct Feeder {
    pub wal: Arc<Wal>,
    pub sequencer: Arc<Sequencer>,
    pub pipeline: Pipeline,
    pub pending: Pending,
    pub stats: Arc<FeedStats>,
    pub stop: Arc<AtomicBool>,
    pub start: Start,
    pub snapshots: SnapshotPolicy,
}

/// The inputs as they stand, for snapshots.
struct State {
    fragments: HashMap<FragKey, Arc<Fragment>>,
    uploads: HashSet<(AudienceIdx, IdKey)>,
    last_log_epoch: Option<u64>,
    /// Position, log size and events fed at the last snapshot.
    snapshot_at: (u64, u64, u64),
}

impl State {
    fn absorb(&mut self, inputs: &[EpochInput]) {
        for input in inputs {
            for (key, write) in &input.fragments {
                match &write.value {
                    Some(f) => {
                        self.fragments.insert(*key, f.clone());
                    }
                    None => {
                        self.fragments.remove(key);
                    }
                }
            }
            for (key, write) in &input.uploads {
                if write.member {
                    self.uploads.insert(*key);
                } else {
                    self.uploads.remove(key);
                }
            }
        }
    }
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
        let start = std::mem::take(&mut self.start);
        let started = start.began.unwrap_or_else(Instant::now);
        let mut control = start.control;
        let mut plan: Arc<Plan> = Arc::new(control.plan()?);
        let mut builder = EpochBuilder::new(self.pipeline.peers());
        let mut position = start.position.max(self.wal.first_position());
        let mut state = State {
            fragments: start.fragments,
            uploads: start.uploads,
            last_log_epoch: start.last_log_epoch,
            snapshot_at: (position, self.wal.disk_bytes(), 0),
        };
        let mut open: Option<Open> = None;
        let (from, target) = (position, self.wal.next_position());
        while !self.stop.load(Ordering::Acquire) {
            if !self.stats.ready.load(Ordering::Relaxed) && position >= target && open.is_none() {
                self.caught_up(started, from, target)?;
            }
            let durable = self.wal.next_position();
            if position < durable {
                let reader = self.wal.read_from(position)?;
                for record in reader.take((durable - position) as usize) {
                    let (at, bytes) = record?;
                    let entry = Entry::decode(at, &bytes)?;
                    if open.as_ref().is_some_and(|o| o.epoch != entry.epoch) {
                        self.flush(&mut builder, &mut state)?;
                        open = None;
                        self.maybe_snapshot(&control, &mut state, at)?;
                    }
                    state.last_log_epoch = Some(entry.epoch);
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
                    if open.is_none() {
                        self.maybe_snapshot(&control, &mut state, position)?;
                    }
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
                    self.flush(&mut builder, &mut state)?;
                    open = None;
                    self.maybe_snapshot(&control, &mut state, position)?;
                }
            }
            let wait = match &open {
                Some(o) => EPOCH_TIME
                    .saturating_sub(o.seen.elapsed())
                    .max(Duration::from_micros(200)),
                None => Duration::from_millis(50),
            };
            if self.wal.next_position() == position {
                if open.is_none() {
                    // Idle: a snapshot that fell due while the writer was busy is taken once
                    // it is free, not only when the next record comes.
                    self.maybe_snapshot(&control, &mut state, position)?;
                }
                std::thread::park_timeout(wait);
            }
        }
        Ok(())
    }

    /// Queues what the hand-off must do at the next epoch pushed.
    fn queue(&self, change: EgressChange) {
        let epoch = self.pipeline.next_epoch();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(epoch, change);
    }

    /// The log as it stood at the start has been read: waits until the dataflow and the
    /// hand-off are through it, and says so.
    fn caught_up(&mut self, started: Instant, from: u64, target: u64) -> anyhow::Result<()> {
        self.pipeline.wait_all_acked()?;
        self.stats.ready.store(true, Ordering::Relaxed);
        if self.pipeline.next_epoch() > 0 {
            eprintln!(
                "streamdest: state rebuilt {:.2}s after the start ({} epochs; log positions {from}..{target})",
                started.elapsed().as_secs_f64(),
                self.pipeline.next_epoch(),
            );
        }
        Ok(())
    }

    /// Takes a snapshot at `position` (an epoch boundary: every record before it is in the
    /// dataflow) when the policy says it is time.
    fn maybe_snapshot(
        &mut self,
        control: &Control,
        state: &mut State,
        position: u64,
    ) -> anyhow::Result<()> {
        if self.stats.snapshot_writing.load(Ordering::Acquire) {
            return Ok(());
        }
        let (at, bytes, events) = state.snapshot_at;
        let fed = self.stats.events.load(Ordering::Relaxed);
        let replay_cost = fed.saturating_sub(events);
        let due = position.saturating_sub(at) >= self.snapshots.records
            || self.wal.disk_bytes().saturating_sub(bytes) >= self.snapshots.bytes
            || replay_cost >= self.snapshots.events.max(state.fragments.len() as u64 / 4);
        if !due {
            return Ok(());
        }
        let (config, layout) = control.parts();
        let inputs = Inputs {
            position,
            next_log_epoch: state.last_log_epoch.map_or(0, |e| e + 1),
            config,
            layout: layout.clone(),
            fragments: state.fragments.values().cloned().collect(),
            uploads: state.uploads.iter().copied().collect(),
        };
        self.queue(EgressChange {
            ids: control.destination_ids(),
            snapshot: Some(Box::new(inputs)),
            ..Default::default()
        });
        self.pipeline.push_snapshot()?;
        state.snapshot_at = (position, self.wal.disk_bytes(), fed);
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

    fn flush(&mut self, builder: &mut EpochBuilder, state: &mut State) -> anyhow::Result<()> {
        if builder.events() > 0 {
            let inputs = builder.finish();
            state.absorb(&inputs);
            self.pipeline.push(inputs)?;
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
        let actions = match change {
            ControlChange::Put {
                kind: ObjectKind::Destination,
                id,
                ..
            } => control
                .config()
                .destination(id)
                .map(|d| DestinationAction::Upsert(Box::new(d.clone())))
                .into_iter()
                .collect(),
            ControlChange::Delete {
                kind: ObjectKind::Destination,
                id,
            } => vec![DestinationAction::Remove(id.clone())],
            _ => Vec::new(),
        };
        self.queue(EgressChange {
            ids: control.destination_ids(),
            actions,
            ..Default::default()
        });
        self.pipeline.push_control(applied.plan.clone())?;
        self.stats.epochs.fetch_add(1, Ordering::Relaxed);
        Ok(applied.plan)
    }
}

/// The hand-off: every completed epoch's exports to the egress, in epoch order, except the
/// ones finished before a restart; and the snapshots, written when their epoch comes.
pub struct HandOff {
    pub stream: ExportStream,
    pub egress: Egress,
    pub pending: Pending,
    pub done: HashSet<String>,
    pub exported: Arc<AtomicU64>,
    pub wal: Arc<Wal>,
    pub acks: AckLog,
    pub data_dir: PathBuf,
    pub stats: Arc<FeedStats>,
}

impl HandOff {
    pub fn run(mut self) -> anyhow::Result<()> {
        let writer = snapshot_writer(
            self.data_dir.clone(),
            self.wal.clone(),
            self.acks.clone(),
            self.stats.clone(),
        )?;
        let mut ids: Vec<String> = Vec::new();
        while let Some((epoch, exports)) = self.stream.next_epoch() {
            let change = self
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&epoch);
            if let Some(change) = change {
                ids = change.ids;
                for action in change.actions {
                    self.act(action);
                }
                for export in change.outbox {
                    if !self.submit(export) {
                        return Ok(());
                    }
                }
                if let Some(inputs) = change.snapshot {
                    let records = self.stream.snapshot(epoch)?;
                    self.write_snapshot(&writer, *inputs, records);
                }
            }
            for e in exports {
                let Some(destination) = ids.get(e.destination as usize).cloned() else {
                    continue;
                };
                let export = Export {
                    destination,
                    profile: e.profile,
                    order_keys: e.order_keys,
                    epoch,
                    idempotency_key: e.idempotency_key,
                    payload: bytes::Bytes::from(e.payload),
                };
                if !self.submit(export) {
                    return Ok(());
                }
            }
            self.stream.ack(epoch);
        }
        Ok(())
    }

    fn act(&self, action: DestinationAction) {
        match action {
            DestinationAction::Upsert(d) => {
                if let Err(e) = self.egress.upsert_destination(&d) {
                    tracing::error!(destination = %d.id, error = %e, "destination not usable");
                }
            }
            DestinationAction::Remove(id) => {
                self.egress.remove_destination(&id);
            }
        }
    }

    /// Submits one export unless it ended before a restart; `false` once the egress closed.
    fn submit(&mut self, export: Export) -> bool {
        if !self.done.is_empty() && self.done.remove(&export.idempotency_key) {
            return true;
        }
        let key = export.idempotency_key.clone();
        self.exported.fetch_add(1, Ordering::Relaxed);
        match self.egress.submit_blocking(export) {
            Ok(()) => true,
            Err(crate::egress::EgressError::Closed) => false,
            Err(e) => {
                // The destination could not be set up (logged when it was changed): not sent
                // now, and not recorded either, so it goes out after a restart that fixes it.
                tracing::warn!(error = %e, key, "export not handed to the egress");
                true
            }
        }
    }

    /// Completes a snapshot with the records and the outbox and hands it to the writer. While
    /// the writer is still busy with an earlier one, this one is dropped: snapshots are
    /// written one at a time, in order (a later one must never be overwritten by an earlier
    /// one, whose log the later one's truncation may have deleted), and the next comes soon.
    fn write_snapshot(
        &self,
        writer: &crossbeam_channel::Sender<Snapshot>,
        inputs: Inputs,
        records: Vec<streamdest_operators::history::Seed>,
    ) {
        let outbox: Vec<OutboxEntry> = self
            .egress
            .unfinished()
            .iter()
            .map(OutboxEntry::from)
            .collect();
        let position = inputs.position;
        let snapshot = Snapshot {
            inputs,
            records,
            outbox,
        };
        if writer.try_send(snapshot).is_err() {
            tracing::debug!(
                position,
                "snapshot skipped: the previous one is still being written"
            );
        }
    }
}

/// The snapshot writer: one thread, one snapshot at a time. Once a snapshot is durable, the
/// log before it is deleted and the acknowledgements it makes moot are dropped.
fn snapshot_writer(
    data_dir: PathBuf,
    wal: Arc<Wal>,
    acks: AckLog,
    stats: Arc<FeedStats>,
) -> anyhow::Result<crossbeam_channel::Sender<Snapshot>> {
    let (tx, rx) = crossbeam_channel::bounded::<Snapshot>(0);
    let delay = write_delay();
    std::thread::Builder::new()
        .name("snapshot".into())
        .spawn(move || {
            for snapshot in rx {
                stats.snapshot_writing.store(true, Ordering::Release);
                std::thread::sleep(delay);
                let started = Instant::now();
                let position = snapshot.inputs.position;
                let keep: HashSet<String> = snapshot
                    .outbox
                    .iter()
                    .map(|e| e.idempotency_key.clone())
                    .collect();
                let (profiles, entries) = (snapshot.records.len(), snapshot.outbox.len());
                match snapshot::write(&data_dir, &snapshot) {
                    Ok(bytes) => {
                        drop(snapshot);
                        let first = wal.truncate_before(position);
                        acks.compact(position, keep);
                        tracing::info!(
                            position,
                            profiles,
                            outbox = entries,
                            bytes,
                            seconds = started.elapsed().as_secs_f64(),
                            log_starts_at = ?first.ok(),
                            "snapshot written"
                        );
                    }
                    Err(e) => tracing::error!(error = %e, "snapshot not written; the log is kept"),
                }
                stats.snapshot_writing.store(false, Ordering::Release);
            }
        })
        .context("starting the snapshot writer")?;
    Ok(tx)
}

/// `STREAMDEST_TEST_SNAPSHOT_DELAY_MS`: a pause before each snapshot is written, so that a test
/// can find the writer busy (as a large state keeps it). For tests only; zero when unset.
fn write_delay() -> Duration {
    std::env::var("STREAMDEST_TEST_SNAPSHOT_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::ZERO, Duration::from_millis)
}

/// Starts the hand-off thread; `failed` hears of the error it stops with, if any.
pub fn spawn_hand_off(
    hand_off: HandOff,
    failed: impl FnOnce(&anyhow::Error) + Send + 'static,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("hand-off".into())
        .spawn(move || {
            if let Err(e) = hand_off.run() {
                failed(&e);
            }
        })
        .context("starting the hand-off thread")
}

/// A restart's first two epochs from a snapshot: the records (epoch 0), then the inputs with
/// marks that name no path (epoch 1), so that no profile is exported for being loaded.
/// Takes the records out of `snapshot`.
pub fn load_epochs(peers: usize, snapshot: &mut Snapshot) -> (Vec<EpochInput>, Vec<EpochInput>) {
    let peers = peers.max(1);
    let mut seeds: Vec<EpochInput> = (0..peers).map(|_| EpochInput::default()).collect();
    seeds[0].seeds = std::mem::take(&mut snapshot.records);
    let mut load: Vec<EpochInput> = (0..peers).map(|_| EpochInput::default()).collect();
    for f in &snapshot.inputs.fragments {
        let key = f.key();
        load[(key % peers as u64) as usize].fragments.push((
            key,
            FragmentWrite {
                value: Some(f.clone()),
                mark: Mark::new(f.ts, f.seq, Vec::new()),
            },
        ));
    }
    for &(audience, identity) in &snapshot.inputs.uploads {
        load[(identity % peers as u64) as usize].uploads.push((
            (audience, identity),
            UploadWrite {
                member: true,
                mark: Mark::new(0, 0, Vec::new()),
            },
        ));
    }
    (seeds, load)
}
