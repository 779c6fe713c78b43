//! The whole dataflow, one stage a function:
//!
//! ```text
//!                 ┌─ identity sets ─► components (worker 0) ────► (identity, profile) ──┬──────┐
//! fragment ─► upsert ─ fragments ────────────────────────────────────────┐                │      │
//! writes        └─ marks ──────────────────────────────────────────┐     ▼                ▼      │
//!                                                                  │   members ◄── uploads       │
//! upload writes ─► uploads (upsert) ───────────────────────────────┼────┘ (by identity)   │      │
//!       └─ marks ──────────────────────────────────────────────┐   │     │ (profile, member)     │
//!                                                              ▼   ▼     ▼                       │
//!                                                              link ◄────┼───────────────────────┘
//!                                                   (identities before/after: successors, marks)
//!                                                                │     views (by profile)
//!                                                                ▼       │
//!                                              route ◄── marks, successors, view changes
//!                                                │  (records of t - 1: hand-over, tombstones)
//!                                                ▼
//!                                              decide ─► candidates ─► sink
//! ```
//!
//! Time is the epoch. Differential keeps the upload memberships (an upsert arrangement);
//! everything else is hand-written, epoch at a time, on keyed state (`components` on worker 0,
//! which only identity-set changes reach; `members` and `link` by identity; `views`, `route`
//! and `decide` by profile): the identity graph, which fragments each profile has, its view,
//! where identities were, the previous epoch's statuses, and the epoch's events (marks), which
//! travel as messages. An attribute-only write updates no arrangement at all: it moves a
//! fragment version through `upsert`, `members` and `views`, and its mark through `link` and
//! `route` (`cargo bench --bench dataflow -- --count` tabulates it).

use differential_dataflow::VecCollection;
use differential_dataflow::operators::arrange::upsert::arrange_from_upsert;
use differential_dataflow::trace::implementations::{ValBuilder, ValSpine};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::core::Map;
use timely::dataflow::operators::core::input::{Handle, Input as _};
use timely::dataflow::operators::{Concat, Concatenate};
use timely::dataflow::{Scope, Stream};

use crate::history::{Decided, Seed, history};
use crate::input::{
    Epoch, EpochInput, FragKey, FragRef, FragmentWrite, IdKey, ProfileKey, UploadWrite,
};
use crate::link::{AtIdentity, Role, ToProfile, link};
use crate::members::{AtAnchor, MemberChange, members};
use crate::meter::Meter;
use crate::plan::{AudienceIdx, Plans, Stitching};
use crate::stitch::{anchor, identity_profiles};
use crate::upsert::{FragmentIdentities, FragmentMark, Upserted, upsert};
use crate::view::{Member, views};

type Coll<'s, D> = VecCollection<'s, Epoch, D, isize>;
/// Each epoch's export candidates, and the records handed out at snapshot epochs.
pub type Decisions<'s> = Stream<'s, Epoch, Vec<Decided>>;
type UploadRecord = ((AudienceIdx, IdKey), UploadWrite, Epoch);

/// The handles a worker pushes its share of each epoch into.
pub struct Inputs {
    fragments: Handle<Epoch, CapacityContainerBuilder<Vec<(FragKey, FragmentWrite)>>>,
    uploads: Handle<Epoch, CapacityContainerBuilder<Vec<UploadRecord>>>,
    /// Only under a dynamic plan (the service restores snapshots).
    seeds: Option<Handle<Epoch, CapacityContainerBuilder<Vec<Seed>>>>,
}

impl Inputs {
    /// Pushes this worker's share of `epoch` and closes the epoch on every input.
    ///
    /// Epochs must be pushed in increasing order; an epoch with no data is pushed as empty, so
    /// that every input advances.
    pub fn push(&mut self, epoch: Epoch, data: EpochInput) {
        debug_assert!(epoch >= *self.fragments.time());
        self.advance_to(epoch);
        for write in data.fragments {
            self.fragments.send(write);
        }
        for (key, write) in data.uploads {
            self.uploads.send((key, write, epoch));
        }
        if let Some(handle) = self.seeds.as_mut() {
            for seed in data.seeds {
                handle.send(seed);
            }
        }
        self.advance_to(epoch + 1);
    }

    fn advance_to(&mut self, epoch: Epoch) {
        if *self.fragments.time() < epoch {
            self.fragments.advance_to(epoch);
            self.uploads.advance_to(epoch);
            if let Some(handle) = self.seeds.as_mut() {
                handle.advance_to(epoch);
            }
        }
    }

    /// The first epoch not yet closed.
    pub fn time(&self) -> Epoch {
        *self.fragments.time()
    }
}

