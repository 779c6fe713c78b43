//! History: statuses and `lastQualificationTime` carried across epochs and across the profiles
//! that continue each other, and the decision of what to export.
//!
//! ```text
//!  to profiles ─exchange(profile)─► route ─exchange(profile)─► decide ─► candidates
//!  (views, successors, marks)         │  ▲                        │
//!                                     │  └── records (t - 1) ◄────┘  (shared, worker-local)
//!                                     └─ a record and its marks, to each successor
//! ```
//!
//! Both stages are keyed by profile and hold no arrangement. The previous epoch's records live
//! in a map shared by the two stages of one worker (the same keys land on the same worker for
//! both). `route` acts on epoch `t` once `decide` has finished `t - 1` on its worker, so it
//! reads the records as they stood at the end of `t - 1`; it sends each record with the
//! before-marks to the profile's successors (an exchange, as a successor may live elsewhere)
//! and exports the profiles that ended with no successor (tombstones). `decide` acts on `t`
//! once every worker's `route` has, so it has every predecessor of its profiles; it writes the
//! new records. Each profile is evaluated once per epoch in which it was touched.
//!
//! Snapshots: at a snapshot epoch `decide` hands out every record it holds (a second output),
//! and after a restart the records come back as *seeds*, inserted before the snapshot's
//! inputs are loaded, so the profiles keep their history (statuses and times).
//!
//! At a control epoch (the plan changed; no event belongs to it) `decide` gives every profile
//! it evaluates the change's mark — its statuses then carry the change's time — and, when
//! the change maps audiences anew, exports every profile realized in one of them to the
//! destination that maps it (the backfill), once, together with any other export of the
//! profile in that epoch.

pub mod step;

use rustc_hash::FxHashMap;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::Stream;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Concat;
use timely::dataflow::operators::core::Map;
use timely::dataflow::operators::generic::Operator;
use timely::scheduling::Activator;

use crate::export::Candidate;
use crate::gate::EpochGate;
use crate::input::Mark;
use crate::input::{Epoch, ProfileKey};
use crate::link::{Role, ToProfile};
use crate::plan::{Plan, PlanChange, Plans, PolicyIdx, Stitching};
use crate::view::ProfileView;
use crate::view::{control_gate, touch_control_epochs};
pub use step::{PolicyMark, Record};

/// The state the two stages of one worker share.
#[derive(Default)]
struct Shared {
    /// Each live profile's record, as of the end of the last decided epoch.
    records: FxHashMap<ProfileKey, Record>,
    /// Every epoch before this one has been decided on this worker.
    decided: Epoch,
    /// Wakes `route` when `decided` moves.
    route: Option<Activator>,
}

/// A profile's record from a snapshot, for the profiles of one stitching.
pub type Seed = (Stitching, ProfileKey, Record);

/// What `route` hands `decide` about a profile.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum Pass {
    /// A record from a snapshot.
    Seed(Record),
    /// The profile exists after the epoch: its view (`None`: unchanged), whether it continues
    /// itself (it existed before), and its marks.
    Live {
        view: Option<Arc<ProfileView>>,
        continues_itself: bool,
        marks: Vec<PolicyMark>,
    },
    /// The profile no longer exists: forget its record.
    Gone,
    /// A predecessor's record and before-marks.
    Predecessor {
        record: Record,
        marks: Vec<PolicyMark>,
    },
    /// An export decided by `route` (a tombstone).
    Emit(Candidate),
}

/// What one epoch told `route` about one profile.
#[derive(Default)]
struct Touch {
    inserted: Option<Arc<ProfileView>>,
    retracted: bool,
    successors: Vec<ProfileKey>,
    before: Vec<PolicyMark>,
    after: Vec<PolicyMark>,
    if_gone: Vec<PolicyMark>,
}

impl Touch {
    fn add(&mut self, message: ToProfile) {
        match message {
            ToProfile::View { view, diff } if diff > 0 => self.inserted = Some(view),
            ToProfile::View { .. } => self.retracted = true,
            ToProfile::Successor(s) => self.successors.push(s),
            ToProfile::Mark { role, policy, mark } => match role {
                Role::Before => self.before.push((policy, mark)),
                Role::After => self.after.push((policy, mark)),
                Role::IfGone => self.if_gone.push((policy, mark)),
            },
        }
    }
}

/// What `decide` hands out: export candidates, and at snapshot epochs every record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Decided {
    Candidate(Candidate),
    /// A record of a profile of this stitching, at a snapshot epoch.
    Record(Seed),
}

