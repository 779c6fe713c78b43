//! The streamdest dataflow: identity stitching, attribute merge, audience evaluation and change
//! detection on differential dataflow. Pure dataflow, no I/O: inputs are pushed in by the binary
//! and exports leave through a channel, one completed epoch at a time.

pub mod leaf;
pub mod plan;
pub mod rule;
