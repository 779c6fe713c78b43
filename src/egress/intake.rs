//! Intake, ordering and outcomes (stage 4 of [`super`]): the [`Egress`] handle. A bounded
//! intake (backpressure on [`Egress::submit`]), then the [`OrderTable`]; each export is
//! delivered by [`service::deliver_round`], then its outcome goes to the dead-letter store
//! (group commit), the stats and the optional callback. An export that could not be stored
//! is kept in memory ([`Egress::unstored`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

use super::error::{SettingsError, last_error_text};
use super::ordering::OrderTable;
use super::redrive::{self, RedriveReport};
use super::service::{self, DestinationRuntime, RoundResult, ServiceOptions};
use super::settings::destination_settings;
use super::stats::EgressStats;
use super::transport::Transport;
use crate::config::Destination;
use crate::storage::deadletter::StoreError;
use crate::storage::{DeadLetterStore, NewDeadLetter};

/// One export handed over by the dataflow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Export {
    /// The destination's id.
    pub destination: String,
    /// The profile, `"namespace:id"`.
    pub profile: String,
    /// The profile's identities as order keys: the export waits for every earlier export to
    /// its destination sharing one (SPEC §4). Empty: ordered by `profile` alone.
    pub order_keys: Vec<u64>,
    /// The epoch that produced it.
    pub epoch: u64,
    /// Sent as `Idempotency-Key`, the same on every attempt and redrive.
    pub idempotency_key: String,
    /// The JSON payload, ready to send.
    pub payload: Bytes,
}

/// How an export ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Delivered {
        attempts: u32,
        status: u16,
    },
    /// Failed after its retries. `entry` is the dead-letter id, `None` when no store is
    /// configured or storing failed (logged as an error; the export is then kept in
    /// [`Egress::unstored`]).
    DeadLettered {
        attempts: u32,
        last_status: Option<u16>,
        last_error: String,
        entry: Option<u64>,
    },
}

/// Called once per export with its outcome, after the dead letter (if any) is durable and
/// before the next export of the same (destination, profile) starts.
pub type OutcomeCallback = Arc<dyn Fn(&Export, Outcome) + Send + Sync>;

/// Egress tunables.
#[derive(Clone)]
pub struct EgressOptions {
    /// Exports queued or in delivery at most; [`Egress::submit`] waits beyond it.
    pub queue_capacity: usize,
    pub service: ServiceOptions,
    pub on_outcome: Option<OutcomeCallback>,
    /// Keep a copy of every export until it ends, for [`Egress::unfinished`] (the service's
    /// snapshots); off by default.
    pub track_unfinished: bool,
}

impl Default for EgressOptions {
    fn default() -> Self {
        EgressOptions {
            queue_capacity: 16_384,
            service: ServiceOptions::default(),
            on_outcome: None,
            track_unfinished: false,
        }
    }
}

impl std::fmt::Debug for EgressOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressOptions")
            .field("queue_capacity", &self.queue_capacity)
            .field("track_unfinished", &self.track_unfinished)
            .field("service", &self.service)
            .field(
                "on_outcome",
                &self.on_outcome.as_ref().map(|_| "<callback>"),
            )
            .finish()
    }
}

/// Egress errors. Texts never contain a secret.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("destinations[{index}] ({id}): {reason}")]
    InvalidDestination {
        index: usize,
        id: String,
        reason: SettingsError,
    },
    #[error("destination {0:?} is configured twice")]
    DuplicateDestination(String),
    #[error("unknown destination {0:?}")]
    UnknownDestination(String),
    #[error("the egress is closed")]
    Closed,
    #[error("the egress needs a tokio runtime (create it inside one)")]
    NoRuntime,
}

struct Queued {
    export: Export,
    /// Submission number.
    number: u64,
    submitted: Instant,
    _permit: OwnedSemaphorePermit,
}

/// An export waiting for its order keys, with its destination's runtime.
type Ordered = (Arc<DestinationRuntime>, Queued);

/// A dead letter to store and where to say under which id (or why not).
type DeadLetterRequest = (NewDeadLetter, oneshot::Sender<Result<u64, StoreFailure>>);

/// Why a dead letter was not stored; its text becomes [`Unstored::error`] and the log's.
#[derive(Clone, Debug, thiserror::Error)]
enum StoreFailure {
    /// The writer task is gone (the egress is shutting down).
    #[error("the dead-letter writer stopped")]
    WriterStopped,
    /// The blocking write panicked or was cancelled.
    #[error("dead-letter task failed: {0}")]
    TaskFailed(String),
    /// The store's error (path and OS error), shared by the batch it failed.
    #[error(transparent)]
    Store(Arc<StoreError>),
}

