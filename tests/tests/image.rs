//! The container image, built offline by `packaging/image/build.sh` (what `cargo xtask image`
//! runs) from the release binary, and run by podman as the DaemonSet runs it: its capabilities
//! (all dropped, the DaemonSet's added), a read-only root, host PID, the pod's own network, the
//! host paths it mounts and the ConfigMap's config. The agent starts, its eBPF programs load,
//! /metrics answers from another network namespace (as Prometheus would), the gRPC health check
//! answers a stock client, and the DaemonSet's probe command succeeds. A second test checks that
//! `packaging/Containerfile` (the production build) and the offline build describe the same
//! image: files, user, entrypoint, command, ports and labels.
//!
//! Podman's storage (vfs) and state live in a directory of the test's own, removed afterwards;
//! runc runs the containers (crun refuses this VM's hybrid cgroup layout), with the cgroupfs
//! manager (systemd is not PID 1 here).

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use nodeward_tests::{
    agent_binary, cap_number, grantable_caps, is_root,
    kube::{find, strings, tool, yaml},
    net::veth,
    python_grpcio, skip, wait_for, Netns,
};
use serde_json::Value;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn path(rel: &str) -> PathBuf {
    Path::new(ROOT).join(rel)
}

/// The release binary `cargo xtask test` builds first (as packaging.rs expects it).
fn release_binary() -> PathBuf {
    let bin = agent_binary()
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/nodeward")
        .join("release/nodeward");
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build --release -p nodeward, or cargo xtask test)",
        bin.display()
    );
    bin
}

/// Why this machine cannot build and run the image, if it cannot.
fn missing_tools() -> Option<String> {
    if !is_root() {
        return Some("needs root (buildah mount, podman with host PID and capabilities)".into());
    }
    let missing: Vec<&str> = ["buildah", "podman", "runc", "ldd", "strip", "python3"]
        .into_iter()
        .filter(|t| tool(t).is_none())
        .collect();
    (!missing.is_empty()).then(|| {
        format!("{missing:?} not installed (Debian packages buildah, podman, runc: cargo xtask test installs them)")
    })
}

/// Podman and buildah with storage and state in a directory of this test's own.
struct Containers {
    dir: PathBuf,
    tag: String,
}

