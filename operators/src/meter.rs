//! Optional counts of the updates each stage receives, for the benchmarks' table of work per
//! event: arrangement inputs (each update is sorted, merged and compacted) and the messages of
//! the hand-written stages. Off (the default), it adds no operator.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use differential_dataflow::VecCollection;
use timely::dataflow::Stream;
use timely::dataflow::operators::core::Inspect;

use crate::input::Epoch;

/// Update counts by stage name; cloned into every worker's dataflow.
#[derive(Clone, Debug, Default)]
pub struct Meter(Option<Arc<Mutex<BTreeMap<&'static str, u64>>>>);

impl Meter {
    /// A meter that counts.
    pub fn counting() -> Meter {
        Meter(Some(Default::default()))
    }

    fn add(counts: &Mutex<BTreeMap<&'static str, u64>>, name: &'static str, n: usize) {
        let mut counts = counts.lock().unwrap_or_else(|e| e.into_inner());
        *counts.entry(name).or_default() += n as u64;
    }

    /// Counts the updates of `collection` under `name`.
    pub fn collection<D: Clone + 'static>(
        &self,
        name: &'static str,
        collection: &VecCollection<'_, Epoch, D, isize>,
    ) {
        if let Some(counts) = self.0.clone() {
            collection
                .clone()
                .inspect_batch(move |_, updates| Meter::add(&counts, name, updates.len()));
        }
    }

    /// Counts the messages of `stream` under `name`.
    pub fn stream<D: Clone + 'static>(
        &self,
        name: &'static str,
        stream: &Stream<'_, Epoch, Vec<D>>,
    ) {
        if let Some(counts) = self.0.clone() {
            stream.clone().inspect_core(move |event| {
                if let Ok((_, data)) = event {
                    Meter::add(&counts, name, data.len());
                }
            });
        }
    }

    /// The counts so far, summed over the workers of this process.
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.0
            .as_ref()
            .map(|c| c.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default()
    }
}