/// The most dead letters written with one `fsync`.
const DEAD_LETTER_BATCH: usize = 1024;

/// An export that failed after its retries and could not be stored in the dead-letter store
/// either: the egress keeps it in memory so that it is not lost.
#[derive(Clone, Debug)]
pub struct Unstored {
    /// What would have been stored (payload, destination, attempts, last error).
    pub letter: NewDeadLetter,
    /// Why it could not be stored (the store's error: path and OS error, no secret).
    pub error: String,
}

struct Shared {
    runtime: tokio::runtime::Handle,
    /// To the dead-letter writer task (group commit), when a store is configured.
    dead_letter_tx: Option<mpsc::UnboundedSender<DeadLetterRequest>>,
    transport: Transport,
    destinations: RwLock<HashMap<String, Arc<DestinationRuntime>>>,
    dead_letters: Option<Arc<DeadLetterStore>>,
    /// Failed exports the store could not take, in the order they failed.
    unstored: Mutex<Vec<Unstored>>,
    intake: Arc<Semaphore>,
    /// The exports waiting for, or holding, their order keys.
    order: Mutex<OrderTable<Ordered>>,
    /// With `track_unfinished`: every export submitted and not ended, by submission number.
    unfinished: Mutex<std::collections::BTreeMap<u64, Export>>,
    submitted: std::sync::atomic::AtomicU64,
    pending: watch::Sender<u64>,
    options: EgressOptions,
    closed: AtomicBool,
    started: Instant,
}

