//! `streamdest bench`: the whole pipeline — synthetic events → dataflow → egress → a local
//! HTTP endpoint — in one process, at a fixed offered rate, with event-to-receipt latency.
//!
//! # What runs
//!
//! * an in-process [`Receiver`](crate::receiver::Receiver) (hyper, HTTP/1.1 keep-alive, `127.0.0.1:0`) that answers
//!   `200` and timestamps every request once its body is read;
//! * the dataflow ([`Pipeline`](crate::pipeline::Pipeline), `--workers` timely threads) fed by this thread;
//! * the [`Egress`](crate::egress::Egress) (one destination pointing at the receiver, `--max-in-flight` slots) on a
//!   tokio runtime shared with the receiver;
//! * a *collector* thread that takes completed epochs from the [`ExportStream`](crate::pipeline::ExportStream) and a
//!   *submitter* thread that hands their exports to the egress.
//!
//! # Phases
//!
//! 1. **Initial load** (not timed as part of the latency): two fragments per profile, in big
//!    epochs (`--load-batch` events), generated and parsed on a helper thread. The exports the
//!    load produces are counted and discarded — they would be a one-off backfill, not the
//!    steady state this measures.
//! 2. **Measured phases**, one per `--rate` (and the trials of `--max`): an *open-loop* feeder.
//!    Event `i` of a phase is *scheduled* at `t0 + i / rate`; every `--batch-ms` the feeder
//!    takes every event whose time has come (at most `--load-batch`), parses and resolves it
//!    and pushes it as one epoch. A stall therefore makes the next epochs bigger and their
//!    events later — it does not slow the schedule down (no coordinated omission). The first
//!    `--warmup` seconds of a phase are excluded from the figures.
//!
//! # Latency: from the `Idempotency-Key`
//!
//! Event `i` of a phase gets the ingest sequence number `base + i`. An export's
//! `Idempotency-Key` ends in `-{seq:x}`, the largest sequence number among the events for that
//! profile in the epoch (`streamdest_operators::export::encode`). When the receiver gets a
//! request it parses that suffix, computes the event's scheduled time from `i` alone and
//! records `receipt − scheduled` in a histogram: no map from exports to events, no per-event
//! bookkeeping, one mutex-protected histogram update per request. When several events for one
//! profile fall into one epoch they give one export, measured from the newest of them (the
//! older ones are at most one epoch, `--batch-ms` plus catch-up, older); with far more
//! profiles than events per epoch this is rare. Requests whose key does not parse are counted
//! as `unmatched` (a non-zero count means the key format changed).
//!
//! # Where the time goes
//!
//! Each measured event's latency is split into stages, each with its own histogram:
//! `ingest_wait` (scheduled → its epoch pushed: batching and dataflow backpressure),
//! `dataflow_per_epoch` (push → the epoch completed at the [`ExportStream`](crate::pipeline::ExportStream)),
//! `queue_before_egress` (completed → accepted by [`Egress::submit`](crate::egress::Egress::submit), per export), and `egress`
//! (submit → delivered: waiting for the profile's previous export and a `maxInFlight` slot,
//! plus the HTTP round trip; the egress's own histogram).
//!
//! `--max` searches the highest offered rate whose p99 stays under `--p99-ms`: short trials
//! (`--max-duration`) doubling from `--max-start` until one fails, then bisecting. A trial is
//! cut short once the feeder lags its schedule by more than `max(1 s, 4 × --p99-ms)`; a
//! `--rate` phase once it lags by more than `--max-lag` (its unpushed events are reported as
//! `events_dropped`, and the phase fails).
//!
//! # Layout
//!
//! `args` (the command-line options and their validation), `command` (`streamdest bench`
//! itself), `engine` (the receiver + pipeline + egress engine, shared with `demo`),
//! `max_search` (`--max`), `report` (the report's types, also the `--json` schema),
//! `resources` (CPU and memory sampling), `serve_only` (`--serve-only`) and `table` (the
//! human-readable report).

mod args;
mod command;
mod engine;
mod max_search;
mod report;
mod resources;
mod serve_only;
mod table;

pub use args::BenchArgs;
pub use command::run;
pub(crate) use engine::{Engine, EngineOptions, PhaseSpec, Progress};
pub use report::{
    BenchReport, Breakdown, EgressTotals, LoadReport, Machine, MaxReport, Params, Percentiles,
    PhaseReport, Resources,
};
pub(crate) use resources::peak_rss_mib;
