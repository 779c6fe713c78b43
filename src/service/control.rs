//! The control state: the configuration as the control API changed it, and the dataflow plan
//! that each change puts in force.
//!
//! The same [`Control`] runs twice over the same sequence of changes: in the sequencer, which
//! validates each request against what was accepted before it (the API's view, `GET`), and
//! in the feeder, which applies the logged changes to the dataflow in log order. Applying is a
//! function of the change, its time and its position, so both (and a restart, which replays
//! the log) reach the same configuration, indices and plans.

use std::sync::Arc;

use serde_json::Value;
use streamdest_operators::plan::{AudienceIdx, DestinationIdx, Plan, PlanChange};

use crate::config::{
    Audience, Config, ConfigError, Destination, MergePolicy, ObjectKind, parse_strict,
};

use super::layout::{Layout, LayoutFull};

/// A change of the configuration, as logged.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum ControlChange {
    /// Create or replace; `object` is the JSON text of the request body.
    Put {
        kind: ObjectKind,
        id: String,
        object: String,
    },
    Delete {
        kind: ObjectKind,
        id: String,
    },
}

/// Why a change was refused; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    Invalid(ConfigError),
    #[error("no {} with id {:?}", .0.as_str(), .1)]
    NotFound(ObjectKind, String),
    #[error("{0}")]
    Referenced(ConfigError),
    #[error("{0}")]
    Full(#[from] LayoutFull),
}

/// What an accepted change did.
#[derive(Debug)]
pub struct Applied {
    /// The plan in force after the change, with the change (time, position, backfill).
    pub plan: Arc<Plan>,
    /// A PUT created the object (else replaced it).
    pub created: bool,
    /// The object as `GET` shows it now (`Null` after a delete).
    pub shown: Value,
}

/// The configuration and its layout.
#[derive(Clone, Debug, Default)]
pub struct Control {
    config: Config,
    layout: Layout,
}

fn ms(ts_micros: i64) -> i64 {
    ts_micros.div_euclid(1000)
}

impl Control {
    /// The configuration as it stands.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The plan of the configuration as it stands, with no change (the plan a restart starts
    /// its dataflow with is the empty one; this is for validating events).
    pub fn plan(&mut self) -> Result<Plan, LayoutFull> {
        self.layout.plan(&self.config, 0, None)
    }

    /// The parts a snapshot keeps: the configuration as JSON text (its own format, secrets and
    /// all) and the layout.
    pub fn parts(&self) -> (String, &Layout) {
        (
            serde_json::to_string(&self.config).unwrap_or_default(),
            &self.layout,
        )
    }

    /// Rebuilds the state from [`Self::parts`].
    pub fn from_parts(config: &str, layout: Layout) -> Result<Control, serde_json::Error> {
        Ok(Control {
            config: serde_json::from_str(config)?,
            layout,
        })
    }

    /// Destination ids by index.
    pub fn destination_ids(&self) -> Vec<String> {
        self.layout.destination_ids().to_vec()
    }

    /// The object `kind`/`id` as `GET` shows it.
    pub fn show(&self, kind: ObjectKind, id: &str) -> Option<Value> {
        match kind {
            ObjectKind::MergePolicy => self.config.merge_policy(id).map(|p| p.redacted_json()),
            ObjectKind::Audience => self.config.audience(id).map(|a| a.redacted_json()),
            ObjectKind::Destination => self.config.destination(id).map(|d| d.redacted_json()),
        }
    }

    /// Refuses a change the service cannot act on now: a destination whose `{"env": …}`
    /// secrets are not set. (Checked when a change is accepted, not when the log is replayed.)
    pub fn check_secrets(change: &ControlChange) -> Result<(), ControlError> {
        if let ControlChange::Put {
            kind: ObjectKind::Destination,
            id,
            object,
        } = change
        {
            let value = with_id(object, id).map_err(ControlError::Invalid)?;
            if let Ok(destination) = parse_strict::<Destination>(value, ObjectKind::Destination) {
                destination.unset_secrets().map_err(ControlError::Invalid)?;
            }
        }
        Ok(())
    }