/// The egress: submit exports, they are delivered or dead-lettered. Cheap to clone.
#[derive(Clone)]
pub struct Egress {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<String> = self.read_destinations().keys().cloned().collect();
        f.debug_struct("Egress")
            .field("destinations", &ids)
            .field("pending", &self.pending())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Egress {
    /// Validates every destination (headers, URLs) and prepares the transport. Must be called
    /// within a tokio multi-thread runtime, which the egress then spawns its tasks on.
    pub fn new(
        destinations: Vec<Destination>,
        dead_letters: Option<Arc<DeadLetterStore>>,
        options: EgressOptions,
    ) -> Result<Egress, EgressError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| EgressError::NoRuntime)?;
        let transport = Transport::new();
        let mut map = HashMap::new();
        for (index, destination) in destinations.iter().enumerate() {
            let rt =
                build_runtime(destination, &transport, &options.service).map_err(|reason| {
                    EgressError::InvalidDestination {
                        index,
                        id: destination.id.clone(),
                        reason,
                    }
                })?;
            if map.insert(destination.id.clone(), Arc::new(rt)).is_some() {
                return Err(EgressError::DuplicateDestination(destination.id.clone()));
            }
        }
        let (pending, _) = watch::channel(0);
        let dead_letter_tx = dead_letters.as_ref().map(|store| {
            let (tx, rx) = mpsc::unbounded_channel();
            runtime.spawn(write_dead_letters(store.clone(), rx));
            tx
        });
        let capacity = options.queue_capacity.clamp(1, Semaphore::MAX_PERMITS);
        Ok(Egress {
            shared: Arc::new(Shared {
                runtime,
                dead_letter_tx,
                transport,
                destinations: RwLock::new(map),
                dead_letters,
                unstored: Mutex::new(Vec::new()),
                intake: Arc::new(Semaphore::new(capacity)),
                order: Mutex::new(OrderTable::default()),
                unfinished: Mutex::default(),
                submitted: Default::default(),
                pending,
                options,
                closed: AtomicBool::new(false),
                started: Instant::now(),
            }),
        })
    }

    fn read_destinations(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<DestinationRuntime>>> {
        self.shared
            .destinations
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Adds or replaces a destination (control API). Exports already submitted keep the
    /// settings they were submitted with; the new one starts with an empty token cache and
    /// keeps the counters.
    pub fn upsert_destination(&self, destination: &Destination) -> Result<(), EgressError> {
        let mut rt = build_runtime(
            destination,
            &self.shared.transport,
            &self.shared.options.service,
        )
        .map_err(|reason| EgressError::InvalidDestination {
            index: 0,
            id: destination.id.clone(),
            reason,
        })?;
        let mut map = self
            .shared
            .destinations
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(old) = map.get(&destination.id) {
            rt.counters = old.counters.clone();
        }
        map.insert(destination.id.clone(), Arc::new(rt));
        Ok(())
    }

    /// Removes a destination; exports already submitted to it are still delivered.
    pub fn remove_destination(&self, id: &str) -> bool {
        let mut map = self
            .shared
            .destinations
            .write()
            .unwrap_or_else(|p| p.into_inner());
        map.remove(id).is_some()
    }

    /// The ids of the configured destinations.
    pub fn destination_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.read_destinations().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Hands over one export. Waits while the intake is full (backpressure). Exports of one
    /// (destination, profile) are delivered in the order they are submitted.
    pub async fn submit(&self, export: Export) -> Result<(), EgressError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(EgressError::Closed);
        }
        let rt = self
            .read_destinations()
            .get(&export.destination)
            .cloned()
            .ok_or_else(|| EgressError::UnknownDestination(export.destination.clone()))?;
        let permit = self
            .shared
            .intake
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| EgressError::Closed)?;
        self.enqueue(rt, export, permit);
        Ok(())
    }

    /// [`Self::submit`] from a thread outside the runtime (a dataflow worker). Must not be
    /// called from within an async task.
    pub fn submit_blocking(&self, export: Export) -> Result<(), EgressError> {
        self.shared.runtime.block_on(self.submit(export))
    }

    /// Submits without waiting; gives the export back when the intake is full.
    pub fn try_submit(&self, export: Export) -> Result<Result<(), Export>, EgressError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(EgressError::Closed);
        }
        let rt = self
            .read_destinations()
            .get(&export.destination)
            .cloned()
            .ok_or_else(|| EgressError::UnknownDestination(export.destination.clone()))?;
        match self.shared.intake.clone().try_acquire_owned() {
            Ok(permit) => {
                self.enqueue(rt, export, permit);
                Ok(Ok(()))
            }
            Err(tokio::sync::TryAcquireError::NoPermits) => Ok(Err(export)),
            Err(tokio::sync::TryAcquireError::Closed) => Err(EgressError::Closed),
        }
    }

    fn enqueue(&self, rt: Arc<DestinationRuntime>, export: Export, permit: OwnedSemaphorePermit) {
        rt.counters.exports.fetch_add(1, Ordering::Relaxed);
        rt.counters.pending.fetch_add(1, Ordering::Relaxed);
        self.shared.pending.send_modify(|n| *n += 1);
        let destination = export.destination.clone();
        let keys = order_keys(&export);
        let number = self.shared.submitted.fetch_add(1, Ordering::Relaxed);
        if self.shared.options.track_unfinished {
            lock(&self.shared.unfinished).insert(number, export.clone());
        }
        let queued = Queued {
            export,
            number,
            submitted: Instant::now(),
            _permit: permit,
        };
        let start = lock(&self.shared.order).push(&destination, keys, (rt, queued));
        if let Some((id, (rt, queued))) = start {
            let shared = self.shared.clone();
            self.shared
                .runtime
                .spawn(run_ordered(shared, rt, id, queued));
        }
    }

    /// Exports submitted and not yet delivered or dead-lettered.
    pub fn pending(&self) -> u64 {
        *self.shared.pending.borrow()
    }

    /// Waits until every export submitted so far (and any submitted meanwhile) is delivered
    /// or dead-lettered.
    pub async fn drain(&self) {
        let mut rx = self.shared.pending.subscribe();
        // The sender lives in `shared`, which `self` keeps alive: this cannot fail.
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Stops intake: later submits fail with [`EgressError::Closed`]. What was submitted is
    /// still delivered ([`Self::drain`] waits for it).
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
    }

    /// Withdraws every export still waiting behind another of its profile (not yet started)
    /// and returns them, in submission order per profile; the ones in delivery finish. For a
    /// shutdown that leaves queued exports to the next start (SPEC §7).
    pub fn cancel_queued(&self) -> Vec<Export> {
        let withdrawn: Vec<Queued> = lock(&self.shared.order)
            .withdraw()
            .into_iter()
            .map(|(_, queued)| queued)
            .collect();
        let destinations = self.read_destinations();
        for q in &withdrawn {
            if let Some(rt) = destinations.get(&q.export.destination) {
                rt.counters.pending.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let n = withdrawn.len() as u64;
        self.shared
            .pending
            .send_modify(|p| *p = p.saturating_sub(n));
        if self.shared.options.track_unfinished {
            let mut unfinished = lock(&self.shared.unfinished);
            for q in &withdrawn {
                unfinished.remove(&q.number);
            }
        }
        withdrawn.into_iter().map(|q| q.export).collect()
    }

    /// The exports submitted and not yet ended (queued or in delivery), in submission order.
    /// Empty unless [`EgressOptions::track_unfinished`] is on.
    pub fn unfinished(&self) -> Vec<Export> {
        lock(&self.shared.unfinished).values().cloned().collect()
    }

    /// Counters and latency, in total and per destination.
    pub fn stats(&self) -> EgressStats {
        let destinations = self.read_destinations();
        EgressStats::collect(
            destinations.values().map(|rt| rt.as_ref()),
            self.shared.started.elapsed(),
        )
    }

    /// Redrives the dead letters (of one destination or all) through this egress's transport;
    /// an entry whose destination is configured here is re-sent with its current settings
    /// (fixed since the failure, it is used as fixed), the others with their stored ones.
    pub async fn redrive(&self, destination: Option<&str>) -> Option<RedriveReport> {
        self.redrive_as(destination, None).await
    }

    /// [`Self::redrive`], with `current` taken as the destination's configuration (the
    /// service passes the one last accepted, which this egress may not have applied yet).
    /// An invalid `current` is ignored.
    pub async fn redrive_as(
        &self,
        destination: Option<&str>,
        current: Option<&Destination>,
    ) -> Option<RedriveReport> {
        let store = self.shared.dead_letters.clone()?;
        let mut runtimes = self.read_destinations().clone();
        if let Some(d) = current
            && let Ok(mut rt) =
                build_runtime(d, &self.shared.transport, &self.shared.options.service)
        {
            if let Some(old) = runtimes.get(&d.id) {
                rt.counters = old.counters.clone();
            }
            runtimes.insert(d.id.clone(), Arc::new(rt));
        }
        Some(
            redrive::redrive_with(
                &self.shared.transport,
                store,
                &crate::storage::deadletter::DeadLetterFilter::destination(destination),
                &self.shared.options.service,
                &runtimes,
            )
            .await,
        )
    }

    /// The dead-letter store, when configured.
    pub fn dead_letters(&self) -> Option<&Arc<DeadLetterStore>> {
        self.shared.dead_letters.as_ref()
    }

    /// The exports that failed and could not be stored in the dead-letter store, in the order
    /// they failed (complete once [`Self::drain`] returns). They exist nowhere else: a caller
    /// that ends must report or save them.
    pub fn unstored(&self) -> Vec<Unstored> {
        lock(&self.shared.unstored).clone()
    }
}

/// Validates a destination; one with its own TLS settings gets its connection pool now (its
/// files read, errors at `tls.…`), shared with the other destinations with the same settings.
fn build_runtime(
    destination: &Destination,
    transport: &Transport,
    options: &ServiceOptions,
) -> Result<DestinationRuntime, SettingsError> {
    let settings = destination_settings(destination)?;
    let rt = DestinationRuntime::new(settings, options)?;
    if rt.settings.tls.is_some() {
        transport.with_tls(rt.settings.tls.as_ref())?;
    }
    Ok(rt)
}

/// The order keys of an export: its identities, or its profile name when it has none.
fn order_keys(export: &Export) -> Vec<u64> {
    if export.order_keys.is_empty() {
        vec![streamdest_operators::input::stable_hash(&export.profile)]
    } else {
        export.order_keys.clone()
    }
}

/// Delivers one export, then starts those that were waiting for it.
fn run_ordered(
    shared: Arc<Shared>,
    rt: Arc<DestinationRuntime>,
    id: u64,
    queued: Queued,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move {
        deliver_one(&shared, &rt, queued).await;
        let ready = lock(&shared.order).finish(id);
        for (id, (rt, queued)) in ready {
            shared
                .runtime
                .spawn(run_ordered(shared.clone(), rt, id, queued));
        }
    })
}