/// Builds the dataflow in `scope`. Returns the input handles and the decisions: the export
/// candidates of each epoch and the records handed out at snapshot epochs (see
/// [`crate::sink`]). `meter` counts each stage's updates when it is on. The
/// dataflow's shape follows the first plan (every branch, when it is dynamic); each stage
/// reads the plan in force at the epoch it acts on.
pub fn build<'s>(scope: Scope<'s, Epoch>, plans: Plans, meter: &Meter) -> (Inputs, Decisions<'s>) {
    let plan = plans.at(0);
    let (fragment_handle, fragment_writes) = scope.new_input::<Vec<(FragKey, FragmentWrite)>>();
    let (upload_handle, upload_writes) = scope.new_input::<Vec<UploadRecord>>();
    let (seed_handle, seeds) = match plan.dynamic {
        true => {
            let (handle, stream) = scope.new_input::<Vec<Seed>>();
            (Some(handle), Some(stream))
        }
        false => (None, None),
    };

    let Upserted {
        fragments,
        identities,
        marks: fragment_marks,
    } = upsert(fragment_writes, plans.clone());
    meter.collection("upsert output (not arranged)", &fragments);
    meter.stream("fragment marks", &fragment_marks);
    let uploads = uploads(upload_writes.clone());

    let decisions: Vec<_> = plan
        .stitchings()
        .into_iter()
        .map(|kind| {
            profiles(
                &plans,
                kind,
                meter,
                Sources {
                    fragments: fragments.clone(),
                    identities: identities.clone(),
                    fragment_marks: fragment_marks.clone(),
                    uploads: uploads.clone(),
                    upload_writes: upload_writes.clone(),
                    seeds: seeds.clone(),
                },
            )
        })
        .collect();
    let inputs = Inputs {
        fragments: fragment_handle,
        uploads: upload_handle,
        seeds: seed_handle,
    };
    (inputs, scope.concatenate(decisions))
}

/// What every stitching reads.
struct Sources<'s> {
    fragments: Coll<'s, (FragKey, FragRef)>,
    identities: FragmentIdentities<'s>,
    fragment_marks: Stream<'s, Epoch, Vec<(FragmentMark, Epoch)>>,
    uploads: Coll<'s, (IdKey, AudienceIdx)>,
    upload_writes: Stream<'s, Epoch, Vec<UploadRecord>>,
    seeds: Option<Stream<'s, Epoch, Vec<Seed>>>,
}

/// The upload memberships, `(identity, audience)`, from their upserts.
fn uploads<'s>(writes: Stream<'s, Epoch, Vec<UploadRecord>>) -> Coll<'s, (IdKey, AudienceIdx)> {
    let upserts = writes.map(|((audience, identity), write, epoch): UploadRecord| {
        ((identity, audience), write.member.then_some(()), epoch)
    });
    arrange_from_upsert::<
        ValBuilder<(IdKey, AudienceIdx), (), Epoch, isize>,
        ValSpine<(IdKey, AudienceIdx), (), Epoch, isize>,
        (IdKey, AudienceIdx),
        (),
    >(upserts, "Uploads")
    .as_collection(|key, _| *key)
}

/// The decisions about the profiles of one stitching.
fn profiles<'s>(
    plans: &Plans,
    kind: Stitching,
    meter: &Meter,
    sources: Sources<'s>,
) -> Decisions<'s> {
    let plan = plans.at(0);
    let holders = identity_profiles(kind, sources.fragments.clone(), sources.identities, meter);
    let member_changes = profile_members(
        plans,
        kind,
        &sources.fragments,
        &holders,
        sources.uploads,
        meter,
    );
    meter.stream("messages to views (member changes)", &member_changes);
    let views = views(plans.clone(), kind, member_changes);
    meter.stream("messages to route: view changes", &views);
    let views =
        views.map(|(profile, view, epoch, diff)| (profile, ToProfile::View { view, diff }, epoch));

    let scope = views.scope();
    let mut to_profiles = vec![views];
    let mut at_identities = Vec::new();
    match route_fragment_marks(kind, sources.fragment_marks) {
        MarksTo::Link(marks) => at_identities.push(marks),
        MarksTo::Route(marks) => to_profiles.push(marks),
    }
    if kind == Stitching::PrivateGraph || plan.has_uploads(kind) {
        at_identities.push(holders.inner.map(|((identity, profile), epoch, diff)| {
            (identity, AtIdentity::Holds { profile, diff }, epoch)
        }));
        at_identities.push(upload_marks(plans, kind, sources.upload_writes));
        let at_identities = scope.concatenate(at_identities);
        meter.stream("messages to link", &at_identities);
        to_profiles.push(link(at_identities, kind == Stitching::PrivateGraph));
    }
    let to_profiles = scope.concatenate(to_profiles);
    meter.stream("messages to route", &to_profiles);
    history(plans.clone(), kind, to_profiles, sources.seeds)
}