    /// Applies `change`, accepted at `ts` (µs) at log position `seq`. On an error nothing
    /// changed.
    pub fn apply(
        &mut self,
        change: &ControlChange,
        ts: i64,
        seq: u64,
    ) -> Result<Applied, ControlError> {
        let mut next = self.clone();
        let now_ms = ms(ts);
        let (created, backfill_of) = next.change_config(change, now_ms)?;
        let mut backfill = Vec::new();
        if let Some((destination, audiences)) = backfill_of {
            let dest = next.layout.destination(&destination)?;
            for audience in audiences {
                if let Some(a) = next.layout.audience(&next.config, &audience)? {
                    backfill.push((dest as DestinationIdx, a as AudienceIdx));
                }
            }
        }
        let mapped_before = self.layout.mapped_paths();
        let mut plan = next.layout.plan(&next.config, now_ms, None)?;
        let reevaluate = !matches!(
            change,
            ControlChange::Put {
                kind: ObjectKind::Destination,
                ..
            } | ControlChange::Delete {
                kind: ObjectKind::Destination,
                ..
            }
        ) || next.layout.mapped_paths() > mapped_before;
        plan.change = Some(PlanChange {
            ts,
            seq,
            backfill,
            reevaluate,
        });
        let shown = match change {
            ControlChange::Put { kind, id, .. } => next.show(*kind, id).unwrap_or(Value::Null),
            ControlChange::Delete { .. } => Value::Null,
        };
        *self = next;
        Ok(Applied {
            plan: Arc::new(plan),
            created,
            shown,
        })
    }

    /// Changes the configuration; returns whether a PUT created its object, and the
    /// destination and audience ids to backfill.
    #[allow(clippy::type_complexity)]
    fn change_config(
        &mut self,
        change: &ControlChange,
        now_ms: i64,
    ) -> Result<(bool, Option<(String, Vec<String>)>), ControlError> {
        match change {
            ControlChange::Put { kind, id, object } => {
                let value = with_id(object, id).map_err(ControlError::Invalid)?;
                match kind {
                    ObjectKind::MergePolicy => {
                        let policy: MergePolicy =
                            parse_strict(value, *kind).map_err(ControlError::Invalid)?;
                        let created = self
                            .config
                            .put_merge_policy(policy)
                            .map_err(ControlError::Invalid)?;
                        Ok((created, None))
                    }
                    ObjectKind::Audience => {
                        let audience: Audience =
                            parse_strict(value, *kind).map_err(ControlError::Invalid)?;
                        let created = self
                            .config
                            .put_audience(audience, now_ms)
                            .map_err(ControlError::Invalid)?;
                        Ok((created, None))
                    }
                    ObjectKind::Destination => {
                        let destination: Destination =
                            parse_strict(value, *kind).map_err(ControlError::Invalid)?;
                        let before: Vec<String> = self
                            .config
                            .destination(id)
                            .map(|d| d.audiences.iter().map(|m| m.id.clone()).collect())
                            .unwrap_or_default();
                        let added: Vec<String> = destination
                            .audiences
                            .iter()
                            .map(|m| m.id.clone())
                            .filter(|a| !before.contains(a))
                            .collect();
                        let created = self
                            .config
                            .put_destination(destination, now_ms)
                            .map_err(ControlError::Invalid)?;
                        Ok((created, Some((id.clone(), added))))
                    }
                }
            }
            ControlChange::Delete { kind, id } => {
                let removed = match kind {
                    ObjectKind::MergePolicy => self
                        .config
                        .remove_merge_policy(id)
                        .map_err(ControlError::Referenced)?,
                    ObjectKind::Audience => self
                        .config
                        .remove_audience(id)
                        .map_err(ControlError::Referenced)?,
                    ObjectKind::Destination => self.config.remove_destination(id),
                };
                if removed {
                    Ok((false, None))
                } else {
                    Err(ControlError::NotFound(*kind, id.clone()))
                }
            }
        }
    }
}

