//! `packaging/Containerfile` (the production build on Anolis OS 23, which needs a registry)
//! and the offline build (`packaging/image/build.sh`, `cargo xtask image`) describe the same
//! image: the Containerfile is parsed here and compared with `buildah inspect` of the offline
//! build (labels, ports, entry point, command, user), and the offline image's files with the
//! RPM's that the Containerfile installs, plus exactly the libraries the binary loads.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::Command,
};

use nodeward_tests::{
    image::{missing_tools, path, release_binary, text, Containers},
    kube::strings,
    skip,
};
use serde_json::Value;

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

/// The RPM's files (not its directories) and their permission bits: what the Containerfile's
/// `rpm -i` installs.
fn rpm_files(rpm: &Path) -> BTreeMap<String, u32> {
    nodeward_tests::rpm::rpm_query(rpm, &["--qf", "[%{FILENAMES}\t%{FILEMODES:octal}\n]"])
        .lines()
        .filter_map(|l| {
            let (file, mode) = l.split_once('\t')?;
            let mode = u32::from_str_radix(mode.trim(), 8).expect("octal mode");
            (mode & 0o170_000 != 0o040_000).then(|| (file.to_owned(), mode & 0o7777))
        })
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
    let Some(rpm_path) = containers.build(TEST) else {
        return;
    };
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
    let rpm = rpm_files(&rpm_path);
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
