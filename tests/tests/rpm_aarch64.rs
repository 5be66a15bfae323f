//! The aarch64 RPM (GH200/GB200 nodes are arm64), cross-built on x86_64 by
//! `cargo xtask rpm --target aarch64` from the aarch64 debug build that `cargo xtask test`
//! makes first: its header, its dependencies against Anolis OS 23's glibc, its files against
//! the x86_64 package's, its eBPF programs against the x86_64 binary's, and the binary itself
//! run under qemu-user for what needs no kernel of that architecture.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use nodeward_tests::{
    agent_binary,
    rpm::{
        file_entries, have_tools, newest_glibc, rpm_query, temp_dir, text, xtask, ANOLIS_23_GLIBC,
        WORKSPACE,
    },
    skip,
};
use serde_json::Value;

/// An `llvm-objdump` (the LLVM that bpf-linker was built against is installed by setup).
fn llvm_objdump() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin/llvm-objdump"))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop()
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

const EM_BPF: u16 = 247;
const EM_AARCH64: u16 = 183;

/// The eBPF object the agent embeds (`include_bytes_aligned!`): the one little-endian ELF64
/// with machine EM_BPF inside the binary, cut at the end of its section header table.
fn embedded_bpf_object(binary: &[u8]) -> Vec<u8> {
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(off) = binary[at..].windows(4).position(|w| w == b"\x7fELF") {
        let start = at + off;
        let elf = &binary[start..];
        let is_bpf = elf.get(4) == Some(&2) // 64-bit
            && elf.get(5) == Some(&1) // little-endian
            && u16_at(elf, 0x12) == Some(EM_BPF);
        if is_bpf {
            let len = (|| {
                let shoff = usize::try_from(u64_at(elf, 0x28)?).ok()?;
                let entsize = usize::from(u16_at(elf, 0x3a)?);
                let num = usize::from(u16_at(elf, 0x3c)?);
                Some(shoff + entsize * num)
            })();
            if let Some(len) = len.filter(|l| *l <= elf.len()) {
                found.push(elf[..len].to_vec());
            }
        }
        at = start + 4;
    }
    assert_eq!(found.len(), 1, "one embedded eBPF object expected");
    found.remove(0)
}

/// `llvm-objdump -d -r`: every program's instructions and relocations, without the header line
/// that names the file.
fn disassembly(objdump: &Path, object: &[u8], dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, object).expect("write the object");
    let out = Command::new(objdump)
        .args(["-d", "-r"])
        .arg(&path)
        .output()
        .expect("run llvm-objdump");
    assert!(out.status.success(), "llvm-objdump: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.contains(name))
        .collect::<Vec<_>>()
        .join("\n")
}

fn qemu(root: &Path, args: &[&str]) -> std::process::Output {
    Command::new("qemu-aarch64")
        .args(["-L", "/usr/aarch64-linux-gnu"])
        .arg(root.join("usr/bin/nodeward"))
        .args(args)
        .output()
        .expect("run qemu-aarch64")
}

