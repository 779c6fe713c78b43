//! Identity stitching: which profile each fragment belongs to, and each identity.
//!
//! `privateGraph` is incremental connected components over the identities: a fragment links the
//! identities it holds, and a profile is a component, named by its smallest identity key; a
//! fragment belongs to the component of its identities. A keyed stage holds the graph and, at
//! each epoch, relabels the components the epoch's identity-set changes touched: walking those
//! that may have split, joining by union-find those that only gained ([`graph`]). An attribute-only write changes no identity set and never reaches
//! it.
//!
//! `none` puts each fragment in the profile of its primary identity, with no arrangement at all.
//! Which fragments each profile then has is [`crate::identity`]'s business.

pub mod graph;

use differential_dataflow::{AsCollection, VecCollection};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;

pub use graph::Graph;

use crate::gate::EpochGate;
use crate::input::{Epoch, FragKey, FragRef, IdKey, ProfileKey};
use crate::meter::Meter;
use crate::plan::Stitching;
use crate::upsert::{FragmentIdentities, IdentitySet};

type Coll<'s, D> = VecCollection<'s, Epoch, D, isize>;

/// Each identity's profile(s) under `kind`: one under `privateGraph` (its component); under
/// `none`, one pair per fragment holding the identity (the fragment's primary identity), so a
/// pair's multiplicity counts those fragments.
pub fn identity_profiles<'s>(
    kind: Stitching,
    fragments: Coll<'s, (FragKey, FragRef)>,
    identities: FragmentIdentities<'s>,
    meter: &Meter,
) -> Coll<'s, (IdKey, ProfileKey)> {
    match kind {
        Stitching::None => fragments.flat_map(|(_, f): (FragKey, FragRef)| {
            let profile = f.primary().key();
            f.identities
                .iter()
                .map(|i| (i.key(), profile))
                .collect::<Vec<_>>()
        }),
        Stitching::PrivateGraph => {
            let labels = components(identities, meter);
            meter.collection("identity profiles (components output)", &labels);
            labels
        }
    }
}

/// A fragment's anchor: its first identity (a fragment holds at least one), whose profile it
/// belongs to under `privateGraph`.
pub fn anchor(f: &FragRef) -> IdKey {
    f.identities.first().map_or(0, |i| i.key())
}

/// `(identity, component)` for every identity some fragment holds: the connected components
/// of the graph in which each fragment links its identities, each named by its smallest
/// identity key (see [`graph`]).
///
/// The graph is held whole by worker 0: a component can span every worker's identities, and
/// only a change of some fragment's identity set reaches it (a new or deleted fragment, an
/// identity added or dropped), so its work is the components those changes touch. The labels
/// go back out as a collection, exchanged by identity downstream.
pub fn components<'s>(
    identities: FragmentIdentities<'s>,
    meter: &Meter,
) -> Coll<'s, (IdKey, ProfileKey)> {
    meter.collection("messages to components", &identities);
    identities
        .inner
        .unary_frontier::<CapacityContainerBuilder<Vec<_>>, _, _, _>(
            Exchange::new(|_: &((FragKey, IdentitySet), Epoch, isize)| 0),
            "Components",
            |_initial, _info| {
                let mut gate = EpochGate::default();
                let mut graph = Graph::default();
                move |(input, frontier), output| {
                    input.for_each(|cap, data| {
                        gate.push_timed(cap.retain_least(0), data.drain(..), |((_, ids), t, d)| {
                            (t, (ids, d))
                        })
                    });
                    while let Some((cap, changes)) = gate.next_complete(frontier) {
                        let epoch = *cap.time();
                        for (ids, diff) in changes {
                            graph.update(&ids, diff);
                        }
                        let mut session = output.session(&cap);
                        graph.settle(|identity, label, diff| {
                            session.give(((identity, label), epoch, diff))
                        });
                    }
                    gate.release(frontier);
                }
            },
        )
        .as_collection()
}
