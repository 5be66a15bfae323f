//! The `[api]` config section: where the gRPC API listens, TLS, watch heartbeats and who may
//! drain the node. Every default is documented here and in `packaging/nodeward.toml`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::{authz::DrainPolicy, identity::Identity};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Serve the gRPC API at all.
    pub enabled: bool,
    /// Unix socket path; empty disables the socket listener.
    pub unix_socket: PathBuf,
    /// Permissions of the socket file, octal.
    pub unix_socket_mode: String,
    /// Group of the socket file (a name from /etc/group or a numeric gid), so that members
    /// can query the agent; empty keeps the agent's own group.
    pub unix_socket_group: String,
    /// TCP listen address; empty (the default) disables the TCP listener, so that on a host
    /// the API is the Unix socket, guarded by its file mode. An address other than loopback
    /// needs TLS (`tls_cert` and `tls_key`).
    pub tcp_listen: String,
    /// PEM server certificate chain for the TCP listener; empty = plain text (loopback only).
    pub tls_cert: PathBuf,
    /// PEM private key of `tls_cert`.
    pub tls_key: PathBuf,
    /// PEM CA that signs client certificates; when set, clients must present a certificate
    /// signed by it (unless `tls_client_auth_optional`).
    pub tls_client_ca: PathBuf,
    /// With a client CA: accept clients without a certificate too (they are "anonymous").
    pub tls_client_auth_optional: bool,
    /// WatchNodeHealth sends the unchanged state after this long without a change.
    #[serde(with = "humantime_serde")]
    pub watch_heartbeat: Duration,
    /// How long a drain waits for live streams when the caller gives no deadline.
    #[serde(with = "humantime_serde")]
    pub drain_default_deadline: Duration,
    /// Identities allowed to call BeginDrain and CancelDrain besides root and the socket's
    /// group on the Unix socket; over TCP only these may (empty: none). Forms: "uid:<n>" (Unix
    /// socket peer), "cn:<common name>", "dns:<SAN DNS name>", "uri:<SAN URI>" (TLS client
    /// certificate), "anonymous" (TCP without a client certificate); any other entry is a
    /// config error (see `authz`). Empty is refused with a TCP listener off loopback that
    /// admits callers without a client certificate.
    pub drain_allowed_identities: Vec<String>,
    /// Node name in reports; empty = the kernel's hostname.
    pub node_name: String,
    /// Limits that keep one caller from starving the others.
    pub limits: ApiLimits,
}

/// `[api.limits]`: bounds on what callers can hold open (issue 19).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiLimits {
    /// HTTP/2 streams (calls) one connection may have open at once.
    pub max_concurrent_streams_per_connection: u32,
    /// WatchNodeHealth streams open at once across all connections; more are refused with
    /// RESOURCE_EXHAUSTED.
    pub max_watch_streams: usize,
    /// How long a call may take to produce its reply (for Watch: its first message head);
    /// a shorter `grpc-timeout` from the client wins.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// HTTP/2 PING sent on a connection idle this long; 0s disables keep-alive pings.
    #[serde(with = "humantime_serde")]
    pub http2_keepalive_interval: Duration,
    /// A PING not acknowledged within this closes the connection.
    #[serde(with = "humantime_serde")]
    pub http2_keepalive_timeout: Duration,
    /// A TLS client must finish its handshake within this, or it is dropped.
    #[serde(with = "humantime_serde")]
    pub tls_handshake_timeout: Duration,
    /// A connection this old gets a GOAWAY: it takes no new calls, its open ones finish, and
    /// the client reconnects (so long-lived clients rebalance and pick up new certificates).
    /// 0s disables it.
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Duration,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            max_concurrent_streams_per_connection: 200,
            max_watch_streams: 1024,
            request_timeout: Duration::from_secs(30),
            http2_keepalive_interval: Duration::from_secs(60),
            http2_keepalive_timeout: Duration::from_secs(20),
            tls_handshake_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(30 * 60),
        }
    }
}

