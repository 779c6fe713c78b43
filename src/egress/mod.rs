//! The egress stage: exports → HTTP requests → delivered or dead-lettered (SPEC §4).
//!
//! Modelled on Vector's http sink, in stages:
//!
//! 1. **Settings** — [`settings`]: [`destination_settings`] turns a configured
//!    [`Destination`](crate::config::Destination) into the
//!    [`DestinationSettings`] a re-send needs (also what the dead-letter store keeps);
//!    [`service::DestinationRuntime`] validates them once (URL, headers, token URL).
//! 2. **Request building** — [`request::RequestTemplate`] + [`auth::Authorizer`]
//!    (bearer, OAuth2 with a single-flight token cache).
//! 3. **Service** — [`service::deliver_round`]: attempts, per-attempt timeout,
//!    `maxInFlight` slots, [`retry::RetryPolicy`] (exponential backoff, full jitter,
//!    `Retry-After`), over the pooled hyper [`transport::Transport`]: the system's trust
//!    store, and one TLS client (and pool) per distinct `tls` settings (extra CAs, a client
//!    certificate), shared by the destinations that have the same.
//! 4. **Intake and ordering** — [`intake`]: [`Egress`], a bounded intake (backpressure on
//!    [`Egress::submit`]), then [`ordering::OrderTable`]: an export starts once every earlier
//!    export to its destination sharing an identity with it has ended (epoch order across a
//!    profile's history — renames, merges, splits — never two at once, no head-of-line
//!    blocking across unrelated profiles); outcomes to the dead-letter store, the stats and
//!    an optional callback.
//!    An export that failed and could not be stored either (full disk, I/O error) is not
//!    dropped: it is kept in memory ([`Egress::unstored`]), counted apart
//!    ([`EgressStats::not_stored`]) and logged as an error naming the data directory and the
//!    OS error. When a batch of dead letters does not fit, the ones written whole before
//!    the disk ran out are stored (and counted so), the others are not.
//! 5. **Redrive** — [`redrive()`] / [`Egress::redrive`] and [`list_json_lines`] for the
//!    `dead-letters` command and API.
//!
//! Why a delivery failed is a typed [`DeliveryError`], why a destination's settings were
//! refused a typed [`SettingsError`] ([`error`]); each is turned into text only where
//! `lastError` is stored or printed, or a configuration error is reported.
//!
//! Secrets never reach logs, errors, `Debug` output or metrics: they stay in
//! [`Secret`](crate::secret::Secret)s and sensitive header values until the request is sent.

pub mod auth;
pub mod error;
pub mod intake;
pub mod ordering;
pub mod redrive;
pub mod request;
pub mod retry;
pub mod service;
pub mod settings;
pub mod stats;
pub mod transport;

pub use error::{DeliveryError, SettingsError};
pub use intake::{Egress, EgressError, EgressOptions, Export, Outcome, OutcomeCallback, Unstored};
pub use redrive::{
    RedriveReport, list_json, list_json_lines, redrive, redrive_matching, summary_json,
};
pub use retry::RetryPolicy;
pub use service::{DestinationRuntime, RoundResult, ServiceOptions};
pub use settings::{DestinationSettings, destination_settings};
pub use stats::{DestinationStats, EgressStats};
pub use transport::Transport;
