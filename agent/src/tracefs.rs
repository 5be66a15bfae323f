//! tracefs: where it is mounted and the layout of tracepoint records.
//!
//! Tracepoint records have no stable ABI, so the eBPF programs never hard-code field offsets:
//! user space reads them from `events/<system>/<event>/format` at start-up.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error("tracefs is not mounted at /sys/kernel/tracing or /sys/kernel/debug/tracing")]
    NotMounted,
    #[error("cannot mount tracefs at {path}: {source}")]
    Mount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tracepoint {system}:{event} does not exist on this kernel ({path}: {source})")]
    NoTracepoint {
        system: String,
        event: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tracepoint {tracepoint} has no field `{field}`")]
    MissingField { tracepoint: String, field: String },
}

/// Finds the tracefs mount: `configured` if it is non-empty, else the usual two places.
pub fn locate(configured: &Path) -> Result<PathBuf, TracefsError> {
    if !configured.as_os_str().is_empty() {
        return if configured.join("events").is_dir() {
            Ok(configured.to_path_buf())
        } else {
            Err(TracefsError::NotMounted)
        };
    }
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("events").is_dir())
        .ok_or(TracefsError::NotMounted)
}

/// Finds tracefs, mounting it at `/sys/kernel/tracing` when it is not mounted anywhere (hosts
/// and containers often have neither tracefs nor debugfs mounted). Needs CAP_SYS_ADMIN.
pub fn locate_or_mount(configured: &Path) -> Result<PathBuf, TracefsError> {
    if let Ok(p) = locate(configured) {
        return Ok(p);
    }
    let target = if configured.as_os_str().is_empty() {
        Path::new("/sys/kernel/tracing")
    } else {
        configured
    };
    mount_tracefs(target).map_err(|e| TracefsError::Mount {
        path: target.to_path_buf(),
        source: e,
    })?;
    tracing::info!(path = %target.display(), "mounted tracefs");
    locate(configured)
}

fn mount_tracefs(target: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_target = std::ffi::CString::new(target.as_os_str().as_bytes())?;
    // SAFETY: all pointers are valid NUL-terminated strings; data may be NULL.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            c_target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One field of a tracepoint record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// The C declaration without the name, e.g. `int`, `__u16`, `const void *`, `__u8[4]`.
    pub c_type: String,
    pub name: String,
    pub offset: u32,
    pub size: u32,
    pub signed: bool,
}

/// The parsed `format` file of one tracepoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Format {
    pub name: String,
    pub id: Option<u32>,
    pub fields: Vec<Field>,
}

impl Format {
    /// Reads `events/<system>/<event>/format` under `tracefs`.
    pub fn read(tracefs: &Path, system: &str, event: &str) -> Result<Self, TracefsError> {
        let path = tracefs
            .join("events")
            .join(system)
            .join(event)
            .join("format");
        let text = std::fs::read_to_string(&path).map_err(|source| TracefsError::NoTracepoint {
            system: system.to_owned(),
            event: event.to_owned(),
            path: path.clone(),
            source,
        })?;
        Ok(Self::parse(&text))
    }

    /// Parses the text of a `format` file. Lines that are not field descriptions are skipped.
    pub fn parse(text: &str) -> Self {
        let mut name = String::new();
        let mut id = None;
        let mut fields = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if let Some(n) = line.strip_prefix("name:") {
                name = n.trim().to_owned();
            } else if let Some(i) = line.strip_prefix("ID:") {
                id = i.trim().parse().ok();
            } else if line.starts_with("field:") {
                if let Some(f) = parse_field(line) {
                    fields.push(f);
                }
            }
        }
        Self { name, id, fields }
    }

    pub fn field(&self, name: &str) -> Result<&Field, TracefsError> {
        self.fields
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| TracefsError::MissingField {
                tracepoint: self.name.clone(),
                field: name.to_owned(),
            })
    }
}

