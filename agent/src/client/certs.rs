//! `nodeward certs ca|node|client`: the certificates of the gRPC API's mutual TLS, for
//! clusters and hosts without cert-manager. All files go to one directory (`--dir`):
//! `ca.crt`/`ca.key`, then `<name>.crt`/`<name>.key` for each node or client, signed by that
//! CA. Keys are written mode 0600, certificates 0644; nothing is overwritten without `--force`.
//!
//! A node certificate names the node (SAN DNS `<node>`, plus `--dns`/`--ip`): the fleet client
//! verifies an agent against the node name its list gives. A client certificate's subject CN
//! is its name, the `cn:<name>` that `api.drain_allowed_identities` lists (plus SAN URIs and
//! DNS names: `uri:`/`dns:`).

use std::{
    io::Write as _,
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, SystemTime},
};

use clap::{Args, Subcommand};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Directory of the files (the CA's and the new ones); made if missing.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Days the certificate is valid from now.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub days: Option<u32>,
    /// Replace files that exist.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Clone, Subcommand)]
pub enum CertsCommand {
    /// A new CA: `ca.crt` and `ca.key` [default validity: 3650 days].
    Ca {
        #[command(flatten)]
        common: Common,
        /// The CA's subject common name.
        #[arg(long, default_value = "nodeward CA")]
        name: String,
    },
    /// An agent's (server) certificate for node NAME, signed by the CA: `<NAME>.crt` and
    /// `<NAME>.key` [default validity: 365 days].
    Node {
        #[command(flatten)]
        common: Common,
        /// The node's name (a SAN DNS name and the subject CN).
        name: String,
        /// Another DNS name the agent is reached by (repeatable).
        #[arg(long, value_name = "NAME")]
        dns: Vec<String>,
        /// An IP address the agent is reached at (repeatable).
        #[arg(long, value_name = "ADDR")]
        ip: Vec<IpAddr>,
    },
    /// A client certificate with subject CN NAME (`cn:NAME` to the agent's drain
    /// authorisation), signed by the CA: `<NAME>.crt` and `<NAME>.key` [default validity:
    /// 365 days].
    Client {
        #[command(flatten)]
        common: Common,
        /// The client's name: its subject common name.
        name: String,
        /// A SAN URI, e.g. a SPIFFE ID (`uri:` in drain_allowed_identities; repeatable).
        #[arg(long, value_name = "URI")]
        uri: Vec<String>,
        /// A SAN DNS name (`dns:` in drain_allowed_identities; repeatable).
        #[arg(long, value_name = "NAME")]
        dns: Vec<String>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("{0} exists; pass --force to replace it")]
    Exists(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Rcgen { what: String, source: rcgen::Error },
    #[error("{0}")]
    Usage(String),
}

impl CertsError {
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            Self::Exists(_) | Self::Usage(_) => crate::EXIT_USAGE,
            Self::Io { .. } | Self::Rcgen { .. } => 1,
        })
    }
}

fn rc<T>(what: &str, r: Result<T, rcgen::Error>) -> Result<T, CertsError> {
    r.map_err(|source| CertsError::Rcgen {
        what: what.to_owned(),
        source,
    })
}

fn io<T>(path: &Path, r: std::io::Result<T>) -> Result<T, CertsError> {
    r.map_err(|source| CertsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A file name stem: what becomes `<stem>.crt` must not leave the directory.
fn check_name(name: &str) -> Result<(), CertsError> {
    let ok = !name.is_empty()
        && name != "ca"
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(CertsError::Usage(format!(
            "{name:?}: a name is letters, digits, '-', '.', '_' and '@', not \"ca\" and not \
             starting with '.'"
        )))
    }
}

/// Validity from an hour ago (clocks of the fleet differ a little) for `days`.
fn validity(params: &mut CertificateParams, days: u32) {
    let since_epoch = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let start = since_epoch.saturating_sub(Duration::from_secs(3600));
    params.not_before = epoch + start;
    params.not_after = epoch + since_epoch + Duration::from_secs(u64::from(days) * 86_400);
}

/// Writes `text` to `path` with `mode`: refuses an existing file without `force`, and with it
/// sets the mode anew (a key left 0644 by something else becomes 0600).
fn write(path: &Path, text: &str, mode: u32, force: bool) -> Result<(), CertsError> {
    let mut open = std::fs::OpenOptions::new();
    open.write(true).mode(mode);
    if force {
        open.create(true).truncate(true);
    } else {
        open.create_new(true);
    }
    let mut file = match open.open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(CertsError::Exists(path.to_path_buf()))
        }
        r => io(path, r)?,
    };
    io(
        path,
        file.set_permissions(std::fs::Permissions::from_mode(mode)),
    )?;
    io(path, file.write_all(text.as_bytes()))?;
    io(path, file.sync_all())
}

/// Writes a certificate and its key as `<stem>.crt` and `<stem>.key`, checking first that
/// neither exists (unless `force`), so a refusal leaves nothing half written.
fn write_pair(
    common: &Common,
    stem: &str,
    cert: &str,
    key: &str,
) -> Result<(PathBuf, PathBuf), CertsError> {
    io(&common.dir, std::fs::create_dir_all(&common.dir))?;
    let crt = common.dir.join(format!("{stem}.crt"));
    let key_path = common.dir.join(format!("{stem}.key"));
    if !common.force {
        for p in [&crt, &key_path] {
            if p.exists() {
                return Err(CertsError::Exists(p.clone()));
            }
        }
    }
    write(&key_path, key, 0o600, common.force)?;
    write(&crt, cert, 0o644, common.force)?;
    Ok((crt, key_path))
}

