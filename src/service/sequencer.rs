//! The sequencer: the one place where requests get their order. Each accepted request becomes
//! one record of the write-ahead log, with the epoch it belongs to, and is acknowledged once
//! the record is durable.
//!
//! Ordering: a short lock decides a request's epoch and position (and applies a control change
//! to the accepted configuration) and queues its record; the `fsync` is awaited outside the
//! lock, so concurrent requests share one (group commit). Records reach the log in the order
//! the lock gave, which is the order in which changes take effect (SPEC §6).
//!
//! Epochs: consecutive event records share an epoch until it holds `epoch_events` events or
//! the feeder closes it because it has been open `epoch_time` ([`Sequencer::close`]); a
//! control change is an epoch of its own. The epoch is written into the record, so a replay of
//! the log forms the same epochs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use streamdest_operators::plan::Plan;

use crate::storage::wal::{Wal, WalError};

use super::control::{Applied, Control, ControlChange, ControlError};
use super::record::{Body, Entry, control_seq};

/// Why a request was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The log's disk budget is used up: retry later.
    #[error("the write-ahead log holds {bytes} bytes, its budget is {budget}: retry later")]
    Full { bytes: u64, budget: u64 },
    #[error("{0}")]
    Wal(#[from] WalError),
    /// An earlier write failed: the service accepts nothing more.
    #[error("the write-ahead log failed earlier ({0}); nothing more is accepted")]
    Failed(String),
}

#[derive(Clone, Copy, Debug)]
pub struct SequencerOptions {
    /// An epoch closes once it holds this many events.
    pub epoch_events: usize,
    /// Refuse requests while the log holds more than this many bytes.
    pub max_wal_bytes: Option<u64>,
}

impl Default for SequencerOptions {
    fn default() -> Self {
        SequencerOptions {
            epoch_events: 10_000,
            max_wal_bytes: None,
        }
    }
}

struct State {
    /// The configuration as accepted.
    control: Control,
    /// Its plan, for validating events.
    plan: Arc<Plan>,
    /// The epoch of the next record, unless it joins the open one.
    epoch: u64,
    /// Events in epoch `epoch`, when it is open (has records and is not closed).
    open: Option<usize>,
    /// One past the last record queued.
    next_position: u64,
    failed: Option<String>,
}

/// What a restart learns from the log before it accepts anything.
pub struct Recovered {
    pub control: Control,
    /// One past the last epoch in the log.
    pub epoch: u64,
}

