//! What the dataflow is fed: fragments, upload memberships and the per-epoch event records.
//!
//! The binary's `events` stage turns input lines into these types. Time is the *epoch*, a
//! position in the input (a line range of a file, an offset range of a log), never wall-clock
//! time, so a replay of the same input always forms the same epochs.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use smol_str::SmolStr;

use crate::intern::Name;
use crate::leaf::{Leaf, Path};
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
///
/// Every fragment and view holds its identities, so an identity is 40 bytes and usually no
/// allocation: the namespace is interned ([`Name`]), an id of up to 23 bytes is held
/// inline (a longer one is shared by every copy), and the node key is computed once.
///
/// Serialized (snapshots) as `{namespace, id, key}`, as when the fields were shared strings.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Identity {
    namespace: Name,
    id: SmolStr,
    /// A function of the namespace and id, so it never changes the order or equality.
    key: IdKey,
}

impl Identity {
    pub fn new(namespace: &str, id: &str) -> Self {
        Identity {
            key: stable_hash(&(0u8, namespace, id)) & !(1 << 63),
            namespace: Name::new(namespace),
            id: SmolStr::new(id),
        }
    }

    pub fn namespace(&self) -> &str {
        self.namespace.as_str()
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The identity's node key in the stitching graph.
    pub fn key(&self) -> IdKey {
        self.key
    }

    /// `"namespace:id"`, the form used to name profiles.
    pub fn display(&self) -> String {
        format!("{}:{}", self.namespace(), self.id)
    }
}

impl PartialEq for Identity {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key && self.namespace == other.namespace && self.id == other.id
    }
}
impl Eq for Identity {}
impl PartialOrd for Identity {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Identity {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.namespace
            .cmp(&other.namespace)
            .then_with(|| self.id.as_str().cmp(other.id.as_str()))
    }
}
impl Hash for Identity {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Equal identities have equal keys.
        self.key.hash(state);
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

/// One record of one dataset, as it stands after an upsert, projected to the attribute paths
/// that some rule or mapping reads.
///
/// Every live version is held once, for its whole life (shared by [`FragRef`]s), so it is
/// kept compact: exact-size slices, and nothing that the plan can tell (which mapped paths it
/// has values for: [`Fragment::mapped`]).
///
/// Serialized (snapshots) in the form it had when it kept those paths, with an empty list in
/// their place, so that snapshots written before and after read alike.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(from = "FragmentRepr")]
pub struct Fragment {
    /// [`fragment_key`] of `(dataset, id)`.
    pub key: FragKey,
    pub dataset: Name,
    /// Sorted and deduplicated; never empty.
    pub identities: Box<[Identity]>,
    /// Index in `identities` of the identity flagged primary, else of the smallest.
    pub primary: u32,
    /// Leaves sorted by path.
    pub leaves: Box<[(Path, Leaf)]>,
    /// Event time, microseconds since the Unix epoch.
    pub ts: i64,
    /// Ingest sequence number of the event that wrote it (ties in `ts` go to the larger).
    /// Unique per version: no two writes share a sequence number.
    pub seq: u64,
}

/// [`Fragment`]'s serialized form: its fields, then the mapped paths it once kept.
#[derive(Deserialize)]
#[serde(rename = "Fragment")]
struct FragmentRepr {
    key: FragKey,
    dataset: Name,
    identities: Box<[Identity]>,
    primary: u32,
    leaves: Box<[(Path, Leaf)]>,
    ts: i64,
    seq: u64,
    /// Ignored: the plan tells.
    #[allow(dead_code)]
    mapped: Vec<u16>,
}

impl From<FragmentRepr> for Fragment {
    fn from(r: FragmentRepr) -> Fragment {
        Fragment {
            key: r.key,
            dataset: r.dataset,
            identities: r.identities,
            primary: r.primary,
            leaves: r.leaves,
            ts: r.ts,
            seq: r.seq,
        }
    }
}

impl Serialize for Fragment {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("Fragment", 8)?;
        s.serialize_field("key", &self.key)?;
        s.serialize_field("dataset", &self.dataset)?;
        s.serialize_field("identities", &self.identities)?;
        s.serialize_field("primary", &self.primary)?;
        s.serialize_field("leaves", &self.leaves)?;
        s.serialize_field("ts", &self.ts)?;
        s.serialize_field("seq", &self.seq)?;
        // A sequence (a slice), as the list was: an array would be a tuple.
        s.serialize_field("mapped", &[0u16; 0][..])?;
        s.end()
    }
}

impl Fragment {
    pub fn key(&self) -> FragKey {
        self.key
    }

    /// The primary identity.
    pub fn primary(&self) -> &Identity {
        &self.identities[(self.primary as usize).min(self.identities.len().saturating_sub(1))]
    }

    /// Indices into `Plan::mapped_paths` of the mapped paths this fragment has a value for,
    /// sorted.
    pub fn mapped(&self, plan: &crate::plan::Plan) -> Vec<u16> {
        plan.mapped_indices_of_all(self.leaves.iter().map(|(p, _)| &**p))
    }
}

/// A shared fragment version as arrangements hold it: compared by its sequence number alone,
/// which is unique per version, so sorting never walks the fragment's contents.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FragRef(pub Arc<Fragment>);