/// `(profile, member) ± 1`: each profile's fragments and upload memberships. Under
/// `privateGraph` a fragment follows its anchor identity's component and an upload every
/// profile holding the identity, both kept by [`members`]; under `none` a fragment goes to its
/// primary identity's profile directly.
fn profile_members<'s>(
    plans: &Plans,
    kind: Stitching,
    fragments: &Coll<'s, (FragKey, FragRef)>,
    holders: &Coll<'s, (IdKey, ProfileKey)>,
    uploads: Coll<'s, (IdKey, AudienceIdx)>,
    meter: &Meter,
) -> Stream<'s, Epoch, Vec<MemberChange>> {
    let mut at_anchors = holders
        .inner
        .clone()
        .map(|((identity, profile), epoch, diff)| {
            (identity, AtAnchor::Holder(profile), epoch, diff)
        });
    let plan = plans.at(0);
    if plan.has_uploads(kind) {
        let plans = plans.clone();
        at_anchors = at_anchors.concat(uploads.inner.flat_map(
            move |((identity, audience), epoch, diff)| {
                let plan = plans.at(epoch);
                let policy = plan.audiences[audience as usize].policy;
                (plan.policies[policy as usize].stitching == kind).then_some((
                    identity,
                    AtAnchor::Upload(audience),
                    epoch,
                    diff,
                ))
            },
        ));
    }
    match kind {
        Stitching::PrivateGraph => {
            let anchored = fragments
                .inner
                .clone()
                .map(|((_, f), epoch, diff)| (anchor(&f), AtAnchor::Fragment(f), epoch, diff));
            let at_anchors = at_anchors.concat(anchored);
            meter.stream("messages to members", &at_anchors);
            members(at_anchors)
        }
        Stitching::None => {
            let direct = fragments.inner.clone().map(
                |((_, f), epoch, diff): ((FragKey, FragRef), Epoch, isize)| {
                    ((f.primary().key(), Member::Fragment(f)), epoch, diff)
                },
            );
            if plan.has_uploads(kind) {
                direct.concat(members(at_anchors))
            } else {
                direct
            }
        }
    }
}

type ToLinker<'s> = Stream<'s, Epoch, Vec<(IdKey, AtIdentity, Epoch)>>;
type ToProfiles<'s> = Stream<'s, Epoch, Vec<(ProfileKey, ToProfile, Epoch)>>;

/// Where a stitching's fragment marks go.
enum MarksTo<'s> {
    Link(ToLinker<'s>),
    Route(ToProfiles<'s>),
}

/// Fragment marks, to the profile before and after the epoch: through the linker (an
/// identity names the profile under `privateGraph`), or straight to the primary identity's
/// profile (`none`).
fn route_fragment_marks<'s>(
    kind: Stitching,
    marks: Stream<'s, Epoch, Vec<(FragmentMark, Epoch)>>,
) -> MarksTo<'s> {
    match kind {
        Stitching::PrivateGraph => {
            MarksTo::Link(marks.flat_map(|(m, epoch): (FragmentMark, Epoch)| {
                let at = |identity: IdKey, before| {
                    let mark = AtIdentity::Fragment {
                        before,
                        mark: m.mark.clone(),
                    };
                    (identity, mark, epoch)
                };
                let before = m.before.map(|a| at(a.identity, true));
                let after = m.after.map(|a| at(a.identity, false));
                before.into_iter().chain(after)
            }))
        }
        Stitching::None => MarksTo::Route(marks.flat_map(|(m, epoch): (FragmentMark, Epoch)| {
            let to = |profile: ProfileKey, role| {
                let mark = ToProfile::Mark {
                    role,
                    policy: None,
                    mark: m.mark.clone(),
                };
                (profile, mark, epoch)
            };
            let before = m.before.map(|a| to(a.primary, Role::Before));
            let after = m.after.map(|a| to(a.primary, Role::After));
            before.into_iter().chain(after)
        })),
    }
}

/// Upload marks of the audiences of `kind`'s policies, to the linker.
fn upload_marks<'s>(
    plans: &Plans,
    kind: Stitching,
    writes: Stream<'s, Epoch, Vec<UploadRecord>>,
) -> ToLinker<'s> {
    let plans = plans.clone();
    writes.flat_map(move |((audience, identity), write, epoch): UploadRecord| {
        let plan = plans.at(epoch);
        let policy = plan.audiences[audience as usize].policy;
        (plan.policies[policy as usize].stitching == kind).then(|| {
            let mark = AtIdentity::Upload {
                policy,
                mark: write.mark,
            };
            (identity, mark, epoch)
        })
    })
}
