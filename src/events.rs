//! The events stage: input lines (SPEC §1) → typed events → the dataflow's epoch inputs.
//!
//! Parsing is strict about what it needs and lenient about the rest: unknown fields are
//! ignored, a missing or ill-typed required field is an [`EventError`] naming the field. An
//! [`EpochBuilder`] then collapses one epoch's events into the per-key form the dataflow's
//! upsert inputs need, keeping every event's mark for the export triggers.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value};
use streamdest_operators::input::{
    EpochInput, Fragment, FragmentWrite, Identity, Mark, UploadWrite, fragment_key,
};
use streamdest_operators::intern::Name;
use streamdest_operators::leaf::{Leaf, Path, flatten};
use streamdest_operators::plan::{AudienceIdx, AudienceKind, Plan};

/// Why an event was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("an event must be a JSON object")]
    NotAnObject,
    #[error("field `{field}`: {problem}")]
    Field { field: String, problem: String },
    #[error("unknown event type {0:?} (expected fragment, fragmentDelete or uploadMembers)")]
    UnknownType(String),
}

fn field_err(field: impl Into<String>, problem: impl Into<String>) -> EventError {
    EventError::Field {
        field: field.into(),
        problem: problem.into(),
    }
}

/// One parsed input event.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Fragment {
        dataset: String,
        id: String,
        timestamp: Option<i64>,
        /// `(identity, primary)` in input order.
        identities: Vec<(Identity, bool)>,
        attributes: Map<String, Value>,
    },
    FragmentDelete {
        dataset: String,
        id: String,
        timestamp: Option<i64>,
    },
    UploadMembers {
        audience: String,
        timestamp: Option<i64>,
        add: Vec<Identity>,
        remove: Vec<Identity>,
    },
}

impl Event {
    pub fn timestamp(&self) -> Option<i64> {
        match self {
            Event::Fragment { timestamp, .. }
            | Event::FragmentDelete { timestamp, .. }
            | Event::UploadMembers { timestamp, .. } => *timestamp,
        }
    }
}

/// Parses one line of NDJSON.
pub fn parse_line(line: &str) -> Result<Event, EventError> {
    let value: Value = serde_json::from_str(line).map_err(|e| EventError::Json(e.to_string()))?;
    parse_value(&value)
}

fn string(obj: &Map<String, Value>, field: &str) -> Result<String, EventError> {
    match obj.get(field) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(field_err(field, "must not be empty")),
        Some(_) => Err(field_err(field, "must be a string")),
        None => Err(field_err(field, "missing")),
    }
}

/// Parses an RFC 3339 timestamp to µs since the Unix epoch; `None` unless it is a valid time
/// whose UTC year is 0000–9999 (an offset can push a valid local time outside).
pub fn parse_timestamp(text: &str) -> Option<i64> {
    use chrono::Datelike as _;
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .filter(|t| (0..=9999).contains(&t.to_utc().year()))
        .map(|t| t.timestamp_micros())
}

/// Refuses attribute names that contain `.`: a dotted path names a nested leaf, so such a name
/// would collide with one.
fn check_attribute_names(map: &Map<String, Value>, prefix: &str) -> Result<(), EventError> {
    // Paths are spelled out only where needed: for an error, or to descend.
    for (name, value) in map {
        if name.contains('.') {
            return Err(field_err(
                format!("{prefix}.{name}"),
                "an attribute name must not contain '.' (it would read as a nested path)",
            ));
        }
        if let Value::Object(inner) = value {
            check_attribute_names(inner, &format!("{prefix}.{name}"))?;
        }
    }
    Ok(())
}

fn timestamp(obj: &Map<String, Value>) -> Result<Option<i64>, EventError> {
    match obj.get("timestamp") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_timestamp(s).map(Some).ok_or_else(|| {
            field_err(
                "timestamp",
                format!("{s:?} is not an RFC 3339 time in the years 0000 to 9999 (UTC)"),
            )
        }),
        Some(_) => Err(field_err("timestamp", "must be an RFC 3339 string")),
    }
}

