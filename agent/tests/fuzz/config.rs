//! The config loader: any file text, environment value or `--set` flag gives a config or a
//! `ConfigError`, never a panic; whatever loads survives a round trip through `config show`.

use std::{
    io::Write as _,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use nodeward::config::{self, ConfigError, Origin};
use proptest::prelude::*;

use crate::{cases, corpus};

/// A config file in the temp directory, removed on drop.
struct TempConfig(PathBuf);

impl TempConfig {
    fn new(text: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "nodeward-fuzz-config-{}-{n}.toml",
            std::process::id()
        ));
        let mut f = std::fs::File::create(&path).expect("create temp config");
        f.write_all(text.as_bytes()).expect("write temp config");
        Self(path)
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn load(
    text: &str,
    env: Vec<(String, String)>,
    flags: &[String],
) -> Result<config::Config, ConfigError> {
    let file = TempConfig::new(text);
    config::load(
        &config::Source {
            explicit_path: Some(&file.0),
            flags,
        },
        env,
    )
}

/// Every leaf key of the defaults, e.g. `agent.tick`, `udp.max_flows`.
fn leaf_keys() -> Vec<String> {
    fn walk(prefix: &str, t: &toml::Table, out: &mut Vec<String>) {
        for (k, v) in t {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(inner) if !inner.is_empty() => walk(&key, inner, out),
                _ => out.push(key),
            }
        }
    }
    let mut out = Vec::new();
    walk("", &config::defaults_table(), &mut out);
    out
}

/// Values of every TOML type, with the edge cases config keys meet: zero, negative, huge,
/// durations in and out of range, paths, filters.
fn value() -> impl Strategy<Value = toml::Value> {
    let scalar = prop_oneof![
        any::<i64>().prop_map(toml::Value::Integer),
        prop::sample::select(vec![0i64, -1, 1, 4, 65_535, 65_536, i64::MAX])
            .prop_map(toml::Value::Integer),
        any::<f64>().prop_map(toml::Value::Float),
        any::<bool>().prop_map(toml::Value::Boolean),
        prop::sample::select(vec![
            "0s",
            "1ms",
            "2s",
            "5m",
            "1h",
            "99999999999999999h",
            "-1s",
            "",
            "info",
            "nodeward=debug,aya=warn",
            "[[[",
            "/",
            "/run/nodeward/x.sock",
            "127.0.0.1:0",
            "[::1]:50051",
            "json",
            "plain",
            "max",
        ])
        .prop_map(|s| toml::Value::String(s.to_owned())),
        "\\PC{0,24}".prop_map(toml::Value::String),
    ];
    prop_oneof![
        4 => scalar.clone(),
        1 => prop::collection::vec(scalar, 0..4).prop_map(toml::Value::Array),
    ]
}

fn render(pairs: &[(String, toml::Value)]) -> String {
    let mut table = toml::Table::new();
    for (key, v) in pairs {
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().expect("keys are non-empty");
        let mut t = &mut table;
        for p in parts {
            t = t
                .entry(p.to_owned())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .expect("only leaf keys are generated, so a section is never a value");
        }
        t.insert(last.to_owned(), v.clone());
    }
    toml::to_string(&table).expect("a table of plain values renders")
}

/// A loaded config printed by `config show` loads back to the same config.
fn round_trips(c: &config::Config) -> Result<(), TestCaseError> {
    let shown = config::to_toml(c);
    let again = load(&shown, Vec::new(), &[]).map_err(|e| {
        TestCaseError::fail(format!("`config show` output does not load: {e}\n{shown}"))
    })?;
    prop_assert_eq!(config::to_toml(&again), shown);
    Ok(())
}

#[test]
fn config_corpus_loads_good_files_and_names_the_key_of_bad_ones() {
    // The sample config that ships in the RPM is read where it lives, so it cannot drift.
    let packaged =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/nodeward.toml");
    let packaged = std::fs::read_to_string(&packaged).expect("packaging/nodeward.toml");
    let all = corpus("config")
        .into_iter()
        .chain([("ok-packaged.toml".to_owned(), packaged)]);
    for (name, text) in all {
        let r = load(&text, Vec::new(), &[]);
        if name.starts_with("ok-") {
            let c = r.unwrap_or_else(|e| panic!("{name}: {e}"));
            round_trips(&c).unwrap_or_else(|e| panic!("{name}: {e}"));
        } else if name.starts_with("bad-") {
            // `bad-<key>.toml` must be rejected naming that key.
            let key = name.trim_start_matches("bad-").trim_end_matches(".toml");
            match r {
                Err(ConfigError::Invalid { key: k, .. }) => {
                    assert!(k.starts_with(key), "{name}: blamed {k}")
                }
                other => panic!("{name}: {other:?}"),
            }
        } else {
            assert!(
                matches!(r, Ok(_) | Err(ConfigError::Syntax { .. })),
                "{name}: {r:?}"
            );
        }
    }
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn any_config_file_text_loads_or_is_a_config_error(text in prop_oneof!["\\PC*", "[\\[\\]a-z._=\"' 0-9\n]*"]) {
        match load(&text, Vec::new(), &[]) {
            Ok(c) => round_trips(&c)?,
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn known_keys_with_any_value_load_or_blame_a_key_from_the_file(
        pairs in prop::collection::vec((prop::sample::select(leaf_keys()), value()), 1..6),
    ) {
        let text = render(&pairs);
        match load(&text, Vec::new(), &[]) {
            Ok(c) => round_trips(&c)?,
            Err(ConfigError::Invalid { key, .. }) => prop_assert!(!key.is_empty(), "{text}"),
            Err(e) => prop_assert!(false, "{e}\n{text}"),
        }
    }

    #[test]
    fn any_environment_value_loads_or_is_blamed_on_a_key(
        key in prop::sample::select(leaf_keys()),
        v in prop_oneof!["\\PC{0,32}", value().prop_map(|v| v.to_string())],
        log in prop::option::of("\\PC{0,16}"),
    ) {
        let mut env = vec![(config::env_name(&key), v.clone())];
        if let Some(l) = log {
            env.push((config::LOG_ENV.to_owned(), l));
        }
        match load("", env, &[]) {
            Ok(c) => round_trips(&c)?,
            Err(ConfigError::Invalid { origin, .. }) => {
                prop_assert!(!matches!(origin, Origin::File(_)), "blamed the empty file");
            }
            Err(e) => prop_assert!(false, "{key}={v:?}: {e}"),
        }
    }

    #[test]
    fn any_set_flag_loads_or_is_a_config_error(flags in prop::collection::vec("\\PC{0,24}", 0..4)) {
        match load("", Vec::new(), &flags) {
            Ok(c) => round_trips(&c)?,
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}