impl Containers {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("nodeward-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the storage directory");
        std::fs::write(
            dir.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{0}/graph\"\nrunroot = \"{0}/run\"\n",
                dir.display()
            ),
        )
        .expect("write storage.conf");
        std::fs::write(
            dir.join("containers.conf"),
            format!(
                "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
                 runtime = \"runc\"\ntmp_dir = \"{}/tmp\"\n",
                dir.display()
            ),
        )
        .expect("write containers.conf");
        Self {
            tag: format!("localhost/nodeward:{test}-{}", std::process::id()),
            dir,
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("TMPDIR", &self.dir);
        c
    }

    /// `program args`, which must succeed; its stdout.
    fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Builds the image from the release binary, as `cargo xtask image` does.
    fn build(&self) {
        let out = self
            .command("sh")
            .arg(path("packaging/image/build.sh"))
            .arg(release_binary())
            .arg(&self.tag)
            .output()
            .expect("run packaging/image/build.sh");
        assert!(
            out.status.success(),
            "build.sh: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        let _ = self.command("podman").args(["rm", "-af"]).output();
        let _ = self.command("buildah").args(["rm", "-a"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The DaemonSet's pod spec and its ConfigMap, parsed from the manifests.
fn daemonset() -> Option<(Value, Value)> {
    let ds = yaml(&path("packaging/kubernetes/30-daemonset.yaml"))?;
    let cm = yaml(&path("packaging/kubernetes/20-configmap.yaml"))?;
    Some((
        find(&ds, "DaemonSet")["spec"]["template"]["spec"].clone(),
        find(&cm, "ConfigMap").clone(),
    ))
}

/// An option and its value.
fn pair(args: &mut Vec<String>, option: &str, value: String) {
    args.push(option.to_owned());
    args.push(value);
}

/// `podman run` arguments that give the container what the DaemonSet's pod spec gives it.
/// Host paths that this machine lacks and the pod spec does not require (no `type`) are left
/// out, as the kubelet would mount an empty directory there; `/run/nodeward` becomes
/// `run_dir`, so that the test's agent does not share the host's socket.
fn podman_args(pod: &Value, config_map: &Value, dir: &Path, run_dir: &Path) -> Vec<String> {
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    let mut args: Vec<String> = Vec::new();
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    pair(&mut args, "--cap-drop", "all".into());
    let add = strings(&sc["capabilities"]["add"]);
    let (granted, missing) = grantable_caps(&add);
    if !missing.is_empty() {
        eprintln!("image: this machine cannot grant {missing:?}; running without them");
    }
    // `+bpf,+perfmon` (setpriv's form) to `BPF,PERFMON`.
    pair(
        &mut args,
        "--cap-add",
        granted.replace('+', "").to_uppercase(),
    );
    if sc["readOnlyRootFilesystem"] == true {
        args.push("--read-only".into());
        // Kubernetes mounts no tmpfs of its own on a read-only root; podman would.
        args.push("--read-only-tmpfs=false".into());
    }
    if sc["allowPrivilegeEscalation"] == false {
        pair(&mut args, "--security-opt", "no-new-privileges".into());
    }
    if sc["seccompProfile"]["type"] == "Unconfined" {
        pair(&mut args, "--security-opt", "seccomp=unconfined".into());
    }
    if let Some(uid) = sc["runAsUser"].as_u64() {
        pair(&mut args, "--user", uid.to_string());
    }
    if pod["hostPID"] == true {
        pair(&mut args, "--pid", "host".into());
    }
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().expect("env name");
        let value = match e["value"].as_str() {
            Some(v) => v.to_owned(),
            // spec.nodeName and the like: what the kubelet would fill in.
            None => "nodeward-image-test".to_owned(),
        };
        pair(&mut args, "--env", format!("{name}={value}"));
    }
    let volumes = pod["volumes"].as_array().expect("volumes");
    for m in c["volumeMounts"].as_array().expect("volumeMounts") {
        let volume = volumes
            .iter()
            .find(|v| v["name"] == m["name"])
            .expect("every mount has its volume");
        let target = m["mountPath"].as_str().expect("mountPath");
        let source = if volume["configMap"].is_object() {
            assert_eq!(volume["configMap"]["name"], config_map["metadata"]["name"]);
            let files = dir.join("configmap");
            std::fs::create_dir_all(&files).expect("configmap dir");
            for (name, text) in config_map["data"].as_object().expect("data") {
                std::fs::write(files.join(name), text.as_str().expect("text")).expect("write");
            }
            files
        } else {
            let host = volume["hostPath"]["path"]
                .as_str()
                .expect("a hostPath volume");
            if host == "/run/nodeward" {
                run_dir.to_owned()
            } else if Path::new(host).exists() {
                PathBuf::from(host)
            } else {
                assert!(
                    volume["hostPath"].get("type").is_none(),
                    "{host} is required by the DaemonSet but missing here"
                );
                eprintln!("image: {host} does not exist here; not mounted");
                continue;
            }
        };
        let mut options = Vec::new();
        if m["readOnly"] == true {
            options.push("ro");
        }
        if m["mountPropagation"] == "HostToContainer" {
            options.push("rslave");
        }
        let mut spec = format!("{}:{target}", source.display());
        if !options.is_empty() {
            spec = format!("{spec}:{}", options.join(","));
        }
        pair(&mut args, "--volume", spec);
    }
    args
}

/// This process's hard limit of `resource`, for `--ulimit`: podman's defaults are above what
/// this sandbox (no CAP_SYS_RESOURCE) may set, and podman caps its own nproc at 32768.
fn ulimit(resource: libc::__rlimit_resource_t, cap: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    assert_eq!(unsafe { libc::getrlimit(resource, &raw mut lim) }, 0);
    lim.rlim_max.min(cap)
}

/// `CapEff` of a process, from /proc.
fn effective_caps(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff");
    u64::from_str_radix(hex.trim(), 16).expect("hex CapEff")
}

/// The gRPC health check of the agent's TCP listener inside the pod's network namespace, asked
/// by a stock client: grpcurl, else Python grpcio (the request is empty; the reply's field 1 is
/// the status, SERVING = 1). `None` when neither client is here.
fn health_check(pod_ns: &Netns, port: u64) -> Option<String> {
    let addr = format!("127.0.0.1:{port}");
    if Path::new("/usr/local/bin/grpcurl").is_file() {
        let out = pod_ns
            .command("/usr/local/bin/grpcurl")
            .args(["-plaintext", &addr, "grpc.health.v1.Health/Check"])
            .output()
            .expect("run grpcurl");
        return Some(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    if !python_grpcio("image_grpc_health") {
        return None;
    }
    let script = r#"import grpc, sys
ch = grpc.insecure_channel(sys.argv[1])
reply = ch.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=10)
print({b"\x08\x01": '"status": "SERVING"'}.get(reply, "status bytes %r" % reply))"#;
    let out = pod_ns
        .command("python3")
        .args(["-c", script, &addr])
        .output()
        .expect("run python3");
    Some(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_image_runs_under_podman_as_the_daemonset_runs_it_and_answers_its_probes() {
    const TEST: &str = "image_run";
    if let Some(why) = missing_tools() {
        return skip(TEST, &why);
    }
    let Some((pod, config_map)) = daemonset() else {
        return skip(TEST, "python3 with PyYAML missing (tests/requirements.txt)");
    };
    let containers = Containers::new(TEST);
    containers.build();

    let run_dir = containers.dir.join("run-nodeward");
    std::fs::create_dir_all(&run_dir).expect("run dir");
    let mut args = podman_args(&pod, &config_map, &containers.dir, &run_dir);
    // The pod's own network namespace (the DaemonSet is not hostNetwork), joined by a veth to
    // another one from which /metrics is scraped, as Prometheus scrapes the pod address.
    assert_ne!(pod["hostNetwork"], true);
    let pod_ns = Netns::new("img-pod");
    let prom_ns = Netns::new("img-prom");
    let (_, pod_ip) = veth(&prom_ns, &pod_ns, 95);
    let name = format!("nodeward-image-test-{}", std::process::id());
    let c = &pod["containers"][0];
    let port = |n: &str| {
        c["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .find(|p| p["name"] == n)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no port {n}"))
    };
    args.extend([
        "--name".to_owned(),
        name.clone(),
        "--detach".to_owned(),
        "--network".to_owned(),
        format!("ns:/run/netns/{}", pod_ns.name),
        "--ulimit".to_owned(),
        format!("nofile={0}:{0}", ulimit(libc::RLIMIT_NOFILE, 1 << 20)),
        "--ulimit".to_owned(),
        format!("nproc={0}:{0}", ulimit(libc::RLIMIT_NPROC, 32_768)),
        containers.tag.clone(),
    ]);
    args.extend(strings(&c["args"]).into_iter().map(str::to_owned));
    let started = containers
        .command("podman")
        .arg("run")
        .args(&args)
        .output()
        .expect("run podman");
    assert!(
        started.status.success(),
        "podman run {args:?}: {}",
        text(&started)
    );
    let logs = || {
        text(
            &containers
                .command("podman")
                .args(["logs", &name])
                .output()
                .expect("logs"),
        )
    };

    let metrics_url = format!("http://{pod_ip}:{}/metrics", port("metrics"));
    let scrape = wait_for(Duration::from_secs(60), || {
        let out = prom_ns
            .command("curl")
            .args(["-sf", "--max-time", "5", &metrics_url])
            .output()
            .ok()?;
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        (body.contains("nodeward_source_up{source=\"ebpf/tcp\"}")
            && body.contains("nodeward_source_up{source=\"ebpf/udp\"}"))
        .then_some(body)
    })
    .unwrap_or_else(|| panic!("no /metrics at {metrics_url}; log:\n{}", logs()));
    for source in ["ebpf/tcp", "ebpf/udp"] {
        assert!(
            scrape.contains(&format!("nodeward_source_up{{source=\"{source}\"}} 1")),
            "{source} did not start in the container:\n{scrape}\nlog:\n{}",
            logs()
        );
    }
    let loaded: f64 = scrape
        .lines()
        .find_map(|l| l.strip_prefix("nodeward_ebpf_programs_loaded "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no nodeward_ebpf_programs_loaded:\n{scrape}"));
    assert!(loaded > 0.0, "no eBPF program loaded:\n{scrape}");

    match health_check(&pod_ns, port("grpc")) {
        Some(reply) => assert!(
            reply.contains("\"status\": \"SERVING\""),
            "gRPC health check: {reply}\nlog:\n{}",
            logs()
        ),
        None => skip(
            "image_grpc_health",
            "neither grpcurl nor python grpcio: the gRPC health check was not asked",
        ),
    }
    // The DaemonSet's probes, run the way the kubelet runs an exec probe.
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let cmd = strings(&c[probe]["exec"]["command"]);
        let out = containers
            .command("podman")
            .args(["exec", &name])
            .args(&cmd)
            .output()
            .expect("podman exec");
        assert!(out.status.success(), "{probe} {cmd:?}: {}", text(&out));
    }

    // What the kernel says about the agent's process: a read-only root, exactly the
    // capabilities the DaemonSet adds (those this machine can grant).
    let pid: u32 = containers
        .run("podman", &["inspect", "--format", "{{.State.Pid}}", &name])
        .trim()
        .parse()
        .expect("the container's pid");
    let mountinfo =
        std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("read mountinfo");
    let root_options = mountinfo
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.get(4) == Some(&"/"))
        .and_then(|f| f.get(5).map(|o| (*o).to_owned()))
        .expect("the root mount");
    assert!(
        root_options.split(',').any(|o| o == "ro"),
        "the root is mounted {root_options}"
    );
    let (granted, _) = grantable_caps(&strings(&c["securityContext"]["capabilities"]["add"]));
    let want = granted
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|cap| {
            let name = format!("CAP_{}", cap.trim_start_matches('+').to_uppercase());
            1u64 << cap_number(&name).expect("a known capability")
        })
        .fold(0, |a, b| a | b);
    assert_eq!(
        effective_caps(pid),
        want,
        "effective capabilities differ from the DaemonSet's ({granted})"
    );

    let stopped = containers
        .command("podman")
        .args(["stop", "--time", "30", &name])
        .output()
        .expect("podman stop");
    let log = logs();
    assert!(stopped.status.success(), "podman stop: {}", text(&stopped));
    let code = containers.run(
        "podman",
        &["inspect", "--format", "{{.State.ExitCode}}", &name],
    );
    assert_eq!(code.trim(), "0", "the agent did not stop cleanly:\n{log}");
    assert!(
        !log.contains("Read-only file system") && !log.contains("os error 30"),
        "something tried to write to the read-only root:\n{log}"
    );
}

/// What an image says about itself, from a Containerfile or from `buildah inspect`.
#[derive(Debug, PartialEq, Eq)]
struct ImageConfig {
    labels: BTreeMap<String, String>,
    ports: BTreeSet<String>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    user: String,
}

/// Splits `key="value" key2=value2` as Docker's LABEL does (double quotes, backslash escapes).
fn label_pairs(text: &str) -> BTreeMap<String, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let (mut quoted, mut escaped, mut any) = (false, false, false);
    for ch in text.chars() {
        if escaped {
            word.push(ch);
            escaped = false;
        } else if ch == '\\' {
            escaped = true;
        } else if ch == '"' {
            quoted = !quoted;
            any = true;
        } else if ch.is_whitespace() && !quoted {
            if any || !word.is_empty() {
                words.push(std::mem::take(&mut word));
                any = false;
            }
        } else {
            word.push(ch);
        }
    }
    if any || !word.is_empty() {
        words.push(word);
    }
    words
        .into_iter()
        .map(|w| {
            let (k, v) = w.split_once('=').unwrap_or_else(|| panic!("LABEL {w}"));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// The image configuration a Containerfile describes (its last stage; this one has one).
fn containerfile_config(text: &str) -> ImageConfig {
    let joined = text.replace("\\\n", " ");
    let mut config = ImageConfig {
        labels: BTreeMap::new(),
        ports: BTreeSet::new(),
        entrypoint: Vec::new(),
        cmd: Vec::new(),
        user: String::new(),
    };
    let json = |v: &str| -> Vec<String> {
        serde_json::from_str(v).unwrap_or_else(|e| panic!("exec form expected, {v}: {e}"))
    };
    for line in joined.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (instruction, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim();
        match instruction.to_uppercase().as_str() {
            "LABEL" => config.labels.extend(label_pairs(rest)),
            "EXPOSE" => config.ports.extend(rest.split_whitespace().map(|p| {
                if p.contains('/') {
                    p.to_owned()
                } else {
                    format!("{p}/tcp")
                }
            })),
            "ENTRYPOINT" => config.entrypoint = json(rest),
            "CMD" => config.cmd = json(rest),
            "USER" => rest.clone_into(&mut config.user),
            _ => {}
        }
    }
    config
}

/// The image's configuration as buildah records it (its own version label left out).
fn built_config(inspect: &Value) -> ImageConfig {
    let c = &inspect["OCIv1"]["config"];
    let list = |v: &Value| strings(v).into_iter().map(str::to_owned).collect();
    ImageConfig {
        labels: c["Labels"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| k.as_str() != "io.buildah.version")
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
            .collect(),
        ports: c["ExposedPorts"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k.clone())
            .collect(),
        entrypoint: list(&c["Entrypoint"]),
        cmd: list(&c["Cmd"]),
        user: c["User"].as_str().unwrap_or_default().to_owned(),
    }
}

/// The RPM's files and modes (`[package.metadata.generate-rpm]` assets in agent/Cargo.toml,
/// read by python's tomllib): what the Containerfile's `rpm -i` installs.
fn rpm_files() -> BTreeMap<String, u32> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, tomllib; m = tomllib.load(open(sys.argv[1], 'rb')); \
             json.dump({a['dest']: a['mode'] for a in m['package']['metadata']['generate-rpm']['assets']}, sys.stdout)",
        ])
        .arg(path("agent/Cargo.toml"))
        .output()
        .expect("run python3");
    assert!(out.status.success(), "{}", text(&out));
    let modes: BTreeMap<String, String> = serde_json::from_slice(&out.stdout).expect("JSON");
    modes
        .into_iter()
        .map(|(p, m)| (p, u32::from_str_radix(&m, 8).expect("octal mode")))
        .collect()
}

/// Every regular file under `root`, as an absolute path inside it, with its permission bits.
fn files_under(root: &Path) -> BTreeMap<String, u32> {
    let mut found = BTreeMap::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)
            .expect("read a directory of the image")
            .flatten()
        {
            let meta = std::fs::symlink_metadata(entry.path()).expect("stat");
            if meta.is_dir() {
                dirs.push(entry.path());
            } else {
                let rel = entry
                    .path()
                    .strip_prefix(root)
                    .expect("below root")
                    .to_owned();
                found.insert(
                    format!("/{}", rel.display()),
                    meta.permissions().mode() & 0o7777,
                );
            }
        }
    }
    found
}

/// The shared libraries and the loader `ldd` resolves for `binary`.
fn ldd(binary: &Path) -> BTreeSet<String> {
    let out = Command::new("ldd").arg(binary).output().expect("run ldd");
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            match l.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next(),
                None => l.split_whitespace().next(),
            }
        })
        .filter(|p| p.starts_with('/'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_containerfile_and_the_offline_build_describe_the_same_image() {
    const TEST: &str = "image_same";
    if let Some(why) = missing_tools() {
        return skip(TEST, &why);
    }
    let containerfile =
        std::fs::read_to_string(path("packaging/Containerfile")).expect("read the Containerfile");
    let expected = containerfile_config(&containerfile);
    assert_eq!(expected.entrypoint, ["/usr/bin/nodeward"]);
    assert!(!expected.labels.is_empty() && !expected.ports.is_empty());
    // The production image gets its files from the RPM, and nothing else of nodeward's.
    assert!(
        containerfile.contains("rpm -i") && containerfile.contains("COPY ${RPM}"),
        "the Containerfile no longer installs the RPM: this test's file list is the RPM's"
    );

    let containers = Containers::new(TEST);
    containers.build();
    let inspect: Value = serde_json::from_str(
        &containers.run("buildah", &["inspect", "--type", "image", &containers.tag]),
    )
    .expect("buildah inspect JSON");
    let built = built_config(&inspect);
    assert_eq!(
        built, expected,
        "the Containerfile and the offline build differ"
    );
    // The comparison can fail: one more label in the Containerfile is a difference.
    assert_ne!(
        built,
        containerfile_config(&format!("{containerfile}\nLABEL vendor=\"x\"\n")),
    );

    // The files: the RPM's (same paths and modes), the libraries the binary loads, and the
    // passwd/group naming root; nothing else.
    let ctr = containers.run("buildah", &["from", &containers.tag]);
    let mnt = containers.run("buildah", &["mount", ctr.trim()]);
    let files = files_under(Path::new(mnt.trim()));
    containers.run("buildah", &["umount", ctr.trim()]);
    let rpm = rpm_files();
    for (file, mode) in &rpm {
        assert_eq!(
            files.get(file),
            Some(mode),
            "{file} (mode {mode:o}) is not in the image as the RPM installs it"
        );
    }
    let libraries = ldd(&release_binary());
    assert!(
        libraries.iter().any(|l| l.contains("libc.so")),
        "{libraries:?}"
    );
    let allowed: BTreeSet<String> = rpm
        .keys()
        .cloned()
        .chain(libraries.iter().cloned())
        .chain(["/etc/passwd".to_owned(), "/etc/group".to_owned()])
        .collect();
    let present: BTreeSet<String> = files.keys().cloned().collect();
    assert_eq!(
        present, allowed,
        "the image holds other files than the RPM's, the binary's libraries and passwd/group"
    );
}
