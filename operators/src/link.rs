//! The linker: from identities to profiles, before and after each epoch.
//!
//! A keyed stage (exchanged by identity) that keeps, per identity, the profile(s) holding it,
//! fed by the stitching's `(identity, profile)` changes. Once an epoch is complete it knows
//! where each identity was before the epoch and where it is after, and says so to the profiles:
//!
//! - **successors**: under `privateGraph`, an identity that moved from profile `a` to `b` makes
//!   `b` a successor of `a` (SPEC §3: profiles sharing an identity continue each other);
//! - **marks**: a fragment's mark, anchored at one of its identities, goes to the profile that
//!   held that identity before the epoch (*before*) or holds it after (*after*); an upload's
//!   mark goes to every profile holding the identity after, and to those that held it before
//!   in case they end in this epoch (a vanished profile's last export carries the time).
//!
//! Under `none` no identity links profiles (a profile continues only itself, by its primary
//! identity), and the linker only resolves upload marks.

use rustc_hash::FxHashMap;

use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::Stream;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;

use crate::gate::EpochGate;
use crate::input::{Epoch, IdKey, Mark, ProfileKey};
use crate::plan::PolicyIdx;
use crate::view::ProfileView;

/// What the linker is told about an identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AtIdentity {
    /// The `(identity, profile)` pair's multiplicity changed by `diff`.
    Holds { profile: ProfileKey, diff: isize },
    /// A fragment anchored at this identity was written: the mark goes to its profile before
    /// (`before: true`) or after the epoch.
    Fragment { before: bool, mark: Mark },
    /// The identity was uploaded to (or removed from) an audience of `policy`.
    Upload { policy: PolicyIdx, mark: Mark },
}

/// How a mark concerns a profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// An event on a fragment the profile held before the epoch: for the profile's successors.
    Before,
    /// An event for the profile as it is after the epoch.
    After,
    /// An upload of an identity the profile held: counts only if the profile ends.
    IfGone,
}

/// What a profile is told, keyed by the profile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToProfile {
    /// The profile's view changed: the old one retracted (`-1`), the new one inserted (`+1`).
    View {
        view: std::sync::Arc<ProfileView>,
        diff: isize,
    },
    /// Profile `0` continues this one (it now holds one of this one's identities).
    Successor(ProfileKey),
    /// A mark, for every policy of the stitching (`None`) or one.
    Mark {
        role: Role,
        policy: Option<PolicyIdx>,
        mark: Mark,
    },
}

/// The profiles holding one identity, with multiplicities: one profile under `privateGraph`
/// (kept inline, as nearly every identity has one), possibly several under `none`.
#[derive(Clone, Debug)]
enum Holders {
    One(ProfileKey, isize),
    Many(Vec<(ProfileKey, isize)>),
}

impl Holders {
    fn profiles(&self) -> Vec<ProfileKey> {
        match self {
            Holders::One(p, n) if *n > 0 => vec![*p],
            Holders::One(..) => Vec::new(),
            Holders::Many(all) => all
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(p, _)| *p)
                .collect(),
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, Holders::One(_, 0)) || matches!(self, Holders::Many(all) if all.is_empty())
    }

    fn update(&mut self, profile: ProfileKey, diff: isize) {
        match self {
            Holders::One(p, n) if *p == profile || *n == 0 => {
                *n = if *p == profile { *n + diff } else { diff };
                *p = profile;
            }
            Holders::One(p, n) => *self = Holders::Many(vec![(*p, *n), (profile, diff)]),
            Holders::Many(all) => {
                match all.iter_mut().find(|(p, _)| *p == profile) {
                    Some(slot) => slot.1 += diff,
                    None => all.push((profile, diff)),
                }
                all.retain(|(_, n)| *n != 0);
            }
        }
    }
}

