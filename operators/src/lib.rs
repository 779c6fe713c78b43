//! The streamdest dataflow: identity stitching, attribute merge, audience evaluation and change
//! detection on differential dataflow. Pure dataflow, no I/O: inputs are pushed in by the binary
//! and exports leave through a sink, one completed epoch at a time.

pub mod dataflow;
pub mod export;
pub mod input;
pub mod leaf;
pub mod merge;
pub mod plan;
pub mod profile;
pub mod rule;
pub mod sink;
pub mod status;
pub mod stitch;
