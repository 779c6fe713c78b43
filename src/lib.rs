//! streamdest: a streaming HTTP API destination on timely + differential dataflow.
//!
//! Stages, each a module: [`config`] (the user's JSON → a validated plan), [`events`] (input
//! lines → dataflow updates), the dataflow itself (the `streamdest-operators` crate),
//! `egress` (exports → HTTP requests, retries, dead letters) and the command line in `main.rs`.

pub mod api;
pub mod bench;
pub mod config;
pub mod demo;
pub mod egress;
pub mod events;
pub mod pipeline;
pub mod receiver;
pub mod replay;
pub mod secret;
pub mod service;
pub mod storage;
pub mod synth;
