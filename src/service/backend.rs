//! The API's backend: what each request means to the service. Events are validated against
//! the accepted configuration and logged; control changes are validated, applied and logged
//! (the sequencer); reads come from the accepted configuration, the egress and the dead-letter
//! store.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Value, json};

use crate::api::{self, ApiError, Backend, BoxFuture, DestinationMetrics, MetricsSnapshot};
use crate::config::ObjectKind;
use crate::egress::Egress;
use crate::events::{Update, parse_value};

use super::control::{ControlChange, ControlError};
use super::feeder::FeedStats;
use super::sequencer::{Sequencer, SubmitError};

pub struct Service {
    pub sequencer: Arc<Sequencer>,
    pub egress: Egress,
    pub feed: Arc<FeedStats>,
    pub accepting: Arc<AtomicBool>,
}

fn kind_of(kind: api::ObjectKind) -> ObjectKind {
    match kind {
        api::ObjectKind::MergePolicy => ObjectKind::MergePolicy,
        api::ObjectKind::Audience => ObjectKind::Audience,
        api::ObjectKind::Destination => ObjectKind::Destination,
    }
}

fn api_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::Control(ControlError::Invalid(e)) => ApiError::bad_request(e.to_string()),
        SubmitError::Control(e @ ControlError::NotFound(..)) => ApiError::NotFound(e.to_string()),
        SubmitError::Control(ControlError::Referenced(e)) => ApiError::Conflict(e.to_string()),
        SubmitError::Control(e @ ControlError::Full(_)) => ApiError::Conflict(e.to_string()),
        e @ SubmitError::Full { .. } => ApiError::Unavailable {
            retry_after_s: 5,
            message: e.to_string(),
        },
        e @ (SubmitError::Wal(_) | SubmitError::Failed(_)) => ApiError::Internal(e.to_string()),
    }
}

impl Service {
    fn known_destination(&self, id: &str) -> Result<(), ApiError> {
        let known = self
            .sequencer
            .with_control(|c| c.config().destination(id).is_some());
        // A deleted destination's dead letters stay listable and re-drivable.
        let has_letters = self
            .egress
            .dead_letters()
            .is_some_and(|store| !store.list(Some(id)).is_empty());
        if known || has_letters || self.egress.destination_ids().iter().any(|d| d == id) {
            Ok(())
        } else {
            Err(ApiError::NotFound(format!("no destination with id {id:?}")))
        }
    }

    /// Checks every event against the accepted plan; returns their JSON texts.
    fn validate(&self, events: &[Value]) -> Result<Vec<String>, ApiError> {
        let plan = self.sequencer.plan();
        events
            .iter()
            .enumerate()
            .map(|(index, value)| {
                parse_value(value)
                    .and_then(|event| Update::resolve(&plan, event, 0, 0))
                    .map(|_| value.to_string())
                    .map_err(|e| ApiError::BadRequest {
                        message: format!("event {index}: {e}"),
                        index: Some(index),
                    })
            })
            .collect()
    }
}

impl Backend for Service {
    fn ingest(&self, events: Vec<Value>) -> BoxFuture<'_, Result<usize, ApiError>> {
        Box::pin(async move {
            let texts = self.validate(&events)?;
            self.sequencer.events(texts).await.map_err(api_error)
        })
    }

    fn get_object(&self, kind: api::ObjectKind, id: &str) -> Result<Value, ApiError> {
        let kind = kind_of(kind);
        self.sequencer
            .with_control(|c| c.show(kind, id))
            .ok_or_else(|| ApiError::NotFound(format!("no {} with id {id:?}", kind.as_str())))
    }

    fn put_object(
        &self,
        kind: api::ObjectKind,
        id: &str,
        body: Value,
    ) -> BoxFuture<'_, Result<(bool, Value), ApiError>> {
        let change = ControlChange::Put {
            kind: kind_of(kind),
            id: id.to_owned(),
            object: body.to_string(),
        };
        Box::pin(async move {
            let applied = self.sequencer.control(change).await.map_err(api_error)?;
            Ok((applied.created, applied.shown))
        })
    }

    fn delete_object(
        &self,
        kind: api::ObjectKind,
        id: &str,
    ) -> BoxFuture<'_, Result<(), ApiError>> {
        let change = ControlChange::Delete {
            kind: kind_of(kind),
            id: id.to_owned(),
        };
        Box::pin(async move {
            self.sequencer.control(change).await.map_err(api_error)?;
            Ok(())
        })
    }

    fn add_members(
        &self,
        audience: &str,
        members: Vec<(String, String)>,
    ) -> BoxFuture<'_, Result<usize, ApiError>> {
        let n = members.len();
        let event = json!({
            "type": "uploadMembers",
            "audience": audience,
            "add": members
                .into_iter()
                .map(|(namespace, id)| json!({"namespace": namespace, "id": id}))
                .collect::<Vec<_>>(),
        });
        let audience = audience.to_owned();
        Box::pin(async move {
            let exists = self
                .sequencer
                .with_control(|c| c.config().audience(&audience).map(|a| a.is_upload()));
            match exists {
                None => {
                    return Err(ApiError::NotFound(format!(
                        "no audience with id {audience:?}"
                    )));
                }
                Some(false) => {
                    return Err(ApiError::Conflict(format!(
                        "audience {audience:?} is rule-based: members can only be uploaded to an upload audience"
                    )));
                }
                Some(true) => {}
            }
            if n == 0 {
                return Ok(0);
            }
            let texts = self.validate(&[event]).map_err(|e| match e {
                ApiError::BadRequest { message, .. } => ApiError::bad_request(message),
                other => other,
            })?;
            self.sequencer.events(texts).await.map_err(api_error)?;
            Ok(n)
        })
    }

    fn dead_letters(&self, destination: &str) -> Result<Vec<Value>, ApiError> {
        self.known_destination(destination)?;
        Ok(self
            .egress
            .dead_letters()
            .map(|store| crate::egress::list_json(store, Some(destination)))
            .unwrap_or_default())
    }

    fn redrive(&self, destination: &str) -> BoxFuture<'_, Result<Value, ApiError>> {
        let destination = destination.to_owned();
        Box::pin(async move {
            self.known_destination(&destination)?;
            // The destination as last accepted: a PUT that fixed it counts at once.
            let current = self
                .sequencer
                .with_control(|c| c.config().destination(&destination).cloned());
            let report = self
                .egress
                .redrive_as(Some(&destination), current.as_ref())
                .await;
            Ok(match report {
                Some(r) => json!({"succeeded": r.succeeded, "failed": r.failed}),
                None => json!({"succeeded": 0, "failed": 0}),
            })
        })
    }

    fn destination_metrics(&self, destination: &str) -> Result<Value, ApiError> {
        self.known_destination(destination)?;
        let stats = self.egress.stats();
        Ok(stats
            .destinations
            .get(destination)
            .map(|s| s.to_json())
            .unwrap_or_else(|| json!({"exports": 0})))
    }

    fn metrics(&self) -> MetricsSnapshot {
        let stats = self.egress.stats();
        let wal = self.sequencer.wal();
        MetricsSnapshot {
            events_accepted: self.sequencer.accepted_events(),
            epochs: self.feed.epochs.load(Ordering::Relaxed),
            wal_bytes: wal.disk_bytes(),
            wal_position: wal.next_position(),
            snapshot_writing: self.feed.snapshot_writing.load(Ordering::Relaxed),
            destinations: stats
                .destinations
                .iter()
                .map(|(id, s)| (id.clone(), DestinationMetrics::from_stats(s)))
                .collect(),
        }
    }

    fn accepting(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
    }
}