/// History and decision for the profiles of stitching `kind`: the export candidates, and at
/// each snapshot epoch every record (one stream: the sink takes both, nothing is copied).
pub fn history<'s>(
    plans: Plans,
    kind: Stitching,
    to_profiles: Stream<'s, Epoch, Vec<(ProfileKey, ToProfile, Epoch)>>,
    seeds: Option<Stream<'s, Epoch, Vec<Seed>>>,
) -> Stream<'s, Epoch, Vec<Decided>> {
    let shared = Rc::new(RefCell::new(Shared::default()));
    let scope = to_profiles.scope();
    let passes = route(plans.clone(), kind, to_profiles, shared.clone(), scope);
    let passes = match seeds {
        Some(seeds) => passes.concat(seeds.flat_map(move |(k, profile, record): Seed| {
            (k == kind).then_some((profile, Pass::Seed(record)))
        })),
        None => passes,
    };
    decide(plans, kind, passes, shared)
}

fn route<'s>(
    plans: Plans,
    kind: Stitching,
    to_profiles: Stream<'s, Epoch, Vec<(ProfileKey, ToProfile, Epoch)>>,
    shared: Rc<RefCell<Shared>>,
    scope: timely::dataflow::Scope<'s, Epoch>,
) -> Stream<'s, Epoch, Vec<(ProfileKey, Pass)>> {
    to_profiles.unary_frontier::<CapacityContainerBuilder<Vec<(ProfileKey, Pass)>>, _, _, _>(
        Exchange::new(|(profile, _, _): &(ProfileKey, ToProfile, Epoch)| *profile),
        "Route",
        move |_initial, info| {
            shared.borrow_mut().route = Some(scope.activator_for(info.address));
            let mut gate = EpochGate::default();
            move |(input, frontier), output| {
                input.for_each(|cap, data| {
                    gate.push_timed(cap.retain_least(0), data.drain(..), |(p, m, t)| (t, (p, m)))
                });
                loop {
                    // The records must be those of the end of the previous epoch.
                    let decided = shared.borrow().decided;
                    if gate.first_pending().is_none_or(|t| t > decided) {
                        break;
                    }
                    let Some((cap, messages)) = gate.next_complete(frontier) else {
                        break;
                    };
                    let mut touched: FxHashMap<ProfileKey, Touch> = FxHashMap::default();
                    for (profile, message) in messages {
                        touched.entry(profile).or_default().add(message);
                    }
                    let plan = plans.at(*cap.time());
                    let shared = shared.borrow();
                    let mut session = output.session(&cap);
                    for (profile, touch) in touched {
                        let record = shared.records.get(&profile);
                        for (to, pass) in route_one(&plan, kind, profile, record, touch) {
                            session.give((to, pass));
                        }
                    }
                }
                gate.release(frontier);
            }
        },
    )
}

/// What `route` says of one touched profile, as `(addressee, pass)` pairs.
fn route_one(
    plan: &Plan,
    kind: Stitching,
    profile: ProfileKey,
    record: Option<&Record>,
    mut touch: Touch,
) -> Vec<(ProfileKey, Pass)> {
    let mut out = Vec::new();
    let exists = touch.inserted.is_some() || (!touch.retracted && record.is_some());
    // As a predecessor: hand the record on, or leave with a tombstone.
    if let Some(record) = record {
        touch.successors.sort_unstable();
        touch.successors.dedup();
        touch.successors.retain(|s| *s != profile);
        if touch.successors.is_empty() && !exists {
            let mut marks = touch.before.clone();
            marks.append(&mut touch.if_gone);
            let mut candidates = Vec::new();
            step::tombstone(plan, kind, record, &marks, &mut candidates);
            out.extend(candidates.into_iter().map(|c| (profile, Pass::Emit(c))));
        }
        for &successor in &touch.successors {
            out.push((
                successor,
                Pass::Predecessor {
                    record: record.clone(),
                    marks: touch.before.clone(),
                },
            ));
        }
    }
    // As a profile after the epoch.
    if exists {
        let mut marks = touch.after;
        if record.is_some() {
            marks.append(&mut touch.before);
        }
        out.push((
            profile,
            Pass::Live {
                view: touch.inserted,
                continues_itself: record.is_some(),
                marks,
            },
        ));
    } else if record.is_some() {
        out.push((profile, Pass::Gone));
    }
    out
}

