//! The `cgroup_skb` UDP/RTP programs: attach at the cgroup v2 root, read flows and streams.

use std::{collections::BTreeMap, fs::File, path::Path};

use agent_ebpf::{
    rtcp::{RtcpReport, RtcpReportKey},
    rtp::{counter, RtpKey, RtpState, UdpFlowKey, UdpFlowStats},
};
use aya::{
    maps::{Array, HashMap, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType},
    Ebpf,
};

use super::{LoadError, OBJECT};

const INGRESS: &str = "nodeward_udp_ingress";
const EGRESS: &str = "nodeward_udp_egress";
const FLOWS: &str = "UDP_FLOWS";
const STREAMS: &str = "RTP_STREAMS";
const FLOW_PROBATION: &str = "UDP_FLOW_PROBATION";
const STREAM_PROBATION: &str = "RTP_STREAM_PROBATION";

/// Entries of a probation map for a main map of `max` entries: a quarter of it, and at least
/// enough that a burst of new flows does not push a real one out before its second packet.
pub fn probation_entries(max: u32) -> u32 {
    (max / 4).max(MIN_PROBATION)
}

/// The smallest probation map: a new flow survives this many other new flows on probation
/// before it is pushed out (a flood of one-packet flows sets the pace).
const MIN_PROBATION: u32 = 1024;
const REPORTS: &str = "RTCP_REPORTS";
const CLOCK_RATES: &str = "RTP_CLOCK_RATES";
const COUNTERS: &str = "UDP_COUNTERS";

/// What one read of the maps returns.
#[derive(Debug, Default, Clone)]
pub struct UdpMaps {
    pub flows: Vec<(UdpFlowKey, UdpFlowStats)>,
    pub streams: Vec<(RtpKey, RtpState)>,
    /// The latest RTCP report block per (container, media SSRC, viewer).
    pub reports: Vec<(RtcpReportKey, RtcpReport)>,
    /// Summed over CPUs, indexed by `agent_ebpf::rtp::counter`.
    pub counters: [u64; counter::COUNT as usize],
}

/// The attached UDP programs; dropping this detaches them.
pub struct UdpPrograms {
    ebpf: Ebpf,
}

impl std::fmt::Debug for UdpPrograms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpPrograms").finish_non_exhaustive()
    }
}

