//! Membership status with history: `realized` / `exited`, `lastQualificationTime`, and the
//! export triggers that compare an epoch's end with the previous one's.
//!
//! A profile inherits its previous status from its *predecessors*, the previous epoch's
//! profiles that share an identity with it (stitching `none`: the same primary identity): per
//! audience the strongest status (`realized` over `exited`), and the earliest
//! `lastQualificationTime` among those holding it. This module is the per-profile logic of the
//! status `reduce`; the dataflow brings each profile its view, its predecessors' records and the
//! epoch's event marks.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::export::{Candidate, Membership, Status};
use crate::input::{EventMark, Identity};
use crate::plan::{AudienceIdx, Plan, PolicyIdx};
use crate::profile::{Member, assemble};

/// What the next epoch needs to know of a profile: its identities and memberships.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StatusRecord {
    pub identities: Vec<Identity>,
    /// Realized or exited memberships, sorted by audience.
    pub memberships: Vec<Membership>,
}

/// One value of a profile's group in the status `reduce`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Part {
    /// A fragment or upload membership of the profile now.
    Member(Member),
    /// A predecessor's record from the previous epoch, tagged with its key.
    Predecessor(u64, Arc<StatusRecord>),
    Mark(EventMark),
}

/// The status `reduce`'s output: the record (state, fed back to the next epoch) and, in an
/// epoch that may export the profile, a candidate (present for that epoch only).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Outcome {
    Record(Arc<StatusRecord>),
    Export(Arc<Candidate>),
}

fn inherited<'a>(
    predecessors: impl Iterator<Item = &'a StatusRecord>,
) -> BTreeMap<AudienceIdx, (Status, i64)> {
    let mut prev: BTreeMap<AudienceIdx, (Status, i64)> = BTreeMap::new();
    for record in predecessors {
        for m in &record.memberships {
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

fn union_touched<'a>(marks: impl Iterator<Item = &'a EventMark>) -> Vec<u16> {
    let mut touched: Vec<u16> = marks.flat_map(|m| m.mapped.iter().copied()).collect();
    touched.sort_unstable();
    touched.dedup();
    touched
}

/// The status step of one live profile: its record for this epoch and, if anything that can
/// trigger an export happened, its candidate.
pub fn step(plan: &Plan, policy: PolicyIdx, parts: &[&Part], out: &mut Vec<Outcome>) {
    let mut members = Vec::new();
    let mut predecessors = Vec::new();
    let mut marks = Vec::new();
    for part in parts {
        match part {
            Part::Member(m) => members.push(m),
            Part::Predecessor(_, r) => predecessors.push(&**r),
            Part::Mark(m) => marks.push(m),
        }
    }
    if members.iter().all(|m| matches!(m, Member::Upload(_))) {
        return; // no fragment: no profile (an upload alone makes none)
    }
    let view = assemble(plan, policy, members.iter().copied());

    let prev = inherited(predecessors.iter().copied());
    let newest_ts = marks.iter().map(|m| m.ts).max();
    let mut memberships = Vec::new();
    let mut changed = Vec::new();
    for (audience, _) in plan.audiences_of(policy) {
        let before = prev.get(&audience).copied();
        let now = if view.qualified.binary_search(&audience).is_ok() {
            Some(Status::Realized)
        } else {
            before.map(|_| Status::Exited)
        };
        let since = if now != before.map(|b| b.0) {
            changed.push(audience);
            // A change without an event of its own (none in replay) keeps the newest known time.
            newest_ts.or(before.map(|b| b.1)).unwrap_or(0)
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
    let identity_changed =
        !(predecessors.len() == 1 && predecessors[0].identities == view.identities);
    let touched = union_touched(marks.iter().copied());
    let realized = memberships.iter().any(|m| m.status == Status::Realized);

    out.push(Outcome::Record(Arc::new(StatusRecord {
        identities: view.identities.clone(),
        memberships: memberships.clone(),
    })));
    let may_export = !changed.is_empty() || (realized && (identity_changed || !touched.is_empty()));
    if let (true, Some(seq)) = (may_export, marks.iter().map(|m| m.seq).max()) {
        out.push(Outcome::Export(Arc::new(Candidate {
            policy,
            identities: view.identities.clone(),
            leaves: view.leaves.clone(),
            memberships,
            changed,
            identity_changed,
            touched,
            seq,
            tombstone: false,
        })));
    }
}

/// The last export of a profile that has no successor (every fragment deleted, or its
/// identities all gone): its realized audiences exit, with the identities it last had and no
/// attributes.
pub fn tombstone(
    policy: PolicyIdx,
    record: &StatusRecord,
    marks: &[&EventMark],
) -> Option<Candidate> {
    let newest_ts = marks.iter().map(|m| m.ts).max();
    let memberships: Vec<Membership> = record
        .memberships
        .iter()
        .filter(|m| m.status == Status::Realized)
        .map(|m| Membership {
            audience: m.audience,
            status: Status::Exited,
            since: newest_ts.unwrap_or(m.since),
        })
        .collect();
    if memberships.is_empty() {
        return None;
    }
    Some(Candidate {
        policy,
        identities: record.identities.clone(),
        leaves: Vec::new(),
        changed: memberships.iter().map(|m| m.audience).collect(),
        memberships,
        identity_changed: false,
        touched: Vec::new(),
        seq: marks.iter().map(|m| m.seq).max().unwrap_or(0),
        tombstone: true,
    })
}
