//! The compiled configuration the dataflow runs on: merge policies, audiences and the
//! destinations' mappings, resolved to dense indices.
//!
//! The binary's `config` stage parses and validates the user's JSON and builds a [`Plan`]; the
//! dataflow only ever reads it (it is shared by all workers behind an `Arc`).
//!
//! # Plans that change (the service)
//!
//! A replay runs on one plan. The service changes its plan while it runs (the control API):
//! [`Plans`] holds the plan in force at each epoch, and a change takes effect at a *control
//! epoch* of its own, whose plan carries a [`PlanChange`] (when, at which input position, and
//! which destinations newly map which audiences: the backfill, SPEC §3 trigger 4). Such a plan
//! is *dynamic*: its indices are stable across changes — policies, audiences, destinations and
//! mapped paths are only ever appended; a deleted object stays as a `removed` entry — so that
//! the state the dataflow keeps (records by policy slot, uploads by audience, marks by mapped
//! path) keeps its meaning; and every branch of the dataflow is built, since a later change may
//! need it.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::input::Epoch;
use crate::rule::Rule;

/// Index of a merge policy in [`Plan::policies`].
pub type PolicyIdx = u16;
/// Index of an audience in [`Plan::audiences`].
pub type AudienceIdx = u16;
/// Index of a destination in [`Plan::destinations`].
pub type DestinationIdx = u16;

/// How fragments' leaves are merged into a profile's attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttributeMerge {
    /// Per leaf path, the fragment with the newest timestamp wins; ties go to the later event.
    TimestampOrdered,
    /// Per leaf path, the earliest-listed dataset wins, unlisted datasets rank after listed
    /// ones, and within a rank the newest timestamp (then the later event) wins.
    DatasetPrecedence(Vec<String>),
}

/// How fragments are grouped into profiles.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Stitching {
    /// A profile is a connected component of fragments that share an identity.
    PrivateGraph,
    /// A profile is the set of fragments with the same primary identity.
    None,
}

#[derive(Clone, Debug)]
pub struct PolicyPlan {
    pub id: String,
    pub merge: AttributeMerge,
    pub stitching: Stitching,
    /// Deleted (a dynamic plan keeps the slot): it has no audiences.
    pub removed: bool,
}

#[derive(Clone, Debug)]
pub enum AudienceKind {
    Rule(Rule),
    Upload,
}

#[derive(Clone, Debug)]
pub struct AudiencePlan {
    pub id: String,
    pub name: String,
    pub policy: PolicyIdx,
    pub kind: AudienceKind,
    /// Unix milliseconds.
    pub created_at: i64,
    pub updated_at: i64,
    /// Deleted (a dynamic plan keeps the index): no profile qualifies, no status is kept.
    pub removed: bool,
}

/// One audience mapped to a destination.
#[derive(Clone, Debug)]
pub struct MappingPlan {
    pub audience: AudienceIdx,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Clone, Debug)]
pub struct DestinationPlan {
    pub id: String,
    pub include_segment_names: bool,
    pub include_segment_timestamps: bool,
    pub mappings: Vec<MappingPlan>,
    /// Mapped attribute paths, as configured (a path may name a leaf or an object above leaves).
    pub attributes: Vec<String>,
}

/// Everything the dataflow needs to know about the configuration.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub policies: Vec<PolicyPlan>,
    pub audiences: Vec<AudiencePlan>,
    pub destinations: Vec<DestinationPlan>,
    /// The union of every destination's mapped paths; a fragment's "touched" set is kept as
    /// indices into this list.
    pub mapped_paths: Vec<String>,
    /// Per policy: every attribute path its rule audiences read (derived by `finish`).
    pub rule_paths: Vec<Vec<String>>,
    /// Every path some rule or mapping reads, sorted (derived by `finish`): a fragment's other
    /// leaves can never reach an export, so ingest drops them (not in a dynamic plan, where a
    /// later change may read them).
    pub read_paths: Vec<String>,
    /// The plan may change while the dataflow runs (see the module doc).
    pub dynamic: bool,
    /// Set on the plan of a control epoch: the change that made it.
    pub change: Option<PlanChange>,
    /// Set on the plan of a snapshot epoch: `decide` hands out every profile's record (see
    /// [`crate::history`]). Nothing else changes.
    pub snapshot: bool,
}

/// What a control epoch changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanChange {
    /// When the change was accepted (µs since the Unix epoch): the `lastQualificationTime` of
    /// the statuses it changes.
    pub ts: i64,
    /// Its input position (export `Idempotency-Key`s derive from it).
    pub seq: u64,
    /// `(destination, audience)` mappings that are new: every profile realized in the
    /// audience is exported to the destination once (SPEC §3 trigger 4).
    pub backfill: Vec<(DestinationIdx, AudienceIdx)>,
    /// The change can change views (a policy or an audience changed, or a path became mapped):
    /// every profile's view is recomputed. A destination change that maps no new path leaves
    /// the views as they are.
    pub reevaluate: bool,
}

impl Plan {
    /// Builds the derived tables (`mapped_paths`). Call once after filling the other fields.
    pub fn finish(mut self) -> Self {
        if !self.dynamic {
            let mut paths: Vec<String> = self
                .destinations
                .iter()
                .flat_map(|d| d.attributes.iter().cloned())
                .collect();
            paths.sort();
            paths.dedup();
            self.mapped_paths = paths;
        }
        self.rule_paths = (0..self.policies.len())
            .map(|p| {
                let mut paths: Vec<String> = self
                    .audiences
                    .iter()
                    .filter(|a| a.policy as usize == p && !a.removed)
                    .filter_map(|a| match &a.kind {
                        AudienceKind::Rule(rule) => Some(rule.paths()),
                        AudienceKind::Upload => None,
                    })
                    .flatten()
                    .collect();
                paths.sort();
                paths.dedup();
                paths
            })
            .collect();
        let mut read: Vec<String> = self
            .mapped_paths
            .iter()
            .chain(self.rule_paths.iter().flatten())
            .cloned()
            .collect();
        read.sort();
        read.dedup();
        self.read_paths = read;
        self
    }

