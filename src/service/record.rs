//! What the service writes to its write-ahead log: one record per accepted request.
//!
//! A record carries the epoch it belongs to, decided when it was accepted, so that the same
//! log always forms the same epochs and so the same exports, with the same `Idempotency-Key`s
//! (they derive from the positions of the events). Events are kept as their JSON text, as
//! validated: the feeder parses them again when it reads the log.

use serde::{Deserialize, Serialize};

use super::control::ControlChange;

/// One record of the log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The log epoch: consecutive records of one epoch form one dataflow epoch.
    pub epoch: u64,
    /// When the request was accepted, µs since the Unix epoch: the time of events without a
    /// timestamp, of uploads, and of control changes.
    pub at: i64,
    pub body: Body,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Body {
    /// The events of one request, each its JSON text.
    Events(Vec<String>),
    /// A control change; always alone in its epoch.
    Control(ControlChange),
}

/// A record that does not decode: the log was written by something else.
#[derive(Debug, thiserror::Error)]
#[error("write-ahead log record at position {position} does not decode: {reason}")]
pub struct BadRecord {
    pub position: u64,
    pub reason: String,
}

impl Entry {
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain data into a Vec cannot fail.
        bincode::serialize(self).unwrap_or_default()
    }

    pub fn decode(position: u64, bytes: &[u8]) -> Result<Entry, BadRecord> {
        bincode::deserialize(bytes).map_err(|e| BadRecord {
            position,
            reason: e.to_string(),
        })
    }
}

/// The sequence number of event `index` of the record at `position`: unique, increasing in
/// log order (the dataflow orders versions by it; export keys derive from it).
pub fn event_seq(position: u64, index: usize) -> u64 {
    (position << 24) | (index as u64 & 0xff_ffff)
}

/// The sequence number of a control change at `position`.
pub fn control_seq(position: u64) -> u64 {
    event_seq(position, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ObjectKind;

    #[test]
    fn entries_round_trip() {
        for body in [
            Body::Events(vec![r#"{"type":"fragment"}"#.into(), "{}".into()]),
            Body::Control(ControlChange::Put {
                kind: ObjectKind::Audience,
                id: "a".into(),
                object: "{}".into(),
            }),
        ] {
            let entry = Entry {
                epoch: 7,
                at: -5,
                body,
            };
            assert_eq!(Entry::decode(3, &entry.encode()).expect("decodes"), entry);
        }
        assert!(Entry::decode(9, b"\xff").is_err());
        assert!(event_seq(1, 5) < event_seq(2, 0));
    }
}
