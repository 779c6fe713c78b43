//! The whole dataflow, one idea per stage:
//!
//! ```text
//! fragment upserts ──arrange_from_upsert──► fragments ──► stitching (per kind) ──► (fragment, profile)
//!                                              │                                       │
//! upload upserts ──arrange_from_upsert──► uploads ─► (profile, audience) ─┐            │
//!                                                                          ▼            ▼
//!                                              members: (policy, profile) → fragments, uploads
//!                                                                          │
//! event marks (transient) ─► routed to profiles ─┐                         ▼
//!                                                 └──► status reduce ◄── predecessors ◄── records (t-1)
//!                                                   (assemble + status)          ▲
//!                                                          │   └── records ──delay 1 epoch──┘
//!                                                          ▼
//!                                                     candidates (+ tombstones) ─► sink
//! ```
//!
//! The status reduce assembles each touched profile's view (merge, audiences) and decides its
//! status in one step, so no view is ever arranged.
//!
//! Time is the epoch. Every collection but the event marks is *state*; the marks are inserted at
//! their epoch and retracted at the next, so at each epoch they accumulate to exactly that
//! epoch's events. History enters through one feedback edge: the status records of epoch `t`
//! come back, delayed by one epoch, as the predecessors' records at `t + 1`. Work per epoch is
//! proportional to the profiles the epoch touched: every operator is an incremental
//! differential operator keyed by fragment, identity or profile.

use std::sync::Arc;

use differential_dataflow::VecCollection;
use differential_dataflow::input::{Input as _, InputSession};
use differential_dataflow::operators::arrange::upsert::arrange_from_upsert;
use differential_dataflow::operators::iterate::VecVariable;
use differential_dataflow::trace::implementations::{ValBuilder, ValSpine};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::Scope;
use timely::dataflow::operators::core::input::{Handle, Input as _};

use crate::export::Candidate;
use crate::input::{Epoch, EpochInput, EventMark, FragKey, Fragment, IdKey, Identity, ProfileKey};
use crate::plan::{AudienceIdx, Plan, PolicyIdx, Stitching};
use crate::profile::Member;
use crate::status::{Outcome, Part, StatusRecord, step, tombstone};

type Coll<'s, D> = VecCollection<'s, Epoch, D, isize>;
type UpsertHandle<K, V> = Handle<Epoch, CapacityContainerBuilder<Vec<(K, Option<V>, Epoch)>>>;
/// `(merge policy, profile)`: the key of everything downstream of stitching.
pub type PolicyProfile = (PolicyIdx, ProfileKey);

/// The handles a worker pushes its share of each epoch into.
pub struct Inputs {
    fragments: UpsertHandle<FragKey, Arc<Fragment>>,
    uploads: UpsertHandle<(AudienceIdx, IdKey), ()>,
    fragment_marks: InputSession<Epoch, (FragKey, EventMark), isize>,
    upload_marks: InputSession<Epoch, ((AudienceIdx, IdKey), EventMark), isize>,
}

impl Inputs {
    /// Pushes this worker's share of `epoch` and closes the epoch on every input.
    ///
    /// Epochs must be pushed in increasing order; an epoch with no data is pushed as empty, so
    /// that every input advances and the traces can compact.
    pub fn push(&mut self, epoch: Epoch, data: EpochInput) {
        debug_assert!(epoch >= *self.fragments.time());
        self.advance_to(epoch);
        for (key, fragment) in data.fragments {
            self.fragments.send((key, fragment, epoch));
        }
        for (key, member) in data.uploads {
            self.uploads.send((key, member.then_some(()), epoch));
        }
        // Marks hold for their epoch only.
        for mark in data.fragment_marks {
            self.fragment_marks.update_at(mark.clone(), epoch, 1);
            self.fragment_marks.update_at(mark, epoch + 1, -1);
        }
        for mark in data.upload_marks {
            self.upload_marks.update_at(mark.clone(), epoch, 1);
            self.upload_marks.update_at(mark, epoch + 1, -1);
        }
        self.advance_to(epoch + 1);
    }

    fn advance_to(&mut self, epoch: Epoch) {
        if *self.fragments.time() < epoch {
            self.fragments.advance_to(epoch);
            self.uploads.advance_to(epoch);
            self.fragment_marks.advance_to(epoch);
            self.upload_marks.advance_to(epoch);
        }
        self.fragment_marks.flush();
        self.upload_marks.flush();
    }

    /// The first epoch not yet closed.
    pub fn time(&self) -> Epoch {
        *self.fragments.time()
    }
}