/// The CA of `dir`, to sign with.
fn load_ca(dir: &Path) -> Result<Issuer<'static, KeyPair>, CertsError> {
    let crt = dir.join("ca.crt");
    let key = dir.join("ca.key");
    let cert_pem = io(&crt, std::fs::read_to_string(&crt))?;
    let key_pem = io(&key, std::fs::read_to_string(&key))?;
    let key = rc(&format!("{}", key.display()), KeyPair::from_pem(&key_pem))?;
    rc(
        &format!("{}", crt.display()),
        Issuer::from_ca_cert_pem(&cert_pem, key),
    )
}

fn named(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn dns_san(name: &str) -> Result<SanType, CertsError> {
    Ok(SanType::DnsName(rc(
        &format!("DNS name {name:?}"),
        name.to_owned().try_into(),
    )?))
}

fn leaf(common: &Common, stem: &str, mut params: CertificateParams) -> Result<(), CertsError> {
    check_name(stem)?;
    let issuer = load_ca(&common.dir)?;
    validity(&mut params, common.days.unwrap_or(365));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let key = rc("a new key", KeyPair::generate())?;
    let cert = rc("signing", params.signed_by(&key, &issuer))?;
    let (crt, key_path) = write_pair(common, stem, &cert.pem(), &key.serialize_pem())?;
    println!("wrote {} and {} (0600)", crt.display(), key_path.display());
    Ok(())
}

pub fn run(cmd: &CertsCommand) -> Result<(), CertsError> {
    match cmd {
        CertsCommand::Ca { common, name } => {
            let mut params = CertificateParams::default();
            params.distinguished_name = named(name);
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            validity(&mut params, common.days.unwrap_or(3650));
            let key = rc("a new key", KeyPair::generate())?;
            let cert = rc("self-signing the CA", params.self_signed(&key))?;
            let (crt, key_path) = write_pair(common, "ca", &cert.pem(), &key.serialize_pem())?;
            println!("wrote {} and {} (0600)", crt.display(), key_path.display());
            Ok(())
        }
        CertsCommand::Node {
            common,
            name,
            dns,
            ip,
        } => {
            let mut params = CertificateParams::default();
            params.distinguished_name = named(name);
            params.subject_alt_names.push(dns_san(name)?);
            for d in dns {
                params.subject_alt_names.push(dns_san(d)?);
            }
            params
                .subject_alt_names
                .extend(ip.iter().map(|a| SanType::IpAddress(*a)));
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            leaf(common, name, params)
        }
        CertsCommand::Client {
            common,
            name,
            uri,
            dns,
        } => {
            let mut params = CertificateParams::default();
            params.distinguished_name = named(name);
            for u in uri {
                params.subject_alt_names.push(SanType::URI(rc(
                    &format!("URI {u:?}"),
                    u.clone().try_into(),
                )?));
            }
            for d in dns {
                params.subject_alt_names.push(dns_san(d)?);
            }
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            leaf(common, name, params)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::identity::{certificate_identities, Identity};

    fn common(dir: &Path) -> Common {
        Common {
            dir: dir.to_path_buf(),
            days: None,
            force: false,
        }
    }

    fn tempdir(stem: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nodeward-certs-{stem}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_client_certificate_names_the_identity_the_drain_authorisation_reads() {
        let dir = tempdir("client");
        run(&CertsCommand::Ca {
            common: common(&dir),
            name: "test CA".into(),
        })
        .expect("ok");
        run(&CertsCommand::Client {
            common: common(&dir),
            name: "rollout".into(),
            uri: vec!["spiffe://td/ns/ops/sa/rollout".into()],
            dns: vec![],
        })
        .expect("ok");
        let pem = std::fs::read(dir.join("rollout.crt")).expect("ok");
        let (_, der) = x509_parser::pem::parse_x509_pem(&pem).expect("ok");
        let ids = certificate_identities(&der.contents);
        assert!(ids.contains(&Identity::Cn("rollout".into())), "{ids:?}");
        assert!(
            ids.contains(&Identity::Uri("spiffe://td/ns/ops/sa/rollout".into())),
            "{ids:?}"
        );
        let mode = std::fs::metadata(dir.join("rollout.key"))
            .expect("ok")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn nothing_is_overwritten_without_force() {
        let dir = tempdir("force");
        let ca = |force| CertsCommand::Ca {
            common: Common {
                force,
                ..common(&dir)
            },
            name: "CA".into(),
        };
        run(&ca(false)).expect("ok");
        let before = std::fs::read(dir.join("ca.key")).expect("ok");
        assert!(matches!(run(&ca(false)), Err(CertsError::Exists(_))));
        assert_eq!(std::fs::read(dir.join("ca.key")).expect("ok"), before);
        std::fs::set_permissions(dir.join("ca.key"), std::fs::Permissions::from_mode(0o644))
            .expect("ok");
        run(&ca(true)).expect("ok");
        assert_ne!(std::fs::read(dir.join("ca.key")).expect("ok"), before);
        let mode = std::fs::metadata(dir.join("ca.key"))
            .expect("ok")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn names_that_would_leave_the_directory_are_refused() {
        for bad in ["../x", "a/b", "", "ca", ".hidden"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        check_name("node-1.example").expect("ok");
    }
}
