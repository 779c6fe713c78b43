//! Interned strings: the few distinct identity namespaces, dataset names and attribute paths
//! are stored once and shared by every fragment and view that names them.
//!
//! The interner is process-wide and only grows; it is fed only with names that the data model
//! bounds (namespaces, datasets, and the attribute paths that some rule or mapping reads, after
//! projection), never with free-form values.

use std::collections::HashSet;
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
}
