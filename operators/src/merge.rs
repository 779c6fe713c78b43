//! Leaf-level attribute merge: a profile's attributes from its fragments, per merge policy.
//!
//! For every leaf path, one fragment wins and gives the value. `timestampOrdered` prefers the
//! newest timestamp, then the later event; `datasetPrecedence` prefers the earliest-listed
//! dataset (unlisted ones rank after every listed one), then the newest timestamp, then the later
//! event. The rank is computed once per fragment, and the merge is a single pass over the
//! fragments' sorted leaves.

use std::collections::BTreeMap;

use crate::input::Fragment;
use crate::leaf::{Leaf, Leaves, Path};
use crate::plan::AttributeMerge;

/// How strongly a fragment's values win: larger wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    /// `datasetPrecedence`: negated position in the list (`i64::MIN` for unlisted datasets).
    precedence: i64,
    ts: i64,
    seq: u64,
}

fn rank(policy: &AttributeMerge, fragment: &Fragment) -> Rank {
    let precedence = match policy {
        AttributeMerge::TimestampOrdered => 0,
        AttributeMerge::DatasetPrecedence(order) => order
            .iter()
            .position(|d| **d == *fragment.dataset)
            .map(|p| -(p as i64))
            .unwrap_or(i64::MIN),
    };
    Rank {
        precedence,
        ts: fragment.ts,
        seq: fragment.seq,
    }
}

/// Merges the leaves of `fragments`, keeping only paths accepted by `keep`.
pub fn merge<'a>(
    policy: &AttributeMerge,
    fragments: impl IntoIterator<Item = &'a Fragment>,
    mut keep: impl FnMut(&str) -> bool,
) -> Leaves {
    let mut best: BTreeMap<&'a Path, (Rank, &'a Leaf)> = BTreeMap::new();
    for fragment in fragments {
        let r = rank(policy, fragment);
        for (path, leaf) in &fragment.leaves {
            if !keep(path) {
                continue;
            }
            match best.get_mut(path) {
                Some(slot) if slot.0 >= r => {}
                Some(slot) => *slot = (r, leaf),
                None => {
                    best.insert(path, (r, leaf));
                }
            }
        }
    }
    best.into_iter()
        .map(|(p, (_, l))| (*p, l.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::Identity;

    fn frag(dataset: &str, ts: i64, seq: u64, leaves: &[(&str, &str)]) -> Fragment {
        Fragment {
            dataset: dataset.into(),
            key: crate::input::fragment_key(dataset, &format!("{dataset}-{seq}")),
            identities: vec![Identity::new("email", "a")].into(),
            primary: 0,
            leaves: leaves
                .iter()
                .map(|(p, v)| (Path::from(*p), Leaf::Str((*v).into())))
                .collect(),
            ts,
            seq,
        }
    }

    fn get<'a>(l: &'a Leaves, p: &str) -> &'a str {
        match l.get(p) {
            Some(Leaf::Str(s)) => s,
            _ => "-",
        }
    }

    #[test]
    fn timestamp_ordered_takes_newest_per_leaf_and_breaks_ties_by_event_order() {
        let a = frag("crm", 10, 1, &[("n", "old"), ("x", "crm")]);
        let b = frag("web", 20, 2, &[("n", "new")]);
        let c = frag("app", 20, 3, &[("x", "tie-later")]);
        let m = merge(&AttributeMerge::TimestampOrdered, [&a, &b, &c], |_| true);
        assert_eq!(get(&m, "n"), "new");
        assert_eq!(get(&m, "x"), "tie-later");
    }

    #[test]
    fn dataset_precedence_ranks_listed_first_then_newest() {
        let policy = AttributeMerge::DatasetPrecedence(vec!["crm".into(), "web".into()]);
        let crm = frag("crm", 10, 1, &[("n", "crm")]);
        let web = frag("web", 99, 2, &[("n", "web"), ("w", "web")]);
        let app_old = frag("app", 5, 3, &[("w", "app"), ("z", "app-old")]);
        let app_new = frag("app2", 6, 4, &[("z", "app-new")]);
        let m = merge(&policy, [&app_new, &web, &crm, &app_old], |_| true);
        assert_eq!(get(&m, "n"), "crm");
        assert_eq!(get(&m, "w"), "web");
        assert_eq!(get(&m, "z"), "app-new");
    }

    #[test]
    fn keep_filters_paths() {
        let a = frag("crm", 10, 1, &[("n", "a"), ("secret", "s")]);
        let m = merge(&AttributeMerge::TimestampOrdered, [&a], |p| p == "n");
        assert_eq!(m.len(), 1);
    }
}