async fn deliver_one(shared: &Shared, rt: &DestinationRuntime, queued: Queued) {
    let Queued {
        export,
        number,
        submitted,
        _permit,
    } = queued;
    let round = service::deliver_round(
        rt,
        &shared.transport,
        &export.idempotency_key,
        &export.payload,
    )
    .await;
    let outcome = if round.delivered {
        rt.counters.delivered.fetch_add(1, Ordering::Relaxed);
        Outcome::Delivered {
            attempts: round.attempts,
            status: round.last_status.unwrap_or(200),
        }
    } else {
        let entry = store_dead_letter(shared, rt, &export, &round).await;
        Outcome::DeadLettered {
            attempts: round.attempts,
            last_status: round.last_status,
            last_error: last_error_text(round.last_error.as_ref()),
            entry,
        }
    };
    let micros = u64::try_from(submitted.elapsed().as_micros()).unwrap_or(u64::MAX);
    lock(&rt.counters.latency).saturating_record(micros.max(1));
    if let Some(callback) = &shared.options.on_outcome {
        callback(&export, outcome);
    }
    if shared.options.track_unfinished {
        lock(&shared.unfinished).remove(&number);
    }
    rt.counters.pending.fetch_sub(1, Ordering::Relaxed);
    drop(_permit);
    shared.pending.send_modify(|n| *n = n.saturating_sub(1));
}

