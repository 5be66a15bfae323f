//! The Prometheus text exposition format (version 0.0.4), written by hand.
//!
//! Collectors add samples in whatever order suits them (container by container, say); samples
//! are grouped by family here, so each family is written once, contiguously, with its HELP and
//! TYPE lines, as the format requires. Families come out sorted by name, which keeps a scrape
//! easy to read and to diff.
//!
//! Our own encoder rather than a crate: the format is small, we render a fresh snapshot on every
//! scrape (collector style) instead of keeping long-lived metric objects, and it keeps the
//! agent's dependency tree and its escaping rules in plain sight.

use std::{collections::BTreeMap, fmt::Write as _};

/// The content type Prometheus expects for this format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

#[derive(Debug)]
struct Family {
    kind: Kind,
    help: &'static str,
    samples: String,
}

/// One scrape's worth of samples.
#[derive(Debug, Default)]
pub struct Metrics {
    families: BTreeMap<&'static str, Family>,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a gauge sample. `labels` are (name, value) pairs; an empty value is the same as an
    /// absent label to Prometheus, so callers pass "" rather than varying the label set.
    pub fn gauge(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        self.sample(name, Kind::Gauge, help, labels, value);
    }

    /// Adds a counter sample; `name` ends in `_total` by convention.
    pub fn counter(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        debug_assert!(
            name.ends_with("_total"),
            "counter {name} must end in _total"
        );
        self.sample(name, Kind::Counter, help, labels, value);
    }

    /// Declares a family without samples, so that HELP and TYPE are there even when nothing is
    /// measured yet (no container has streams, say) and dashboards find the name.
    pub fn declare(&mut self, name: &'static str, kind: Kind, help: &'static str) {
        self.family(name, kind, help);
    }

    fn family(&mut self, name: &'static str, kind: Kind, help: &'static str) -> &mut Family {
        let family = self.families.entry(name).or_insert_with(|| Family {
            kind,
            help,
            samples: String::new(),
        });
        debug_assert_eq!(family.kind, kind, "{name} added as two kinds");
        family
    }

    /// Adds one histogram: `buckets` are (upper bound, samples at or below it) ascending, as
    /// Prometheus counts them (cumulative); the `+Inf` bucket is written from `count`.
    pub fn histogram(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        buckets: &[(f64, u64)],
        count: u64,
        sum: f64,
    ) {
        let family = self.family(name, Kind::Histogram, help);
        let out = &mut family.samples;
        let mut le = String::new();
        for (bound, cumulative) in buckets {
            le.clear();
            write_value(*bound, &mut le);
            write_series(out, name, "_bucket", labels, Some(&le));
            write_value(*cumulative as f64, out);
            out.push('\n');
        }
        write_series(out, name, "_bucket", labels, Some("+Inf"));
        write_value(count as f64, out);
        out.push('\n');
        write_series(out, name, "_sum", labels, None);
        write_value(sum, out);
        out.push('\n');
        write_series(out, name, "_count", labels, None);
        write_value(count as f64, out);
        out.push('\n');
    }

    fn sample(
        &mut self,
        name: &'static str,
        kind: Kind,
        help: &'static str,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        let family = self.family(name, kind, help);
        let out = &mut family.samples;
        write_series(out, name, "", labels, None);
        write_value(value, out);
        out.push('\n');
    }

    /// Whether a family of this name has been added (for tests and collectors' checks).
    pub fn has(&self, name: &str) -> bool {
        self.families.contains_key(name)
    }

    /// The names of every family, sorted.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.families.keys().copied()
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(
            self.families
                .values()
                .map(|f| f.samples.len() + f.help.len() + 64)
                .sum(),
        );
        for (name, family) in &self.families {
            out.push_str("# HELP ");
            out.push_str(name);
            out.push(' ');
            escape_help(family.help, &mut out);
            out.push_str("\n# TYPE ");
            out.push_str(name);
            out.push(' ');
            out.push_str(family.kind.as_str());
            out.push('\n');
            out.push_str(&family.samples);
        }
        out
    }
}

