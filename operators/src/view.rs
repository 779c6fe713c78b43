//! Profile views: a profile's fragments (and upload memberships) become one compact
//! [`ProfileView`]: its identities, and per merge policy its merged mapped attributes and the
//! audiences it qualifies for.
//!
//! The view is all of a profile's *current* state that the exports read; history (statuses and
//! `lastQualificationTime`) is kept downstream, in [`crate::history`]. The view keeps only the
//! mapped paths, so a write of an unmapped attribute that changes no audience leaves the view
//! as it was and costs nothing past this stage.

use std::collections::BTreeSet;
use std::sync::Arc;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::Stream;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;

use crate::gate::EpochGate;
use crate::members::{Counts, MemberChange};

use crate::input::{Epoch, FragRef, Identity, ProfileKey};
use crate::leaf::{Leaf, Path, path_selects};
use crate::merge::merge;
use crate::plan::{AudienceIdx, AudienceKind, Plan, Plans, Stitching};

/// One value of a profile's group in the view `reduce`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Member {
    Fragment(FragRef),
    /// One of the profile's identities is uploaded to this audience.
    Upload(AudienceIdx),
}

/// A profile as one merge policy sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PolicyView {
    /// Merged leaves of the mapped paths only, sorted by path.
    pub leaves: Box<[(Path, Leaf)]>,
    /// Audiences of the policy the profile qualifies for, sorted.
    pub qualified: Box<[AudienceIdx]>,
}

/// A profile at the end of an epoch, for every policy of its stitching.
///
/// Every profile's view is held until its next change, so it is held in exact-size slices.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProfileView {
    /// Sorted, deduplicated, never empty.
    pub identities: Box<[Identity]>,
    /// Index in `identities` of the profile's name: the smallest identity (`privateGraph`) or
    /// the primary identity (`none`).
    pub name: usize,
    /// One per policy of the stitching, in [`Plan::policies_of`] order.
    pub policies: Box<[PolicyView]>,
}

impl ProfileView {
    /// The identity that names the profile.
    pub fn name(&self) -> &Identity {
        &self.identities[self.name.min(self.identities.len().saturating_sub(1))]
    }
}

/// Builds the view of a profile from its members; `None` for a group with no fragment (an
/// upload alone makes no profile).
pub fn assemble<'a>(
    plan: &Plan,
    kind: Stitching,
    members: impl Iterator<Item = &'a Member> + Clone,
) -> Option<ProfileView> {
    let fragments = members.clone().filter_map(|m| match m {
        Member::Fragment(f) => Some(&**f),
        Member::Upload(_) => None,
    });
    let primary = fragments.clone().next()?.primary().clone();
    let uploaded: BTreeSet<AudienceIdx> = members
        .filter_map(|m| match m {
            Member::Upload(a) => Some(*a),
            Member::Fragment(_) => None,
        })
        .collect();

    let mut identities: Vec<Identity> = fragments
        .clone()
        .flat_map(|f| f.identities.iter().cloned())
        .collect();
    identities.sort();
    identities.dedup();
    let name = match kind {
        Stitching::PrivateGraph => 0,
        Stitching::None => identities.binary_search(&primary).unwrap_or(0),
    };

    let is_mapped = |p: &str| plan.mapped_paths.iter().any(|m| path_selects(m, p));
    let policies = plan
        .policies_of(kind)
        .map(|policy| {
            if plan.policies[policy as usize].removed {
                return PolicyView {
                    leaves: Box::default(),
                    qualified: Box::default(),
                };
            }
            let rule_paths = &plan.rule_paths[policy as usize];
            let merged = merge(
                &plan.policies[policy as usize].merge,
                fragments.clone(),
                |p| is_mapped(p) || rule_paths.iter().any(|r| path_selects(r, p)),
            );
            let qualified: Box<[AudienceIdx]> = plan
                .audiences_of(policy)
                .filter(|(idx, a)| match &a.kind {
                    AudienceKind::Rule(rule) => rule.eval(&merged),
                    AudienceKind::Upload => uploaded.contains(idx),
                })
                .map(|(idx, _)| idx)
                .collect();
            let leaves = merged.into_iter().filter(|(p, _)| is_mapped(p)).collect();
            PolicyView { leaves, qualified }
        })
        .collect();
    Some(ProfileView {
        identities: identities.into_boxed_slice(),
        name,
        policies,
    })
}