impl ApiLimits {
    /// Each limit must be a number that lets the API work at all.
    pub fn validate(&self) -> Result<(), ApiConfigError> {
        let bad = |key: &'static str, value: String, allowed: &str| ApiConfigError {
            key,
            value,
            allowed: allowed.to_owned(),
        };
        if self.max_concurrent_streams_per_connection == 0 {
            return Err(bad(
                "limits.max_concurrent_streams_per_connection",
                "0".to_owned(),
                "must be at least 1",
            ));
        }
        if self.max_watch_streams == 0 {
            return Err(bad(
                "limits.max_watch_streams",
                "0".to_owned(),
                "must be at least 1",
            ));
        }
        for (key, value) in [
            ("limits.request_timeout", self.request_timeout),
            (
                "limits.http2_keepalive_timeout",
                self.http2_keepalive_timeout,
            ),
            ("limits.tls_handshake_timeout", self.tls_handshake_timeout),
        ] {
            if value.is_zero() {
                return Err(bad(key, format!("{value:?}"), "must be more than 0s"));
            }
        }
        Ok(())
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            unix_socket: PathBuf::from("/run/nodeward/nodeward.sock"),
            unix_socket_mode: "0660".to_owned(),
            unix_socket_group: String::new(),
            tcp_listen: String::new(),
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            tls_client_ca: PathBuf::new(),
            tls_client_auth_optional: false,
            watch_heartbeat: Duration::from_secs(10),
            drain_default_deadline: Duration::from_secs(3600),
            drain_allowed_identities: Vec::new(),
            node_name: String::new(),
            limits: ApiLimits::default(),
        }
    }
}

/// An `[api]` value that cannot work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("api.{key} = {value}: {allowed}")]
pub struct ApiConfigError {
    pub key: &'static str,
    pub value: String,
    pub allowed: String,
}

impl ApiConfig {
    /// The socket file mode.
    pub fn socket_mode(&self) -> Result<u32, ApiConfigError> {
        u32::from_str_radix(self.unix_socket_mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| ApiConfigError {
                key: "unix_socket_mode",
                value: format!("{:?}", self.unix_socket_mode),
                allowed: "must be an octal file mode such as \"0660\"".to_owned(),
            })
    }

    /// The socket's group id, if one is configured.
    pub fn socket_gid(&self) -> Result<Option<u32>, ApiConfigError> {
        if self.unix_socket_group.is_empty() {
            return Ok(None);
        }
        if let Ok(gid) = self.unix_socket_group.parse::<u32>() {
            return Ok(Some(gid));
        }
        let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
        gid_of(&groups, &self.unix_socket_group)
            .map(Some)
            .ok_or_else(|| ApiConfigError {
                key: "unix_socket_group",
                value: format!("{:?}", self.unix_socket_group),
                allowed: "must be a group in /etc/group or a numeric gid".to_owned(),
            })
    }

    /// The TCP address, if the TCP listener is enabled.
    pub fn tcp_addr(&self) -> Result<Option<SocketAddr>, ApiConfigError> {
        if self.tcp_listen.is_empty() {
            return Ok(None);
        }
        self.tcp_listen
            .parse()
            .map(Some)
            .map_err(|_| ApiConfigError {
                key: "tcp_listen",
                value: format!("{:?}", self.tcp_listen),
                allowed: "must be IP:PORT such as \"127.0.0.1:50051\", or empty to disable"
                    .to_owned(),
            })
    }

