//! Test networks: veth pairs between namespaces, an NFQUEUE delay line (this kernel has no
//! netem), and the kernel's own view of TCP sockets (`ss -ti`, `nstat`) to compare against.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{run, wait_for, Netns};

/// A veth pair with `10.<net>.0.1/24` in `a` and `10.<net>.0.2/24` in `b`; it goes away with
/// the namespaces.
pub fn veth(a: &Netns, b: &Netns, net: u8) -> (String, String) {
    let (ea, eb) = (format!("nwa{net}"), format!("nwb{net}"));
    run(Command::new("ip").args([
        "link", "add", &ea, "netns", &a.name, "type", "veth", "peer", "name", &eb, "netns", &b.name,
    ]));
    for (ns, dev, host) in [(a, &ea, 1), (b, &eb, 2)] {
        run(Command::new("ip").args([
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("10.{net}.0.{host}/24"),
            "dev",
            dev,
        ]));
        run(Command::new("ip").args(["-n", &ns.name, "link", "set", dev, "up"]));
    }
    (format!("10.{net}.0.1"), format!("10.{net}.0.2"))
}

/// A Python interpreter that has the `netfilterqueue` module, if any.
pub fn python_with_nfqueue() -> Option<String> {
    ["python3", "/usr/bin/python3"].into_iter().find_map(|py| {
        let ok = Command::new(py)
            .args(["-c", "import netfilterqueue"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| py.to_owned())
    })
}

/// Whether `iptables` with the NFQUEUE target can be used.
pub fn has_iptables() -> bool {
    Command::new("iptables")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A script shipped with the tests (`tests/scripts/<name>`).
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

/// One packet's fate in the delay line.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub sport: u16,
    pub dport: u16,
    pub len: u32,
    /// `None` when the packet was dropped.
    pub delay_ms: Option<f64>,
}

/// A delay line on the OUTPUT (or INPUT) path of a namespace: packets matching `rule` are held
/// for `mean ± jitter` ms (uniform), in order; `drop` is the fraction of payload packets
/// dropped.
#[derive(Debug)]
pub struct DelayLine {
    child: Child,
    log: PathBuf,
}

impl DelayLine {
    /// On the OUTPUT path of `ns`, the sender's namespace: the packets are held before they
    /// leave its IP stack (netfilter's LOCAL_OUT runs before the `cgroup_skb/egress` hook).
    pub fn start(
        python: &str,
        ns: &Netns,
        queue: u16,
        rule: &[&str],
        mean_ms: f64,
        jitter_ms: f64,
        drop: f64,
    ) -> Self {
        Self::start_on(
            "OUTPUT",
            python,
            ns,
            queue,
            rule,
            (mean_ms, jitter_ms, drop),
        )
    }

    /// On the INPUT path of `ns`, the receiver's namespace: the packets are held after every
    /// hook of the sender (its `cgroup_skb/egress` included), where a network's delay is.
    pub fn inbound(
        python: &str,
        ns: &Netns,
        queue: u16,
        rule: &[&str],
        mean_ms: f64,
        jitter_ms: f64,
        drop: f64,
    ) -> Self {
        Self::start_on("INPUT", python, ns, queue, rule, (mean_ms, jitter_ms, drop))
    }

    fn start_on(
        chain: &str,
        python: &str,
        ns: &Netns,
        queue: u16,
        rule: &[&str],
        (mean_ms, jitter_ms, drop): (f64, f64, f64),
    ) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "nodeward-delay-{}-{queue}-{}",
            std::process::id(),
            ns.name
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (log, ready) = (dir.join("log.jsonl"), dir.join("ready"));
        let _ = std::fs::remove_file(&ready);
        let mut c = ns.command(python);
        c.arg(script("delay_line.py"))
            .args([
                queue.to_string(),
                mean_ms.to_string(),
                jitter_ms.to_string(),
                drop.to_string(),
                u32::from(queue).to_string(),
            ])
            .arg(&log)
            .arg(&ready)
            .stdout(Stdio::null());
        let child = c.spawn().expect("start the delay line");
        assert!(
            wait_for(Duration::from_secs(10), || ready.exists().then_some(())).is_some(),
            "delay line did not bind queue {queue}"
        );
        let mut ipt = ns.command("iptables");
        ipt.args(["-A", chain]).args(rule).args([
            "-j",
            "NFQUEUE",
            "--queue-num",
            &queue.to_string(),
        ]);
        run(&mut ipt);
        Self { child, log }
    }

    /// Every packet handled so far.
    pub fn applied(&self) -> Vec<Applied> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| Applied {
                sport: u16::try_from(v["sport"].as_u64().unwrap_or(0)).unwrap_or(0),
                dport: u16::try_from(v["dport"].as_u64().unwrap_or(0)).unwrap_or(0),
                len: u32::try_from(v["len"].as_u64().unwrap_or(0)).unwrap_or(0),
                delay_ms: v["delay_ms"].as_f64(),
            })
            .collect()
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = self.log.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// One established socket as `ss -tin` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct SsSocket {
    pub local_port: u16,
    pub peer_port: u16,
    pub srtt_ms: f64,
    pub rttvar_ms: f64,
    pub retrans_total: u64,
}

