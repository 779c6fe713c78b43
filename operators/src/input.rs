//! What the dataflow is fed: fragments, upload memberships and the per-epoch event records.
//!
//! The binary's `events` stage turns input lines into these types. Time is the *epoch*, a
//! position in the input (a line range of a file, an offset range of a log), never wall-clock
//! time, so a replay of the same input always forms the same epochs.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::leaf::Leaf;
use crate::plan::AudienceIdx;

/// The dataflow's logical time: an epoch number.
pub type Epoch = u64;

/// A 64-bit key of an identity node (top bit clear).
pub type IdKey = u64;
/// A 64-bit key of a fragment node (top bit set).
pub type FragKey = u64;
/// A profile's key within one stitching: the smallest identity key of the profile (stitching
/// `privateGraph`) or the primary identity's key (stitching `none`).
pub type ProfileKey = u64;

/// An identity: a namespace and an id. Orders by `(namespace, id)`, comparing by code point.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Identity {
    pub namespace: String,
    pub id: String,
}

impl Identity {
    pub fn new(namespace: impl Into<String>, id: impl Into<String>) -> Self {
        Identity {
            namespace: namespace.into(),
            id: id.into(),
        }
    }

    /// The identity's node key in the stitching graph.
    pub fn key(&self) -> IdKey {
        stable_hash(&(0u8, &self.namespace, &self.id)) & !(1 << 63)
    }

    /// `"namespace:id"`, the form used to name profiles.
    pub fn display(&self) -> String {
        format!("{}:{}", self.namespace, self.id)
    }
}

/// The node key of fragment `(dataset, id)`.
pub fn fragment_key(dataset: &str, id: &str) -> FragKey {
    stable_hash(&(1u8, dataset, id)) | (1 << 63)
}

/// A hash that is the same in every worker and process of one build.
pub fn stable_hash<T: Hash + ?Sized>(value: &T) -> u64 {
    // `DefaultHasher::new()` has fixed keys: deterministic, unlike `RandomState`.
    let mut hasher = std::hash::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// One record of one dataset, as it stands after an upsert.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Fragment {
    pub dataset: String,
    pub id: String,
    /// Sorted and deduplicated; never empty.
    pub identities: Vec<Identity>,
    /// The identity flagged primary, else the smallest.
    pub primary: Identity,
    /// Leaves sorted by path.
    pub leaves: Vec<(String, Leaf)>,
    /// Event time, microseconds since the Unix epoch.
    pub ts: i64,
    /// Ingest sequence number of the event that wrote it (ties in `ts` go to the larger).
    pub seq: u64,
    /// Indices into `Plan::mapped_paths` of the mapped paths this fragment has a value for.
    pub mapped: Vec<u16>,
}

impl Fragment {
    pub fn key(&self) -> FragKey {
        fragment_key(&self.dataset, &self.id)
    }
}

/// An event as the dataflow sees it, for the export triggers: when it happened, its place in
/// the input, and the mapped paths it wrote or removed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EventMark {
    pub ts: i64,
    pub seq: u64,
    /// Indices into `Plan::mapped_paths`, sorted.
    pub mapped: Vec<u16>,
}

/// Everything one epoch changes, collapsed per key as the upsert inputs need it.
#[derive(Clone, Debug, Default)]
pub struct EpochInput {
    /// The last upsert (`Some`) or delete (`None`) of each fragment written in the epoch.
    pub fragments: Vec<(FragKey, Option<Arc<Fragment>>)>,
    /// Every fragment event of the epoch (`mapped` holds the paths the upsert wrote; the
    /// dataflow adds those the previous version held).
    pub fragment_marks: Vec<(FragKey, EventMark)>,
    /// The final membership of each `(audience, identity)` uploaded in the epoch.
    pub uploads: Vec<((AudienceIdx, IdKey), bool)>,
    /// Every uploaded `(audience, identity)` of the epoch with its event.
    pub upload_marks: Vec<((AudienceIdx, IdKey), EventMark)>,
}

impl EpochInput {
    pub fn is_empty(&self) -> bool {
        self.fragments.is_empty() && self.uploads.is_empty()
    }

    pub fn len(&self) -> usize {
        self.fragment_marks.len() + self.upload_marks.len()
    }
}