/// `name{labels}` and the space before the value; `le` is a histogram bucket's bound.
fn write_series(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &[(&str, &str)],
    le: Option<&str>,
) {
    out.push_str(name);
    out.push_str(suffix);
    let le = le.map(|v| ("le", v));
    let mut all = labels.iter().copied().chain(le).peekable();
    if all.peek().is_some() {
        out.push('{');
        for (i, (label, value)) in all.enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(label);
            out.push_str("=\"");
            escape_label_value(value, out);
            out.push('"');
        }
        out.push('}');
    }
    out.push(' ');
}

/// Label values escape backslash, double quote and line feed.
fn escape_label_value(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// HELP text escapes backslash and line feed only.
fn escape_help(help: &str, out: &mut String) {
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Go's `ParseFloat` reads what Rust's `Display` writes for finite values (it never uses an
/// exponent); the special values have their own spellings in the format.
fn write_value(value: f64, out: &mut String) {
    if value.is_nan() {
        out.push_str("NaN");
    } else if value == f64::INFINITY {
        out.push_str("+Inf");
    } else if value == f64::NEG_INFINITY {
        out.push_str("-Inf");
    } else {
        let _ = write!(out, "{value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_contiguous_with_help_and_type_even_when_samples_interleave() {
        let mut m = Metrics::new();
        m.gauge("nodeward_b", "B.", &[("cgroup", "/a")], 1.0);
        m.counter("nodeward_a_total", "A.", &[("cgroup", "/a")], 2.0);
        m.gauge("nodeward_b", "B.", &[("cgroup", "/b")], 3.0);
        m.counter("nodeward_a_total", "A.", &[("cgroup", "/b")], 4.0);
        assert_eq!(
            m.render(),
            "# HELP nodeward_a_total A.\n# TYPE nodeward_a_total counter\n\
             nodeward_a_total{cgroup=\"/a\"} 2\nnodeward_a_total{cgroup=\"/b\"} 4\n\
             # HELP nodeward_b B.\n# TYPE nodeward_b gauge\n\
             nodeward_b{cgroup=\"/a\"} 1\nnodeward_b{cgroup=\"/b\"} 3\n"
        );
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut m = Metrics::new();
        m.gauge(
            "nodeward_x",
            "Back\\slash and\nnewline.",
            &[("path", "a\"b\\c\nd")],
            1.0,
        );
        let text = m.render();
        assert!(
            text.contains("# HELP nodeward_x Back\\\\slash and\\nnewline.\n"),
            "{text}"
        );
        assert!(
            text.contains("nodeward_x{path=\"a\\\"b\\\\c\\nd\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn values_use_the_formats_spellings() {
        let mut m = Metrics::new();
        for (i, v) in [
            0.5,
            1e-7,
            1e20,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            42.0,
        ]
        .into_iter()
        .enumerate()
        {
            m.gauge("nodeward_v", "V.", &[("i", &i.to_string())], v);
        }
        let text = m.render();
        let values: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next())
            .collect();
        assert_eq!(
            values,
            [
                "0.5",
                "0.0000001",
                "100000000000000000000",
                "NaN",
                "+Inf",
                "-Inf",
                "42"
            ]
        );
    }

    #[test]
    fn a_histogram_has_cumulative_buckets_inf_sum_and_count() {
        let mut m = Metrics::new();
        m.histogram(
            "nodeward_h_seconds",
            "H.",
            &[("container_id", "a")],
            &[(0.001, 2), (0.002, 5)],
            7,
            0.0105,
        );
        assert_eq!(
            m.render(),
            "# HELP nodeward_h_seconds H.\n# TYPE nodeward_h_seconds histogram\n\
             nodeward_h_seconds_bucket{container_id=\"a\",le=\"0.001\"} 2\n\
             nodeward_h_seconds_bucket{container_id=\"a\",le=\"0.002\"} 5\n\
             nodeward_h_seconds_bucket{container_id=\"a\",le=\"+Inf\"} 7\n\
             nodeward_h_seconds_sum{container_id=\"a\"} 0.0105\n\
             nodeward_h_seconds_count{container_id=\"a\"} 7\n"
        );
    }

    #[test]
    fn a_declared_family_without_samples_still_has_help_and_type() {
        let mut m = Metrics::new();
        m.declare("nodeward_empty", Kind::Gauge, "Nothing yet.");
        assert_eq!(
            m.render(),
            "# HELP nodeward_empty Nothing yet.\n# TYPE nodeward_empty gauge\n"
        );
    }
}
