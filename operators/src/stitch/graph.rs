//! The identity graph, kept incrementally: which component each identity is in.
//!
//! A fragment holds identities and links them as a star around its first one. [`Graph`] counts,
//! per identity, the fragments holding it and its links (with multiplicities: two fragments may
//! link the same pair), and each identity's component label: its component's smallest key.
//!
//! Changes are applied a batch (an epoch) at a time. [`Graph::update`] applies one fragment's
//! identity set, inserted or retracted, and notes the identities it touched; [`Graph::settle`]
//! then walks the components that hold touched identities in the new graph and relabels them.
//! That is enough: an identity whose component gained a link is connected to the link's ends,
//! and one whose component lost a link (a split) or an identity (a removed minimum) is still
//! connected to an end of a removed link. So the cost of a batch is the size of the components
//! it touches, nothing else; a write that changes no identity set never arrives here.

use rustc_hash::{FxHashMap, FxHashSet};

use crate::input::{IdKey, ProfileKey};
use crate::members::Counts;

/// One identity in the graph (40 bytes: the graph holds every identity on one worker).
#[derive(Debug)]
struct Node {
    /// Its component's label once settled, else [`UNSETTLED`].
    label: ProfileKey,
    /// The fragments holding the identity (a count; the node exists while it is positive).
    held: i32,
    /// The identities it is linked to, with multiplicities.
    links: Counts<IdKey>,
}

/// The label of a node not yet settled: no identity key has the top bit set.
const UNSETTLED: ProfileKey = u64::MAX;

impl Default for Node {
    fn default() -> Self {
        Node {
            label: UNSETTLED,
            held: 0,
            links: Counts::default(),
        }
    }
}

impl Node {
    fn label(&self) -> Option<ProfileKey> {
        (self.label != UNSETTLED).then_some(self.label)
    }
}

/// The identity graph and its component labels (see the module doc).
#[derive(Debug, Default)]
pub struct Graph {
    nodes: FxHashMap<IdKey, Node>,
    /// Identities touched since the last [`Graph::settle`].
    touched: Vec<IdKey>,
}

impl Graph {
    /// Applies a fragment's identity set with multiplicity `diff` (+1 inserted, -1 retracted).
    pub fn update(&mut self, identities: &[IdKey], diff: isize) {
        let Some(&hub) = identities.first() else {
            return;
        };
        for &identity in identities {
            debug_assert!(
                identity != UNSETTLED,
                "identity keys keep the top bit clear"
            );
            self.nodes.entry(identity).or_default().held += diff as i32;
            self.touched.push(identity);
            if identity != hub {
                self.link(hub, identity, diff);
                self.link(identity, hub, diff);
            }
        }
    }

    fn link(&mut self, from: IdKey, to: IdKey, diff: isize) {
        self.nodes.entry(from).or_default().links.update(to, diff);
    }

    /// Relabels the components holding identities touched since the last call and calls
    /// `change(identity, label, ±1)` for every label that changed: `-1` for the old label (if
    /// the identity had one), `+1` for the new one (if it is still held).
    pub fn settle(&mut self, mut change: impl FnMut(IdKey, ProfileKey, isize)) {
        let mut touched = std::mem::take(&mut self.touched);
        touched.sort_unstable();
        touched.dedup();
        // Identities no fragment holds any more leave, with their labels.
        for identity in &touched {
            if let Some(node) = self.nodes.get(identity)
                && node.held <= 0
            {
                debug_assert!(node.held == 0 && node.links.is_empty(), "{node:?}");
                if let Some(label) = node.label() {
                    change(*identity, label, -1);
                }
                self.nodes.remove(identity);
            }
        }
        let mut visited = FxHashSet::default();
        let mut component = Vec::new();
        for start in touched {
            if !self.nodes.contains_key(&start) || !visited.insert(start) {
                continue;
            }
            self.walk(start, &mut visited, &mut component);
            let label = component.iter().copied().min().unwrap_or(start);
            for identity in component.drain(..) {
                let Some(node) = self.nodes.get_mut(&identity) else {
                    continue;
                };
                if node.label != label {
                    if let Some(old) = node.label() {
                        change(identity, old, -1);
                    }
                    change(identity, label, 1);
                    node.label = label;
                }
            }
        }
    }