fn identity_list(obj: &Map<String, Value>, field: &str) -> Result<Vec<Identity>, EventError> {
    let list = match obj.get(field) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(field_err(field, "must be an array")),
    };
    list.iter()
        .enumerate()
        .map(|(i, item)| {
            let at = format!("{field}[{i}]");
            let item = item
                .as_object()
                .ok_or_else(|| field_err(&at, "must be an object"))?;
            let namespace = string(item, "namespace").map_err(|e| nest(&at, e))?;
            let id = string(item, "id").map_err(|e| nest(&at, e))?;
            Ok(Identity::new(&namespace, &id))
        })
        .collect()
}

fn nest(prefix: &str, error: EventError) -> EventError {
    match error {
        EventError::Field { field, problem } => field_err(format!("{prefix}.{field}"), problem),
        other => other,
    }
}

fn identity_map(obj: &Map<String, Value>) -> Result<Vec<(Identity, bool)>, EventError> {
    let map = match obj.get("identityMap") {
        Some(Value::Object(map)) => map,
        Some(_) => return Err(field_err("identityMap", "must be an object")),
        None => return Err(field_err("identityMap", "missing")),
    };
    let mut out = Vec::new();
    for (namespace, entries) in map {
        // Field paths are spelled out only for an error.
        let at = || format!("identityMap.{namespace}");
        if namespace.is_empty() {
            return Err(field_err("identityMap", "a namespace must not be empty"));
        }
        let entries = entries
            .as_array()
            .ok_or_else(|| field_err(at(), "must be an array"))?;
        for (i, entry) in entries.iter().enumerate() {
            let at = || format!("{}[{i}]", at());
            let entry = entry
                .as_object()
                .ok_or_else(|| field_err(at(), "must be an object"))?;
            let id = string(entry, "id").map_err(|e| nest(&at(), e))?;
            let primary = match entry.get("primary") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(field_err(format!("{}.primary", at()), "must be a boolean")),
            };
            out.push((Identity::new(namespace, &id), primary));
        }
    }
    if out.is_empty() {
        return Err(field_err("identityMap", "must hold at least one identity"));
    }
    Ok(out)
}

/// Parses one event object.
pub fn parse_value(value: &Value) -> Result<Event, EventError> {
    let obj = value.as_object().ok_or(EventError::NotAnObject)?;
    let kind = match obj.get("type") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(field_err("type", "must be a string")),
        None => return Err(field_err("type", "missing")),
    };
    match kind {
        "fragment" => {
            let attributes = match obj.get("attributes") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(map)) => map.clone(),
                Some(_) => return Err(field_err("attributes", "must be an object")),
            };
            check_attribute_names(&attributes, "attributes")?;
            Ok(Event::Fragment {
                dataset: string(obj, "dataset")?,
                id: string(obj, "id")?,
                timestamp: timestamp(obj)?,
                identities: identity_map(obj)?,
                attributes,
            })
        }
        "fragmentDelete" => Ok(Event::FragmentDelete {
            dataset: string(obj, "dataset")?,
            id: string(obj, "id")?,
            timestamp: timestamp(obj)?,
        }),
        "uploadMembers" => Ok(Event::UploadMembers {
            audience: string(obj, "audience")?,
            timestamp: timestamp(obj)?,
            add: identity_list(obj, "add")?,
            remove: identity_list(obj, "remove")?,
        }),
        other => Err(EventError::UnknownType(other.to_string())),
    }
}

/// An event resolved against the plan, ready for an epoch.
#[derive(Debug, Clone)]
pub enum Update {
    /// A fragment's new version, and the mapped paths it has values for (the paths it writes).
    Upsert {
        fragment: Arc<Fragment>,
        mapped: Vec<u16>,
    },
    Delete {
        dataset: String,
        id: String,
        ts: i64,
        seq: u64,
    },
    Upload {
        audience: AudienceIdx,
        add: Vec<Identity>,
        remove: Vec<Identity>,
        ts: i64,
        seq: u64,
    },
}