/// The request body as a JSON object with `id` set from the path: a body `id` that differs is
/// an error at `id`.
fn with_id(object: &str, id: &str) -> Result<Value, ConfigError> {
    let mut value: Value = serde_json::from_str(object)
        .map_err(|e| ConfigError::new("(root)", format!("not valid JSON: {e}")))?;
    let Some(map) = value.as_object_mut() else {
        return Err(ConfigError::new("(root)", "expected a JSON object"));
    };
    match map.get("id") {
        None => {
            map.insert("id".into(), Value::from(id));
        }
        Some(Value::String(s)) if s == id => {}
        Some(other) => {
            return Err(ConfigError::new(
                "id",
                format!("{other} differs from the id in the path ({id:?})"),
            ));
        }
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(kind: ObjectKind, id: &str, object: &str) -> ControlChange {
        ControlChange::Put {
            kind,
            id: id.into(),
            object: object.into(),
        }
    }

    fn base() -> Control {
        let mut c = Control::default();
        for change in [
            put(
                ObjectKind::MergePolicy,
                "p",
                r#"{"attributeMerge":"timestampOrdered","identityStitching":"privateGraph"}"#,
            ),
            put(
                ObjectKind::Audience,
                "a",
                r#"{"mergePolicy":"p","source":"upload"}"#,
            ),
            put(
                ObjectKind::Audience,
                "b",
                r#"{"mergePolicy":"p","source":"upload"}"#,
            ),
        ] {
            c.apply(&change, 1_000_000, 1).expect("valid");
        }
        c
    }

    #[test]
    fn a_new_destination_backfills_its_audiences_and_a_replacement_only_the_added_ones() {
        let mut c = base();
        let d = |audiences: &str| {
            put(
                ObjectKind::Destination,
                "d",
                &format!(
                    r#"{{"name":"d","endpoint":"http://127.0.0.1:9/x","audiences":{audiences}}}"#
                ),
            )
        };
        let applied = c.apply(&d(r#"[{"id":"a"}]"#), 2_000_000, 7).expect("valid");
        assert!(applied.created);
        let change = applied.plan.change.clone().expect("a change");
        assert_eq!(change.backfill, vec![(0, 0)]);
        assert_eq!((change.ts, change.seq), (2_000_000, 7));
        assert!(
            !change.reevaluate,
            "a destination mapping no new path leaves the views"
        );

        let applied = c
            .apply(&d(r#"[{"id":"a"},{"id":"b"}]"#), 3_000_000, 8)
            .expect("valid");
        assert!(!applied.created);
        assert_eq!(
            applied.plan.change.as_ref().expect("change").backfill,
            vec![(0, 1)]
        );

        // Removing a mapping backfills nothing.
        let applied = c.apply(&d(r#"[{"id":"b"}]"#), 4_000_000, 9).expect("valid");
        assert!(
            applied
                .plan
                .change
                .as_ref()
                .expect("change")
                .backfill
                .is_empty()
        );
    }

    #[test]
    fn the_parts_round_trip_with_secrets() {
        let mut c = base();
        let d = put(
            ObjectKind::Destination,
            "d",
            r#"{"name":"d","endpoint":"http://127.0.0.1:9/x","audiences":[{"id":"a"}],
                "auth":{"type":"bearer","token":"lit3ral"},"attributes":["x.y"]}"#,
        );
        c.apply(&d, 5_000_000, 3).expect("valid");
        let (config, layout) = c.parts();
        let mut back = Control::from_parts(&config, layout.clone()).expect("parses");
        assert_eq!(back.config(), c.config());
        let plan = back.plan().expect("plan");
        assert_eq!(plan.destinations[0].mappings[0].audience, 0);
        assert_eq!(plan.mapped_paths, vec!["x.y"]);
    }

    #[test]
    fn refusals_change_nothing_and_name_the_problem() {
        let mut c = base();
        let before = c.config().clone();
        let bad = put(
            ObjectKind::Audience,
            "x",
            r#"{"mergePolicy":"p","sorce":"upload"}"#,
        );
        let err = c.apply(&bad, 0, 2).expect_err("unknown field");
        assert!(err.to_string().contains("did you mean \"source\""), "{err}");
        let other_id = put(
            ObjectKind::Audience,
            "x",
            r#"{"id":"y","mergePolicy":"p","source":"upload"}"#,
        );
        let err = c.apply(&other_id, 0, 2).expect_err("id mismatch");
        assert!(err.to_string().starts_with("id:"), "{err}");
        let referenced = ControlChange::Delete {
            kind: ObjectKind::MergePolicy,
            id: "p".into(),
        };
        assert!(matches!(
            c.apply(&referenced, 0, 3),
            Err(ControlError::Referenced(_))
        ));
        let missing = ControlChange::Delete {
            kind: ObjectKind::Audience,
            id: "zz".into(),
        };
        assert!(matches!(
            c.apply(&missing, 0, 3),
            Err(ControlError::NotFound(..))
        ));
        assert_eq!(c.config(), &before);
    }
}
