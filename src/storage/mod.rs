//! Durable local storage in the data directory.
//!
//! [`deadletter::DeadLetterStore`], the append-only log of exports that could not be delivered
//! (SPEC §4, §5 `dead-letters`), and [`wal::Wal`], the write-ahead log of accepted events and
//! control changes (SPEC §7).

pub mod deadletter;
pub mod wal;

pub use deadletter::{
    Damage, DamageKind, DeadLetter, DeadLetterStore, DestinationSettings, NewDeadLetter,
    PartialBatch, StoreError,
};
pub use wal::{Recovery, TornTail, Wal, WalError, WalOptions, WalReader};
