//! Members: which fragments and upload memberships each profile has, kept by identity.
//!
//! A keyed stage (exchanged by identity) that holds, per identity, the profile(s) holding it
//! (from stitching), the fragments anchored at it (`privateGraph`: a fragment lies in its
//! anchor identity's component) and the audiences it is uploaded to. Once an epoch is complete
//! it emits the change of each touched identity's contribution, `(profile, member) ± 1`:
//! a fragment moves with its anchor's profile when stitching relabels a component, and an
//! upload counts for every profile holding the identity.
//!
//! This is the join of the fragments, the uploads and the identity profiles, kept as keyed
//! state rather than arrangements: an attribute-only write costs one retraction and one
//! insertion here and nothing in any arrangement.

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::Stream;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;

use crate::gate::EpochGate;
use crate::input::{Epoch, FragRef, IdKey, ProfileKey};
use crate::plan::AudienceIdx;
use crate::view::Member;

/// A change at an identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AtAnchor {
    /// The identity is held by `profile` (multiplicity change).
    Holder(ProfileKey),
    /// A fragment anchored at the identity.
    Fragment(FragRef),
    /// The identity is uploaded to the audience.
    Upload(AudienceIdx),
}

/// A small multiset of `(value, count)`, with the one-value case (nearly every identity: one
/// profile, one anchored fragment) kept inline.
#[derive(Clone, Debug, Default)]
pub(crate) enum Counts<T> {
    #[default]
    Empty,
    One(T, isize),
    Many(Vec<(T, isize)>),
}

impl<T: PartialEq + Clone> Counts<T> {
    pub(crate) fn update(&mut self, value: T, diff: isize) {
        match self {
            Counts::Empty => *self = Counts::One(value, diff),
            Counts::One(v, n) if *v == value => {
                *n += diff;
                if *n == 0 {
                    *self = Counts::Empty;
                }
            }
            Counts::One(v, n) => *self = Counts::Many(vec![(v.clone(), *n), (value, diff)]),
            Counts::Many(all) => {
                match all.iter_mut().find(|(v, _)| *v == value) {
                    Some(slot) => slot.1 += diff,
                    None => all.push((value, diff)),
                }
                all.retain(|(_, n)| *n != 0);
                if all.is_empty() {
                    *self = Counts::Empty;
                }
            }
        }
    }

    pub(crate) fn present(&self) -> impl Iterator<Item = &T> {
        let (one, many) = match self {
            Counts::Empty => (None, &[][..]),
            Counts::One(v, n) => ((*n > 0).then_some(v), &[][..]),
            Counts::Many(all) => (None, all.as_slice()),
        };
        one.into_iter()
            .chain(many.iter().filter(|(_, n)| *n > 0).map(|(v, _)| v))
    }

    pub(crate) fn is_empty(&self) -> bool {
        matches!(self, Counts::Empty)
    }
}

/// What one identity holds.
#[derive(Clone, Debug)]
struct Anchor {
    holders: Counts<ProfileKey>,
    fragments: Counts<FragRef>,
    uploads: Counts<AudienceIdx>,
}

impl Anchor {
    fn new() -> Anchor {
        Anchor {
            holders: Counts::Empty,
            fragments: Counts::Empty,
            uploads: Counts::Empty,
        }
    }

    fn is_empty(&self) -> bool {
        self.holders.is_empty() && self.fragments.is_empty() && self.uploads.is_empty()
    }

    /// The `(profile, member)` pairs this identity contributes.
    fn contribution(&self) -> Vec<(ProfileKey, Member)> {
        let members: Vec<Member> = self
            .fragments
            .present()
            .cloned()
            .map(Member::Fragment)
            .chain(self.uploads.present().map(|a| Member::Upload(*a)))
            .collect();
        self.holders
            .present()
            .flat_map(|p| members.iter().map(move |m| (*p, m.clone())))
            .collect()
    }
}

pub type MemberChange = ((ProfileKey, Member), Epoch, isize);

/// The members' changes, from the changes at identities.
pub fn members<'s>(
    at_identities: Stream<'s, Epoch, Vec<(IdKey, AtAnchor, Epoch, isize)>>,
) -> Stream<'s, Epoch, Vec<MemberChange>> {
    at_identities.unary_frontier::<CapacityContainerBuilder<Vec<MemberChange>>, _, _, _>(
        Exchange::new(|(identity, _, _, _): &(IdKey, AtAnchor, Epoch, isize)| *identity),
        "Members",
        |_initial, _info| {
            let mut gate = EpochGate::default();
            let mut anchors: FxHashMap<IdKey, Anchor> = FxHashMap::default();
            move |(input, frontier), output| {
                input.for_each(|cap, data| {
                    gate.push_timed(cap.retain_least(0), data.drain(..), |(i, c, t, d)| {
                        (t, (i, c, d))
                    })
                });
                while let Some((cap, changes)) = gate.next_complete(frontier) {
                    let epoch = *cap.time();
                    let mut by_identity: FxHashMap<IdKey, Vec<(AtAnchor, isize)>> =
                        FxHashMap::default();
                    for (identity, change, diff) in changes {
                        by_identity
                            .entry(identity)
                            .or_default()
                            .push((change, diff));
                    }
                    let mut session = output.session(&cap);
                    for (identity, changes) in by_identity {
                        let anchor = anchors.entry(identity).or_insert_with(Anchor::new);
                        let before = anchor.contribution();
                        for (change, diff) in changes {
                            match change {
                                AtAnchor::Holder(p) => anchor.holders.update(p, diff),
                                AtAnchor::Fragment(f) => anchor.fragments.update(f, diff),
                                AtAnchor::Upload(a) => anchor.uploads.update(a, diff),
                            }
                        }
                        let after = anchor.contribution();
                        if anchor.is_empty() {
                            anchors.remove(&identity);
                        }
                        for pair in before.iter().filter(|m| !after.contains(m)) {
                            session.give((pair.clone(), epoch, -1));
                        }
                        for pair in after.into_iter().filter(|m| !before.contains(m)) {
                            session.give((pair, epoch, 1));
                        }
                    }
                }
                gate.release(frontier);
            }
        },
    )
}
