//! Durable local storage in the data directory.
//!
//! For now one store: [`deadletter::DeadLetterStore`], the append-only log of exports that
//! could not be delivered (SPEC §4, §5 `dead-letters`).

pub mod deadletter;

pub use deadletter::{
    Damage, DamageKind, DeadLetter, DeadLetterStore, DestinationSettings, NewDeadLetter,
    PartialBatch, StoreError,
};