    /// Collects `start`'s component into `component`, marking it visited.
    fn walk(&self, start: IdKey, visited: &mut FxHashSet<IdKey>, component: &mut Vec<IdKey>) {
        let mut stack = vec![start];
        while let Some(identity) = stack.pop() {
            component.push(identity);
            if let Some(node) = self.nodes.get(&identity) {
                for &next in node.links.present() {
                    if visited.insert(next) {
                        stack.push(next);
                    }
                }
            }
        }
    }

    /// The identities held, with their labels (for tests and snapshots of state).
    pub fn labels(&self) -> impl Iterator<Item = (IdKey, Option<ProfileKey>)> + '_ {
        self.nodes.iter().map(|(i, n)| (*i, n.label()))
    }

    /// How many identities the graph holds.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the graph holds no identity.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Components from scratch: union-find over the sets, each labelled by its minimum.
    fn from_scratch(sets: &BTreeMap<u64, Vec<IdKey>>) -> BTreeMap<IdKey, ProfileKey> {
        let mut parent: BTreeMap<IdKey, IdKey> = BTreeMap::new();
        fn find(parent: &mut BTreeMap<IdKey, IdKey>, x: IdKey) -> IdKey {
            let p = parent[&x];
            if p == x {
                return x;
            }
            let root = find(parent, p);
            parent.insert(x, root);
            root
        }
        for ids in sets.values() {
            for &i in ids {
                parent.entry(i).or_insert(i);
            }
            for pair in ids.windows(2) {
                let (a, b) = (find(&mut parent, pair[0]), find(&mut parent, pair[1]));
                parent.insert(a.max(b), a.min(b));
            }
        }
        let keys: Vec<IdKey> = parent.keys().copied().collect();
        keys.into_iter()
            .map(|k| (k, find(&mut parent, k)))
            .collect()
    }

    #[test]
    fn a_node_is_compact() {
        assert_eq!(std::mem::size_of::<Node>(), 40);
    }

    #[test]
    fn labels_follow_merges_splits_and_deletes_batch_by_batch() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut below = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let mut graph = Graph::default();
        let mut sets: BTreeMap<u64, Vec<IdKey>> = BTreeMap::new();
        // The labels as the emitted changes say, to check the changes as well as the state.
        let mut emitted: BTreeMap<(IdKey, ProfileKey), isize> = BTreeMap::new();
        let (mut merges, mut splits) = (0, 0);
        for _batch in 0..400 {
            let components_before = from_scratch(&sets).values().copied().collect::<Vec<_>>();
            let before = components_before
                .iter()
                .collect::<std::collections::BTreeSet<_>>();
            // Several writes a batch, some to the same fragment: the graph sees the
            // retraction of the old set and the insertion of the new, in any order.
            let mut writes = Vec::new();
            for _ in 0..1 + below(4) {
                let fragment = below(30);
                let new: Option<Vec<IdKey>> = (below(4) != 0).then(|| {
                    let mut ids: Vec<IdKey> = (0..1 + below(3)).map(|_| below(40)).collect();
                    ids.dedup();
                    ids
                });
                if let Some(old) = sets.remove(&fragment) {
                    writes.push((old, -1));
                }
                if let Some(new) = new {
                    writes.push((new.clone(), 1));
                    sets.insert(fragment, new);
                }
            }
            if below(2) == 0 {
                writes.reverse();
            }
            for (ids, diff) in writes {
                graph.update(&ids, diff);
            }
            graph.settle(|i, l, d| {
                let count = emitted.entry((i, l)).or_default();
                *count += d;
                if *count == 0 {
                    emitted.remove(&(i, l));
                }
            });
            let expected = from_scratch(&sets);
            let after = expected.values().collect::<std::collections::BTreeSet<_>>();
            merges += usize::from(after.len() < before.len());
            splits += usize::from(after.len() > before.len());
            let held: BTreeMap<IdKey, ProfileKey> = graph
                .labels()
                .map(|(i, l)| (i, l.expect("every identity held is labelled")))
                .collect();
            assert_eq!(held, expected);
            let said: BTreeMap<IdKey, ProfileKey> = emitted
                .iter()
                .map(|(&(i, l), &n)| {
                    assert_eq!(n, 1, "identity {i} label {l}");
                    (i, l)
                })
                .collect();
            assert_eq!(said, expected);
        }
        assert!(
            merges > 20 && splits > 20,
            "merges {merges}, splits {splits}"
        );
    }
}
