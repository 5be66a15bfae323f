//! The container image, built offline by `packaging/image/build.sh` (what `cargo xtask image`
//! runs) from the release binary, and run by podman as the DaemonSet runs it: its capabilities
//! (all dropped, the DaemonSet's added), a read-only root, host PID, the pod's own network, the
//! host paths it mounts and the ConfigMap's config. The agent starts, its eBPF programs load,
//! /metrics answers from another network namespace (as Prometheus would), the gRPC health check
//! answers a stock client, and the DaemonSet's probe command succeeds. Podman's storage lives in
//! a directory of the test's own (`nodeward_tests::image`).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use nodeward_tests::{
    cap_number, grantable_caps,
    image::{missing_tools, path, text, Containers},
    kube::{find, strings, yaml},
    net::veth,
    python_grpcio, skip, wait_for, Netns,
};
use serde_json::Value;

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
    if containers.build(TEST).is_none() {
        return;
    }

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
