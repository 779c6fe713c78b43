//! Interned strings: the few distinct identity namespaces, dataset names and attribute paths
//! are stored once and shared by every fragment and view that names them.
//!
//! The interner is process-wide and only grows; it is fed only with names that the data model
//! bounds (namespaces, datasets, and the attribute paths that some rule or mapping reads, after
//! projection), never with free-form values.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

/// The shared copy of `s`.
pub fn intern(s: &str) -> Arc<str> {
    static STRINGS: OnceLock<Mutex<HashSet<Arc<str>>>> = OnceLock::new();
    let strings = STRINGS.get_or_init(Default::default);
    // A poisoned lock still holds a valid set: no operation leaves it half-written.
    let mut strings = strings.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(shared) = strings.get(s) {
        return shared.clone();
    }
    let shared: Arc<str> = Arc::from(s);
    strings.insert(shared.clone());
    shared
}

/// An identity namespace's name, stored once for the process: a thin pointer, compared by
/// address for equality and by name for order. Like every interned name it is never freed.
#[derive(Clone, Copy)]
pub struct Namespace(&'static String);

impl Namespace {
    pub fn new(name: &str) -> Namespace {
        static NAMES: OnceLock<Mutex<HashMap<&'static str, &'static String>>> = OnceLock::new();
        let names = NAMES.get_or_init(Default::default);
        // A poisoned lock still holds a valid map: no operation leaves it half-written.
        let mut names = names.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&shared) = names.get(name) {
            return Namespace(shared);
        }
        let shared: &'static String = Box::leak(Box::new(name.to_string()));
        names.insert(shared.as_str(), shared);
        Namespace(shared)
    }

    pub fn as_str(&self) -> &'static str {
        self.0
    }
}

impl PartialEq for Namespace {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self.0, other.0)
    }
}
impl Eq for Namespace {}
impl PartialOrd for Namespace {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Namespace {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        match self == other {
            true => std::cmp::Ordering::Equal,
            false => self.0.cmp(other.0),
        }
    }
}
impl std::hash::Hash for Namespace {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}
impl std::fmt::Debug for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_strings_share_one_allocation() {
        let a = intern("person.name.firstName");
        let b = intern(&String::from("person.name.firstName"));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &intern("person.name.lastName")));
    }

    #[test]
    fn namespaces_are_shared_and_ordered_by_name() {
        let email = Namespace::new("email");
        assert_eq!(email, Namespace::new(&String::from("email")));
        assert_ne!(email, Namespace::new("ecid"));
        assert!(Namespace::new("ecid") < email && email < Namespace::new("emails"));
        assert_eq!(std::mem::size_of::<Namespace>(), 8);
    }
}