    /// Who may drain, from `drain_allowed_identities` and `unix_socket_group`.
    pub fn drain_policy(&self) -> Result<DrainPolicy, ApiConfigError> {
        let allowed = self
            .drain_allowed_identities
            .iter()
            .map(|entry| {
                entry.parse::<Identity>().map_err(|e| ApiConfigError {
                    key: "drain_allowed_identities",
                    value: format!("{entry:?}"),
                    allowed: e.to_string(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(DrainPolicy {
            allowed,
            socket_group: self.socket_gid()?,
        })
    }

    pub fn tls_enabled(&self) -> bool {
        !self.tls_cert.as_os_str().is_empty()
    }

    /// Checks that the values can work together.
    pub fn validate(&self) -> Result<(), ApiConfigError> {
        self.limits.validate()?;
        self.socket_mode()?;
        self.socket_gid()?;
        let addr = self.tcp_addr()?;
        if self.tls_cert.as_os_str().is_empty() != self.tls_key.as_os_str().is_empty() {
            return Err(ApiConfigError {
                key: "tls_key",
                value: format!("{:?}", self.tls_key.display().to_string()),
                allowed: "tls_cert and tls_key must be given together".to_owned(),
            });
        }
        if !self.tls_client_ca.as_os_str().is_empty() && !self.tls_enabled() {
            return Err(ApiConfigError {
                key: "tls_client_ca",
                value: format!("{:?}", self.tls_client_ca.display().to_string()),
                allowed: "needs tls_cert and tls_key".to_owned(),
            });
        }
        if let Some(addr) = addr {
            if !addr.ip().is_loopback() && !self.tls_enabled() {
                return Err(ApiConfigError {
                    key: "tcp_listen",
                    value: format!("{:?}", self.tcp_listen),
                    allowed: "an address other than loopback needs TLS (set api.tls_cert and api.tls_key)".to_owned(),
                });
            }
        }
        let secs = self.watch_heartbeat.as_secs_f64();
        if !(1.0..=3600.0).contains(&secs) {
            return Err(ApiConfigError {
                key: "watch_heartbeat",
                value: format!("{:?}", self.watch_heartbeat),
                allowed: "must be between 1s and 1h".to_owned(),
            });
        }
        let secs = self.drain_default_deadline.as_secs();
        if !(1..=crate::api::drain::MAX_DEADLINE_SECONDS).contains(&(secs as i64)) {
            return Err(ApiConfigError {
                key: "drain_default_deadline",
                value: format!("{:?}", self.drain_default_deadline),
                allowed: "must be between 1s and 7 days".to_owned(),
            });
        }
        self.drain_policy()?;
        if let Some(addr) = addr {
            // Off loopback, a caller without a client certificate is `anonymous`, and an empty
            // allow-list lets anyone on the network drain the node.
            let certless =
                self.tls_client_ca.as_os_str().is_empty() || self.tls_client_auth_optional;
            if !addr.ip().is_loopback() && certless && self.drain_allowed_identities.is_empty() {
                let why = if self.tls_client_auth_optional {
                    "api.tls_client_auth_optional = true"
                } else {
                    "no api.tls_client_ca"
                };
                return Err(ApiConfigError {
                    key: "tcp_listen",
                    value: format!("{:?}", self.tcp_listen),
                    allowed: format!(
                        "an address other than loopback with {why} and an empty \
                         api.drain_allowed_identities lets every caller drain the node as \
                         \"anonymous\": set api.tls_client_ca (client certificates required), \
                         list who may drain in api.drain_allowed_identities, or listen on loopback"
                    ),
                });
            }
        }
        Ok(())
    }
}

/// The gid of `name` in `/etc/group` text (`name:x:gid:members`).
fn gid_of(etc_group: &str, name: &str) -> Option<u32> {
    etc_group.lines().find_map(|line| {
        let mut f = line.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load, ConfigError, Source};

    fn with_flags(flags: &[&str]) -> Result<crate::config::Config, ConfigError> {
        let flags: Vec<String> = flags.iter().map(|s| (*s).to_owned()).collect();
        load(
            &Source {
                explicit_path: Some(std::path::Path::new("/dev/null")),
                flags: &flags,
            },
            Vec::new(),
        )
    }

    #[test]
    fn socket_group_is_read_from_etc_group_text() {
        let text = "root:x:0:\nnodeward:x:992:alice,bob\nvideo:x:44:\n";
        assert_eq!(gid_of(text, "nodeward"), Some(992));
        assert_eq!(gid_of(text, "node"), None);
        let numeric = ApiConfig {
            unix_socket_group: "1234".into(),
            ..ApiConfig::default()
        };
        assert_eq!(numeric.socket_gid(), Ok(Some(1234)));
        let missing = ApiConfig {
            unix_socket_group: "no-such-group-xyz".into(),
            ..ApiConfig::default()
        };
        assert_eq!(
            missing.socket_gid().expect_err("unknown group").key,
            "unix_socket_group"
        );
    }

    #[test]
    fn defaults_are_valid_and_listen_where_the_contract_says() {
        let c = ApiConfig::default();
        assert!(c.validate().is_ok());
        assert_eq!(c.socket_mode(), Ok(0o660));
        assert_eq!(c.tcp_addr(), Ok(None), "no TCP listener unless asked for");
        assert_eq!(c.unix_socket, PathBuf::from("/run/nodeward/nodeward.sock"));
    }

    #[test]
    fn plaintext_off_loopback_is_a_config_error_naming_the_key_and_origin() {
        let e = with_flags(&["api.tcp_listen=0.0.0.0:50051"]).expect_err("needs TLS");
        let msg = e.to_string();
        assert!(
            msg.contains("api.tcp_listen") && msg.contains("TLS") && msg.contains("--set"),
            "{msg}"
        );
    }

    #[test]
    fn bad_values_are_rejected() {
        for (flag, key) in [
            ("api.unix_socket_mode=rw", "api.unix_socket_mode"),
            ("api.unix_socket_mode=1777", "api.unix_socket_mode"),
            ("api.tls_cert=/x.pem", "api.tls_key"),
            ("api.watch_heartbeat=0s", "api.watch_heartbeat"),
            (
                "api.drain_default_deadline=30d",
                "api.drain_default_deadline",
            ),
            ("api.tcp_listen=localhost", "api.tcp_listen"),
            ("health.network_window=30s", "health.network_window"),
            (
                "api.limits.max_watch_streams=0",
                "api.limits.max_watch_streams",
            ),
            (
                "api.limits.tls_handshake_timeout=0s",
                "api.limits.tls_handshake_timeout",
            ),
        ] {
            let e = with_flags(&[flag]).expect_err(flag);
            assert!(e.to_string().contains(key), "{flag}: {e}");
        }
        for entry in ["root", "uid:abc", "uid:", "cn:", "uid:007"] {
            let flag = format!("api.drain_allowed_identities=[\"{entry}\"]");
            let e = with_flags(&[flag.as_str()]).expect_err(entry);
            let msg = e.to_string();
            assert!(
                msg.contains("api.drain_allowed_identities") && msg.contains(&format!("{entry:?}")),
                "{entry}: {msg}"
            );
        }
        let ok = with_flags(&[
            "api.drain_allowed_identities=[\"uid:0\", \"cn:rollout\"]",
            "api.tcp_listen=",
        ])
        .expect("valid");
        assert_eq!(
            ok.api.drain_allowed_identities,
            vec!["uid:0".to_owned(), "cn:rollout".to_owned()]
        );
        assert_eq!(ok.api.tcp_addr(), Ok(None), "empty disables TCP");
    }

    #[test]
    fn off_loopback_tls_that_admits_anonymous_callers_needs_an_allow_list() {
        let tls = [
            "api.tcp_listen=0.0.0.0:50051",
            "api.tls_cert=/etc/nodeward/tls.crt",
            "api.tls_key=/etc/nodeward/tls.key",
        ];
        let e = with_flags(&tls).expect_err("no client CA, empty allow-list");
        let msg = e.to_string();
        for key in [
            "api.tcp_listen",
            "api.tls_client_ca",
            "api.drain_allowed_identities",
        ] {
            assert!(msg.contains(key), "{key} missing: {msg}");
        }
        let optional = [
            &tls[..],
            &[
                "api.tls_client_ca=/etc/nodeward/ca.crt",
                "api.tls_client_auth_optional=true",
            ],
        ]
        .concat();
        let e = with_flags(&optional).expect_err("certificates optional, empty allow-list");
        assert!(
            e.to_string().contains("api.tls_client_auth_optional"),
            "{e}"
        );

        // Each way out is accepted: required client certificates, an allow-list, loopback.
        with_flags(&[&tls[..], &["api.tls_client_ca=/etc/nodeward/ca.crt"]].concat())
            .expect("client certificates required");
        with_flags(
            &[
                &optional[..],
                &["api.drain_allowed_identities=[\"cn:rollout\"]"],
            ]
            .concat(),
        )
        .expect("allow-list");
        with_flags(&[&tls[..], &["api.drain_allowed_identities=[\"anonymous\"]"]].concat())
            .expect("anonymous allowed by name is a choice, not an accident");
        with_flags(&[&tls[1..], &["api.tcp_listen=127.0.0.1:50051"]].concat()).expect("loopback");
        with_flags(
            &[
                &tls[1..],
                &["api.tcp_listen=[::]:50051", "api.tls_client_ca=/ca.pem"],
            ]
            .concat(),
        )
        .expect("IPv6 any with client certificates");
    }
}
