//! Profile assembly: a profile's fragments (and upload memberships) become one merged
//! [`View`] per merge policy, with the audiences it qualifies for.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::input::{Fragment, Identity};
use crate::leaf::{Leaf, path_selects};
use crate::merge::merge;
use crate::plan::{AudienceIdx, AudienceKind, Plan, PolicyIdx};

/// One value of a profile's group in the assembly `reduce`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Member {
    Fragment(Arc<Fragment>),
    /// One of the profile's identities is uploaded to this audience.
    Upload(AudienceIdx),
}

/// A profile as one merge policy sees it, at the end of an epoch.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct View {
    /// Sorted, deduplicated.
    pub identities: Vec<Identity>,
    /// Merged leaves of the mapped paths only, sorted by path.
    pub leaves: Vec<(String, Leaf)>,
    /// Audiences of the policy the profile qualifies for, sorted.
    pub qualified: Vec<AudienceIdx>,
}

/// Builds the view of a profile for `policy` from its members.
pub fn assemble<'a>(
    plan: &Plan,
    policy: PolicyIdx,
    members: impl Iterator<Item = &'a Member> + Clone,
) -> View {
    let fragments = members.clone().filter_map(|m| match m {
        Member::Fragment(f) => Some(&**f),
        Member::Upload(_) => None,
    });
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

    let audiences: Vec<_> = plan.audiences_of(policy).collect();
    let rule_paths = &plan.rule_paths[policy as usize];
    let is_mapped = |p: &str| plan.mapped_paths.iter().any(|m| path_selects(m, p));
    let merged = merge(&plan.policies[policy as usize].merge, fragments, |p| {
        is_mapped(p) || rule_paths.iter().any(|r| path_selects(r, p))
    });

    let qualified = audiences
        .iter()
        .filter(|(idx, a)| match &a.kind {
            AudienceKind::Rule(rule) => rule.eval(&merged),
            AudienceKind::Upload => uploaded.contains(idx),
        })
        .map(|(idx, _)| *idx)
        .collect();

    View {
        identities,
        leaves: merged.into_iter().filter(|(p, _)| is_mapped(p)).collect(),
        qualified,
    }
}
