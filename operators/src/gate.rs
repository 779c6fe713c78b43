//! Epoch gating for the hand-written operators: each buffers its input by epoch and acts on an
//! epoch only once its input frontier has passed it, in epoch order, so that it sees the whole
//! epoch at once (every worker's share) and nothing of a later one.
//!
//! The gate holds one capability, for the least pending epoch, and mints from it a capability
//! for each epoch it releases; when nothing is pending it holds none, so an idle operator never
//! holds the frontier back.
//!
//! A *standing* gate (the stages that act on the control epochs of a changing plan, which may
//! bring them no data) instead keeps its operator's initial capability at its input frontier,
//! so that it can act on an epoch it was only [`EpochGate::touch`]ed for. It holds nothing back
//! either: its capability never runs ahead of its input frontier.

use std::collections::BTreeMap;

use timely::dataflow::operators::Capability;
use timely::progress::frontier::MutableAntichain;

use crate::input::Epoch;

/// Buffered input of an epoch-at-a-time operator.
pub struct EpochGate<D> {
    pending: BTreeMap<Epoch, Vec<D>>,
    held: Option<Capability<Epoch>>,
    standing: bool,
}

impl<D> Default for EpochGate<D> {
    fn default() -> Self {
        EpochGate {
            pending: BTreeMap::new(),
            held: None,
            standing: false,
        }
    }
}

impl<D> EpochGate<D> {
    /// A standing gate, from the operator's initial capability (see the module doc).
    pub fn standing(initial: Capability<Epoch>) -> Self {
        EpochGate {
            pending: BTreeMap::new(),
            held: Some(initial),
            standing: true,
        }
    }

    /// The epoch up to which [`Self::touch`] is possible: a standing gate's capability.
    pub fn standing_at(&self) -> Option<Epoch> {
        self.held
            .as_ref()
            .filter(|_| self.standing)
            .map(|c| *c.time())
    }

    /// Makes `epoch` pending even if it brings no data (a standing gate, `epoch` not before
    /// [`Self::standing_at`]).
    pub fn touch(&mut self, epoch: Epoch) {
        if self.standing_at().is_some_and(|at| at <= epoch) {
            self.pending.entry(epoch).or_default();
        }
    }

    /// Keeps `cap` if it is earlier than the one held.
    fn hold(&mut self, cap: Capability<Epoch>) {
        if self.held.as_ref().is_none_or(|h| cap.time() < h.time()) {
            self.held = Some(cap);
        }
    }

    /// Buffers a message received under `cap`, whose records all belong to `cap`'s epoch.
    pub fn push(&mut self, cap: Option<Capability<Epoch>>, data: &mut Vec<D>) {
        let Some(cap) = cap else { return };
        let epoch = *cap.time();
        self.hold(cap);
        self.pending.entry(epoch).or_default().append(data);
    }

    /// Buffers records that carry their own epochs (differential updates), received under `cap`.
    pub fn push_timed<X>(
        &mut self,
        cap: Option<Capability<Epoch>>,
        data: impl IntoIterator<Item = X>,
        mut split: impl FnMut(X) -> (Epoch, D),
    ) {
        let Some(cap) = cap else { return };
        self.hold(cap);
        for x in data {
            let (epoch, d) = split(x);
            self.pending.entry(epoch).or_default().push(d);
        }
    }

    /// The earliest pending epoch that `frontier` has passed, with a capability for it.
    pub fn next_complete(
        &mut self,
        frontier: &MutableAntichain<Epoch>,
    ) -> Option<(Capability<Epoch>, Vec<D>)> {
        let entry = self.pending.first_entry()?;
        if frontier.less_equal(entry.key()) {
            return None;
        }
        let (epoch, data) = entry.remove_entry();
        let cap = self.held.as_ref()?.delayed(&epoch);
        Some((cap, data))
    }

    /// The earliest pending epoch, if any.
    pub fn first_pending(&self) -> Option<Epoch> {
        self.pending.first_key_value().map(|(e, _)| *e)
    }

    /// Moves the held capability up to the earliest pending epoch, or lets it go (a standing
    /// gate: up to its input frontier, and lets it go when the input has ended).
    pub fn release(&mut self, frontier: &MutableAntichain<Epoch>) {
        let pending = self.pending.first_key_value().map(|(e, _)| *e);
        let target = if self.standing {
            let at = frontier.frontier().iter().min().copied();
            match (pending, at) {
                (Some(p), Some(a)) => Some(p.min(a)),
                (p, a) => p.or(a),
            }
        } else {
            pending
        };
        match target {
            Some(epoch) => {
                if let Some(h) = self.held.as_mut()
                    && *h.time() < epoch
                {
                    h.downgrade(&epoch);
                }
            }
            None => self.held = None,
        }
    }
}
