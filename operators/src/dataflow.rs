//! The whole dataflow, one stage a function:
//!
//! ```text
//!                 ┌─ identity sets ─► components (worker 0) ─► (identity, profile) ─┐
//! fragment ─► upsert ─ fragments, at their anchor identities ──────────────────────┤
//! writes        └─ marks, at the anchors before and after ─────────────────────────┤
//!                                                                                  ▼
//! upload writes ─► uploads (upsert) ─ memberships ─────────────────────► identities (by identity)
//!       └─ marks ──────────────────────────────────────────────────────►    │           │
//!                                                        (profile, member) ± 1   successors, marks
//!                                                                           ▼           │
//!                                                               views (by profile)      │
//!                                                                           │ views     │
//!                                                                           ▼           ▼
//!                                                                     route (records of t - 1:
//!                                                                       │  hand-over, tombstones)
//!                                                                       ▼
//!                                                                     decide ─► candidates ─► sink
//! ```
//!
//! Time is the epoch. Differential keeps the upload memberships (an upsert arrangement);
//! everything else is hand-written, epoch at a time, on keyed state (`components` on worker 0,
//! which only identity-set changes reach; `identities` by identity; `views`, `route` and
//! `decide` by profile): the identity graph, which fragments each profile has, its view,
//! where identities were, the previous epoch's statuses, and the epoch's events (marks), which
//! travel as messages. An attribute-only write updates no arrangement at all: it moves a
//! fragment version through `upsert`, `identities` and `views`, and its mark through
//! `identities` and `route` (`cargo bench --bench dataflow -- --count` tabulates it).

use differential_dataflow::VecCollection;
use differential_dataflow::operators::arrange::upsert::arrange_from_upsert;
use differential_dataflow::trace::implementations::{ValBuilder, ValSpine};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::Concatenate;
use timely::dataflow::operators::core::Map;
use timely::dataflow::operators::core::input::{Handle, Input as _};
use timely::dataflow::{Scope, Stream};

use crate::history::{Decided, Seed, history};
use crate::identity::{AtIdentity, ToIdentity, ToProfiles, identities};
use crate::input::{
    Epoch, EpochInput, FragKey, FragRef, FragmentWrite, IdKey, ProfileKey, UploadWrite,
};
use crate::link::{MarkAt, Role, ToProfile};
use crate::members::MemberChange;
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
    let scope = sources.fragment_marks.scope();
    let mut member_changes = Vec::new();
    let mut to_profiles = Vec::new();
    if kind == Stitching::None {
        let (members, marks) =
            by_primary_identity(&sources.fragments, sources.fragment_marks.clone());
        member_changes.push(members);
        to_profiles.push(marks);
    }
    if kind == Stitching::PrivateGraph || plan.has_uploads(kind) {
        let holders = identity_profiles(
            kind,
            sources.fragments.clone(),
            sources.identities.clone(),
            meter,
        );
        let at_identities = to_identities(plans, kind, &sources, holders);
        meter.stream("messages to identities", &at_identities);
        let out = identities(at_identities, kind == Stitching::PrivateGraph);
        member_changes.push(out.members);
        to_profiles.push(out.to_profiles);
    }
    let member_changes = scope.concatenate(member_changes);
    meter.stream("messages to views (member changes)", &member_changes);
    let views = views(plans.clone(), kind, member_changes);
    meter.stream("messages to route: view changes", &views);
    to_profiles.push(
        views.map(|(profile, view, epoch, diff)| (profile, ToProfile::View { view, diff }, epoch)),
    );
    let to_profiles = scope.concatenate(to_profiles);
    meter.stream("messages to route", &to_profiles);
    history(plans.clone(), kind, to_profiles, sources.seeds)
}

/// Under `none`, a fragment and its marks go straight to its primary identity's profile.
fn by_primary_identity<'s>(
    fragments: &Coll<'s, (FragKey, FragRef)>,
    marks: Stream<'s, Epoch, Vec<(FragmentMark, Epoch)>>,
) -> (
    Stream<'s, Epoch, Vec<MemberChange>>,
    Stream<'s, Epoch, Vec<ToProfiles>>,
) {
    let members = fragments.inner.clone().map(
        |((_, f), epoch, diff): ((FragKey, FragRef), Epoch, isize)| {
            ((f.primary().key(), Member::Fragment(f)), epoch, diff)
        },
    );
    let marks = marks.flat_map(|(m, epoch): (FragmentMark, Epoch)| {
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
    });
    (members, marks)
}

/// What the identity stage of `kind` is told: the stitching's holders; under `privateGraph`
/// each fragment at its anchor identity and its marks at the anchors before and after; the
/// upload memberships and marks of the audiences of `kind`'s policies.
fn to_identities<'s>(
    plans: &Plans,
    kind: Stitching,
    sources: &Sources<'s>,
    holders: Coll<'s, (IdKey, ProfileKey)>,
) -> Stream<'s, Epoch, Vec<ToIdentity>> {
    let plan = plans.at(0);
    let mut streams = vec![holders.inner.map(|((identity, profile), epoch, diff)| {
        (identity, AtIdentity::Holds { profile, diff }, epoch)
    })];
    if kind == Stitching::PrivateGraph {
        streams.push(
            sources
                .fragments
                .inner
                .clone()
                .map(|((_, f), epoch, diff)| {
                    (
                        anchor(&f),
                        AtIdentity::Fragment { fragment: f, diff },
                        epoch,
                    )
                }),
        );
        streams.push(sources.fragment_marks.clone().flat_map(
            |(m, epoch): (FragmentMark, Epoch)| {
                let at = |identity: IdKey, before| {
                    let mark = MarkAt::Fragment {
                        before,
                        mark: m.mark.clone(),
                    };
                    (identity, AtIdentity::Mark(mark), epoch)
                };
                let before = m.before.map(|a| at(a.identity, true));
                let after = m.after.map(|a| at(a.identity, false));
                before.into_iter().chain(after)
            },
        ));
    }
    if plan.has_uploads(kind) {
        let of_kind = {
            let plans = plans.clone();
            move |audience: AudienceIdx, epoch: Epoch| {
                let plan = plans.at(epoch);
                let policy = plan.audiences[audience as usize].policy;
                (plan.policies[policy as usize].stitching == kind).then_some(policy)
            }
        };
        let memberships = of_kind.clone();
        streams.push(sources.uploads.inner.clone().flat_map(
            move |((identity, audience), epoch, diff)| {
                memberships(audience, epoch)
                    .map(|_| (identity, AtIdentity::Upload { audience, diff }, epoch))
            },
        ));
        streams.push(sources.upload_writes.clone().flat_map(
            move |((audience, identity), write, epoch): UploadRecord| {
                of_kind(audience, epoch).map(|policy| {
                    let mark = MarkAt::Upload {
                        policy,
                        mark: write.mark,
                    };
                    (identity, AtIdentity::Mark(mark), epoch)
                })
            },
        ));
    }
    sources.fragment_marks.scope().concatenate(streams)
}