/// A view's change: `(profile, view, epoch, ±1)`.
pub type ViewChange = (ProfileKey, Arc<ProfileView>, Epoch, isize);

/// The view of every profile of `kind`: a keyed stage (exchanged by profile) that holds each
/// profile's members and view, and once an epoch is complete recomputes the view of every
/// profile whose members changed, emitting the old view retracted and the new one inserted
/// when they differ. At a control epoch (the plan changed) it recomputes every profile's view.
pub fn views<'s>(
    plans: Plans,
    kind: Stitching,
    members: Stream<'s, Epoch, Vec<MemberChange>>,
) -> Stream<'s, Epoch, Vec<ViewChange>> {
    #[derive(Default)]
    struct Profile {
        members: Counts<Member>,
        view: Option<Arc<ProfileView>>,
    }
    members.unary_frontier::<CapacityContainerBuilder<Vec<ViewChange>>, _, _, _>(
        Exchange::new(|((profile, _), _, _): &MemberChange| *profile),
        "View",
        move |initial, _info| {
            let mut gate = control_gate(&plans, initial);
            let mut profiles: FxHashMap<ProfileKey, Profile> = FxHashMap::default();
            move |(input, frontier), output| {
                input.for_each(|cap, data| {
                    gate.push_timed(cap.retain_least(0), data.drain(..), |((p, m), t, d)| {
                        (t, (p, m, d))
                    })
                });
                touch_control_epochs(&plans, &mut gate, frontier);
                while let Some((cap, changes)) = gate.next_complete(frontier) {
                    let epoch = *cap.time();
                    let plan = plans.at(epoch);
                    let mut touched = Vec::new();
                    if plans.is_control(epoch) && plan.change.as_ref().is_some_and(|c| c.reevaluate)
                    {
                        touched.extend(profiles.keys().copied());
                    }
                    for (profile, member, diff) in changes {
                        let state = profiles.entry(profile).or_default();
                        state.members.update(member, diff);
                        touched.push(profile);
                    }
                    touched.sort_unstable();
                    touched.dedup();
                    let mut session = output.session(&cap);
                    for profile in touched {
                        let Some(state) = profiles.get_mut(&profile) else {
                            continue;
                        };
                        let view = assemble(&plan, kind, state.members.present()).map(Arc::new);
                        if view != state.view {
                            if let Some(old) = state.view.take() {
                                session.give((profile, old, epoch, -1));
                            }
                            if let Some(new) = &view {
                                session.give((profile, new.clone(), epoch, 1));
                            }
                            state.view = view;
                        }
                        if state.members.is_empty() {
                            profiles.remove(&profile);
                        }
                    }
                }
                gate.release(frontier);
            }
        },
    )
}

/// The gate of a stage that acts on every control epoch: standing when the plan may change.
pub fn control_gate<D>(
    plans: &Plans,
    initial: timely::dataflow::operators::Capability<Epoch>,
) -> EpochGate<D> {
    if plans.dynamic() {
        EpochGate::standing(initial)
    } else {
        EpochGate::default()
    }
}

/// Makes the control epochs the input frontier has passed pending in `gate`.
pub fn touch_control_epochs<D>(
    plans: &Plans,
    gate: &mut EpochGate<D>,
    frontier: &timely::progress::frontier::MutableAntichain<Epoch>,
) {
    if let Some(from) = gate.standing_at() {
        let to = frontier
            .frontier()
            .iter()
            .min()
            .copied()
            .unwrap_or(Epoch::MAX);
        for epoch in plans.control_epochs(from, to) {
            gate.touch(epoch);
        }
    }
}
