//! The exit of the dataflow: each worker turns the candidates of every *completed* epoch into
//! encoded exports, one message per frontier advance.
//!
//! The sink reads its input frontier: once it has passed epoch `t`, no candidate of `t` can
//! still arrive, so the epoch's exports are final. Encoding runs here, on the worker
//! threads, so JSON building scales with the workers. The receiver (the binary's egress feed)
//! merges the workers' messages: an epoch is complete when every worker's `upper` is past it.

use std::collections::BTreeMap;

use timely::dataflow::Stream;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;

use crate::export::{Candidate, Encoded, encode};
use crate::history::{Decided, Seed};
use crate::input::Epoch;
use crate::plan::{DestinationIdx, Plans};

/// One worker's progress: every epoch below `upper` is complete on this worker, and `epochs`
/// holds its exports of the epochs completed since its previous message.
#[derive(Debug)]
pub struct Completed {
    pub worker: usize,
    /// `Epoch::MAX` once the dataflow has finished.
    pub upper: Epoch,
    pub epochs: Vec<(Epoch, Vec<Encoded>)>,
}

/// Attaches the export sink to the decisions: `emit` gets the exports of every completed epoch
/// (see [`Completed`]), `snapshot` each snapshot epoch's records of this worker (possibly
/// none, so that the receiver knows when it has every worker's). Both are called on the worker
/// thread and must not block for long (hand the message to a channel).
pub fn export_sink<'s>(
    decisions: Stream<'s, Epoch, Vec<Decided>>,
    plans: Plans,
    worker: usize,
    mut emit: impl FnMut(Completed) + 'static,
    mut snapshot: impl FnMut(SnapshotPart) + 'static,
) {
    let mut pending: BTreeMap<Epoch, Vec<Candidate>> = BTreeMap::new();
    let mut records: BTreeMap<Epoch, Vec<Seed>> = BTreeMap::new();
    let mut reported: Epoch = 0;
    decisions.sink(Pipeline, "ExportSink", move |(input, frontier)| {
        input.for_each(|cap, decisions| {
            if let Some(epoch) = cap.least() {
                for d in decisions.drain(..) {
                    match d {
                        Decided::Candidate(c) => pending.entry(*epoch).or_default().push(c),
                        Decided::Record(r) => records.entry(*epoch).or_default().push(r),
                    }
                }
            }
        });
        let upper = frontier
            .frontier()
            .iter()
            .min()
            .copied()
            .unwrap_or(Epoch::MAX);
        if upper <= reported {
            return;
        }
        let mut epochs = Vec::new();
        while let Some(entry) = pending.first_entry() {
            if *entry.key() >= upper {
                break;
            }
            let (epoch, candidates) = entry.remove_entry();
            let plan = plans.at(epoch);
            let mut exports = Vec::new();
            for candidate in &candidates {
                for dest in 0..plan.destinations.len() as DestinationIdx {
                    exports.extend(encode(&plan, dest, candidate));
                }
            }
            epochs.push((epoch, exports));
        }
        if plans.dynamic() {
            for epoch in plans.control_epochs(reported, upper) {
                if plans.is_snapshot(epoch) {
                    snapshot(SnapshotPart {
                        worker,
                        epoch,
                        records: records.remove(&epoch).unwrap_or_default(),
                    });
                }
            }
        }
        reported = upper;
        emit(Completed {
            worker,
            upper,
            epochs,
        });
    });
}

/// One worker's records at a snapshot epoch.
#[derive(Debug)]
pub struct SnapshotPart {
    pub worker: usize,
    pub epoch: Epoch,
    pub records: Vec<Seed>,
}
