//! Ordering across a profile's history (SPEC §4): an export waits until every earlier export
//! to the same destination that shares an *order key* with it — an identity of its profile —
//! has been delivered or dead-lettered. A profile whose name changed, that merged or split,
//! therefore never overtakes its predecessors' exports, while exports of unrelated profiles go
//! out side by side.
//!
//! A lock table: per `(destination, key)` the ids of the exports holding or waiting for the
//! key, in submission order. An export starts when it heads the line of every one of its keys;
//! when it ends it leaves its lines, and the exports that now head all of theirs start. Memory
//! is bounded by what is queued or in flight (entries leave with their exports).

use std::collections::{HashMap, VecDeque};

/// A waiting export: its destination, its keys and the export.
type Waiting<T> = (String, Vec<u64>, T);

/// Exports (any `T`) waiting for or holding their order keys.
pub struct OrderTable<T> {
    next: u64,
    lines: HashMap<(String, u64), VecDeque<u64>>,
    /// Not started: the destination, the keys and the item.
    waiting: HashMap<u64, Waiting<T>>,
    /// Started: the destination and the keys to release.
    started: HashMap<u64, (String, Vec<u64>)>,
}

impl<T> Default for OrderTable<T> {
    fn default() -> Self {
        OrderTable {
            next: 0,
            lines: HashMap::new(),
            waiting: HashMap::new(),
            started: HashMap::new(),
        }
    }
}

impl<T> OrderTable<T> {
    /// Adds an export with its keys; returns it with its id if it may start now.
    pub fn push(&mut self, destination: &str, mut keys: Vec<u64>, item: T) -> Option<(u64, T)> {
        keys.sort_unstable();
        keys.dedup();
        let id = self.next;
        self.next += 1;
        for key in &keys {
            self.lines
                .entry((destination.to_owned(), *key))
                .or_default()
                .push_back(id);
        }
        if self.heads_all(destination, &keys, id) {
            self.started.insert(id, (destination.to_owned(), keys));
            Some((id, item))
        } else {
            self.waiting
                .insert(id, (destination.to_owned(), keys, item));
            None
        }
    }

    fn heads_all(&self, destination: &str, keys: &[u64], id: u64) -> bool {
        keys.iter().all(|k| {
            self.lines
                .get(&(destination.to_owned(), *k))
                .and_then(|line| line.front())
                == Some(&id)
        })
    }

    /// Marks export `id` ended; returns the exports that may start now, in submission order.
    pub fn finish(&mut self, id: u64) -> Vec<(u64, T)> {
        let Some((destination, keys)) = self.started.remove(&id) else {
            return Vec::new();
        };
        let mut candidates = Vec::new();
        for key in keys {
            let line_key = (destination.clone(), key);
            if let Some(line) = self.lines.get_mut(&line_key) {
                line.retain(|x| *x != id);
                match line.front() {
                    Some(next) => candidates.push(*next),
                    None => {
                        self.lines.remove(&line_key);
                    }
                }
            }
        }
        candidates.sort_unstable();
        candidates.dedup();
        let mut ready = Vec::new();
        for candidate in candidates {
            let startable = self
                .waiting
                .get(&candidate)
                .is_some_and(|(d, keys, _)| self.heads_all(d, keys, candidate));
            if startable && let Some((d, keys, item)) = self.waiting.remove(&candidate) {
                self.started.insert(candidate, (d, keys));
                ready.push((candidate, item));
            }
        }
        ready
    }

    /// Withdraws every export not yet started, in submission order; started ones stay.
    pub fn withdraw(&mut self) -> Vec<T> {
        let mut waiting: Vec<(u64, Waiting<T>)> = self.waiting.drain().collect();
        waiting.sort_by_key(|(id, _)| *id);
        for (id, (destination, keys, _)) in &waiting {
            for key in keys {
                let line_key = (destination.clone(), *key);
                if let Some(line) = self.lines.get_mut(&line_key) {
                    line.retain(|x| x != id);
                    if line.is_empty() {
                        self.lines.remove(&line_key);
                    }
                }
            }
        }
        waiting.into_iter().map(|(_, (_, _, item))| item).collect()
    }

    /// Exports waiting or started.
    pub fn len(&self) -> usize {
        self.waiting.len() + self.started.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_keys_wait_and_unrelated_exports_pass() {
        let mut t = OrderTable::default();
        // A profile {1, 2}; then its successor after a merge {2, 3}; an unrelated {9}; then a
        // split part {1} of the first.
        assert_eq!(t.push("d", vec![1, 2], "a"), Some((0, "a")));
        assert_eq!(t.push("d", vec![2, 3], "b"), None);
        assert_eq!(t.push("d", vec![9], "c"), Some((2, "c")));
        assert_eq!(t.push("d", vec![1], "e"), None);
        // Another destination is not held back.
        assert_eq!(t.push("x", vec![1, 2], "f"), Some((4, "f")));
        // `a` ends: `b` and `e` head all their lines now.
        assert_eq!(t.finish(0), vec![(1, "b"), (3, "e")]);
        assert!(t.finish(1).is_empty());
        assert_eq!(t.len(), 3);
        for id in [2, 3, 4] {
            t.finish(id);
        }
        assert!(t.is_empty() && t.lines.is_empty());
    }

    #[test]
    fn an_export_waits_for_every_key_it_shares() {
        let mut t = OrderTable::default();
        assert!(t.push("d", vec![1], "a").is_some());
        assert!(t.push("d", vec![2], "b").is_some());
        // A merge of both: waits for a and b.
        assert!(t.push("d", vec![1, 2], "c").is_none());
        assert!(t.finish(0).is_empty());
        assert_eq!(t.finish(1), vec![(2, "c")]);
    }

    #[test]
    fn withdrawn_exports_leave_their_lines() {
        let mut t = OrderTable::default();
        assert!(t.push("d", vec![1], "a").is_some());
        assert!(t.push("d", vec![1], "b").is_none());
        assert!(t.push("d", vec![1, 2], "c").is_none());
        assert_eq!(t.withdraw(), vec!["b", "c"]);
        assert!(t.finish(0).is_empty());
        assert!(t.is_empty() && t.lines.is_empty());
    }
}