/// Resolves identities to profiles; `links`: whether moved identities make successors
/// (`privateGraph`).
pub fn link<'s>(
    input: Stream<'s, Epoch, Vec<(IdKey, AtIdentity, Epoch)>>,
    links: bool,
) -> Stream<'s, Epoch, Vec<(ProfileKey, ToProfile, Epoch)>> {
    input.unary_frontier::<CapacityContainerBuilder<Vec<(ProfileKey, ToProfile, Epoch)>>, _, _, _>(
        Exchange::new(|(identity, _, _): &(IdKey, AtIdentity, Epoch)| *identity),
        "Link",
        move |_initial, _info| {
            let mut gate = EpochGate::default();
            let mut index: FxHashMap<IdKey, Holders> = FxHashMap::default();
            move |(input, frontier), output| {
                input.for_each(|cap, data| {
                    gate.push_timed(cap.retain_least(0), data.drain(..), |(i, m, t)| (t, (i, m)))
                });
                while let Some((cap, messages)) = gate.next_complete(frontier) {
                    let epoch = *cap.time();
                    let mut session = output.session(&cap);
                    let mut changes: FxHashMap<IdKey, Vec<(ProfileKey, isize)>> =
                        FxHashMap::default();
                    let mut marks = Vec::new();
                    for (identity, message) in messages {
                        match message {
                            AtIdentity::Holds { profile, diff } => {
                                changes.entry(identity).or_default().push((profile, diff))
                            }
                            other => marks.push((identity, other)),
                        }
                    }
                    // Where each changed identity was before the epoch.
                    let mut before: FxHashMap<IdKey, Vec<ProfileKey>> = FxHashMap::default();
                    for (identity, deltas) in changes {
                        let holders = index.entry(identity).or_insert(Holders::One(0, 0));
                        let was: Vec<ProfileKey> = holders.profiles();
                        for (profile, diff) in deltas {
                            holders.update(profile, diff);
                        }
                        if links {
                            for &a in &was {
                                for b in holders.profiles().into_iter().filter(|b| *b != a) {
                                    session.give((a, ToProfile::Successor(b), epoch));
                                }
                            }
                        }
                        if holders.is_empty() {
                            index.remove(&identity);
                        }
                        before.insert(identity, was);
                    }
                    let now = |identity: &IdKey| -> Vec<ProfileKey> {
                        index
                            .get(identity)
                            .map(Holders::profiles)
                            .unwrap_or_default()
                    };
                    for (identity, message) in marks {
                        let was = before
                            .get(&identity)
                            .cloned()
                            .unwrap_or_else(|| now(&identity));
                        match message {
                            AtIdentity::Fragment { before: true, mark } => {
                                for p in was {
                                    session.give((
                                        p,
                                        ToProfile::Mark {
                                            role: Role::Before,
                                            policy: None,
                                            mark: mark.clone(),
                                        },
                                        epoch,
                                    ));
                                }
                            }
                            AtIdentity::Fragment {
                                before: false,
                                mark,
                            } => {
                                for p in now(&identity) {
                                    session.give((
                                        p,
                                        ToProfile::Mark {
                                            role: Role::After,
                                            policy: None,
                                            mark: mark.clone(),
                                        },
                                        epoch,
                                    ));
                                }
                            }
                            AtIdentity::Upload { policy, mark } => {
                                let is = now(&identity);
                                for &p in &is {
                                    session.give((
                                        p,
                                        ToProfile::Mark {
                                            role: Role::After,
                                            policy: Some(policy),
                                            mark: mark.clone(),
                                        },
                                        epoch,
                                    ));
                                }
                                for p in was.into_iter().filter(|p| !is.contains(p)) {
                                    session.give((
                                        p,
                                        ToProfile::Mark {
                                            role: Role::IfGone,
                                            policy: Some(policy),
                                            mark: mark.clone(),
                                        },
                                        epoch,
                                    ));
                                }
                            }
                            AtIdentity::Holds { .. } => {}
                        }
                    }
                }
                gate.release(frontier);
            }
        },
    )
}
