//! The drain state on disk, so that a drain outlives the agent: a SIGKILL, an OOM kill or an
//! upgrade of nodeward restores the same drain, deadline, requesters and start time.
//!
//! The file is JSON with a `version` (this is version 1), replaced atomically on every change:
//! written to a temporary file in the same directory, flushed (`fsync`), renamed over the old
//! one, and the directory flushed, so that a crash at any point leaves either the old state or
//! the new one, never a torn file. No drain is stored as `"drain": null`; a missing file means
//! no drain either (a fresh node, or `/run` emptied by a reboot).
//!
//! A file that cannot be read or parsed, or has another version, is *not* taken as "no drain":
//! [`load`] moves it aside (`<name>.unreadable-<unix seconds>`) and says why, and the
//! controller then holds the node as draining with no known deadline until a caller cancels
//! or begins a drain (see [`super::DrainController::open`]).

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::{Drain, Requester};
use crate::store::clock::unix_ms;

/// The format written, and the only one read.
pub const VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("parsing {0}: {1}")]
    Parse(PathBuf, serde_json::Error),
    #[error("{0} has format version {1}; this agent reads version {VERSION}")]
    Version(PathBuf, u32),
    #[error("{0}: {1}")]
    Invalid(PathBuf, &'static str),
    #[error("writing {0}: {1}")]
    Write(PathBuf, std::io::Error),
    #[error("moving the unreadable {0} aside: {1}")]
    MoveAside(PathBuf, std::io::Error),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    drain: Option<StoredDrain>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredDrain {
    started_unix_ms: i64,
    deadline_unix_ms: i64,
    requesters: Vec<StoredRequester>,
    requesters_not_kept: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredRequester {
    requested_by: String,
    identity: String,
    reason: String,
    requested_unix_ms: i64,
}

fn time(ms: i64) -> Option<SystemTime> {
    let ms = u64::try_from(ms).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

/// What a state file held.
#[derive(Debug, PartialEq)]
pub enum Loaded {
    /// No file, or a file that says no drain.
    Idle,
    Draining(Drain),
    /// The file could not be used; it was moved to `moved_to` (if the move worked).
    Unreadable {
        reason: String,
        moved_to: Option<PathBuf>,
    },
}

/// Reads the state at `path`; an unusable file is moved aside (see the module's doc).
pub fn load(path: &Path, now: SystemTime) -> Loaded {
    match read(path) {
        Ok(Some(d)) => Loaded::Draining(d),
        Ok(None) => Loaded::Idle,
        Err(e) => {
            let secs = now
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let mut aside = path.as_os_str().to_owned();
            aside.push(format!(".unreadable-{secs}"));
            let aside = PathBuf::from(aside);
            match fs::rename(path, &aside) {
                Ok(()) => Loaded::Unreadable {
                    reason: e.to_string(),
                    moved_to: Some(aside),
                },
                Err(m) => Loaded::Unreadable {
                    reason: format!("{e}; {}", StateError::MoveAside(path.to_owned(), m)),
                    moved_to: None,
                },
            }
        }
    }
}

/// Parses the file: `None` when there is none or it holds no drain.
fn read(path: &Path) -> Result<Option<Drain>, StateError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StateError::Read(path.to_owned(), e)),
    };
    parse(path, &bytes)
}

/// Parses a state file's bytes (`path` only names it in errors).
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Option<Drain>, StateError> {
    // The version first, so that a newer format is named as such rather than as a parse error.
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let v: Versioned =
        serde_json::from_slice(bytes).map_err(|e| StateError::Parse(path.to_owned(), e))?;
    if v.version != VERSION {
        return Err(StateError::Version(path.to_owned(), v.version));
    }
    let f: File =
        serde_json::from_slice(bytes).map_err(|e| StateError::Parse(path.to_owned(), e))?;
    let Some(d) = f.drain else {
        return Ok(None);
    };
    let bad = |why| StateError::Invalid(path.to_owned(), why);
    let started = time(d.started_unix_ms).ok_or_else(|| bad("start time out of range"))?;
    let deadline = time(d.deadline_unix_ms).ok_or_else(|| bad("deadline out of range"))?;
    if deadline < started {
        return Err(bad("deadline before the start"));
    }
    let requesters = d
        .requesters
        .into_iter()
        .map(|r| {
            Ok(Requester {
                at: time(r.requested_unix_ms).ok_or_else(|| bad("request time out of range"))?,
                requested_by: r.requested_by,
                identity: r.identity,
                reason: r.reason,
            })
        })
        .collect::<Result<Vec<_>, StateError>>()?;
    Ok(Some(Drain {
        requesters,
        requesters_not_kept: d.requesters_not_kept,
        started,
        deadline: Some(deadline),
        problem: None,
    }))
}

