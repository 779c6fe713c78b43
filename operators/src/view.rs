//! Profile views: a profile's fragments (and upload memberships) become one compact
//! [`ProfileView`]: its identities, and per merge policy its merged mapped attributes and the
//! audiences it qualifies for.
//!
//! The view is all of a profile's *current* state that the exports read; history (statuses and
//! `lastQualificationTime`) is kept downstream, in [`crate::history`]. The view keeps only the
//! mapped paths, so a write of an unmapped attribute that changes no audience leaves the view
//! as it was and costs nothing past the reduce.

use std::collections::BTreeSet;
use std::sync::Arc;

use differential_dataflow::VecCollection;
use serde::{Deserialize, Serialize};

use crate::input::{Epoch, FragRef, Identity, ProfileKey};
use crate::leaf::{Leaf, Path, path_selects};
use crate::merge::merge;
use crate::plan::{AudienceIdx, AudienceKind, Plan, PolicyIdx, Stitching};

/// One value of a profile's group in the view `reduce`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Member {
    Fragment(FragRef),
    /// One of the profile's identities is uploaded to this audience.
    Upload(AudienceIdx),
}

/// A profile as one merge policy sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PolicyView {
    /// Merged leaves of the mapped paths only, sorted by path.
    pub leaves: Vec<(Path, Leaf)>,
    /// Audiences of the policy the profile qualifies for, sorted.
    pub qualified: Vec<AudienceIdx>,
}

/// A profile at the end of an epoch, for every policy of its stitching.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProfileView {
    /// Sorted, deduplicated, never empty.
    pub identities: Vec<Identity>,
    /// Index in `identities` of the profile's name: the smallest identity (`privateGraph`) or
    /// the primary identity (`none`).
    pub name: usize,
    /// One per policy of the stitching, in [`Plan::policies_of`] order.
    pub policies: Vec<PolicyView>,
}

impl ProfileView {
    /// The identity that names the profile.
    pub fn name(&self) -> &Identity {
        &self.identities[self.name.min(self.identities.len().saturating_sub(1))]
    }
}

/// Builds the view of a profile from its members; `None` for a group with no fragment (an
/// upload alone makes no profile).
pub fn assemble<'a>(
    plan: &Plan,
    kind: Stitching,
    members: impl Iterator<Item = &'a Member> + Clone,
) -> Option<ProfileView> {
    let fragments = members.clone().filter_map(|m| match m {
        Member::Fragment(f) => Some(&**f),
        Member::Upload(_) => None,
    });
    let primary = fragments.clone().next()?.primary().clone();
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
    // Views live in the reduce's output until the next change: no spare capacity.
    identities.shrink_to_fit();
    let name = match kind {
        Stitching::PrivateGraph => 0,
        Stitching::None => identities.binary_search(&primary).unwrap_or(0),
    };

    let is_mapped = |p: &str| plan.mapped_paths.iter().any(|m| path_selects(m, p));
    let policies = plan
        .policies_of(kind)
        .map(|policy| {
            let rule_paths = &plan.rule_paths[policy as usize];
            let merged = merge(
                &plan.policies[policy as usize].merge,
                fragments.clone(),
                |p| is_mapped(p) || rule_paths.iter().any(|r| path_selects(r, p)),
            );
            let qualified: Vec<AudienceIdx> = plan
                .audiences_of(policy)
                .filter(|(idx, a)| match &a.kind {
                    AudienceKind::Rule(rule) => rule.eval(&merged),
                    AudienceKind::Upload => uploaded.contains(idx),
                })
                .map(|(idx, _)| idx)
                .collect();
            let mut leaves: Vec<_> = merged.into_iter().filter(|(p, _)| is_mapped(p)).collect();
            leaves.shrink_to_fit();
            PolicyView { leaves, qualified }
        })
        .collect();
    Some(ProfileView {
        identities,
        name,
        policies,
    })
}

/// The view of every profile of `kind`: one `reduce` over the profiles' members.
pub fn views<'s>(
    plan: Arc<Plan>,
    kind: Stitching,
    members: VecCollection<'s, Epoch, (ProfileKey, Member), isize>,
) -> VecCollection<'s, Epoch, (ProfileKey, Arc<ProfileView>), isize> {
    members.reduce_named("View", move |_profile, members, out| {
        if let Some(view) = assemble(&plan, kind, members.iter().map(|(m, _)| *m)) {
            out.push((Arc::new(view), 1));
        }
    })
}

/// Which policies' indices a policy has within its stitching's views.
pub fn position_in_kind(plan: &Plan, kind: Stitching, policy: PolicyIdx) -> Option<usize> {
    plan.policies_of(kind).position(|p| p == policy)
}
