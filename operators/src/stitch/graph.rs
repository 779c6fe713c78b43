//! The identity graph, kept incrementally: which component each identity is in.
//!
//! A fragment holds identities and links them as a star around its first one. [`Graph`] counts,
//! per identity, the fragments holding it and its links (with multiplicities: two fragments may
//! link the same pair), and each identity's component label: its component's smallest key.
//!
//! Changes are applied a batch (an epoch) at a time. [`Graph::update`] applies one fragment's
//! identity set, inserted or retracted, and notes the identities it touched and those that
//! lost something; [`Graph::settle`] then relabels, in three steps:
//!
//! 1. **remove**: identities no fragment holds any more leave;
//! 2. **split**: a component that lost a link or an identity may have split, so it is walked
//!    from the identities that lost something, in the new graph, and each part is named by its
//!    minimum (every part holds one of them: a path to a removed link ends at its end);
//! 3. **merge**: the components that only gained are joined by union-find over the touched
//!    identities and their old labels; each group takes the least old label or new key, and
//!    only the old components whose label changes are walked to relabel them.
//!
//! So a batch costs the components it splits and those it relabels: a fragment that joins a
//! large component costs nothing more unless it brings that component a smaller key (as in
//! label propagation); a write that changes no identity set never arrives here.

use rustc_hash::{FxHashMap, FxHashSet};

use crate::input::{IdKey, ProfileKey};
use crate::members::Counts;

/// One identity in the graph (32 bytes: the graph holds every identity on one worker).
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
    /// Of those, the ones that lost a link or a holding fragment.
    shrunk: Vec<IdKey>,
    /// Identities visited by walks so far: the stage's work beyond the touched identities.
    walked: u64,
}

/// The root of `x` in a union-find forest kept as a parent map (absent: a root).
fn find(parent: &mut FxHashMap<IdKey, IdKey>, x: IdKey) -> IdKey {
    let mut root = x;
    while let Some(&p) = parent.get(&root) {
        root = p;
    }
    let mut at = x;
    while let Some(&p) = parent.get(&at) {
        if p == root {
            break;
        }
        parent.insert(at, root);
        at = p;
    }
    root
}

fn union(parent: &mut FxHashMap<IdKey, IdKey>, a: IdKey, b: IdKey) {
    let (a, b) = (find(parent, a), find(parent, b));
    if a != b {
        parent.insert(a.max(b), a.min(b));
    }
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
            if diff < 0 {
                self.shrunk.push(identity);
            }
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
        let mut shrunk = std::mem::take(&mut self.shrunk);
        shrunk.sort_unstable();
        shrunk.dedup();
        self.remove_unheld(&touched, &mut change);
        let visited = self.split(&shrunk, &mut change);
        let grown: Vec<IdKey> = touched
            .into_iter()
            .filter(|i| !visited.contains(i) && self.nodes.contains_key(i))
            .collect();
        self.merge(&grown, &mut change);
    }

    /// Identities no fragment holds any more leave, with their labels.
    fn remove_unheld(
        &mut self,
        touched: &[IdKey],
        change: &mut impl FnMut(IdKey, ProfileKey, isize),
    ) {
        for identity in touched {
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
    }

    /// The components that lost a link or an identity may have split: walks each from the
    /// identities that lost something and names it by its minimum. Returns what it walked.
    fn split(
        &mut self,
        shrunk: &[IdKey],
        change: &mut impl FnMut(IdKey, ProfileKey, isize),
    ) -> FxHashSet<IdKey> {
        let mut visited = FxHashSet::default();
        let mut component = Vec::new();
        for &start in shrunk {
            if !self.nodes.contains_key(&start) || !visited.insert(start) {
                continue;
            }
            self.walk(start, &mut visited, &mut component);
            let label = component.iter().copied().min().unwrap_or(start);
            for identity in component.drain(..) {
                self.relabel(identity, label, change);
            }
        }
        visited
    }

    /// The components that only gained links and identities: the old components an epoch's
    /// new links join (found by union-find over the touched identities and their old labels)
    /// take the least of their labels and new identities' keys, and only the components whose
    /// label changes are walked. A fragment joining a large component costs nothing more
    /// unless it brings a smaller identity.
    fn merge(&mut self, grown: &[IdKey], change: &mut impl FnMut(IdKey, ProfileKey, isize)) {
        let grown_set: FxHashSet<IdKey> = grown.iter().copied().collect();
        let mut parent: FxHashMap<IdKey, IdKey> = FxHashMap::default();
        for &identity in grown {
            let Some(node) = self.nodes.get(&identity) else {
                continue;
            };
            if let Some(label) = node.label() {
                union(&mut parent, identity, label);
            }
            for &next in node.links.present() {
                if grown_set.contains(&next) {
                    union(&mut parent, identity, next);
                }
            }
        }
        // Per group: its identities (the touched ones) and the least key or old label.
        let mut groups: FxHashMap<IdKey, (Vec<IdKey>, ProfileKey)> = FxHashMap::default();
        for &identity in grown {
            let root = find(&mut parent, identity);
            let Some(node) = self.nodes.get(&identity) else {
                continue;
            };
            let least = node.label().unwrap_or(identity);
            let group = groups.entry(root).or_insert((Vec::new(), least));
            group.0.push(identity);
            group.1 = group.1.min(least);
        }
        let mut stack = Vec::new();
        for (members, label) in groups.into_values() {
            for identity in members {
                let old = self.nodes.get(&identity).and_then(Node::label);
                match old {
                    None => self.relabel(identity, label, change),
                    // The rest of an old component that takes another label.
                    Some(old) if old != label => {
                        stack.push(identity);
                        while let Some(at) = stack.pop() {
                            let Some(node) = self.nodes.get(&at) else {
                                continue;
                            };
                            if node.label != old {
                                continue;
                            }
                            stack.extend(node.links.present().copied());
                            self.walked += 1;
                            self.relabel(at, label, change);
                        }
                    }
                    Some(_) => {}
                }
            }
        }
    }

    /// Gives `identity` the label `label`, saying so if it changes.
    fn relabel(
        &mut self,
        identity: IdKey,
        label: ProfileKey,
        change: &mut impl FnMut(IdKey, ProfileKey, isize),
    ) {
        let Some(node) = self.nodes.get_mut(&identity) else {
            return;
        };
        if node.label != label {
            if let Some(old) = node.label() {
                change(identity, old, -1);
            }
            change(identity, label, 1);
            node.label = label;
        }
    }

    /// Collects `start`'s component into `component`, marking it visited.
    fn walk(&mut self, start: IdKey, visited: &mut FxHashSet<IdKey>, component: &mut Vec<IdKey>) {
        let mut stack = vec![start];
        while let Some(identity) = stack.pop() {
            self.walked += 1;
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

    /// How many identities walks have visited since the graph was made.
    pub fn walked(&self) -> u64 {
        self.walked
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
    use super::*;

    #[test]
    fn a_node_is_compact() {
        assert_eq!(std::mem::size_of::<Node>(), 32);
    }
}