impl PartialEq for FragRef {
    fn eq(&self, other: &Self) -> bool {
        self.0.seq == other.0.seq
    }
}
impl Eq for FragRef {}
impl PartialOrd for FragRef {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for FragRef {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.seq.cmp(&other.0.seq)
    }
}
impl Hash for FragRef {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.seq.hash(state);
    }
}
impl std::ops::Deref for FragRef {
    type Target = Fragment;
    fn deref(&self) -> &Fragment {
        &self.0
    }
}

/// What one epoch's events did to one key, for the export triggers: the newest event time,
/// the latest input position, and the mapped paths written or removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Mark {
    pub ts: i64,
    pub seq: u64,
    /// Indices into `Plan::mapped_paths`, sorted and deduplicated.
    pub touched: Vec<u16>,
}

impl Mark {
    /// A mark of one event.
    pub fn new(ts: i64, seq: u64, touched: Vec<u16>) -> Mark {
        Mark { ts, seq, touched }
    }

    /// Folds `other` in: the newest time, the latest position, the union of paths.
    pub fn absorb(&mut self, other: &Mark) {
        self.ts = self.ts.max(other.ts);
        self.seq = self.seq.max(other.seq);
        self.add_paths(&other.touched);
    }

    /// Adds paths to `touched`, keeping it sorted and deduplicated.
    pub fn add_paths(&mut self, paths: &[u16]) {
        if paths.is_empty() {
            return;
        }
        self.touched.extend_from_slice(paths);
        self.touched.sort_unstable();
        self.touched.dedup();
    }
}

/// The net effect of one epoch on one fragment: its last version (`None`: deleted) and the
/// mark of all the epoch's events on it (`touched` holds the paths they wrote; the dataflow
/// adds those the previous version held).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FragmentWrite {
    pub value: Option<Arc<Fragment>>,
    pub mark: Mark,
}

/// The net effect of one epoch on one `(audience, identity)` upload membership.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadWrite {
    pub member: bool,
    pub mark: Mark,
}

/// One worker's share of an epoch, collapsed per key.
#[derive(Clone, Debug, Default)]
pub struct EpochInput {
    pub fragments: Vec<(FragKey, FragmentWrite)>,
    pub uploads: Vec<((AudienceIdx, IdKey), UploadWrite)>,
    /// Profiles' records from a snapshot, pushed before the snapshot's inputs (a restart).
    pub seeds: Vec<crate::history::Seed>,
}

impl EpochInput {
    pub fn is_empty(&self) -> bool {
        self.fragments.is_empty() && self.uploads.is_empty() && self.seeds.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_compact_and_order_by_namespace_then_id() {
        assert_eq!(std::mem::size_of::<Identity>(), 40);
        let mut ids = vec![
            Identity::new("email", "b@x"),
            Identity::new("ecid", "z"),
            Identity::new("email", "a@x"),
            Identity::new("email", "a@x"),
        ];
        ids.sort();
        ids.dedup();
        let shown: Vec<String> = ids.iter().map(Identity::display).collect();
        assert_eq!(shown, ["ecid:z", "email:a@x", "email:b@x"]);
        let long = "a-long-identifier-of-more-than-23-bytes@example.org";
        assert_eq!(Identity::new("email", long).id(), long);
    }

    #[test]
    fn a_fragment_serializes_in_the_form_snapshots_have_always_had() {
        // The form of the fragments, identities and leaves of earlier snapshots.
        #[derive(Serialize)]
        struct OldIdentity {
            namespace: String,
            id: String,
            key: u64,
        }
        #[derive(Serialize)]
        struct OldFragment {
            key: u64,
            dataset: String,
            identities: Vec<OldIdentity>,
            primary: u32,
            leaves: Vec<(String, Leaf)>,
            ts: i64,
            seq: u64,
            mapped: Vec<u16>,
        }
        let email = Identity::new("email", "a@x");
        let fragment = Fragment {
            key: fragment_key("crm", "c1"),
            dataset: Name::new("crm"),
            identities: vec![email.clone()].into(),
            primary: 0,
            leaves: vec![(Name::new("a.b"), Leaf::Num("1".into()))].into(),
            ts: 5,
            seq: 7,
        };
        let old = |mapped: Vec<u16>| OldFragment {
            key: fragment.key,
            dataset: "crm".into(),
            identities: vec![OldIdentity {
                namespace: "email".into(),
                id: "a@x".into(),
                key: email.key(),
            }],
            primary: 0,
            leaves: vec![("a.b".into(), Leaf::Num("1".into()))],
            ts: 5,
            seq: 7,
            mapped,
        };
        let bytes = bincode::serialize(&fragment).unwrap();
        assert_eq!(bytes, bincode::serialize(&old(vec![])).unwrap());
        // An older snapshot's list of mapped paths is read and dropped.
        let older = bincode::serialize(&old(vec![0, 3])).unwrap();
        assert_eq!(bincode::deserialize::<Fragment>(&older).unwrap(), fragment);
    }

    #[test]
    fn an_identity_serializes_as_its_namespace_id_and_key() {
        let identity = Identity::new("email", "a@x");
        let json = serde_json::to_value(&identity).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"namespace": "email", "id": "a@x", "key": identity.key()})
        );
        let back: Identity = serde_json::from_value(json).unwrap();
        assert_eq!(
            (back.key(), back.display()),
            (identity.key(), identity.display())
        );
    }
}
