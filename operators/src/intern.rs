//! Interned names: the few distinct identity namespaces, dataset names and attribute paths
//! are stored once and shared by every fragment and view that names them.
//!
//! A [`Name`] is a thin pointer to its one copy: eight bytes where a shared string is sixteen,
//! compared by address for equality and by text for order, so it sorts and looks up like the
//! string (it borrows as `str`). The interner is process-wide and only grows; it is fed only
//! with names that the data model bounds (namespaces, datasets, and the attribute paths that
//! some rule or mapping reads, after projection), never with free-form values.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Serialize};

/// An interned name.
#[derive(Clone, Copy)]
pub struct Name(&'static String);

impl Name {
    /// The shared copy of `name`.
    pub fn new(name: &str) -> Name {
        static NAMES: OnceLock<Mutex<HashMap<&'static str, &'static String>>> = OnceLock::new();
        let names = NAMES.get_or_init(Default::default);
        // A poisoned lock still holds a valid map: no operation leaves it half-written.
        let mut names = names.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&shared) = names.get(name) {
            return Name(shared);
        }
        let shared: &'static String = Box::leak(Box::new(name.to_string()));
        names.insert(shared.as_str(), shared);
        Name(shared)
    }

    pub fn as_str(&self) -> &'static str {
        self.0
    }
}

impl From<&str> for Name {
    fn from(name: &str) -> Name {
        Name::new(name)
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        self.0
    }
}

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        self.0
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self.0, other.0)
    }
}
impl Eq for Name {}
impl PartialOrd for Name {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Name {
    fn cmp(&self, other: &Self) -> Ordering {
        match self == other {
            true => Ordering::Equal,
            false => self.0.as_str().cmp(other.0.as_str()),
        }
    }
}
impl Hash for Name {
    /// As the text hashes, so that a map keyed by names can be searched by `str`.
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.as_str().hash(state);
    }
}
impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.0, f)
    }
}
impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// Serialized as its text (as the shared strings it replaced were).
impl Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        Ok(Name::new(&text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_names_share_one_copy_and_order_by_text() {
        let a = Name::new("person.name.firstName");
        let b = Name::new(&String::from("person.name.firstName"));
        assert!(std::ptr::eq(a.as_str(), b.as_str()));
        assert_eq!(a, b);
        assert_ne!(a, Name::new("person.name.lastName"));
        assert!(Name::new("ecid") < Name::new("email") && Name::new("email") < Name::new("emails"));
        assert_eq!(std::mem::size_of::<Name>(), 8);
    }

    #[test]
    fn a_map_of_names_is_searched_by_text_and_names_serialize_as_text() {
        let map: std::collections::BTreeMap<Name, u8> = [(Name::new("b"), 2), (Name::new("a"), 1)]
            .into_iter()
            .collect();
        assert_eq!(map.get("b"), Some(&2));
        let json = serde_json::to_string(&Name::new("a.b")).unwrap();
        assert_eq!(json, "\"a.b\"");
        let back: Name = serde_json::from_str(&json).unwrap();
        assert_eq!(back, Name::new("a.b"));
    }
}
