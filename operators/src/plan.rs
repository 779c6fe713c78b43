//! The compiled configuration the dataflow runs on: merge policies, audiences and the
//! destinations' mappings, resolved to dense indices.
//!
//! The binary's `config` stage parses and validates the user's JSON and builds a [`Plan`]; the
//! dataflow only ever reads it (it is shared by all workers behind an `Arc`).

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
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
    /// leaves can never reach an export, so ingest drops them.
    pub read_paths: Vec<String>,
}

impl Plan {
    /// Builds the derived tables (`mapped_paths`). Call once after filling the other fields.
    pub fn finish(mut self) -> Self {
        let mut paths: Vec<String> = self
            .destinations
            .iter()
            .flat_map(|d| d.attributes.iter().cloned())
            .collect();
        paths.sort();
        paths.dedup();
        self.mapped_paths = paths;
        self.rule_paths = (0..self.policies.len())
            .map(|p| {
                let mut paths: Vec<String> = self
                    .audiences
                    .iter()
                    .filter(|a| a.policy as usize == p)
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

    /// True when some rule or mapping reads the leaf at `leaf_path`.
    pub fn reads(&self, leaf_path: &str) -> bool {
        self.read_paths
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

    /// The audiences of a policy.
    pub fn audiences_of(
        &self,
        policy: PolicyIdx,
    ) -> impl Iterator<Item = (AudienceIdx, &AudiencePlan)> {
        self.audiences
            .iter()
            .enumerate()
            .filter(move |(_, a)| a.policy == policy)
            .map(|(i, a)| (i as AudienceIdx, a))
    }

    /// The stitching kinds some policy uses, in order.
    pub fn stitchings(&self) -> Vec<Stitching> {
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

    /// True when some upload audience belongs to a policy of stitching `kind`.
    pub fn has_uploads(&self, kind: Stitching) -> bool {
        self.audiences.iter().any(|a| {
            matches!(a.kind, AudienceKind::Upload)
                && self.policies[a.policy as usize].stitching == kind
        })
    }
}
