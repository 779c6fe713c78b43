//! The identity stage: everything the dataflow keeps per identity, in one keyed stage.
//!
//! ```text
//!  holders (stitching) ─┐                       ┌─► member changes ─► views   (crate::members)
//!  anchored fragments ──┼─exchange(identity)─► identity ─┤
//!  uploads, marks ──────┘                       └─► successors, marks ─► route (crate::link)
//! ```
//!
//! Per identity it holds an `Anchor` ([`crate::members`]): the profile(s) holding it, the fragments anchored at
//! it and the audiences it is uploaded to. Once an epoch is complete it applies the epoch's
//! changes identity by identity and says two things: to `views`, the change of each touched
//! identity's contribution `(profile, member) ± 1` ([`crate::members`]); to the profiles, the
//! successors an identity's move names and the epoch's marks, resolved against where each
//! identity was before the epoch and is after it ([`crate::link`]). One map serves both, so
//! an identity's holders are kept, and sent, once.

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::Stream;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::core::Map;
use timely::dataflow::operators::generic::Operator;

use crate::gate::EpochGate;
use crate::input::{Epoch, FragRef, IdKey, ProfileKey};
use crate::link::{MarkAt, ToProfile, resolve, successors};
use crate::members::{Anchor, MemberChange};
use crate::plan::AudienceIdx;

/// What the identity stage is told about an identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AtIdentity {
    /// The `(identity, profile)` pair's multiplicity changed by `diff` (stitching).
    Holds { profile: ProfileKey, diff: isize },
    /// A fragment version anchored at the identity, inserted (`+1`) or retracted.
    Fragment { fragment: FragRef, diff: isize },
    /// The identity's membership of an upload audience, inserted or retracted.
    Upload { audience: AudienceIdx, diff: isize },
    /// A mark, to resolve to profiles.
    Mark(MarkAt),
}

/// A message to the stage: `(identity, what, epoch)`.
pub type ToIdentity = (IdKey, AtIdentity, Epoch);
/// A message from the stage to a profile.
pub type ToProfiles = (ProfileKey, ToProfile, Epoch);

/// The stage's two outputs.
pub struct FromIdentities<'s> {
    /// `(profile, member) ± 1`, for `views`.
    pub members: Stream<'s, Epoch, Vec<MemberChange>>,
    /// Successors and marks, for `route`.
    pub to_profiles: Stream<'s, Epoch, Vec<ToProfiles>>,
}

/// One output record, before the split.
#[derive(Clone)]
enum Out {
    Member(MemberChange),
    Profile(ToProfiles),
}

/// The identity stage; `links`: whether moved identities make successors (`privateGraph`).
pub fn identities<'s>(
    input: Stream<'s, Epoch, Vec<ToIdentity>>,
    links: bool,
) -> FromIdentities<'s> {
    let out = input.unary_frontier::<CapacityContainerBuilder<Vec<Out>>, _, _, _>(
        Exchange::new(|(identity, _, _): &ToIdentity| *identity),
        "Identities",
        move |_initial, _info| {
            let mut gate = EpochGate::default();
            let mut anchors: FxHashMap<IdKey, Anchor> = FxHashMap::default();
            move |(input, frontier), output| {
                input.for_each(|cap, data| {
                    gate.push_timed(cap.retain_least(0), data.drain(..), |(i, m, t)| (t, (i, m)))
                });
                while let Some((cap, messages)) = gate.next_complete(frontier) {
                    let epoch = *cap.time();
                    let mut session = output.session(&cap);
                    let mut give = |out| session.give(out);
                    apply_epoch(&mut anchors, messages, links, epoch, &mut give);
                }
                gate.release(frontier);
            }
        },
    );
    FromIdentities {
        members: out.clone().flat_map(|o: Out| match o {
            Out::Member(m) => Some(m),
            Out::Profile(_) => None,
        }),
        to_profiles: out.flat_map(|o: Out| match o {
            Out::Profile(p) => Some(p),
            Out::Member(_) => None,
        }),
    }
}

/// One complete epoch at one worker's identities: the changes first, identity by identity
/// (member changes and successors), then the marks, against the holders before and after.
fn apply_epoch(
    anchors: &mut FxHashMap<IdKey, Anchor>,
    messages: Vec<(IdKey, AtIdentity)>,
    links: bool,
    epoch: Epoch,
    give: &mut impl FnMut(Out),
) {
    let mut changes: FxHashMap<IdKey, Vec<AtIdentity>> = FxHashMap::default();
    let mut marks = Vec::new();
    for (identity, message) in messages {
        match message {
            AtIdentity::Mark(mark) => marks.push((identity, mark)),
            change => changes.entry(identity).or_default().push(change),
        }
    }
    // Where each changed identity was before the epoch.
    let mut before: FxHashMap<IdKey, Vec<ProfileKey>> = FxHashMap::default();
    for (identity, changes) in changes {
        let anchor = anchors.entry(identity).or_default();
        let was: Vec<ProfileKey> = anchor.holders.present().copied().collect();
        let contributed = anchor.contribution();
        for change in changes {
            match change {
                AtIdentity::Holds { profile, diff } => anchor.holders.update(profile, diff),
                AtIdentity::Fragment { fragment, diff } => anchor.fragments.update(fragment, diff),
                AtIdentity::Upload { audience, diff } => anchor.upload(audience, diff),
                AtIdentity::Mark(_) => {}
            }
        }
        let contributes = anchor.contribution();
        if links {
            let now: Vec<ProfileKey> = anchor.holders.present().copied().collect();
            for (p, s) in successors(&was, &now) {
                give(Out::Profile((p, s, epoch)));
            }
        }
        if anchor.is_empty() {
            anchors.remove(&identity);
        }
        for pair in contributed.iter().filter(|m| !contributes.contains(m)) {
            give(Out::Member((pair.clone(), epoch, -1)));
        }
        for pair in contributes.into_iter().filter(|m| !contributed.contains(m)) {
            give(Out::Member((pair, epoch, 1)));
        }
        before.insert(identity, was);
    }
    for (identity, mark) in marks {
        let now: Vec<ProfileKey> = anchors
            .get(&identity)
            .map(|a| a.holders.present().copied().collect())
            .unwrap_or_default();
        let was = before.get(&identity).unwrap_or(&now);
        resolve(mark, was, &now, |p, m| give(Out::Profile((p, m, epoch))));
    }
}