    /// True when some rule or mapping reads the leaf at `leaf_path` (always, in a dynamic plan).
    pub fn reads(&self, leaf_path: &str) -> bool {
        self.dynamic
            || self
                .read_paths
                .iter()
                .any(|p| crate::leaf::path_selects(p, leaf_path))
    }

    /// Indices into `mapped_paths` of the paths that select `leaf_path`.
    pub fn mapped_indices_of<'a>(&'a self, leaf_path: &'a str) -> impl Iterator<Item = u16> + 'a {
        self.mapped_paths
            .iter()
            .enumerate()
            .filter(move |(_, m)| crate::leaf::path_selects(m, leaf_path))
            .map(|(i, _)| i as u16)
    }

    /// The mapped paths (indices into `mapped_paths`, sorted) that select some of `leaves`.
    pub fn mapped_indices_of_all<'a>(&self, leaves: impl Iterator<Item = &'a str>) -> Vec<u16> {
        let mut mapped: Vec<u16> = leaves.flat_map(|p| self.mapped_indices_of(p)).collect();
        mapped.sort_unstable();
        mapped.dedup();
        mapped
    }

    /// The audiences of a policy (not the removed ones).
    pub fn audiences_of(
        &self,
        policy: PolicyIdx,
    ) -> impl Iterator<Item = (AudienceIdx, &AudiencePlan)> {
        self.audiences
            .iter()
            .enumerate()
            .filter(move |(_, a)| a.policy == policy && !a.removed)
            .map(|(i, a)| (i as AudienceIdx, a))
    }

    /// The stitching kinds some policy uses, in order (both, in a dynamic plan).
    pub fn stitchings(&self) -> Vec<Stitching> {
        if self.dynamic {
            return vec![Stitching::PrivateGraph, Stitching::None];
        }
        let mut kinds: Vec<Stitching> = self.policies.iter().map(|p| p.stitching).collect();
        kinds.sort();
        kinds.dedup();
        kinds
    }
}

impl Plan {
    /// The policies that use stitching `kind`, in order.
    pub fn policies_of(&self, kind: Stitching) -> impl Iterator<Item = PolicyIdx> + Clone + '_ {
        self.policies
            .iter()
            .enumerate()
            .filter(move |(_, p)| p.stitching == kind)
            .map(|(i, _)| i as PolicyIdx)
    }

    /// True when some upload audience belongs to a policy of stitching `kind` (always, in a
    /// dynamic plan).
    pub fn has_uploads(&self, kind: Stitching) -> bool {
        self.dynamic
            || self.audiences.iter().any(|a| {
                matches!(a.kind, AudienceKind::Upload)
                    && self.policies[a.policy as usize].stitching == kind
            })
    }
}

/// The plan in force at each epoch, shared by the workers of a process (see the module doc).
#[derive(Clone, Debug)]
pub struct Plans {
    /// Plans by the first epoch they are in force.
    by_epoch: Arc<RwLock<BTreeMap<Epoch, Arc<Plan>>>>,
}

impl Plans {
    /// `plan` in force from epoch 0.
    pub fn new(plan: Arc<Plan>) -> Plans {
        Plans {
            by_epoch: Arc::new(RwLock::new(BTreeMap::from([(0, plan)]))),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<Epoch, Arc<Plan>>> {
        self.by_epoch.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The plan in force at `epoch`.
    pub fn at(&self, epoch: Epoch) -> Arc<Plan> {
        let plans = self.read();
        match plans.range(..=epoch).next_back() {
            Some((_, plan)) => plan.clone(),
            // Plans before the first kept one were forgotten: the first kept one is the oldest.
            None => plans.values().next().cloned().unwrap_or_default(),
        }
    }

    /// True when the plans may change (the first plan is dynamic).
    pub fn dynamic(&self) -> bool {
        self.read().values().next().is_some_and(|p| p.dynamic)
    }

    /// Puts `plan` in force from `epoch` on. Call before pushing `epoch`'s input, with
    /// `plan.change` set: `epoch` is then a control epoch.
    pub fn set(&self, epoch: Epoch, plan: Arc<Plan>) {
        self.by_epoch
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(epoch, plan);
    }

    /// The control and snapshot epochs in `[from, to)`: the epochs whose plan carries a
    /// change or asks for a snapshot.
    pub fn control_epochs(&self, from: Epoch, to: Epoch) -> Vec<Epoch> {
        if from >= to {
            return Vec::new();
        }
        self.read()
            .range(from..to)
            .filter(|(_, p)| p.change.is_some() || p.snapshot)
            .map(|(e, _)| *e)
            .collect()
    }

    /// True when `epoch` is a snapshot epoch.
    pub fn is_snapshot(&self, epoch: Epoch) -> bool {
        self.read().get(&epoch).is_some_and(|p| p.snapshot)
    }

    /// True when `epoch` is a control epoch.
    pub fn is_control(&self, epoch: Epoch) -> bool {
        self.read().get(&epoch).is_some_and(|p| p.change.is_some())
    }

    /// Forgets the plans no epoch from `epoch` on can need (the one in force at `epoch` stays).
    pub fn forget_before(&self, epoch: Epoch) {
        let mut plans = self.by_epoch.write().unwrap_or_else(|p| p.into_inner());
        let keep = plans.range(..=epoch).next_back().map(|(e, _)| *e);
        if let Some(keep) = keep {
            plans.retain(|e, _| *e >= keep);
        }
    }
}