/// Builds the dataflow in `scope`. Returns the input handles and the export candidates, which
/// hold for one epoch: read the insertions at each completed epoch (see [`crate::sink`]).
pub fn build<'s>(
    scope: Scope<'s, Epoch>,
    plan: Arc<Plan>,
) -> (Inputs, Coll<'s, (PolicyProfile, Arc<Candidate>)>) {
    let (fragment_handle, fragment_stream) =
        scope.new_input::<Vec<(FragKey, Option<Arc<Fragment>>, Epoch)>>();
    let (upload_handle, upload_stream) =
        scope.new_input::<Vec<((AudienceIdx, IdKey), Option<()>, Epoch)>>();
    let (fragment_marks_in, fragment_marks) = scope.new_collection::<(FragKey, EventMark), isize>();
    let (upload_marks_in, upload_marks) =
        scope.new_collection::<((AudienceIdx, IdKey), EventMark), isize>();

    let fragments = arrange_from_upsert::<
        ValBuilder<FragKey, Arc<Fragment>, Epoch, isize>,
        ValSpine<FragKey, Arc<Fragment>, Epoch, isize>,
        FragKey,
        Arc<Fragment>,
    >(fragment_stream, "Fragments");
    let uploads = arrange_from_upsert::<
        ValBuilder<(AudienceIdx, IdKey), (), Epoch, isize>,
        ValSpine<(AudienceIdx, IdKey), (), Epoch, isize>,
        (AudienceIdx, IdKey),
        (),
    >(upload_stream, "Uploads")
    .as_collection(|key, _| *key);

    // A fragment event also removes the mapped paths its previous version held.
    let previous_mapped = fragments
        .clone()
        .as_collection(|key, f: &Arc<Fragment>| (*key, f.mapped.clone()))
        .delay(|t| t + 1);
    let removed_marks = fragment_marks
        .clone()
        .map(|(key, mark)| (key, (mark.ts, mark.seq)))
        .join_map(previous_mapped, |key, &(ts, seq), mapped| {
            (
                *key,
                EventMark {
                    ts,
                    seq,
                    mapped: mapped.clone(),
                },
            )
        });
    let fragment_marks = fragment_marks.concat(removed_marks);

    let mut members_all = Vec::new();
    let mut links_now = Vec::new();
    let mut marks_now = Vec::new();
    let mut marks_before = Vec::new();
    for kind in plan.stitchings() {
        let policies: Arc<Vec<PolicyIdx>> = Arc::new(
            (0..plan.policies.len() as PolicyIdx)
                .filter(|&p| plan.policies[p as usize].stitching == kind)
                .collect(),
        );
        let fragment_profile = crate::stitch::profiles_of(kind, fragments.clone());

        // The fragments of each profile, and each identity's profile(s).
        let members = fragment_profile
            .clone()
            .arrange_by_key()
            .join_core(fragments.clone(), |_key, profile, fragment| {
                Some((*profile, fragment.clone()))
            });
        let identity_profile = members
            .clone()
            .flat_map(|(profile, f): (ProfileKey, Arc<Fragment>)| {
                f.identities
                    .iter()
                    .map(move |i| (i.key(), profile))
                    .collect::<Vec<_>>()
            })
            .distinct();
        let audience_policy = {
            let plan = plan.clone();
            move |a: AudienceIdx| plan.audiences[a as usize].policy
        };
        let of_kind = {
            let plan = plan.clone();
            move |a: &AudienceIdx| {
                plan.policies[plan.audiences[*a as usize].policy as usize].stitching == kind
            }
        };

        let uploaded = {
            let of_kind = of_kind.clone();
            uploads
                .clone()
                .filter(move |(a, _)| of_kind(a))
                .map(|(a, identity)| (identity, a))
                .join_map(identity_profile.clone(), |_, a, profile| {
                    (*profile, Member::Upload(*a))
                })
                .distinct()
        };

        // Each profile's members, once per policy of this stitching: the status reduce
        // assembles the view where it also decides the status, so no view is arranged.
        let policies_m = policies.clone();
        let audience_policy_m = audience_policy.clone();
        members_all.push(
            members
                .flat_map(move |(profile, f)| {
                    policies_m
                        .iter()
                        .map(|&p| ((p, profile), Part::Member(Member::Fragment(f.clone()))))
                        .collect::<Vec<_>>()
                })
                .concat(uploaded.map(move |(profile, member)| {
                    let policy = match &member {
                        Member::Upload(a) => audience_policy_m(*a),
                        Member::Fragment(_) => 0,
                    };
                    ((policy, profile), Part::Member(member))
                })),
        );
        // Link keys of the current profiles: identity keys (`privateGraph`) or the profile key
        // itself (`none`, whose key is the primary identity's).
        let policies_l = policies.clone();
        links_now.push(
            identity_profile
                .clone()
                .flat_map(move |(identity, profile)| {
                    policies_l
                        .iter()
                        .filter(|_| kind == Stitching::PrivateGraph || identity == profile)
                        .map(|&p| ((p, identity), profile))
                        .collect::<Vec<_>>()
                }),
        );

        // Route the epoch's events to the profiles they are for: the fragment's profile after
        // the epoch, and (through predecessors, below) its profile before.
        let fan_out = move |policies: &Arc<Vec<PolicyIdx>>| {
            let policies = policies.clone();
            move |(profile, mark): (ProfileKey, EventMark)| {
                policies
                    .iter()
                    .map(move |&p| ((p, profile), mark.clone()))
                    .collect::<Vec<_>>()
            }
        };
        marks_now.push(
            fragment_marks
                .clone()
                .join_map(fragment_profile.clone(), |_, mark, profile| {
                    (*profile, mark.clone())
                })
                .flat_map(fan_out(&policies)),
        );
        marks_before.push(
            fragment_marks
                .clone()
                .join_map(fragment_profile.delay(|t| t + 1), |_, mark, profile| {
                    (*profile, mark.clone())
                })
                .flat_map(fan_out(&policies)),
        );
        marks_now.push(
            upload_marks
                .clone()
                .filter(move |((a, _), _)| of_kind(a))
                .map(|((a, identity), mark)| (identity, (a, mark)))
                .join_map(identity_profile, move |_, (a, mark), profile| {
                    ((audience_policy(*a), *profile), mark.clone())
                }),
        );
    }
    let members = differential_dataflow::collection::concatenate(scope, members_all);
    let now_links = differential_dataflow::collection::concatenate(scope, links_now);
    let marks_now = differential_dataflow::collection::concatenate(scope, marks_now);
    let marks_before = differential_dataflow::collection::concatenate(scope, marks_before);

    // History: the records of the previous epoch.
    let (records_var, previous) =
        VecVariable::<Epoch, (PolicyProfile, Arc<StatusRecord>), isize>::new(scope, 1);

    // Predecessors: previous profiles sharing an identity (stitching `none`: the same primary
    // identity, which is the profile key itself).
    let link_keys = {
        let plan = plan.clone();
        move |((policy, profile), identities): (PolicyProfile, Vec<IdKey>)| {
            let keys: Vec<_> = match plan.policies[policy as usize].stitching {
                Stitching::PrivateGraph => identities
                    .into_iter()
                    .map(|i| ((policy, i), profile))
                    .collect(),
                Stitching::None => vec![((policy, profile), profile)],
            };
            keys
        }
    };
    let before_links = previous
        .clone()
        .map(|(key, r)| {
            (
                key,
                r.identities.iter().map(Identity::key).collect::<Vec<_>>(),
            )
        })
        .flat_map(link_keys);
    let predecessors = now_links
        .join_map(before_links, |(policy, _), profile, before| {
            ((*policy, *before), *profile)
        })
        .distinct(); // ((policy, before), now)

    let predecessor_parts =
        predecessors
            .clone()
            .join_map(previous.clone(), |(policy, before), now, record| {
                ((*policy, *now), Part::Predecessor(*before, record.clone()))
            });
    let marks_after = marks_before
        .clone()
        .join_map(predecessors.clone(), |(policy, _), mark, now| {
            ((*policy, *now), mark.clone())
        });

    let plan_s = plan.clone();
    let outcomes = members
        .concat(predecessor_parts)
        .concat(
            marks_now
                .concat(marks_after)
                .map(|(key, m)| (key, Part::Mark(m))),
        )
        .reduce_named("Status", move |&(policy, _), parts, out| {
            let mut produced = Vec::new();
            let parts: Vec<&Part> = parts.iter().map(|(p, _)| *p).collect();
            step(&plan_s, policy, &parts, &mut produced);
            out.extend(produced.into_iter().map(|o| (o, 1)));
        });

    let records = outcomes.clone().flat_map(|(key, o)| match o {
        Outcome::Record(r) => Some((key, r)),
        Outcome::Export(_) => None,
    });
    records_var.set(records);

    // Profiles of the previous epoch with no successor leave with a tombstone export.
    let succeeded = predecessors.map(|(before, _)| before).distinct();
    let orphans = previous.antijoin(succeeded);
    let tombstones = orphans
        .clone()
        .map(|(key, r)| (key, Part::Predecessor(key.1, r)))
        .concat(
            marks_before
                .semijoin(orphans.map(|(key, _)| key))
                .map(|(key, m)| (key, Part::Mark(m))),
        )
        .reduce_named(
            "Tombstone",
            |&(policy, _), parts, out: &mut Vec<(Arc<Candidate>, isize)>| {
                let mut record = None;
                let mut marks = Vec::new();
                for (part, _) in parts {
                    match part {
                        Part::Predecessor(_, r) => record = Some(r),
                        Part::Mark(m) => marks.push(m),
                        Part::Member(_) => {}
                    }
                }
                if let Some(candidate) = record.and_then(|r| tombstone(policy, r, &marks)) {
                    out.push((Arc::new(candidate), 1));
                }
            },
        );

    let candidates = outcomes
        .flat_map(|(key, o)| match o {
            Outcome::Export(c) => Some((key, c)),
            Outcome::Record(_) => None,
        })
        .concat(tombstones);

    let inputs = Inputs {
        fragments: fragment_handle,
        uploads: upload_handle,
        fragment_marks: fragment_marks_in,
        upload_marks: upload_marks_in,
    };
    (inputs, candidates)
}
