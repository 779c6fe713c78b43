//! The fragment upsert: each epoch's last write of every fragment replaces its previous version.
//!
//! A keyed stage (exchanged by fragment key) holding each fragment's current version. It turns
//! the writes into the differential changes of the fragments collection (old version retracted,
//! new inserted) and, because it is the one place that sees both versions, it completes each
//! write's [`Mark`] with the mapped paths the old version held (an upsert or delete that removes
//! a mapped value is a change, SPEC §3 trigger 3) and says where the mark must go: to the
//! profile that held the old version (*before* the epoch) and to the one that holds the new
//! version (*after*). Both are named by an [`Anchor`]: stitching `privateGraph` resolves a
//! profile from an identity, `none` names it by the primary identity.

use std::sync::Arc;

use rustc_hash::FxHashMap;

use differential_dataflow::{AsCollection, VecCollection};
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::Stream;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::core::Map;
use timely::dataflow::operators::generic::Operator;

use crate::gate::EpochGate;
use crate::input::{Epoch, FragKey, FragRef, Fragment, FragmentWrite, IdKey, Mark};
use crate::plan::Plans;

/// Where a fragment version sits in the identity graph: one of its identities (its profile
/// under `privateGraph`) and its primary identity (its profile under `none`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Anchor {
    pub identity: IdKey,
    pub primary: IdKey,
}

impl Anchor {
    pub fn of(fragment: &Fragment) -> Anchor {
        Anchor {
            // Never empty: a fragment holds at least one identity.
            identity: fragment.identities.first().map_or(0, |i| i.key()),
            primary: fragment.primary().key(),
        }
    }
}

/// The mark of one epoch's writes to one fragment, with the versions' anchors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FragmentMark {
    /// The version before the epoch, if there was one.
    pub before: Option<Anchor>,
    /// The version after the epoch, unless it was deleted.
    pub after: Option<Anchor>,
    pub mark: Mark,
}

/// A fragment's identity keys, in the order of its identities (the first is its anchor).
pub type IdentitySet = Arc<[IdKey]>;

/// One of the upsert's three outputs.
#[derive(Clone)]
enum Out {
    Fragment(((FragKey, FragRef), Epoch, isize)),
    Identities(((FragKey, IdentitySet), Epoch, isize)),
    Mark((FragmentMark, Epoch)),
}

/// The fragments collection: each fragment's current version.
pub type Fragments<'s> = VecCollection<'s, Epoch, (FragKey, FragRef), isize>;
/// Each fragment's identity keys: changes only when a write changes the identities, so an
/// attribute-only write never reaches the identity graph.
pub type FragmentIdentities<'s> = VecCollection<'s, Epoch, (FragKey, IdentitySet), isize>;
/// Each epoch's fragment marks, with their epochs.
pub type FragmentMarks<'s> = Stream<'s, Epoch, Vec<(FragmentMark, Epoch)>>;

/// The upsert's outputs.
pub struct Upserted<'s> {
    pub fragments: Fragments<'s>,
    pub identities: FragmentIdentities<'s>,
    pub marks: FragmentMarks<'s>,
}

fn identity_set(fragment: &Fragment) -> IdentitySet {
    fragment.identities.iter().map(|i| i.key()).collect()
}

/// Applies the writes. The old version's mapped paths are those of the plan of the epoch
/// (under a dynamic plan, paths may have become mapped since it was written).
pub fn upsert<'s>(
    writes: Stream<'s, Epoch, Vec<(FragKey, FragmentWrite)>>,
    plans: Plans,
) -> Upserted<'s> {
    let all = writes.unary_frontier::<CapacityContainerBuilder<Vec<Out>>, _, _, _>(
        Exchange::new(|(key, _): &(FragKey, FragmentWrite)| *key),
        "Upsert",
        move |_initial, _info| {
            let mut gate = EpochGate::default();
            let mut versions: FxHashMap<FragKey, Arc<Fragment>> = Default::default();
            move |(input, frontier), output| {
                input.for_each(|cap, data| gate.push(cap.retain_least(0), data));
                while let Some((cap, writes)) = gate.next_complete(frontier) {
                    let epoch = *cap.time();
                    let plan = plans.at(epoch);
                    let mut session = output.session(&cap);
                    for (key, write) in writes {
                        let old = match &write.value {
                            Some(new) => versions.insert(key, new.clone()),
                            None => versions.remove(&key),
                        };
                        let mut mark = write.mark;
                        let same_identities = matches!((&old, &write.value),
                            (Some(o), Some(n)) if o.identities == n.identities);
                        if let Some(old) = &old {
                            mark.add_paths(&old.mapped(&plan));
                            session.give(Out::Fragment(((key, FragRef(old.clone())), epoch, -1)));
                            if !same_identities {
                                session.give(Out::Identities((
                                    (key, identity_set(old)),
                                    epoch,
                                    -1,
                                )));
                            }
                        }
                        if let Some(new) = &write.value {
                            session.give(Out::Fragment(((key, FragRef(new.clone())), epoch, 1)));
                            if !same_identities {
                                session.give(Out::Identities(((key, identity_set(new)), epoch, 1)));
                            }
                        }
                        let mark = FragmentMark {
                            before: old.as_deref().map(Anchor::of),
                            after: write.value.as_deref().map(Anchor::of),
                            mark,
                        };
                        session.give(Out::Mark((mark, epoch)));
                    }
                }
                gate.release(frontier);
            }
        },
    );
    Upserted {
        fragments: all
            .clone()
            .flat_map(|x: Out| match x {
                Out::Fragment(u) => Some(u),
                _ => None,
            })
            .as_collection(),
        identities: all
            .clone()
            .flat_map(|x: Out| match x {
                Out::Identities(u) => Some(u),
                _ => None,
            })
            .as_collection(),
        marks: all.flat_map(|x: Out| match x {
            Out::Mark(m) => Some(m),
            _ => None,
        }),
    }
}
