//! nodeward: a node agent for Kubernetes hosts that serve live streams and GPU work.
//!
//! Data flows one way: `sources` (eBPF, cgroups, procfs, NVML) collect, the health engine
//! decides, and the API only translates. This library holds every part; `main.rs` only wires
//! them together, and the integration tests in `tests/` drive the same parts directly.

pub mod api;
pub mod bridge;
pub mod cli;
pub mod client;
pub mod config;
pub mod containers;
pub mod daemon;
pub mod ebpf;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod health;
pub mod kube;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod paths;
pub mod probe;
pub mod reload;
pub mod sources;
pub mod store;
pub mod supervise;
pub mod task;
pub mod verify;

#[cfg(test)]
mod layering_tests;

/// `EX_USAGE` from sysexits.h: the exit code for a bad config or command line.
pub const EXIT_USAGE: u8 = 64;
/// `EX_SOFTWARE`: the agent failed while running.
pub const EXIT_SOFTWARE: u8 = 70;
