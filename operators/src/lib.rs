//! The streamdest dataflow: identity stitching, attribute merge, audience evaluation and change
//! detection on timely and differential dataflow. Pure dataflow, no I/O: inputs are pushed in by
//! the binary and exports leave through a sink, one completed epoch at a time. [`dataflow`]
//! draws the whole and composes the stages, each a module.

pub mod dataflow;
pub mod export;
pub mod gate;
pub mod history;
pub mod identity;
pub mod input;
pub mod intern;
pub mod leaf;
pub mod link;
pub mod members;
pub mod merge;
pub mod meter;
pub mod plan;
pub mod rule;
pub mod sink;
pub mod stitch;
pub mod upsert;
pub mod view;
