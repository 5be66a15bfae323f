//! Label selectors as `kubectl -l` accepts them: comma-separated requirements, each
//! `key=value`, `key==value`, `key!=value`, `key in (a,b)`, `key notin (a,b)`, `key` (exists)
//! or `!key` (does not exist). All requirements must hold.

use std::collections::BTreeMap;

/// One requirement on a pod's labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Requirement {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Self::Equals(k, v) => labels.get(k) == Some(v),
            // As Kubernetes: a pod without the key matches `!=` and `notin`.
            Self::NotEquals(k, v) => labels.get(k) != Some(v),
            Self::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Self::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Self::Exists(k) => labels.contains_key(k),
            Self::DoesNotExist(k) => !labels.contains_key(k),
        }
    }
}

/// A parsed selector: every requirement must match. The empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector(pub Vec<Requirement>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("label selector: empty requirement at byte {0}")]
    Empty(usize),
    #[error("label selector: {0:?} is not a valid label key")]
    BadKey(String),
    #[error("label selector: {0:?} is not a valid label value")]
    BadValue(String),
    #[error("label selector: unclosed set after {0:?}")]
    UnclosedSet(String),
    #[error("label selector: cannot read {0:?}")]
    Syntax(String),
}

impl Selector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| r.matches(labels))
    }

    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(Self::default());
        }
        let mut out = Vec::new();
        for (at, part) in split_top_level(text) {
            out.push(parse_requirement(part.trim(), at)?);
        }
        Ok(Self(out))
    }
}

/// Splits at commas outside parentheses, with each part's byte offset.
fn split_top_level(text: &str) -> Vec<(usize, &str)> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0_i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push((start, &text[start..i]));
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push((start, &text[start..]));
    parts
}

fn parse_requirement(part: &str, at: usize) -> Result<Requirement, SelectorError> {
    if part.is_empty() {
        return Err(SelectorError::Empty(at));
    }
    if let Some(key) = part.strip_prefix('!') {
        return Ok(Requirement::DoesNotExist(key_of(key.trim())?));
    }
    for (op, ne) in [("!=", true), ("==", false), ("=", false)] {
        if let Some((k, v)) = part.split_once(op) {
            let (k, v) = (key_of(k.trim())?, value_of(v.trim())?);
            return Ok(if ne {
                Requirement::NotEquals(k, v)
            } else {
                Requirement::Equals(k, v)
            });
        }
    }
    let mut words = part.splitn(2, char::is_whitespace);
    let key = words.next().unwrap_or_default();
    let Some(rest) = words.next().map(str::trim) else {
        return Ok(Requirement::Exists(key_of(key)?));
    };
    let (notin, set) = if let Some(s) = rest.strip_prefix("notin") {
        (true, s)
    } else if let Some(s) = rest.strip_prefix("in") {
        (false, s)
    } else {
        return Err(SelectorError::Syntax(part.to_owned()));
    };
    let set = set
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| SelectorError::UnclosedSet(key.to_owned()))?;
    let values = set
        .split(',')
        .map(|v| value_of(v.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    let key = key_of(key)?;
    Ok(if notin {
        Requirement::NotIn(key, values)
    } else {
        Requirement::In(key, values)
    })
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63
/// characters (alphanumerics, `-`, `_`, `.`, starting and ending alphanumeric).
fn key_of(k: &str) -> Result<String, SelectorError> {
    let bad = || SelectorError::BadKey(k.to_owned());
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
        if !ok {
            return Err(bad());
        }
    }
    if name.is_empty() || !is_label_text(name) {
        return Err(bad());
    }
    Ok(k.to_owned())
}

/// A label value: empty, or a name as in [`key_of`].
fn value_of(v: &str) -> Result<String, SelectorError> {
    if v.is_empty() || is_label_text(v) {
        Ok(v.to_owned())
    } else {
        Err(SelectorError::BadValue(v.to_owned()))
    }
}

fn is_label_text(s: &str) -> bool {
    s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn every_kubectl_operator_selects_as_kubernetes_does() {
        let web = labels(&[("app", "web"), ("tier", "front")]);
        let db = labels(&[("app", "db")]);
        let none = labels(&[]);
        for (sel, want) in [
            ("app=web", [true, false, false]),
            ("app==web", [true, false, false]),
            ("app!=web", [false, true, true]),
            ("app in (web, db)", [true, true, false]),
            ("app notin (web)", [false, true, true]),
            ("tier", [true, false, false]),
            ("!tier", [false, true, true]),
            ("app=web,tier=front", [true, false, false]),
            ("app in (db),!tier", [false, true, false]),
            ("", [true, true, true]),
        ] {
            let s = Selector::parse(sel).expect(sel);
            let got = [s.matches(&web), s.matches(&db), s.matches(&none)];
            assert_eq!(got, want, "{sel:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_text_parses_or_is_refused_without_panicking(text in "[a-z=!,() \\-_./]{0,40}|\\PC{0,40}") {
            if let Ok(s) = Selector::parse(&text) {
                let _ = s.matches(&labels(&[("a", "b")]));
            }
        }
    }

    #[test]
    fn prefixed_keys_parse_and_bad_input_is_named() {
        let s = Selector::parse("app.kubernetes.io/name=nginx").expect("prefixed");
        assert!(s.matches(&labels(&[("app.kubernetes.io/name", "nginx")])));
        assert!(matches!(
            Selector::parse("app in (a"),
            Err(SelectorError::UnclosedSet(_))
        ));
        assert!(matches!(
            Selector::parse("a b c"),
            Err(SelectorError::Syntax(_))
        ));
        assert!(matches!(
            Selector::parse("a=x y"),
            Err(SelectorError::BadValue(_))
        ));
        assert!(matches!(
            Selector::parse("=x"),
            Err(SelectorError::BadKey(_))
        ));
        assert!(matches!(
            Selector::parse("a=b,,c"),
            Err(SelectorError::Empty(_))
        ));
    }
}
