//! The per-profile decision of an epoch, a pure function: from a profile's view, its
//! predecessors' records and the epoch's marks, its new record and its export candidates.
//!
//! A profile inherits its previous status from its *predecessors*, the previous epoch's
//! profiles that share an identity with it (stitching `none`: the same primary identity): per
//! audience the strongest status (`realized` over `exited`), and the earliest
//! `lastQualificationTime` among those holding it (SPEC §3).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::export::{Candidate, Membership, Status};
use crate::input::Mark;
use crate::plan::{AudienceIdx, Plan, PolicyIdx, Stitching};
use crate::view::ProfileView;

/// What the next epoch needs to know of a profile: its view and, per policy of its stitching,
/// its memberships.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub view: Arc<ProfileView>,
    /// Per policy (as in `view.policies`): realized or exited memberships, sorted by audience.
    pub memberships: Vec<Vec<Membership>>,
}

/// A mark with the policy it is for (`None`: every policy of the stitching).
pub type PolicyMark = (Option<PolicyIdx>, Mark);

fn applies(mark: &PolicyMark, policy: PolicyIdx) -> bool {
    mark.0.is_none_or(|p| p == policy)
}

fn inherited<'a>(
    predecessors: impl Iterator<Item = &'a [Membership]>,
) -> BTreeMap<AudienceIdx, (Status, i64)> {
    let mut prev: BTreeMap<AudienceIdx, (Status, i64)> = BTreeMap::new();
    for memberships in predecessors {
        for m in memberships {
            prev.entry(m.audience)
                .and_modify(|slot| {
                    if m.status > slot.0 || (m.status == slot.0 && m.since < slot.1) {
                        *slot = (m.status, m.since);
                    }
                })
                .or_insert((m.status, m.since));
        }
    }
    prev
}

/// The epoch's marks for one policy, folded: newest time, latest position, union of paths.
fn fold<'a>(marks: impl Iterator<Item = &'a PolicyMark>, policy: PolicyIdx) -> Option<Mark> {
    marks
        .filter(|m| applies(m, policy))
        .fold(None, |acc: Option<Mark>, (_, m)| {
            let mut acc = acc.unwrap_or_else(|| m.clone());
            acc.absorb(m);
            Some(acc)
        })
}

/// Decides a live profile: its record for this epoch and, per policy where anything that can
/// trigger an export happened, a candidate.
pub fn decide(
    plan: &Plan,
    kind: Stitching,
    view: Arc<ProfileView>,
    predecessors: &[&Record],
    marks: &[PolicyMark],
    out: &mut Vec<Candidate>,
) -> Record {
    let identity_changed =
        !(predecessors.len() == 1 && predecessors[0].view.identities == view.identities);
    let mut all = Vec::with_capacity(view.policies.len());
    for (slot, policy) in plan.policies_of(kind).enumerate() {
        let prev = inherited(
            predecessors
                .iter()
                .filter_map(|r| r.memberships.get(slot).map(Vec::as_slice)),
        );
        let mark = fold(marks.iter(), policy);
        let qualified = view
            .policies
            .get(slot)
            .map(|p| &p.qualified[..])
            .unwrap_or_default();
        let mut memberships = Vec::new();
        let mut changed = Vec::new();
        for (audience, _) in plan.audiences_of(policy) {
            let before = prev.get(&audience).copied();
            let now = if qualified.binary_search(&audience).is_ok() {
                Some(Status::Realized)
            } else {
                before.map(|_| Status::Exited)
            };
            let since = if now != before.map(|b| b.0) {
                changed.push(audience);
                // A change without an event of its own keeps the newest known time.
                mark.as_ref()
                    .map(|m| m.ts)
                    .or(before.map(|b| b.1))
                    .unwrap_or(0)
            } else {
                before.map(|b| b.1).unwrap_or(0)
            };
            if let Some(status) = now {
                memberships.push(Membership {
                    audience,
                    status,
                    since,
                });
            }
        }
        let realized = memberships.iter().any(|m| m.status == Status::Realized);
        if let Some(mark) = mark {
            let touched = !mark.touched.is_empty();
            if !changed.is_empty() || (realized && (identity_changed || touched)) {
                out.push(Candidate {
                    policy,
                    view: view.clone(),
                    slot,
                    memberships: memberships.clone(),
                    changed,
                    identity_changed,
                    touched: mark.touched,
                    seq: mark.seq,
                    tombstone: false,
                    backfill: false,
                });
            }
        }
        // Records are kept until the profile's next change: no spare capacity.
        memberships.shrink_to_fit();
        all.push(memberships);
    }
    Record {
        view,
        memberships: all,
    }
}

/// The last export of a profile that has no successor (every fragment deleted, or its
/// identities all gone): its realized audiences exit, with the identities it last had and no
/// attributes.
pub fn tombstone(
    plan: &Plan,
    kind: Stitching,
    record: &Record,
    marks: &[PolicyMark],
    out: &mut Vec<Candidate>,
) {
    for (slot, policy) in plan.policies_of(kind).enumerate() {
        let mark = fold(marks.iter(), policy);
        let memberships: Vec<Membership> = record
            .memberships
            .get(slot)
            .into_iter()
            .flatten()
            .filter(|m| m.status == Status::Realized)
            .map(|m| Membership {
                audience: m.audience,
                status: Status::Exited,
                since: mark.as_ref().map_or(m.since, |mk| mk.ts),
            })
            .collect();
        if memberships.is_empty() {
            continue;
        }
        out.push(Candidate {
            policy,
            view: record.view.clone(),
            slot,
            changed: memberships.iter().map(|m| m.audience).collect(),
            memberships,
            identity_changed: false,
            touched: Vec::new(),
            seq: mark.map_or(0, |m| m.seq),
            tombstone: true,
            backfill: false,
        });
    }
}