pub struct Sequencer {
    wal: Arc<Wal>,
    state: Mutex<State>,
    options: SequencerOptions,
    /// Woken when records become durable.
    feeder: OnceLock<std::thread::Thread>,
    accepted_events: AtomicU64,
}

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Reads the log from `from` (the position a snapshot ends at, or the start), on top of
/// `control` and `epoch` (the snapshot's): the accepted configuration and the next epoch.
pub fn recover(
    wal: &Wal,
    from: u64,
    mut control: Control,
    mut epoch: u64,
) -> anyhow::Result<Recovered> {
    for record in wal.read_from(from.max(wal.first_position()))? {
        let (position, bytes) = record?;
        let entry = Entry::decode(position, &bytes)?;
        epoch = entry.epoch + 1;
        if let Body::Control(change) = &entry.body
            && let Err(e) = control.apply(change, entry.at, control_seq(position))
        {
            // Accepted once, so it applied then: the log was written by another version.
            tracing::warn!(position, error = %e, "a logged control change no longer applies");
        }
    }
    Ok(Recovered { control, epoch })
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sequencer {
    pub fn new(
        wal: Arc<Wal>,
        recovered: Recovered,
        options: SequencerOptions,
    ) -> anyhow::Result<Sequencer> {
        let mut control = recovered.control;
        let plan = Arc::new(control.plan()?);
        let next_position = wal.next_position();
        Ok(Sequencer {
            wal,
            state: Mutex::new(State {
                control,
                plan,
                epoch: recovered.epoch,
                open: None,
                next_position,
                failed: None,
            }),
            options,
            feeder: OnceLock::new(),
            accepted_events: AtomicU64::new(0),
        })
    }

    /// The thread to wake when records become durable.
    pub fn set_feeder(&self, thread: std::thread::Thread) {
        let _ = self.feeder.set(thread);
    }

    /// The plan as accepted (for validating events).
    pub fn plan(&self) -> Arc<Plan> {
        lock(&self.state).plan.clone()
    }

    /// The accepted configuration.
    pub fn with_control<T>(&self, f: impl FnOnce(&Control) -> T) -> T {
        f(&lock(&self.state).control)
    }

    /// Events accepted since the start.
    pub fn accepted_events(&self) -> u64 {
        self.accepted_events.load(Ordering::Relaxed)
    }

    pub fn wal(&self) -> &Wal {
        &self.wal
    }

    fn admit(&self, state: &State) -> Result<(), SubmitError> {
        if let Some(reason) = &state.failed {
            return Err(SubmitError::Failed(reason.clone()));
        }
        if let Some(budget) = self.options.max_wal_bytes {
            let bytes = self.wal.disk_bytes();
            if bytes > budget {
                return Err(SubmitError::Full { bytes, budget });
            }
        }
        Ok(())
    }

    async fn durable(
        &self,
        append: impl Future<Output = Result<std::ops::Range<u64>, WalError>>,
    ) -> Result<(), SubmitError> {
        match append.await {
            Ok(_) => {
                if let Some(feeder) = self.feeder.get() {
                    feeder.unpark();
                }
                Ok(())
            }
            Err(e) => {
                lock(&self.state)
                    .failed
                    .get_or_insert_with(|| e.to_string());
                Err(e.into())
            }
        }
    }

    /// Logs one request's events (validated JSON texts); returns once they are durable.
    pub async fn events(&self, events: Vec<String>) -> Result<usize, SubmitError> {
        let n = events.len();
        if n == 0 {
            return Ok(0);
        }
        let append = {
            let mut state = lock(&self.state);
            self.admit(&state)?;
            match state.open {
                Some(held) if held < self.options.epoch_events => {
                    state.open = Some(held + n);
                }
                Some(_) => {
                    state.epoch += 1;
                    state.open = Some(n);
                }
                None => state.open = Some(n),
            }
            let entry = Entry {
                epoch: state.epoch,
                at: now_micros(),
                body: Body::Events(events),
            };
            state.next_position += 1;
            self.wal.append_async(vec![entry.encode()])
        };
        self.durable(append).await?;
        self.accepted_events.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    /// Validates, applies and logs a control change; returns once it is durable.
    pub async fn control(&self, change: ControlChange) -> Result<Applied, SubmitError> {
        let (append, applied) = {
            let mut state = lock(&self.state);
            self.admit(&state)?;
            Control::check_secrets(&change)?;
            let at = now_micros();
            let position = state.next_position;
            let applied = state.control.apply(&change, at, control_seq(position))?;
            state.plan = applied.plan.clone();
            if state.open.take().is_some() {
                state.epoch += 1;
            }
            let entry = Entry {
                epoch: state.epoch,
                at,
                body: Body::Control(change),
            };
            state.epoch += 1;
            state.next_position += 1;
            (self.wal.append_async(vec![entry.encode()]), applied)
        };
        self.durable(append).await?;
        Ok(applied)
    }

    /// Closes log epoch `epoch` if it is still open. Returns the position up to which its
    /// records may reach (every record of it is before), or `None` when `epoch` has not
    /// started yet.
    pub fn close(&self, epoch: u64) -> Option<u64> {
        let mut state = lock(&self.state);
        if epoch > state.epoch || (epoch == state.epoch && state.open.is_none()) {
            return None;
        }
        if epoch == state.epoch {
            state.epoch += 1;
            state.open = None;
        }
        Some(state.next_position)
    }
}