impl Update {
    /// Resolves `event` (sequence number `seq`, ingested at `now` µs) against `plan`.
    pub fn resolve(plan: &Plan, event: Event, seq: u64, now: i64) -> Result<Update, EventError> {
        let ts = event.timestamp().unwrap_or(now);
        Ok(match event {
            Event::Fragment {
                dataset,
                id,
                identities,
                attributes,
                ..
            } => {
                let primary = identities
                    .iter()
                    .find(|(_, p)| *p)
                    .map(|(i, _)| i.clone())
                    .or_else(|| identities.iter().map(|(i, _)| i).min().cloned())
                    .ok_or_else(|| field_err("identityMap", "must hold at least one identity"))?;
                let mut identities: Vec<Identity> =
                    identities.into_iter().map(|(i, _)| i).collect();
                identities.sort();
                identities.dedup();
                // Projection: leaves that no rule or mapping reads never reach an export.
                let leaves: Box<[(Path, Leaf)]> = flatten(&attributes)
                    .into_iter()
                    .filter(|(path, _)| plan.reads(path))
                    .map(|(path, leaf)| (Name::new(&path), leaf))
                    .collect::<Vec<_>>()
                    .into_boxed_slice();
                let primary = identities.binary_search(&primary).unwrap_or(0) as u32;
                // Held for the fragment's life: exact-size slices.
                let fragment = Fragment {
                    key: fragment_key(&dataset, &id),
                    dataset: Name::new(&dataset),
                    identities: identities.into_boxed_slice(),
                    primary,
                    leaves,
                    ts,
                    seq,
                };
                Update::Upsert {
                    mapped: fragment.mapped(plan),
                    fragment: Arc::new(fragment),
                }
            }
            Event::FragmentDelete { dataset, id, .. } => Update::Delete {
                dataset,
                id,
                ts,
                seq,
            },
            Event::UploadMembers {
                audience,
                add,
                remove,
                ..
            } => {
                let idx = plan
                    .audiences
                    .iter()
                    .position(|a| a.id == audience && !a.removed)
                    .ok_or_else(|| {
                        field_err("audience", format!("unknown audience {audience:?}"))
                    })?;
                if !matches!(plan.audiences[idx].kind, AudienceKind::Upload) {
                    return Err(field_err(
                        "audience",
                        format!("audience {audience:?} is rule-based, not a custom upload"),
                    ));
                }
                Update::Upload {
                    audience: idx as AudienceIdx,
                    add,
                    remove,
                    ts,
                    seq,
                }
            }
        })
    }

    /// The key that decides which worker ingests the update.
    pub fn route(&self) -> u64 {
        match self {
            Update::Upsert { fragment, .. } => fragment.key(),
            Update::Delete { dataset, id, .. } => fragment_key(dataset, id),
            Update::Upload { audience, .. } => u64::from(*audience),
        }
    }
}

/// Collapses one epoch's updates into the dataflow's per-key inputs, split across workers: per
/// fragment its last version and the mark of all its events; per uploaded `(audience,
/// identity)` its final membership and the mark of all its events.
#[derive(Debug)]
pub struct EpochBuilder {
    peers: usize,
    fragments: Vec<BTreeMap<u64, FragmentWrite>>,
    uploads: Vec<BTreeMap<(AudienceIdx, u64), UploadWrite>>,
    events: usize,
}

impl EpochBuilder {
    pub fn new(peers: usize) -> Self {
        let peers = peers.max(1);
        EpochBuilder {
            peers,
            fragments: vec![BTreeMap::new(); peers],
            uploads: vec![BTreeMap::new(); peers],
            events: 0,
        }
    }

    /// Events added since the last [`EpochBuilder::finish`].
    pub fn events(&self) -> usize {
        self.events
    }

    fn worker(&self, key: u64) -> usize {
        (key % self.peers as u64) as usize
    }

    fn write_fragment(&mut self, key: u64, value: Option<Arc<Fragment>>, mark: Mark) {
        let w = self.worker(key);
        self.fragments[w]
            .entry(key)
            .and_modify(|write| {
                write.value = value.clone();
                write.mark.absorb(&mark);
            })
            .or_insert(FragmentWrite { value, mark });
    }