/// The file's bytes for `drain` (`None`: no drain).
pub fn render(drain: Option<&Drain>) -> Vec<u8> {
    let file = File {
        version: VERSION,
        drain: drain.map(|d| StoredDrain {
            started_unix_ms: unix_ms(d.started),
            deadline_unix_ms: d.deadline.map_or(0, unix_ms),
            requesters: d
                .requesters
                .iter()
                .map(|r| StoredRequester {
                    requested_by: r.requested_by.clone(),
                    identity: r.identity.clone(),
                    reason: r.reason.clone(),
                    requested_unix_ms: unix_ms(r.at),
                })
                .collect(),
            requesters_not_kept: d.requesters_not_kept,
        }),
    };
    let mut out = serde_json::to_vec_pretty(&file).unwrap_or_default();
    out.push(b'\n');
    out
}

/// Replaces the file at `path` with `bytes` atomically: temporary file in the same directory,
/// `fsync`, rename, `fsync` of the directory.
pub fn save(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let err = |e| StateError::Write(path.to_owned(), e);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir).map_err(err)?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let written = (|| {
        let mut f = {
            use std::os::unix::fs::OpenOptionsExt as _;
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?
        };
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain() -> Drain {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_765_000_000_123);
        Drain {
            requesters: vec![Requester {
                requested_by: "rollout/a".into(),
                identity: "uid:0".into(),
                reason: "v2 \"quoted\"\nline".into(),
                at: t,
            }],
            requesters_not_kept: 7,
            started: t,
            deadline: Some(t + Duration::from_secs(600)),
            problem: None,
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nodeward-drain-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_saved_drain_loads_back_the_same_and_no_drain_loads_as_idle() {
        let d = dir("roundtrip");
        let path = d.join("sub").join("drain.json");
        assert_eq!(load(&path, SystemTime::now()), Loaded::Idle, "no file");
        save(&path, &render(Some(&drain()))).expect("save");
        assert_eq!(load(&path, SystemTime::now()), Loaded::Draining(drain()));
        save(&path, &render(None)).expect("save");
        assert_eq!(load(&path, SystemTime::now()), Loaded::Idle);
        let left: Vec<_> = fs::read_dir(path.parent().expect("dir"))
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, ["drain.json"], "no temporary file is left behind");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn an_unreadable_file_is_moved_aside_with_the_reason() {
        let d = dir("corrupt");
        fs::create_dir_all(&d).expect("mkdir");
        let path = d.join("drain.json");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_765_000_000);
        for (bytes, expect) in [
            (&b"{\"version\":1,\"drain\":{\"started_unix_ms\":"[..], "parsing"),
            (&b"{\"version\":2,\"drain\":null}"[..], "format version 2"),
            (
                &b"{\"version\":1,\"drain\":{\"started_unix_ms\":10,\"deadline_unix_ms\":5,\"requesters\":[],\"requesters_not_kept\":0}}"[..],
                "deadline before the start",
            ),
        ] {
            fs::write(&path, bytes).expect("write");
            match load(&path, now) {
                Loaded::Unreadable { reason, moved_to } => {
                    assert!(reason.contains(expect), "{reason}");
                    let moved = moved_to.expect("moved");
                    assert_eq!(
                        moved,
                        d.join("drain.json.unreadable-1765000000"),
                        "renamed with a suffix"
                    );
                    assert_eq!(fs::read(&moved).expect("kept"), bytes);
                }
                other => panic!("{other:?}"),
            }
            assert!(!path.exists(), "the bad file no longer sits where the state goes");
        }
        let _ = fs::remove_dir_all(&d);
    }
}
