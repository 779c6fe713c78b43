//! Attribute leaves: the values a profile holds, and the flattened form the dataflow moves.
//!
//! An attribute *leaf* is any JSON value that is not an object (arrays are leaves). Fragments
//! carry their attributes as a sorted list of `(dotted path, Leaf)`; merged profiles carry a
//! [`Leaves`] map. `Leaf` is `Ord + Hash` so that it can live in differential arrangements, which
//! `serde_json::Value` cannot.

use std::collections::BTreeMap;
use std::ops::Bound;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use smol_str::SmolStr;

/// One attribute value that is not an object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Leaf {
    Null,
    Bool(bool),
    /// A JSON number, kept as its canonical text so it is written back exactly as received.
    Num(SmolStr),
    /// Up to 23 bytes inline, longer ones shared by every copy (as are the other texts).
    Str(SmolStr),
    /// A JSON array, kept as its canonical JSON text.
    Array(SmolStr),
}

impl Leaf {
    /// The leaf for a JSON value, or `None` for an object (objects are not leaves).
    pub fn from_json(value: &Value) -> Option<Leaf> {
        Some(match value {
            Value::Null => Leaf::Null,
            Value::Bool(b) => Leaf::Bool(*b),
            Value::Number(n) => Leaf::Num(n.to_string().into()),
            Value::String(s) => Leaf::Str(s.as_str().into()),
            Value::Array(_) => Leaf::Array(value.to_string().into()),
            Value::Object(_) => return None,
        })
    }

    /// The JSON value of this leaf.
    pub fn to_json(&self) -> Value {
        match self {
            Leaf::Null => Value::Null,
            Leaf::Bool(b) => Value::Bool(*b),
            Leaf::Num(n) => serde_json::from_str(n).unwrap_or(Value::Null),
            Leaf::Str(s) => Value::String(s.to_string()),
            Leaf::Array(a) => serde_json::from_str(a).unwrap_or(Value::Null),
        }
    }

    /// The numeric value of a number leaf.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Leaf::Num(n) => n.parse().ok(),
            _ => None,
        }
    }
}

/// Flattens a JSON object of attributes into `(dotted path, leaf)` pairs, sorted by path.
///
/// Empty objects contribute nothing. Keys are joined with `.` as they are; a key that itself
/// contains a `.` therefore reads as a deeper path, as in XDM's dotted notation.
pub fn flatten(attributes: &serde_json::Map<String, Value>) -> Vec<(String, Leaf)> {
    fn walk(prefix: &str, map: &serde_json::Map<String, Value>, out: &mut Vec<(String, Leaf)>) {
        for (key, value) in map {
            // Concatenated, not `format!`ed: every attribute of every event passes here.
            let mut path = String::with_capacity(prefix.len() + 1 + key.len());
            if !prefix.is_empty() {
                path.push_str(prefix);
                path.push('.');
            }
            path.push_str(key);
            match value {
                Value::Object(inner) => walk(&path, inner, out),
                other => {
                    if let Some(leaf) = Leaf::from_json(other) {
                        out.push((path, leaf));
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    walk("", attributes, &mut out);
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.dedup_by(|later, earlier| later.0 == earlier.0);
    out
}

/// A dotted attribute path, interned (see [`crate::intern`]).
pub type Path = crate::intern::Name;

/// A merged profile's attributes: dotted leaf path to value.
pub type Leaves = BTreeMap<Path, Leaf>;

/// What a path names in a set of leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// The path is a leaf with this value.
    Leaf(&'a Leaf),
    /// The path is an object: some leaf lies below it.
    Object,
}

/// Looks a dotted path up in merged leaves: a leaf, an object above leaves, or nothing.
pub fn lookup<'a>(leaves: &'a Leaves, path: &str) -> Option<Lookup<'a>> {
    if let Some(leaf) = leaves.get(path) {
        return Some(Lookup::Leaf(leaf));
    }
    let prefix = format!("{path}.");
    leaves
        .range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded))
        .next()
        .filter(|(k, _)| k.starts_with(&prefix))
        .map(|_| Lookup::Object)
}

/// True when `leaf_path` is `mapped` itself or lies below it (`mapped` names an object).
pub fn path_selects(mapped: &str, leaf_path: &str) -> bool {
    leaf_path == mapped
        || (leaf_path.len() > mapped.len()
            && leaf_path.starts_with(mapped)
            && leaf_path.as_bytes()[mapped.len()] == b'.')
}

/// Nests dotted leaves back into a JSON object, as in XDM.
///
/// Where one leaf's path is a prefix of another's (a shape conflict between fragments), the
/// shorter path, the leaf, is kept and the deeper ones are dropped.
pub fn nest<'a>(
    leaves: impl IntoIterator<Item = (&'a str, &'a Leaf)>,
) -> serde_json::Map<String, Value> {
    let mut root = serde_json::Map::new();
    let mut sorted: Vec<_> = leaves.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    'leaves: for (path, leaf) in sorted {
        let mut parts = path.split('.').peekable();
        let mut node = &mut root;
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                if !node.contains_key(part) {
                    node.insert(part.to_string(), leaf.to_json());
                }
                continue 'leaves;
            }
            let child = node
                .entry(part.to_string())
                .or_insert_with(|| Value::Object(serde_json::Map::new()));
            match child {
                Value::Object(map) => node = map,
                _ => continue 'leaves,
            }
        }
    }
    root
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_leaf_and_its_path_take_forty_bytes() {
        // Every fragment and view holds its leaves: the state's size.
        assert_eq!(std::mem::size_of::<(Path, Leaf)>(), 40);
    }

    #[test]
    fn flatten_and_nest_round_trip() {
        let v = json!({"person":{"name":{"firstName":"John"},"tags":[1,2]},"points":4.50,"x":{}});
        let flat = flatten(v.as_object().unwrap());
        let paths: Vec<_> = flat.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["person.name.firstName", "person.tags", "points"]);
        let nested = nest(flat.iter().map(|(p, l)| (p.as_str(), l)));
        assert_eq!(
            Value::Object(nested),
            json!({"person":{"name":{"firstName":"John"},"tags":[1,2]},"points":4.50})
        );
    }

    #[test]
    fn lookup_distinguishes_leaf_object_and_missing() {
        let leaves: Leaves = [("a.b".into(), Leaf::Bool(true))].into_iter().collect();
        assert_eq!(
            lookup(&leaves, "a.b"),
            Some(Lookup::Leaf(&Leaf::Bool(true)))
        );
        assert_eq!(lookup(&leaves, "a"), Some(Lookup::Object));
        assert_eq!(lookup(&leaves, "a.bc"), None);
        assert_eq!(lookup(&leaves, "ab"), None);
    }

    #[test]
    fn path_selection_respects_segment_boundaries() {
        assert!(path_selects("person.name", "person.name.firstName"));
        assert!(path_selects("person.name", "person.name"));
        assert!(!path_selects("person.name", "person.names"));
    }

    #[test]
    fn nest_keeps_the_leaf_on_shape_conflict() {
        let a = Leaf::Str("x".into());
        let b = Leaf::Str("y".into());
        let nested = nest([("p", &a), ("p.q", &b)]);
        assert_eq!(Value::Object(nested), json!({"p":"x"}));
    }
}
