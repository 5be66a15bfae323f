//! `/etc/os-release`: which distribution the node runs, with Anolis OS recognised by name.

use serde::Serialize;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OsRelease {
    /// `ID`, e.g. `anolis`, `debian`.
    pub id: String,
    /// `ID_LIKE`, e.g. `rhel fedora centos`.
    pub id_like: String,
    pub name: String,
    pub version_id: String,
    pub pretty_name: String,
}

impl OsRelease {
    /// Parses `KEY=value` lines; values may be quoted with `"` or `'` and use `\` escapes.
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let value = unquote(value.trim());
            match key.trim() {
                "ID" => out.id = value,
                "ID_LIKE" => out.id_like = value,
                "NAME" => out.name = value,
                "VERSION_ID" => out.version_id = value,
                "PRETTY_NAME" => out.pretty_name = value,
                _ => {}
            }
        }
        out
    }

    /// Anolis OS (OpenAnolis), the distribution the agent is packaged for.
    pub fn is_anolis(&self) -> bool {
        self.id.eq_ignore_ascii_case("anolis")
    }

    /// A one-line description for logs and the API.
    pub fn describe(&self) -> String {
        if !self.pretty_name.is_empty() {
            self.pretty_name.clone()
        } else {
            format!("{} {}", self.name, self.version_id)
                .trim()
                .to_owned()
        }
    }
}

fn unquote(v: &str) -> String {
    let inner = v
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .or_else(|| v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')))
        .unwrap_or(v);
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/etc/os-release` of Anolis OS 23.
    const ANOLIS_23: &str = r#"NAME="Anolis OS"
VERSION="23"
ID="anolis"
VERSION_ID="23"
PLATFORM_ID="platform:an23"
PRETTY_NAME="Anolis OS 23"
ANSI_COLOR="0;31"
HOME_URL="https://openanolis.cn/"
BUG_REPORT_URL="https://bugzilla.openanolis.cn/"
"#;

    /// `/etc/os-release` of Anolis OS 8.8, which declares itself RHEL-like.
    const ANOLIS_8: &str = r#"NAME="Anolis OS"
VERSION="8.8"
ID="anolis"
ID_LIKE="rhel fedora centos"
VERSION_ID="8.8"
PLATFORM_ID="platform:an8"
PRETTY_NAME="Anolis OS 8.8"
ANSI_COLOR="0;31"
HOME_URL="https://openanolis.cn/"
"#;

    /// This build machine's Debian 12.
    const DEBIAN_12: &str = r#"PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
"#;

    #[test]
    fn anolis_23_is_recognised() {
        let os = OsRelease::parse(ANOLIS_23);
        assert!(os.is_anolis());
        assert_eq!(os.version_id, "23");
        assert_eq!(os.describe(), "Anolis OS 23");
    }

    #[test]
    fn anolis_8_is_anolis_though_it_is_rhel_like() {
        let os = OsRelease::parse(ANOLIS_8);
        assert!(os.is_anolis());
        assert_eq!(os.id_like, "rhel fedora centos");
        assert_eq!(os.version_id, "8.8");
    }

    #[test]
    fn debian_unquoted_values_and_is_not_anolis() {
        let os = OsRelease::parse(DEBIAN_12);
        assert!(!os.is_anolis());
        assert_eq!(os.id, "debian");
        assert_eq!(os.describe(), "Debian GNU/Linux 12 (bookworm)");
    }

    #[test]
    fn comments_escapes_and_garbage() {
        let os = OsRelease::parse("# comment\nID='anolis'\nNAME=\"A \\\"quoted\\\" name\"\njunk\n");
        assert!(os.is_anolis());
        assert_eq!(os.name, "A \"quoted\" name");
        assert_eq!(OsRelease::parse(""), OsRelease::default());
    }
}
