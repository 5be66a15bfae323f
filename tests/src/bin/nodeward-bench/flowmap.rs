//! Reading a flow map the size of a busy node's, for issue 15 (scenario `flow map read`): an
//! LRU hash of `FlowState` values like the TCP source's `TCP_FLOWS`, filled with N entries,
//! read again and again two ways in the same process: walked entry by entry (`GET_NEXT_KEY`
//! then `LOOKUP_ELEM`, the two syscalls per entry aya's iterator makes) and with the agent's
//! own batch reader (`BPF_MAP_LOOKUP_BATCH`). The CPU time of each read (user and system) is
//! what a tick of the TCP source spends on the map.

use std::{
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    process::ExitCode,
};

use agent_ebpf::FlowState;
use clap::Args;
use serde::Serialize;

use crate::{fail, print};

#[derive(Debug, Clone, Args)]
pub struct FlowMapArgs {
    /// Entries in the map.
    #[arg(long, default_value_t = 200_000)]
    pub flows: u32,
    /// Reads of each kind.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
}

#[derive(Serialize)]
struct FlowMapReport {
    flows: u32,
    /// CPU ms per full read, each round.
    walk_cpu_ms: Vec<f64>,
    batch_cpu_ms: Vec<f64>,
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

fn bpf(cmd: libc::c_long, attr: &[u64]) -> std::io::Result<i64> {
    // SAFETY: every command used here reads `size_of_val(attr)` bytes of a live slice; the
    // pointers inside point to live buffers of the map's key and value sizes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ret)
}

fn create(max: u32) -> std::io::Result<OwnedFd> {
    let value = u32::try_from(std::mem::size_of::<FlowState>()).unwrap_or(u32::MAX);
    let attr = [
        u64::from(BPF_MAP_TYPE_LRU_HASH) | (8u64 << 32),
        u64::from(value) | (u64::from(max) << 32),
        0,
    ];
    let fd = i32::try_from(bpf(BPF_MAP_CREATE, &attr)?).map_err(std::io::Error::other)?;
    // SAFETY: the kernel just returned this fd and nothing else holds it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn elem_attr(fd: &OwnedFd, key: *const u64, value: u64) -> [u64; 4] {
    [fd.as_raw_fd() as u64, key as u64, value, 0]
}

/// Two syscalls per entry, as aya 0.14's `HashMap::iter` makes.
fn walk(fd: &OwnedFd) -> usize {
    let mut n = 0;
    let mut key: Option<u64> = None;
    loop {
        let mut next: u64 = 0;
        let at = key.as_ref().map_or(std::ptr::null(), std::ptr::from_ref);
        let attr = elem_attr(fd, at, std::ptr::from_mut(&mut next) as u64);
        if bpf(BPF_MAP_GET_NEXT_KEY, &attr).is_err() {
            return n;
        }
        let mut value = FlowState::default();
        let attr = elem_attr(fd, &raw const next, std::ptr::from_mut(&mut value) as u64);
        if bpf(BPF_MAP_LOOKUP_ELEM, &attr).is_ok() {
            n += 1;
        }
        key = Some(next);
    }
}

/// CPU time of this process (user and system), in ms.
fn cpu_ms() -> f64 {
    let u = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    #[expect(clippy::cast_precision_loss, reason = "ms of a short run")]
    let ms = u.tv_sec as f64 * 1e3 + u.tv_nsec as f64 / 1e6;
    ms
}

pub fn flow_map(args: &FlowMapArgs) -> ExitCode {
    let fd = match create(args.flows.saturating_add(args.flows / 4)) {
        Ok(fd) => fd,
        Err(e) => return fail(format!("create an LRU hash map (needs root): {e}")),
    };
    for cookie in 1..=u64::from(args.flows) {
        let value = FlowState {
            cgroup_id: cookie % 7,
            start_ns: cookie,
            ..FlowState::default()
        };
        let attr = elem_attr(&fd, &raw const cookie, std::ptr::from_ref(&value) as u64);
        if let Err(e) = bpf(BPF_MAP_UPDATE_ELEM, &attr) {
            return fail(format!("fill the map: {e}"));
        }
    }
    let mut report = FlowMapReport {
        flows: args.flows,
        walk_cpu_ms: Vec::new(),
        batch_cpu_ms: Vec::new(),
    };
    let mut out: Vec<(u64, FlowState)> = Vec::new();
    for _ in 0..args.rounds {
        let t = cpu_ms();
        let walked = walk(&fd);
        report.walk_cpu_ms.push(cpu_ms() - t);
        out.clear();
        let t = cpu_ms();
        if let Err(e) =
            nodeward::ebpf::batch::lookup_all(fd.as_fd(), nodeward::ebpf::batch::CHUNK, &mut out)
        {
            return fail(e);
        }
        report.batch_cpu_ms.push(cpu_ms() - t);
        if walked != out.len() || out.len() != args.flows as usize {
            return fail(format!(
                "read {walked} entries walking and {} in batches, of {}",
                out.len(),
                args.flows
            ));
        }
    }
    print(&report)
}
