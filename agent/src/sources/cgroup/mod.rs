//! Per-workload cgroup stats (CPU, throttling, memory, OOM, IO, PIDs, PSI), v2 and v1.

pub mod parse;
pub mod read;

pub use read::{CgroupStats, Reader};