/// `field:unsigned short common_type; offset:0; size:2; signed:0;` (tab-separated)
fn parse_field(line: &str) -> Option<Field> {
    let mut decl = None;
    let mut offset = None;
    let mut size = None;
    let mut signed = false;
    for part in line.split(';') {
        let part = part.trim();
        if let Some(d) = part.strip_prefix("field:") {
            decl = Some(d.trim());
        } else if let Some(o) = part.strip_prefix("offset:") {
            offset = o.trim().parse().ok();
        } else if let Some(s) = part.strip_prefix("size:") {
            size = s.trim().parse().ok();
        } else if let Some(s) = part.strip_prefix("signed:") {
            signed = s.trim() == "1";
        }
    }
    let decl = decl?;
    // The name is the last identifier, before any array suffix: `__u8 saddr[4]`.
    let (before_array, array) = match decl.find('[') {
        Some(i) => (&decl[..i], &decl[i..]),
        None => (decl, ""),
    };
    // The byte after the separator: the separator may be any (multi-byte) character.
    let split = before_array
        .char_indices()
        .rev()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || c == '_'))
        .map(|(i, c)| i + c.len_utf8())?;
    let name = before_array[split..].to_owned();
    let c_type = format!("{}{}", before_array[..split].trim(), array);
    Some(Field {
        c_type,
        name,
        offset: offset?,
        size: size?,
        signed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sock/inet_sock_set_state/format` as printed by a 6.x kernel.
    const INET_SOCK_SET_STATE: &str = "name: inet_sock_set_state
ID: 1490
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
	field:int common_pid;	offset:4;	size:4;	signed:1;

	field:const void * skaddr;	offset:8;	size:8;	signed:0;
	field:int oldstate;	offset:16;	size:4;	signed:1;
	field:int newstate;	offset:20;	size:4;	signed:1;
	field:__u16 sport;	offset:24;	size:2;	signed:0;
	field:__u16 dport;	offset:26;	size:2;	signed:0;
	field:__u16 family;	offset:28;	size:2;	signed:0;
	field:__u16 protocol;	offset:30;	size:2;	signed:0;
	field:__u8 saddr[4];	offset:32;	size:4;	signed:0;
	field:__u8 daddr[4];	offset:36;	size:4;	signed:0;
	field:__u8 saddr_v6[16];	offset:40;	size:16;	signed:0;
	field:__u8 daddr_v6[16];	offset:56;	size:16;	signed:0;

print fmt: \"family=%s protocol=%s\", __print_symbolic(REC->family, { 2, \"AF_INET\" })
";

    #[test]
    fn parses_inet_sock_set_state() {
        let f = Format::parse(INET_SOCK_SET_STATE);
        assert_eq!(f.name, "inet_sock_set_state");
        assert_eq!(f.id, Some(1490));
        assert_eq!(f.fields.len(), 15);
        let skaddr = f.field("skaddr").expect("skaddr");
        assert_eq!(
            (skaddr.c_type.as_str(), skaddr.offset, skaddr.size),
            ("const void *", 8, 8)
        );
        let old = f.field("oldstate").expect("oldstate");
        assert_eq!((old.offset, old.size, old.signed), (16, 4, true));
        let proto = f.field("protocol").expect("protocol");
        assert_eq!(
            (proto.c_type.as_str(), proto.offset, proto.size),
            ("__u16", 30, 2)
        );
        let saddr = f.field("saddr_v6").expect("saddr_v6");
        assert_eq!(
            (saddr.c_type.as_str(), saddr.offset, saddr.size),
            ("__u8[16]", 40, 16)
        );
    }

    #[test]
    fn missing_field_is_an_error_naming_it() {
        let f = Format::parse(INET_SOCK_SET_STATE);
        let e = f.field("srtt").expect_err("no srtt here");
        assert!(e.to_string().contains("srtt"));
    }

    #[test]
    fn garbage_lines_are_skipped() {
        let f = Format::parse("name: x\nfield:\nfield:int a;\toffset:zz;\tsize:4;\nrubbish\n");
        assert!(f.fields.is_empty());
        assert_eq!(Format::parse("").fields.len(), 0);
    }
}
