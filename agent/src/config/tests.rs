use std::{io::Write as _, time::Duration};

use super::*;

fn no_env() -> Vec<(String, String)> {
    Vec::new()
}

fn file_with(text: &str) -> tempfile_lite::TempFile {
    let f = tempfile_lite::TempFile::new("nodeward-config-test");
    let mut h = std::fs::File::create(&f.path).expect("create temp config");
    h.write_all(text.as_bytes()).expect("write temp config");
    f
}

/// A minimal temp file helper so the crate needs no dev-dependency for it.
mod tempfile_lite {
    use std::path::PathBuf;
    pub struct TempFile {
        pub path: PathBuf,
    }
    impl TempFile {
        pub fn new(stem: &str) -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("{stem}-{}-{n}.toml", std::process::id()));
            Self { path }
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn load_file(text: &str) -> Result<Config, ConfigError> {
    let f = file_with(text);
    load(
        &Source {
            explicit_path: Some(&f.path),
            flags: &[],
        },
        no_env(),
    )
}

#[test]
fn empty_file_gives_defaults() {
    assert_eq!(
        load_file("").expect("empty file is valid"),
        Config::default()
    );
}

#[test]
fn missing_default_file_is_not_an_error_but_missing_explicit_file_is() {
    let missing = std::path::Path::new("/nonexistent/nodeward.toml");
    let err = load(
        &Source {
            explicit_path: Some(missing),
            flags: &[],
        },
        no_env(),
    )
    .expect_err("an explicit path must exist");
    assert!(matches!(err, ConfigError::Read { .. }), "{err}");
}

#[test]
fn file_values_override_defaults() {
    let c = load_file("[agent]\ntick = \"250ms\"\n[log]\nformat = \"json\"\n").expect("valid");
    assert_eq!(c.agent.tick, Duration::from_millis(250));
    assert_eq!(c.log.format, LogFormat::Json);
    assert_eq!(
        c.agent.shutdown_timeout,
        AgentConfig::default().shutdown_timeout
    );
}

#[test]
fn bad_enum_value_names_key_value_and_allowed() {
    let err = load_file("[log]\nformat = \"xml\"\n").expect_err("xml is not a log format");
    let msg = err.to_string();
    assert!(msg.contains("log.format"), "{msg}");
    assert!(msg.contains("\"xml\""), "{msg}");
    assert!(msg.contains("plain") && msg.contains("json"), "{msg}");
    assert!(msg.contains("file "), "{msg}");
}

#[test]
fn unknown_key_is_rejected_with_its_name() {
    let err = load_file("[agent]\ntik = \"1s\"\n").expect_err("typo must be caught");
    let msg = err.to_string();
    assert!(msg.contains("tik"), "{msg}");
    assert!(msg.contains("tick"), "should list the allowed keys: {msg}");
}

#[test]
fn out_of_range_duration_is_rejected() {
    let err = load_file("[agent]\ntick = \"1ms\"\n").expect_err("1ms tick is too fast");
    let msg = err.to_string();
    assert!(
        msg.contains("agent.tick") && msg.contains("1ms") && msg.contains("between"),
        "{msg}"
    );
}

#[test]
fn syntax_error_is_reported() {
    let err = load_file("[agent\n").expect_err("broken TOML");
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
}

#[test]
fn precedence_is_flag_over_env_over_file() {
    let f =
        file_with("[agent]\ntick = \"3s\"\nshutdown_timeout = \"3s\"\n[ebpf]\nenabled = true\n");
    let env = vec![
        ("NODEWARD_AGENT_TICK".to_owned(), "4s".to_owned()),
        ("NODEWARD_EBPF_ENABLED".to_owned(), "false".to_owned()),
        ("NODEWARD_LOG".to_owned(), "debug".to_owned()),
        ("UNRELATED".to_owned(), "x".to_owned()),
    ];
    let flags = vec!["agent.tick=5s".to_owned()];
    let c = load(
        &Source {
            explicit_path: Some(&f.path),
            flags: &flags,
        },
        env,
    )
    .expect("valid");
    assert_eq!(c.agent.tick, Duration::from_secs(5), "flag wins");
    assert_eq!(
        c.agent.shutdown_timeout,
        Duration::from_secs(3),
        "file beats default"
    );
    assert!(!c.ebpf.enabled, "env beats file");
    assert_eq!(c.log.filter, "debug", "NODEWARD_LOG sets the filter");
}

#[test]
fn bad_env_value_names_the_variable() {
    let env = vec![("NODEWARD_EBPF_ENABLED".to_owned(), "maybe".to_owned())];
    let err = load(
        &Source {
            explicit_path: Some(std::path::Path::new("/dev/null")),
            flags: &[],
        },
        env,
    )
    .expect_err("maybe is not a bool");
    let msg = err.to_string();
    assert!(
        msg.contains("ebpf.enabled") && msg.contains("NODEWARD_EBPF_ENABLED"),
        "{msg}"
    );
}

#[test]
fn bad_log_filter_is_rejected() {
    let err = load_file("[log]\nfilter = \"nodeward=loud\"\n").expect_err("not a level");
    assert!(err.to_string().contains("log.filter"), "{err}");
}

#[test]
fn malformed_set_flag_is_rejected() {
    let flags = vec!["agent.tick".to_owned()];
    let err = load(
        &Source {
            explicit_path: Some(std::path::Path::new("/dev/null")),
            flags: &flags,
        },
        no_env(),
    )
    .expect_err("no '='");
    assert!(matches!(err, ConfigError::BadFlag(_)), "{err}");
}

#[test]
fn env_names_follow_keys() {
    assert_eq!(
        env_name("agent.shutdown_timeout"),
        "NODEWARD_AGENT_SHUTDOWN_TIMEOUT"
    );
}

#[test]
fn shipped_sample_config_matches_the_defaults() {
    let sample = include_str!("../../../packaging/nodeward.toml");
    let parsed: Config = toml::from_str(sample).expect("sample config parses");
    assert_eq!(
        parsed,
        Config::default(),
        "packaging/nodeward.toml drifted from the code's defaults"
    );
}

fn invalid_key(e: &ConfigError) -> &str {
    match e {
        ConfigError::Invalid { key, .. } => key,
        other => panic!("not a key error: {other}"),
    }
}

#[test]
fn network_windows_load_as_typed_windows_shortest_first() {
    let c =
        load_file("[network]\nwindows = [\"30s\", \"2m\"]\n[health]\nnetwork_window = \"2m\"\n")
            .expect("valid windows");
    assert_eq!(
        c.network.windows,
        vec![Window::from_secs(30), Window::from_secs(120)]
    );
    assert_eq!(c.health.network_window, Window::from_secs(120));
    assert_eq!(
        Config::default().network.windows,
        DEFAULT_NETWORK_WINDOWS.to_vec()
    );
}

#[test]
fn bad_window_lists_are_rejected_by_key() {
    for (windows, why) in [
        ("[]", "none"),
        ("[\"1m\", \"10s\"]", "not ascending"),
        ("[\"10s\", \"10s\", \"1m\"]", "not distinct"),
        ("[\"500ms\", \"1m\"]", "below 1s"),
        ("[\"10s\", \"2h\"]", "above 1h"),
        (
            "[\"1s\", \"2s\", \"3s\", \"4s\", \"5s\", \"6s\", \"7s\", \"8s\", \"1m\"]",
            "more than 8",
        ),
        ("[\"soon\"]", "not a duration"),
    ] {
        let e = load_file(&format!("[network]\nwindows = {windows}\n")).expect_err(why);
        // A value that is no duration at all is named with its index: `network.windows[0]`.
        assert!(invalid_key(&e).starts_with("network.windows"), "{why}: {e}");
    }
}

#[test]
fn a_rule_window_that_is_not_configured_is_rejected_at_load_by_key() {
    // The old bug: `tcp.window_medium = "2m"` was accepted and the rules, reading the 60 s
    // window, never fired. Now the windows are one list and the rules' must be in it.
    let e = load_file("[network]\nwindows = [\"10s\", \"2m\", \"5m\"]\n")
        .expect_err("health.network_window = 1m is not configured");
    assert_eq!(invalid_key(&e), "health.network_window");
    assert!(e.to_string().contains("\"2m\""), "{e}");
    let e = load_file("[health]\nnetwork_window = \"30s\"\n").expect_err("30s not configured");
    assert_eq!(invalid_key(&e), "health.network_window");
    // The old keys are gone: naming one is an error, not a silent no-op.
    let e = load_file("[tcp]\nwindow_medium = \"2m\"\n").expect_err("old key");
    assert!(e.to_string().contains("window_medium"), "{e}");
}

#[test]
fn every_key_that_names_a_window_is_checked_against_the_configured_windows() {
    let keys = crate::health::HealthConfig::default().window_keys();
    assert!(!keys.is_empty());
    for (key, _) in keys {
        let flag = format!("{key}=7s");
        let e = load(
            &Source {
                explicit_path: None,
                flags: std::slice::from_ref(&flag),
            },
            no_env(),
        )
        .expect_err(&flag);
        assert_eq!(invalid_key(&e), key, "{e}");
    }
}
