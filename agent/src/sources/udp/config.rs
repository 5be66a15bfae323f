//! The `[udp]` config section.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UdpConfig {
    /// Follow UDP flows and RTP streams with the cgroup_skb programs.
    pub enabled: bool,
    /// A flow or stream with no packet for this long is no longer live.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A non-RTP UDP flow counts as a live stream (SRT, QUIC...) once it has lasted this long,
    /// so that DNS lookups and other short exchanges never hold up a drain.
    #[serde(with = "humantime_serde")]
    pub stream_min_duration: Duration,
    /// Flows and streams idle for this long are removed from the kernel maps.
    #[serde(with = "humantime_serde")]
    pub expiry: Duration,
    /// Capacity of the kernel's flow and stream maps (LRU: the least recently seen go first).
    pub max_flows: u32,
    pub max_streams: u32,
    /// A viewer's RTCP report older than this is dropped, not shown as fresh (viewers report
    /// about every 5 s, RFC 3550 6.2).
    #[serde(with = "humantime_serde")]
    pub viewer_report_stale: Duration,
    /// Clock rates (Hz) of dynamic RTP payload types (96–127), keyed by payload type. Types not
    /// listed have no known rate: their jitter is not guessed, their timestamp step is reported
    /// in timestamp units instead.
    pub dynamic_clock_rates: BTreeMap<String, u32>,
}

impl Default for UdpConfig {
    fn default() -> Self {
        let mut rates = BTreeMap::new();
        // Video (VP8/VP9/H.264/H.265/AV1) is 90 kHz; browsers commonly offer video at 96–110.
        for pt in [96, 97, 98, 99, 100, 102, 103, 104, 106, 108, 109, 127] {
            rates.insert(pt.to_string(), 90_000);
        }
        // Opus is always 48 kHz; 111 is the payload type browsers use for it.
        rates.insert("111".to_owned(), 48_000);
        Self {
            enabled: true,
            idle_timeout: Duration::from_secs(5),
            stream_min_duration: Duration::from_secs(10),
            expiry: Duration::from_secs(300),
            max_flows: 16_384,
            max_streams: 8_192,
            viewer_report_stale: Duration::from_secs(15),
            dynamic_clock_rates: rates,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("udp.dynamic_clock_rates: key {key:?}: {reason}")]
pub struct ClockRateError {
    pub key: String,
    pub reason: &'static str,
}

impl UdpConfig {
    /// The dynamic payload type table as numbers, validated.
    pub fn clock_rates(&self) -> Result<BTreeMap<u8, u32>, ClockRateError> {
        self.dynamic_clock_rates
            .iter()
            .map(|(k, &rate)| {
                let pt: u8 = k.trim().parse().map_err(|_| ClockRateError {
                    key: k.clone(),
                    reason: "not a payload type number",
                })?;
                if !(96..=127).contains(&pt) {
                    return Err(ClockRateError {
                        key: k.clone(),
                        reason: "dynamic payload types are 96..=127",
                    });
                }
                if !(1_000..=1_000_000).contains(&rate) {
                    return Err(ClockRateError {
                        key: k.clone(),
                        reason: "clock rate must be 1000..=1000000 Hz",
                    });
                }
                Ok((pt, rate))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_cover_video_and_opus() {
        let r = UdpConfig::default()
            .clock_rates()
            .expect("defaults are valid");
        assert_eq!(r.get(&96), Some(&90_000));
        assert_eq!(r.get(&111), Some(&48_000));
        assert_eq!(r.get(&120), None, "unknown types stay unknown");
    }

    #[test]
    fn static_or_garbage_payload_types_are_rejected() {
        let mut c = UdpConfig::default();
        c.dynamic_clock_rates.insert("8".to_owned(), 8000);
        assert_eq!(c.clock_rates().expect_err("8 is static").key, "8");
        let mut c = UdpConfig::default();
        c.dynamic_clock_rates.insert("video".to_owned(), 90_000);
        assert!(c.clock_rates().is_err());
        let mut c = UdpConfig::default();
        c.dynamic_clock_rates.insert("120".to_owned(), 5);
        assert!(c.clock_rates().is_err());
    }
}
