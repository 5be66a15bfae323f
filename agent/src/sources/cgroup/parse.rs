//! Parsers of cgroup files, v2 and v1. Each takes the file's text; none touches the filesystem.
//!
//! Single-value files are strict (an empty or non-numeric value is an error the reader turns
//! into an absent field). Keyed files are lenient per line: a line whose value is not a number
//! is skipped, so one odd key added by a newer kernel does not lose the others.

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty file")]
    Empty,
    #[error("not a number: {0:?}")]
    NotANumber(String),
    #[error("malformed line: {0:?}")]
    Malformed(String),
}

/// A single counter or gauge (`memory.current`, `cpuacct.usage`, `pids.current`).
pub fn u64_value(text: &str) -> Result<u64, ParseError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(ParseError::Empty);
    }
    t.parse().map_err(|_| ParseError::NotANumber(t.to_owned()))
}

/// v1 reports "no limit" as the largest page-aligned counter (9223372036854771712 on 4 KiB
/// pages); anything at or above 2^62 is no real limit.
const V1_UNLIMITED: u64 = 1 << 62;

/// A limit (`memory.max`, `pids.max`, `memory.limit_in_bytes`): `None` means unlimited, written
/// `max` on v2 and as a huge number on v1.
pub fn limit(text: &str) -> Result<Option<u64>, ParseError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(ParseError::Empty);
    }
    // cgroups-rs knows the `max` spelling; the v1 sentinel and the error kinds are ours.
    match cgroups_rs::parse_max_value(t) {
        Ok(cgroups_rs::MaxValue::Max) => Ok(None),
        Ok(cgroups_rs::MaxValue::Value(v)) => {
            let v = u64::try_from(v).map_err(|_| ParseError::NotANumber(t.to_owned()))?;
            Ok((v < V1_UNLIMITED).then_some(v))
        }
        // Past i64: still a number, and far above any real limit.
        Err(_) => match t.parse::<u64>() {
            Ok(_) => Ok(None),
            Err(_) => Err(ParseError::NotANumber(t.to_owned())),
        },
    }
}

/// `key value` lines (`cpu.stat`, `memory.stat`, `memory.events`, `cpuacct.stat`,
/// `memory.oom_control`). Lines without a numeric value are skipped.
pub fn keyed(text: &str) -> impl Iterator<Item = (&str, u64)> {
    text.lines().filter_map(|line| {
        let mut it = line.split_ascii_whitespace();
        let key = it.next()?;
        let value = it.next()?.parse().ok()?;
        Some((key, value))
    })
}

/// Looks up a handful of keys in one pass over a keyed file.
pub fn keyed_pick<const N: usize>(text: &str, keys: [&str; N]) -> [Option<u64>; N] {
    let mut out = [None; N];
    for (k, v) in keyed(text) {
        if let Some(i) = keys.iter().position(|want| *want == k) {
            out[i] = Some(v);
        }
    }
    out
}

/// IO counters of one block device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DeviceIo {
    pub major: u32,
    pub minor: u32,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ops: u64,
    pub write_ops: u64,
}

fn device(token: &str) -> Option<(u32, u32)> {
    let (maj, min) = token.split_once(':')?;
    Some((maj.parse().ok()?, min.parse().ok()?))
}

/// v2 `io.stat`: `8:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=0 dios=0` per device.
pub fn io_stat_v2(text: &str) -> Result<Vec<DeviceIo>, ParseError> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut it = line.split_ascii_whitespace();
        let (major, minor) = it
            .next()
            .and_then(device)
            .ok_or_else(|| ParseError::Malformed(line.to_owned()))?;
        let mut d = DeviceIo {
            major,
            minor,
            ..DeviceIo::default()
        };
        for kv in it {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            let Ok(v) = v.parse() else { continue };
            match k {
                "rbytes" => d.read_bytes = v,
                "wbytes" => d.write_bytes = v,
                "rios" => d.read_ops = v,
                "wios" => d.write_ops = v,
                _ => {}
            }
        }
        out.push(d);
    }
    Ok(out)
}

/// v1 `blkio.throttle.io_service_bytes` and `blkio.throttle.io_serviced` together:
/// `8:0 Read 4096` lines per device and operation, and a final `Total N` line.
pub fn blkio_v1(bytes: &str, ops: &str) -> Result<Vec<DeviceIo>, ParseError> {
    let mut out: Vec<DeviceIo> = Vec::new();
    for (text, is_bytes) in [(bytes, true), (ops, false)] {
        for line in text.lines() {
            let mut it = line.split_ascii_whitespace();
            let (Some(dev), Some(op), Some(value)) = (it.next(), it.next(), it.next()) else {
                continue; // `Total N` and blank lines
            };
            let (major, minor) =
                device(dev).ok_or_else(|| ParseError::Malformed(line.to_owned()))?;
            let value: u64 = value
                .parse()
                .map_err(|_| ParseError::NotANumber(value.to_owned()))?;
            let d = match out
                .iter_mut()
                .position(|d| d.major == major && d.minor == minor)
            {
                Some(i) => &mut out[i],
                None => {
                    out.push(DeviceIo {
                        major,
                        minor,
                        ..DeviceIo::default()
                    });
                    let last = out.len() - 1;
                    &mut out[last]
                }
            };
            match (op, is_bytes) {
                ("Read", true) => d.read_bytes = value,
                ("Write", true) => d.write_bytes = value,
                ("Read", false) => d.read_ops = value,
                ("Write", false) => d.write_ops = value,
                _ => {}
            }
        }
    }
    Ok(out)
}

/// One line of a pressure file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PsiLine {
    /// Share of time stalled, percent, over 10 s, 60 s and 300 s.
    pub avg10: f64,
    pub avg60: f64,
    pub avg300: f64,
    /// Total stall time, microseconds.
    pub total_us: u64,
}

/// A pressure file: `some` always; `full` where the kernel reports it (cgroup `cpu.pressure`
/// has it since 5.13, system-wide CPU `full` is meaningless and zero).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Psi {
    pub some: PsiLine,
    pub full: Option<PsiLine>,
}

/// `some avg10=0.00 avg60=0.00 avg300=0.00 total=0` and optionally a `full ...` line.
pub fn psi(text: &str) -> Result<Psi, ParseError> {
    let mut some = None;
    let mut full = None;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut it = line.split_ascii_whitespace();
        let kind = it.next().unwrap_or_default();
        let mut rec = PsiLine::default();
        let mut seen = 0;
        for kv in it {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| ParseError::Malformed(line.to_owned()))?;
            let bad = || ParseError::NotANumber(v.to_owned());
            match k {
                "avg10" => rec.avg10 = v.parse().map_err(|_| bad())?,
                "avg60" => rec.avg60 = v.parse().map_err(|_| bad())?,
                "avg300" => rec.avg300 = v.parse().map_err(|_| bad())?,
                "total" => rec.total_us = v.parse().map_err(|_| bad())?,
                _ => continue,
            }
            seen += 1;
        }
        if seen != 4 {
            return Err(ParseError::Malformed(line.to_owned()));
        }
        match kind {
            "some" => some = Some(rec),
            "full" => full = Some(rec),
            _ => return Err(ParseError::Malformed(line.to_owned())),
        }
    }
    let some = some.ok_or(ParseError::Empty)?;
    Ok(Psi { some, full })
}

#[cfg(test)]
#[path = "parse_tests.rs"]
mod tests;