/// Parses `ss -tinH` output: a socket line followed by an info line.
pub fn parse_ss(text: &str) -> Vec<SsSocket> {
    let mut out = Vec::new();
    let mut ports: Option<(u16, u16)> = None;
    let port_of = |s: &str| s.rsplit(':').next().and_then(|p| p.parse().ok());
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields
            .first()
            .is_some_and(|f| f.starts_with("ESTAB") || f.parse::<u32>().is_ok())
            && fields.len() >= 4
        {
            let n = fields.len();
            ports = port_of(fields[n - 2]).zip(port_of(fields[n - 1]));
            continue;
        }
        let Some((local_port, peer_port)) = ports.take() else {
            continue;
        };
        let mut s = SsSocket {
            local_port,
            peer_port,
            srtt_ms: 0.0,
            rttvar_ms: 0.0,
            retrans_total: 0,
        };
        for f in fields {
            if let Some(v) = f.strip_prefix("rtt:") {
                let mut it = v.split('/');
                s.srtt_ms = it.next().and_then(|x| x.parse().ok()).unwrap_or(0.0);
                s.rttvar_ms = it.next().and_then(|x| x.parse().ok()).unwrap_or(0.0);
            } else if let Some(v) = f.strip_prefix("retrans:") {
                s.retrans_total = v
                    .split('/')
                    .nth(1)
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(0);
            }
        }
        out.push(s);
    }
    out
}

/// Established TCP sockets in `ns`, from `ss -tin`.
pub fn ss(ns: &Netns) -> Vec<SsSocket> {
    parse_ss(&run(ns.command("ss").args([
        "-tinH",
        "state",
        "established",
    ])))
}

/// The namespace's `TcpRetransSegs` counter (`nstat`, absolute, history untouched).
pub fn nstat_retrans(ns: &Netns) -> u64 {
    let text = run(ns.command("nstat").args(["-asz", "TcpRetransSegs"]));
    text.lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some("TcpRetransSegs")).then(|| f.next().and_then(|v| v.parse().ok()))?
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ss_info_lines_are_paired_with_their_socket() {
        let text = "0      0           10.9.0.1:40312        10.9.0.2:5000\n\t cubic wscale:7,7 rto:224 rtt:20.417/3.1 ato:40 mss:1448 retrans:0/3 rcv_space:14480\n";
        let s = parse_ss(text);
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].local_port, s[0].peer_port), (40312, 5000));
        assert!((s[0].srtt_ms - 20.417).abs() < 1e-9 && (s[0].rttvar_ms - 3.1).abs() < 1e-9);
        assert_eq!(s[0].retrans_total, 3);
    }
}
