//! The linker: from identities to profiles, before and after each epoch.
//!
//! The identity stage ([`crate::identity`]) keeps, per identity, the profile(s) holding it, fed
//! by the stitching's `(identity, profile)` changes. Once an epoch is complete it knows where
//! each identity was before the epoch and where it is after, and says so to the profiles, as
//! this module decides:
//!
//! - **successors**: under `privateGraph`, an identity that moved from profile `a` to `b` makes
//!   `b` a successor of `a` (SPEC §3: profiles sharing an identity continue each other);
//! - **marks**: a fragment's mark, anchored at one of its identities, goes to the profile that
//!   held that identity before the epoch (*before*) or holds it after (*after*); an upload's
//!   mark goes to every profile holding the identity after, and to those that held it before
//!   in case they end in this epoch (a vanished profile's last export carries the time).
//!
//! Under `none` no identity links profiles (a profile continues only itself, by its primary
//! identity), and the linker only resolves upload marks.

use serde::{Deserialize, Serialize};

use crate::input::{Mark, ProfileKey};
use crate::plan::PolicyIdx;
use crate::view::ProfileView;

/// How a mark concerns a profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// An event on a fragment the profile held before the epoch: for the profile's successors.
    Before,
    /// An event for the profile as it is after the epoch.
    After,
    /// An upload of an identity the profile held: counts only if the profile ends.
    IfGone,
}

/// What a profile is told, keyed by the profile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToProfile {
    /// The profile's view changed: the old one retracted (`-1`), the new one inserted (`+1`).
    View {
        view: std::sync::Arc<ProfileView>,
        diff: isize,
    },
    /// Profile `0` continues this one (it now holds one of this one's identities).
    Successor(ProfileKey),
    /// A mark, for every policy of the stitching (`None`) or one.
    Mark {
        role: Role,
        policy: Option<PolicyIdx>,
        mark: Mark,
    },
}

/// A mark waiting at an identity for the profiles to resolve it to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MarkAt {
    /// A fragment anchored at this identity was written: the mark goes to its profile before
    /// (`before: true`) or after the epoch.
    Fragment { before: bool, mark: Mark },
    /// The identity was uploaded to (or removed from) an audience of `policy`.
    Upload { policy: PolicyIdx, mark: Mark },
}

/// The successors an identity's move names: each profile that held it before the epoch is
/// continued by each profile holding it after (`privateGraph` only).
pub fn successors<'a>(
    was: &'a [ProfileKey],
    now: &'a [ProfileKey],
) -> impl Iterator<Item = (ProfileKey, ToProfile)> + 'a {
    was.iter().flat_map(move |&a| {
        now.iter()
            .filter(move |&&b| b != a)
            .map(move |&b| (a, ToProfile::Successor(b)))
    })
}

/// The profiles a mark at an identity goes to, and how, from the profiles holding the
/// identity before the epoch (`was`) and after it (`now`).
pub fn resolve(
    mark: MarkAt,
    was: &[ProfileKey],
    now: &[ProfileKey],
    mut send: impl FnMut(ProfileKey, ToProfile),
) {
    let to = |role, policy, mark: &Mark| ToProfile::Mark {
        role,
        policy,
        mark: mark.clone(),
    };
    match mark {
        MarkAt::Fragment { before: true, mark } => {
            for &p in was {
                send(p, to(Role::Before, None, &mark));
            }
        }
        MarkAt::Fragment {
            before: false,
            mark,
        } => {
            for &p in now {
                send(p, to(Role::After, None, &mark));
            }
        }
        MarkAt::Upload { policy, mark } => {
            for &p in now {
                send(p, to(Role::After, Some(policy), &mark));
            }
            for &p in was.iter().filter(|p| !now.contains(p)) {
                send(p, to(Role::IfGone, Some(policy), &mark));
            }
        }
    }
}