fn program_err(name: &'static str) -> impl Fn(aya::programs::ProgramError) -> LoadError {
    move |source| LoadError::Program { name, source }
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> LoadError {
    move |source| LoadError::Map { name, source }
}

impl UdpPrograms {
    /// Loads both programs and attaches them to `cgroup_v2_root`, so they see the sockets of
    /// every cgroup below it. `clock_rates` maps dynamic RTP payload types to their clock rate.
    /// New flows and streams wait in probation maps of [`probation_entries`] until they
    /// proved themselves, so only those enter the `max_flows` and `max_streams` maps.
    pub fn attach(
        cgroup_v2_root: &Path,
        clock_rates: &BTreeMap<u8, u32>,
        max_flows: u32,
        max_streams: u32,
    ) -> Result<Self, LoadError> {
        super::require_cgroup_links()?;
        let mut ebpf =
            super::loader_owning(&[FLOWS, STREAMS, FLOW_PROBATION, STREAM_PROBATION, REPORTS])
                .map_max_entries(FLOWS, max_flows.max(1))
                .map_max_entries(STREAMS, max_streams.max(1))
                .map_max_entries(FLOW_PROBATION, probation_entries(max_flows))
                .map_max_entries(STREAM_PROBATION, probation_entries(max_streams))
                .load(OBJECT)?;
        {
            let mut rates: Array<_, u32> = Array::try_from(
                ebpf.map_mut(CLOCK_RATES)
                    .ok_or(LoadError::MissingMap(CLOCK_RATES))?,
            )
            .map_err(map_err(CLOCK_RATES))?;
            for (&pt, &rate) in clock_rates {
                if pt < 128 {
                    rates
                        .set(u32::from(pt), rate, 0)
                        .map_err(map_err(CLOCK_RATES))?;
                }
            }
        }
        let cgroup = File::open(cgroup_v2_root).map_err(|source| LoadError::Cgroup {
            path: cgroup_v2_root.to_path_buf(),
            source,
        })?;
        for (name, attach_type) in [
            (INGRESS, CgroupSkbAttachType::Ingress),
            (EGRESS, CgroupSkbAttachType::Egress),
        ] {
            let program: &mut CgroupSkb = ebpf
                .program_mut(name)
                .ok_or(LoadError::MissingProgram(name))?
                .try_into()
                .map_err(program_err(name))?;
            program.load().map_err(program_err(name))?;
            // On 5.7+ aya attaches through a bpf_link, which always coexists with other
            // programs on the cgroup and takes no mode flags (a non-zero mode is EINVAL).
            program
                .attach(&cgroup, attach_type, CgroupAttachMode::Single)
                .map_err(program_err(name))?;
        }
        Ok(Self { ebpf })
    }

    /// Removes flows, streams and viewer reports (those user space found idle past their
    /// expiry).
    pub fn remove(
        &mut self,
        flows: &[UdpFlowKey],
        streams: &[RtpKey],
        reports: &[RtcpReportKey],
    ) -> Result<(), LoadError> {
        let mut f: HashMap<_, UdpFlowKey, UdpFlowStats> = HashMap::try_from(
            self.ebpf
                .map_mut(FLOWS)
                .ok_or(LoadError::MissingMap(FLOWS))?,
        )
        .map_err(map_err(FLOWS))?;
        for k in flows {
            // Already gone (evicted meanwhile) is fine.
            let _ = f.remove(k);
        }
        let mut s: HashMap<_, RtpKey, RtpState> = HashMap::try_from(
            self.ebpf
                .map_mut(STREAMS)
                .ok_or(LoadError::MissingMap(STREAMS))?,
        )
        .map_err(map_err(STREAMS))?;
        for k in streams {
            let _ = s.remove(k);
        }
        let mut r: HashMap<_, RtcpReportKey, RtcpReport> = HashMap::try_from(
            self.ebpf
                .map_mut(REPORTS)
                .ok_or(LoadError::MissingMap(REPORTS))?,
        )
        .map_err(map_err(REPORTS))?;
        for k in reports {
            let _ = r.remove(k);
        }
        Ok(())
    }

    /// Reads every flow, stream and counter.
    pub fn read(&self) -> Result<UdpMaps, LoadError> {
        let flows: HashMap<_, UdpFlowKey, UdpFlowStats> =
            HashMap::try_from(self.ebpf.map(FLOWS).ok_or(LoadError::MissingMap(FLOWS))?)
                .map_err(map_err(FLOWS))?;
        let streams: HashMap<_, RtpKey, RtpState> = HashMap::try_from(
            self.ebpf
                .map(STREAMS)
                .ok_or(LoadError::MissingMap(STREAMS))?,
        )
        .map_err(map_err(STREAMS))?;
        let reports: HashMap<_, RtcpReportKey, RtcpReport> = HashMap::try_from(
            self.ebpf
                .map(REPORTS)
                .ok_or(LoadError::MissingMap(REPORTS))?,
        )
        .map_err(map_err(REPORTS))?;
        let counters_map: PerCpuArray<_, u64> = PerCpuArray::try_from(
            self.ebpf
                .map(COUNTERS)
                .ok_or(LoadError::MissingMap(COUNTERS))?,
        )
        .map_err(map_err(COUNTERS))?;
        // An entry can be evicted between listing and lookup: such errors are skipped.
        let mut out = UdpMaps {
            flows: flows.iter().filter_map(Result::ok).collect(),
            streams: streams.iter().filter_map(Result::ok).collect(),
            reports: reports.iter().filter_map(Result::ok).collect(),
            ..UdpMaps::default()
        };
        for (i, slot) in out.counters.iter_mut().enumerate() {
            let values = counters_map
                .get(&(i as u32), 0)
                .map_err(map_err(COUNTERS))?;
            *slot = values.iter().sum();
        }
        Ok(out)
    }
}