/// Stores a failed export; counts it as dead-lettered, or as not stored (kept in memory).
async fn store_dead_letter(
    shared: &Shared,
    rt: &DestinationRuntime,
    export: &Export,
    round: &RoundResult,
) -> Option<u64> {
    let (Some(tx), Some(store)) = (shared.dead_letter_tx.as_ref(), shared.dead_letters.as_ref())
    else {
        rt.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
        rt.warn_failure(&export.profile, &export.idempotency_key, None, round);
        return None;
    };
    let letter = NewDeadLetter {
        destination: rt.settings.clone(),
        profile: export.profile.clone(),
        epoch: export.epoch,
        idempotency_key: export.idempotency_key.clone(),
        payload: export.payload.clone(),
        attempts: round.attempts,
        last_status: round.last_status,
        last_error: last_error_text(round.last_error.as_ref()),
        last_response_body: round.last_body.clone(),
    };
    let (reply, stored) = oneshot::channel();
    let result = match tx.send((letter.clone(), reply)) {
        Ok(()) => stored.await.unwrap_or(Err(StoreFailure::WriterStopped)),
        Err(_) => Err(StoreFailure::WriterStopped),
    };
    match result {
        Ok(id) => {
            rt.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
            rt.warn_failure(&export.profile, &export.idempotency_key, Some(id), round);
            Some(id)
        }
        Err(error) => {
            rt.counters.not_stored.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                destination = rt.id(),
                profile = %export.profile,
                idempotency_key = %export.idempotency_key,
                data_dir = %store.dir().display(),
                %error,
                "could not store a failed export in the dead-letter store: it is kept in memory only"
            );
            lock(&shared.unstored).push(Unstored {
                letter,
                error: error.to_string(),
            });
            None
        }
    }
}

/// Writes dead letters in batches: whatever queued up while the previous `fsync` ran goes
/// out with the next one (group commit), so an endpoint outage is not throttled by the disk.
async fn write_dead_letters(
    store: Arc<DeadLetterStore>,
    mut rx: mpsc::UnboundedReceiver<DeadLetterRequest>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < DEAD_LETTER_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (letters, replies): (Vec<NewDeadLetter>, Vec<_>) = batch.into_iter().unzip();
        let n = letters.len();
        let store = store.clone();
        let results = match tokio::task::spawn_blocking(move || store_batch(&store, letters)).await
        {
            Ok(results) => results,
            Err(e) => vec![Err(StoreFailure::TaskFailed(e.to_string())); n],
        };
        for (result, reply) in results.into_iter().zip(replies) {
            let _ = reply.send(result);
        }
    }
}

/// Stores `letters` with one `fsync`. When the write fails part-way (a full disk), the
/// entries written whole before the failure are stored and the others fail with its error.
fn store_batch(
    store: &DeadLetterStore,
    letters: Vec<NewDeadLetter>,
) -> Vec<Result<u64, StoreFailure>> {
    let n = letters.len();
    match store.put_batch(letters) {
        Ok(entries) => entries.iter().map(|e| Ok(e.id)).collect(),
        Err(partial) => {
            let error = StoreFailure::Store(Arc::new(partial.error));
            let mut results: Vec<Result<u64, StoreFailure>> =
                partial.stored.iter().map(|e| Ok(e.id)).collect();
            results.resize(n, Err(error));
            results
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_failure_texts_are_todays() {
        assert_eq!(
            StoreFailure::WriterStopped.to_string(),
            "the dead-letter writer stopped"
        );
        assert_eq!(
            StoreFailure::TaskFailed("task 1 panicked".into()).to_string(),
            "dead-letter task failed: task 1 panicked"
        );
    }
}
