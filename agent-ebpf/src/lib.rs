//! Types shared between nodeward's eBPF programs and its user space.
//!
//! Every type here is `#[repr(C)]`, `Copy`, made of fixed-width integers only (no `bool`, no
//! enums) and laid out without implicit padding, so that the bytes the kernel writes into a map
//! are exactly the bytes user space reads. With the `user` feature each type implements
//! [`aya::Pod`].
#![no_std]

pub mod rtp;

#[cfg(test)]
extern crate std;
#[cfg(test)]
mod rtp_tests;

/// Key of the `TCP_STATE_EVENTS` per-CPU hash map: one counter per (cgroup, old state, new state).
///
/// `cgroup_id` is the cgroup v2 id (the inode number of the cgroup directory) of the task in
/// whose context the state change ran. The states are the kernel's `TCP_*` numbers
/// (`include/net/tcp_states.h`: 1 = ESTABLISHED, 2 = SYN_SENT, 7 = CLOSE, ...).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TcpStateKey {
    pub cgroup_id: u64,
    pub oldstate: u32,
    pub newstate: u32,
}

/// Offsets of the `sock:inet_sock_set_state` tracepoint record fields the program reads.
///
/// Tracepoint records have no stable ABI across kernels; user space reads these offsets from
/// `/sys/kernel/tracing/events/sock/inet_sock_set_state/format` at start-up and hands them to
/// the program as a global, so the same object file works on 5.10, 6.6 and newer kernels.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SetStateOffsets {
    pub oldstate: u32,
    pub newstate: u32,
    pub protocol: u32,
    /// Size in bytes of the `protocol` field (2 on current kernels, 1 on some older ones).
    pub protocol_size: u32,
}

/// TCP state numbers used by the programs and their tests.
pub mod tcp_state {
    pub const ESTABLISHED: u32 = 1;
    pub const SYN_SENT: u32 = 2;
    pub const SYN_RECV: u32 = 3;
    pub const FIN_WAIT1: u32 = 4;
    pub const FIN_WAIT2: u32 = 5;
    pub const TIME_WAIT: u32 = 6;
    pub const CLOSE: u32 = 7;
    pub const CLOSE_WAIT: u32 = 8;
    pub const LAST_ACK: u32 = 9;
    pub const LISTEN: u32 = 10;
    pub const CLOSING: u32 = 11;
    pub const NEW_SYN_RECV: u32 = 12;
}

/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u32 = 6;

pub mod tcp;
pub use tcp::{CgroupTcpStats, FlowState, HistKey};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: both types are repr(C), made only of u32/u64 fields laid out without padding,
    // so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::TcpStateKey {}
    unsafe impl aya::Pod for super::SetStateOffsets {}
    unsafe impl aya::Pod for super::rtp::UdpFlowKey {}
    unsafe impl aya::Pod for super::rtp::UdpFlowStats {}
    unsafe impl aya::Pod for super::rtp::RtpKey {}
    unsafe impl aya::Pod for super::rtp::RtpState {}
    // SAFETY: as above; each of these is repr(C) with u32/u64 fields only and no padding
    // (checked by the size assertions in `tcp`).
    unsafe impl aya::Pod for super::CgroupTcpStats {}
    unsafe impl aya::Pod for super::FlowState {}
    unsafe impl aya::Pod for super::HistKey {}
}
