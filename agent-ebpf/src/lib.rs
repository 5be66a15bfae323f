//! Types shared between nodeward's eBPF programs and its user space.
//!
//! Every type here is `#[repr(C)]`, `Copy`, made of fixed-width integers only (no `bool`, no
//! enums) and laid out without implicit padding, so that the bytes the kernel writes into a map
//! are exactly the bytes user space reads. With the `user` feature each type implements
//! [`aya::Pod`].
#![no_std]

pub mod rtcp;
pub mod rtp;

#[cfg(test)]
extern crate std;
#[cfg(test)]
mod rtcp_tests;
#[cfg(test)]
mod rtp_tests;

pub mod tcp;
pub use tcp::{CgroupTcpStats, FlowState, HistKey, HistRow, SockState};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: these types are repr(C), made only of u32/u64 fields laid out without padding,
    // so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::rtp::UdpFlowKey {}
    unsafe impl aya::Pod for super::rtp::UdpFlowStats {}
    unsafe impl aya::Pod for super::rtp::RtpKey {}
    unsafe impl aya::Pod for super::rtp::RtpState {}
    unsafe impl aya::Pod for super::rtcp::RtcpReportKey {}
    unsafe impl aya::Pod for super::rtcp::RtcpReport {}
    // SAFETY: as above; each of these is repr(C) with u32/u64 fields only and no padding
    // (checked by the size assertions in `tcp`).
    unsafe impl aya::Pod for super::CgroupTcpStats {}
    unsafe impl aya::Pod for super::FlowState {}
    unsafe impl aya::Pod for super::HistKey {}
}