fn decide<'s>(
    plans: Plans,
    kind: Stitching,
    passes: Stream<'s, Epoch, Vec<(ProfileKey, Pass)>>,
    shared: Rc<RefCell<Shared>>,
) -> Stream<'s, Epoch, Vec<Decided>> {
    passes.unary_frontier::<CapacityContainerBuilder<Vec<Decided>>, _, _, _>(
        Exchange::new(|(profile, _): &(ProfileKey, Pass)| *profile),
        "Decide",
        move |initial, _info| {
            let mut gate = control_gate(&plans, initial);
            move |(input, frontier), output| {
                input.for_each(|cap, data| gate.push(cap.retain_least(0), data));
                touch_control_epochs(&plans, &mut gate, frontier);
                let mut shared = shared.borrow_mut();
                while let Some((cap, passes)) = gate.next_complete(frontier) {
                    let epoch = *cap.time();
                    let plan = plans.at(epoch);
                    let change = plan.change.as_ref().filter(|_| plans.is_control(epoch));
                    let mut by_profile: FxHashMap<ProfileKey, Vec<Pass>> = FxHashMap::default();
                    for (profile, pass) in passes {
                        by_profile.entry(profile).or_default().push(pass);
                    }
                    let mut candidates = Vec::new();
                    // At a control epoch: each profile's candidates, by policy.
                    let mut emitted = FxHashMap::default();
                    let control_mark = change.map(|c| (None, Mark::new(c.ts, c.seq, Vec::new())));
                    for (profile, passes) in by_profile {
                        let first = candidates.len();
                        decide_one(
                            &plan,
                            kind,
                            &mut shared.records,
                            profile,
                            passes,
                            control_mark.clone(),
                            &mut candidates,
                        );
                        if change.is_some() {
                            for (i, c) in candidates.iter().enumerate().skip(first) {
                                emitted.insert((profile, c.policy), i);
                            }
                        }
                    }
                    if let Some(change) = change {
                        let records = &shared.records;
                        backfill(&plan, kind, change, records, &emitted, &mut candidates);
                    }
                    let mut session = output.session(&cap);
                    session.give_iterator(candidates.into_iter().map(Decided::Candidate));
                    if plans.is_snapshot(epoch) {
                        session.give_iterator(
                            shared
                                .records
                                .iter()
                                .map(|(p, r)| Decided::Record((kind, *p, r.clone()))),
                        );
                    }
                }
                gate.release(frontier);
                let decided = frontier
                    .frontier()
                    .iter()
                    .min()
                    .copied()
                    .unwrap_or(Epoch::MAX);
                if decided > shared.decided {
                    shared.decided = decided;
                    if let Some(route) = &shared.route {
                        route.activate();
                    }
                }
            }
        },
    )
}

/// The backfill of a control epoch: every profile realized in a newly mapped audience gets a
/// candidate marked `backfill` (the one it already has in this epoch, or a new one).
fn backfill(
    plan: &Plan,
    kind: Stitching,
    change: &PlanChange,
    records: &FxHashMap<ProfileKey, Record>,
    emitted: &FxHashMap<(ProfileKey, PolicyIdx), usize>,
    out: &mut Vec<Candidate>,
) {
    let newly_mapped = |a| change.backfill.iter().any(|&(_, b)| a == b);
    if !plan
        .policies_of(kind)
        .any(|p| plan.audiences_of(p).any(|(a, _)| newly_mapped(a)))
    {
        return;
    }
    for (&profile, record) in records {
        for (slot, policy) in plan.policies_of(kind).enumerate() {
            let Some(memberships) = record.memberships.get(slot) else {
                continue;
            };
            let due = memberships
                .iter()
                .any(|m| m.status == crate::export::Status::Realized && newly_mapped(m.audience));
            if !due {
                continue;
            }
            match emitted.get(&(profile, policy)) {
                Some(&i) => out[i].backfill = true,
                None => out.push(Candidate {
                    policy,
                    view: record.view.clone(),
                    slot,
                    memberships: memberships.clone(),
                    changed: Vec::new(),
                    identity_changed: false,
                    touched: Vec::new(),
                    seq: change.seq,
                    tombstone: false,
                    backfill: true,
                }),
            }
        }
    }
}

/// Decides one profile from what `route` passed it.
fn decide_one(
    plan: &Plan,
    kind: Stitching,
    records: &mut FxHashMap<ProfileKey, Record>,
    profile: ProfileKey,
    passes: Vec<Pass>,
    control_mark: Option<PolicyMark>,
    out: &mut Vec<Candidate>,
) {
    let mut live = None;
    let mut predecessors = Vec::new();
    let mut marks: Vec<PolicyMark> = control_mark.into_iter().collect();
    for pass in passes {
        match pass {
            Pass::Live {
                view,
                continues_itself,
                marks: mut own,
            } => {
                live = Some((view, continues_itself));
                marks.append(&mut own);
            }
            Pass::Gone => {
                records.remove(&profile);
            }
            Pass::Predecessor {
                record,
                marks: mut theirs,
            } => {
                predecessors.push(record);
                marks.append(&mut theirs);
            }
            Pass::Emit(candidate) => out.push(candidate),
            Pass::Seed(record) => {
                records.insert(profile, record);
            }
        }
    }
    let Some((view, continues_itself)) = live else {
        return;
    };
    let own = records.get(&profile);
    let Some(view) = view.or_else(|| own.map(|r| r.view.clone())) else {
        return;
    };
    let mut preds: Vec<&Record> = predecessors.iter().collect();
    if continues_itself && let Some(own) = own {
        preds.push(own);
    }
    let record = step::decide(plan, kind, view, &preds, &marks, out);
    records.insert(profile, record);
}