#[test]
fn the_aarch64_rpm_cross_builds_and_its_binary_runs_under_qemu() {
    const TEST: &str = "rpm_aarch64";
    if std::env::consts::ARCH != "x86_64" {
        return skip(TEST, "cross-builds from x86_64 only");
    }
    if !have_tools(
        TEST,
        &[
            ("rpmbuild", "rpm"),
            ("rpm2cpio", "rpm"),
            ("cpio", "cpio"),
            ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
            ("aarch64-linux-gnu-strip", "binutils-aarch64-linux-gnu"),
            ("qemu-aarch64", "qemu-user"),
        ],
    ) {
        return;
    }
    let Some(objdump) = llvm_objdump() else {
        return skip(TEST, "no llvm-objdump under /usr/lib/llvm-*/bin (llvm-N)");
    };
    let cross = Path::new(WORKSPACE).join("target/aarch64-unknown-linux-gnu/debug/nodeward");
    if !cross.exists() {
        return skip(
            TEST,
            "target/aarch64-unknown-linux-gnu/debug/nodeward not built (cargo xtask test builds it)",
        );
    }
    let dir = temp_dir(TEST);
    let out = |name: &str| dir.join(name).display().to_string();
    let Some(arm) = xtask(
        TEST,
        &[
            "rpm",
            "--reuse-debug",
            "--target",
            "aarch64",
            "--out",
            &out("arm"),
        ],
    ) else {
        return;
    };
    let Some(x86) = xtask(TEST, &["rpm", "--reuse-debug", "--out", &out("x86")]) else {
        return;
    };

    assert_eq!(rpm_query(&arm, &["--qf", "%{ARCH}"]), "aarch64");
    assert_eq!(
        file_entries(&arm),
        file_entries(&x86),
        "the aarch64 and x86_64 packages hold other files"
    );
    let requires = rpm_query(&arm, &["-R"]);
    assert!(requires.lines().any(|l| l == "systemd"), "{requires}");
    let newest = newest_glibc(&requires);
    assert!(
        newest <= ANOLIS_23_GLIBC,
        "needs GLIBC_{}.{}, newer than Anolis OS 23's:\n{requires}",
        newest.0,
        newest.1
    );
    // Only what glibc and gcc's runtime provide on any aarch64 distribution, 64-bit.
    for req in requires.lines().filter(|l| l.contains(".so")) {
        let lib = req.split('(').next().unwrap_or(req);
        assert!(
            [
                "libc.so.6",
                "libm.so.6",
                "libgcc_s.so.1",
                "ld-linux-aarch64.so.1"
            ]
            .contains(&lib)
                && req.ends_with("(64bit)"),
            "unexpected requirement {req}:\n{requires}"
        );
    }

    let root = dir.join("root");
    std::fs::create_dir_all(&root).expect("create root");
    let unpack = Command::new("sh")
        .arg("-c")
        .arg("rpm2cpio \"$1\" | cpio -idm --quiet")
        .arg("sh")
        .arg(&arm)
        .current_dir(&root)
        .output()
        .expect("unpack the aarch64 RPM");
    assert!(unpack.status.success(), "{}", text(&unpack));
    let binary = std::fs::read(root.join("usr/bin/nodeward")).expect("the packaged binary");
    assert_eq!(
        u16_at(&binary, 0x12),
        Some(EM_AARCH64),
        "not an aarch64 ELF"
    );

    // The same programs as x86_64's: instructions and relocations. (Not the same bytes: aya-build
    // compiles them with the user-space architecture as `bpf_target_arch`, so BTF and debug
    // info name aya-ebpf-bindings' aarch64 module where x86_64's name x86_64.)
    let native = std::fs::read(agent_binary()).expect("read the x86_64 agent");
    let (arm_obj, x86_obj) = (embedded_bpf_object(&binary), embedded_bpf_object(&native));
    let arm_code = disassembly(&objdump, &arm_obj, &dir, "aarch64.o");
    assert!(
        arm_code.contains("sockops") || arm_code.contains("Disassembly of section"),
        "llvm-objdump shows the programs:\n{arm_code}"
    );
    assert!(
        arm_code == disassembly(&objdump, &x86_obj, &dir, "x86_64.o"),
        "the aarch64 binary's eBPF programs differ from the x86_64 binary's"
    );
    eprintln!(
        "{TEST}: eBPF object {} bytes in the aarch64 binary, {} in the x86_64 one, {}",
        arm_obj.len(),
        x86_obj.len(),
        if arm_obj == x86_obj {
            "byte-identical"
        } else {
            "same instructions and relocations, other BTF/debug info"
        }
    );

    let version = qemu(&root, &["--version"]);
    assert!(version.status.success(), "{}", text(&version));
    let native_version = Command::new(agent_binary())
        .arg("--version")
        .output()
        .expect("run the x86_64 agent");
    assert_eq!(text(&version), text(&native_version));

    let config = root.join("etc/nodeward/nodeward.toml");
    let check = qemu(
        &root,
        &["--config", &config.display().to_string(), "config", "check"],
    );
    assert!(check.status.success(), "config check: {}", text(&check));

    // qemu-user does not pass bpf(2) through: the probe must say that it could not load any
    // program type, each with a reason, and still answer.
    let probe = qemu(&root, &["probe", "--json"]);
    assert!(probe.status.success(), "probe: {}", text(&probe));
    let report: Value = serde_json::from_slice(&probe.stdout).expect("probe --json is JSON");
    let types = report["program_types"]
        .as_object()
        .expect("program_types in the probe report");
    assert!(!types.is_empty(), "{report:#}");
    for (name, t) in types {
        assert_eq!(t["available"], false, "{name} under qemu-user: {t}");
        let detail = t["detail"].as_str().unwrap_or_default();
        assert!(!detail.is_empty(), "{name} says why not: {t}");
    }
    // Natively the same probe loads programs (when it may): the check above can see both.
    if nodeward_tests::is_root() {
        let native = Command::new(agent_binary())
            .args(["probe", "--json"])
            .output()
            .expect("run the x86_64 probe");
        let native: Value = serde_json::from_slice(&native.stdout).expect("native probe JSON");
        assert!(
            native["program_types"]
                .as_object()
                .is_some_and(|m| m.values().any(|t| t["available"] == true)),
            "natively some program type loads: {native:#}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