    pub fn add(&mut self, update: Update) {
        self.events += 1;
        match update {
            Update::Upsert { fragment, mapped } => {
                let mark = Mark::new(fragment.ts, fragment.seq, mapped);
                self.write_fragment(fragment.key(), Some(fragment), mark);
            }
            Update::Delete {
                dataset,
                id,
                ts,
                seq,
            } => {
                let mark = Mark::new(ts, seq, Vec::new());
                self.write_fragment(fragment_key(&dataset, &id), None, mark);
            }
            Update::Upload {
                audience,
                add,
                remove,
                ts,
                seq,
            } => {
                for (identities, member) in [(add, true), (remove, false)] {
                    for identity in identities {
                        let key = (audience, identity.key());
                        let w = self.worker(key.1);
                        let mark = Mark::new(ts, seq, Vec::new());
                        self.uploads[w]
                            .entry(key)
                            .and_modify(|write| {
                                write.member = member;
                                write.mark.absorb(&mark);
                            })
                            .or_insert(UploadWrite { member, mark });
                    }
                }
            }
        }
    }

    /// The epoch's input for each worker (index = worker), leaving the builder empty.
    pub fn finish(&mut self) -> Vec<EpochInput> {
        self.events = 0;
        (0..self.peers)
            .map(|w| EpochInput {
                fragments: std::mem::take(&mut self.fragments[w]).into_iter().collect(),
                uploads: std::mem::take(&mut self.uploads[w]).into_iter().collect(),
                seeds: Vec::new(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_spec_examples() {
        let e = parse_line(r#"{"type":"fragment","dataset":"crm","id":"c-17","timestamp":"2024-05-01T10:00:00Z","identityMap":{"ecid":[{"id":"1457500653"}],"email":[{"id":"john@acme.com","primary":true}]},"attributes":{"person":{"name":{"firstName":"John"}}},"extra":1}"#).unwrap();
        match e {
            Event::Fragment {
                identities,
                timestamp,
                ..
            } => {
                assert_eq!(identities.len(), 2);
                assert!(identities[1].1);
                assert_eq!(timestamp, Some(1_714_557_600_000_000));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_line(r#"{"type":"fragmentDelete","dataset":"crm","id":"c-17"}"#),
            Ok(Event::FragmentDelete {
                timestamp: None,
                ..
            })
        ));
        assert!(matches!(
            parse_line(
                r#"{"type":"uploadMembers","audience":"vip","add":[{"namespace":"email","id":"a"}],"remove":[]}"#
            ),
            Ok(Event::UploadMembers { .. })
        ));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (r#"{"dataset":"d"}"#, "field `type`: missing"),
            (
                r#"{"type":"fragment","id":"1","identityMap":{"e":[{"id":"x"}]}}"#,
                "field `dataset`: missing",
            ),
            (
                r#"{"type":"fragment","dataset":"d","id":"1","identityMap":{}}"#,
                "field `identityMap`: must hold at least one identity",
            ),
            (
                r#"{"type":"fragment","dataset":"d","id":"1","identityMap":{"e":[{"id":7}]}}"#,
                "field `identityMap.e[0].id`: must be a string",
            ),
            (
                r#"{"type":"fragment","dataset":"d","id":"1","timestamp":"yesterday","identityMap":{"e":[{"id":"x"}]}}"#,
                "field `timestamp`: \"yesterday\" is not an RFC 3339 time in the years 0000 to 9999 (UTC)",
            ),
            (
                r#"{"type":"fragment","dataset":"d","id":"1","timestamp":"0000-01-01T00:30:00+01:00","identityMap":{"e":[{"id":"x"}]}}"#,
                "field `timestamp`: \"0000-01-01T00:30:00+01:00\" is not an RFC 3339 time in the years 0000 to 9999 (UTC)",
            ),
            (
                r#"{"type":"fragment","dataset":"d","id":"1","identityMap":{"e":[{"id":"x"}]},"attributes":{"person":{"name.first":"J"}}}"#,
                "field `attributes.person.name.first`: an attribute name must not contain '.' (it would read as a nested path)",
            ),
            (
                r#"{"type":"fragmentDelete","dataset":"d","id":5}"#,
                "field `id`: must be a string",
            ),
            (
                r#"{"type":"merge"}"#,
                "unknown event type \"merge\" (expected fragment, fragmentDelete or uploadMembers)",
            ),
            (r#"[1]"#, "an event must be a JSON object"),
        ];
        for (line, expected) in cases {
            assert_eq!(
                parse_line(line).unwrap_err().to_string(),
                expected,
                "{line}"
            );
        }
        assert!(matches!(parse_line("{nope"), Err(EventError::Json(_))));
    }
}
