//! `loopmesh ca`: a small certificate authority for fleets that have none.
//!
//! mTLS between nodes (issue 17) needs every node to hold a certificate
//! naming it `spiffe://<trust domain>/node/<node>` and chained to one trust
//! bundle. Operators with step-ca, Vault or openssl make those themselves
//! (README recipe); for everyone else, `init` makes a CA directory
//! (`ca.pem`, `ca.key`, `trust-domain`) and `issue` signs a node's
//! certificate with it. Before writing, `issue` checks what it made with
//! rustls' own verifiers, as a client and as a server, so a CA directory
//! whose files do not belong together is reported here rather than as a
//! failed handshake between two nodes later.
//!
//! No name constraint on the CA: webpki (rustls) does not implement URI
//! name constraints and refuses every certificate under a CA that has one.
//! The CA names its trust domain in its subject and in a URI SAN instead.

use crate::names::NameError;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use time::OffsetDateTime;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// The CA's certificate in its directory: also every node's trust bundle.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key in its directory (mode 0600).
pub const CA_KEY: &str = "ca.key";
/// The one-line file naming the CA's trust domain.
pub const TRUST_DOMAIN: &str = "trust-domain";
/// The trust bundle `issue` writes next to a node's certificate.
pub const BUNDLE: &str = "bundle.pem";
/// Where `loopmesh ca` keeps the CA unless told otherwise.
pub const DEFAULT_CA_DIR: &str = "/etc/loopmesh/ca";
/// A CA's validity unless told otherwise: ten years.
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// A node certificate's validity unless told otherwise: 90 days.
pub const DEFAULT_NODE_DAYS: u32 = 90;
/// The longest validity either may have: a hundred years.
pub const MAX_DAYS: u32 = 36_500;

/// How far back a certificate's validity starts, so that a peer whose
/// clock is a little behind accepts a certificate issued just now.
const BACKDATE: time::Duration = time::Duration::minutes(5);

/// Why a CA or a node certificate was not made.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("{days} days is not a validity period; give 1 to {MAX_DAYS}")]
    Days { days: u32 },
    #[error("refusing to overwrite {}: give --force to replace it", path.display())]
    Exists { path: PathBuf },
    #[error("refusing to write {}: it is one of the CA's own files (give another --out)", path.display())]
    CaFile { path: PathBuf },
    #[error("{} does not exist: give --ca the directory `loopmesh ca init` made", path.display())]
    Missing { path: PathBuf },
    #[error("cannot create directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot make the certificate: {0}")]
    Generate(#[source] rcgen::Error),
    #[error(
        "a certificate signed with {} does not verify against {} ({reason}); were the CA's files made together by `loopmesh ca init`?",
        key.display(),
        cert.display()
    )]
    Mismatch {
        key: PathBuf,
        cert: PathBuf,
        reason: String,
    },
}

/// A file `init` or `issue` wrote (or found already right).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub path: PathBuf,
    /// What it holds, for the line printed about it.
    pub what: String,
    /// The file already held exactly this (a shared trust bundle).
    pub unchanged: bool,
}

/// The SPIFFE ID of a node: `spiffe://<trust domain>/node/<node>`.
pub fn node_identity(trust_domain: &str, node: &str) -> String {
    format!("spiffe://{trust_domain}/node/{node}")
}

/// Makes a CA in `out_dir` (created with mode 0700 if absent): `ca.pem`,
/// a self-signed ECDSA P-256 CA certificate valid for `days`; `ca.key`
/// (mode 0600); and `trust-domain`. Existing files are refused unless
/// `force`; nothing is written then.
pub fn init(trust_domain: &str, out_dir: &Path, days: u32, force: bool) -> Result<Vec<Output>, CaError> {
    crate::names::check_trust_domain(trust_domain)?;
    let (not_before, not_after) = validity(days)?;
    let [cert_path, key_path, domain_path] = [CA_CERT, CA_KEY, TRUST_DOMAIN].map(|name| out_dir.join(name));
    if !force {
        refuse_existing(&[&cert_path, &key_path, &domain_path])?;
    }
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
    let mut params = ca_params(trust_domain);
    params.not_before = not_before;
    params.not_after = not_after;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.subject_alt_names = vec![uri(format!("spiffe://{trust_domain}"))?];
    let cert = params.self_signed(&key).map_err(CaError::Generate)?;

    if !out_dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(out_dir)
            .map_err(|source| CaError::CreateDir {
                path: out_dir.to_path_buf(),
                source,
            })?;
    }
    // The trust domain last: a CA directory that has it is complete.
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
    write_file(&domain_path, format!("{trust_domain}\n").as_bytes(), 0o644)?;
    Ok(vec![
        written(
            key_path,
            "the CA's private key, mode 0600: keep it off the nodes".into(),
        ),
        written(
            cert_path,
            format!(
                "the CA certificate, spiffe://{trust_domain}, until {}",
                not_after.date()
            ),
        ),
        written(domain_path, format!("trust domain {trust_domain}")),
    ])
}

/// Issues `node` a certificate from the CA in `ca_dir`: a fresh ECDSA
/// P-256 key, URI SAN `spiffe://<trust domain>/node/<node>` and DNS SAN
/// `<node>`, for serverAuth and clientAuth, valid for `days`. Writes
/// `<node>.pem` (the certificate, then the CA's: the chain), `<node>.key`
/// (mode 0600) and `bundle.pem` (the CA certificate) into `out_dir`. An
/// existing certificate or key is refused unless `force`; an existing
/// bundle is kept if it is this CA's, refused unless `force` if not.
pub fn issue(
    ca_dir: &Path,
    node: &str,
    out_dir: &Path,
    days: u32,
    force: bool,
) -> Result<Vec<Output>, CaError> {
    crate::names::check_node_name(node)?;
    let (not_before, not_after) = validity(days)?;
    let ca = Ca::load(ca_dir)?;
    let cert_path = out_dir.join(format!("{node}.pem"));
    let key_path = out_dir.join(format!("{node}.key"));
    let bundle_path = out_dir.join(BUNDLE);
    for path in [&cert_path, &key_path, &bundle_path] {
        ca.refuse_own_file(path)?;
    }
    let bundle = ca.cert_pem.as_bytes();
    let bundle_unchanged = std::fs::read(&bundle_path).is_ok_and(|existing| existing == bundle);
    if !force {
        refuse_existing(&[&cert_path, &key_path])?;
        if !bundle_unchanged {
            refuse_existing(&[&bundle_path])?;
        }
    }

    let identity = node_identity(&ca.trust_domain, node);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, node);
    params.subject_alt_names = vec![uri(identity.clone())?, dns(node)?];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    let issuer = Issuer::new(ca_params(&ca.trust_domain), &ca.key);
    let cert = params.signed_by(&key, &issuer).map_err(CaError::Generate)?;
    ca.check_issued(cert.der(), node)?;

    if !out_dir.is_dir() {
        std::fs::create_dir_all(out_dir).map_err(|source| CaError::CreateDir {
            path: out_dir.to_path_buf(),
            source,
        })?;
    }
    let chain = format!("{}{}", cert.pem(), ca.cert_pem);
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert_path, chain.as_bytes(), 0o644)?;
    let bundle_what = format!("trust bundle: the CA of {}", ca.trust_domain);
    let bundle_output = if bundle_unchanged {
        Output {
            path: bundle_path,
            what: bundle_what,
            unchanged: true,
        }
    } else {
        write_file(&bundle_path, bundle, 0o644)?;
        written(bundle_path, bundle_what)
    };
    Ok(vec![
        written(key_path, format!("{node}'s private key, mode 0600")),
        written(
            cert_path,
            format!(
                "{node}'s certificate and the CA's, {identity}, until {}",
                not_after.date()
            ),
        ),
        bundle_output,
    ])
}

/// A CA directory, loaded.
struct Ca {
    dir: PathBuf,
    trust_domain: String,
    key: KeyPair,
    cert_pem: String,
    cert: CertificateDer<'static>,
}

impl Ca {
    fn load(dir: &Path) -> Result<Ca, CaError> {
        let domain_path = dir.join(TRUST_DOMAIN);
        let trust_domain = read(&domain_path)?.trim().to_string();
        crate::names::check_trust_domain(&trust_domain).map_err(|err| CaError::Invalid {
            path: domain_path,
            reason: err.to_string(),
        })?;
        let key_path = dir.join(CA_KEY);
        let key = KeyPair::from_pem(&read(&key_path)?).map_err(|err| CaError::Invalid {
            path: key_path,
            reason: format!("not a PEM private key rcgen can sign with ({err})"),
        })?;
        let cert_path = dir.join(CA_CERT);
        let cert_pem = read(&cert_path)?;
        let invalid = |reason: String| CaError::Invalid {
            path: cert_path.clone(),
            reason,
        };
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| invalid(format!("not PEM certificates ({err})")))?;
        let [cert] = <[_; 1]>::try_from(certs).map_err(|certs| {
            invalid(format!(
                "holds {} certificates; expected one, the CA's",
                certs.len()
            ))
        })?;
        let cert_pem = if cert_pem.ends_with('\n') {
            cert_pem
        } else {
            format!("{cert_pem}\n")
        };
        Ok(Ca {
            dir: dir.to_path_buf(),
            trust_domain,
            key,
            cert_pem,
            cert,
        })
    }

    /// Refuses to write over the CA's own files (a node named `ca` issued
    /// into the CA directory).
    fn refuse_own_file(&self, path: &Path) -> Result<(), CaError> {
        let canonical = |path: &Path| {
            let parent = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            parent
                .canonicalize()
                .ok()
                .map(|parent| parent.join(path.file_name().unwrap_or_default()))
        };
        let target = canonical(path);
        let own = [CA_CERT, CA_KEY, TRUST_DOMAIN]
            .iter()
            .any(|name| target.is_some() && canonical(&self.dir.join(name)) == target);
        if own {
            return Err(CaError::CaFile {
                path: path.to_path_buf(),
            });
        }
        Ok(())
    }

    /// Checks that `cert` verifies against the CA certificate as rustls
    /// will check it between nodes: as a client certificate, and as a
    /// server certificate for `node`.
    fn check_issued(&self, cert: &CertificateDer<'_>, node: &str) -> Result<(), CaError> {
        use rustls::client::danger::ServerCertVerifier;
        let cert_path = self.dir.join(CA_CERT);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.clone()).map_err(|err| CaError::Invalid {
            path: cert_path.clone(),
            reason: format!("not a usable CA certificate ({err})"),
        })?;
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mismatch = |reason: String| CaError::Mismatch {
            key: self.dir.join(CA_KEY),
            cert: cert_path.clone(),
            reason,
        };
        let now = UnixTime::now();
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|err| mismatch(err.to_string()))?
            .verify_client_cert(cert, &[], now)
            .map_err(|err| mismatch(format!("as a client: {err}")))?;
        let name = ServerName::try_from(node.to_string())
            .map_err(|err| mismatch(format!("node name {node:?}: {err}")))?;
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|err| mismatch(err.to_string()))?
            .verify_server_cert(cert, &[], &name, &[], now)
            .map_err(|err| mismatch(format!("as a server: {err}")))?;
        Ok(())
    }
}

/// The CA's subject and the parts of its parameters an issuer signs with;
/// `issue` rebuilds them from the trust domain and the CA's key, so they
/// must stay what `init` wrote (the subject is the issuer name of every
/// node certificate; the key identifier comes from the key).
fn ca_params(trust_domain: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "loopmesh");
    params.distinguished_name.push(DnType::CommonName, trust_domain);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// From a little before now to `days` from now.
fn validity(days: u32) -> Result<(OffsetDateTime, OffsetDateTime), CaError> {
    if !(1..=MAX_DAYS).contains(&days) {
        return Err(CaError::Days { days });
    }
    let now = OffsetDateTime::now_utc();
    let after = now
        .checked_add(time::Duration::days(i64::from(days)))
        .ok_or(CaError::Days { days })?;
    Ok((now - BACKDATE, after))
}

fn uri(text: String) -> Result<SanType, CaError> {
    Ok(SanType::URI(text.try_into().map_err(CaError::Generate)?))
}

fn dns(text: &str) -> Result<SanType, CaError> {
    Ok(SanType::DnsName(text.try_into().map_err(CaError::Generate)?))
}

fn written(path: PathBuf, what: String) -> Output {
    Output {
        path,
        what,
        unchanged: false,
    }
}

fn refuse_existing(paths: &[&PathBuf]) -> Result<(), CaError> {
    match paths.iter().find(|path| path.symlink_metadata().is_ok()) {
        Some(path) => Err(CaError::Exists {
            path: path.to_path_buf(),
        }),
        None => Ok(()),
    }
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => CaError::Missing {
            path: path.to_path_buf(),
        },
        _ => CaError::Read {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// Writes `contents` to `path` through a staged file in the same
/// directory, created with `mode`, synced and renamed into place: a key is
/// never readable by others, not even for a moment, and a reader never
/// sees half a file.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let error = |source| CaError::Write {
        path: path.to_path_buf(),
        source,
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let staged = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&staged)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&staged, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&staged);
    }
    result.map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn init_then_issue_writes_a_chain_that_rustls_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let made = init("prod.mesh", &ca_dir, DEFAULT_CA_DAYS, false).unwrap();
        assert_eq!(made.len(), 3);
        assert_eq!(mode(&ca_dir), 0o700);
        assert_eq!(mode(&ca_dir.join(CA_KEY)), 0o600);
        assert_eq!(
            std::fs::read_to_string(ca_dir.join(TRUST_DOMAIN)).unwrap(),
            "prod.mesh\n"
        );
        let out = dir.path().join("certs");
        let issued = issue(&ca_dir, "web-1", &out, DEFAULT_NODE_DAYS, false).unwrap();
        assert!(issued.iter().all(|output| !output.unchanged));
        assert_eq!(mode(&out.join("web-1.key")), 0o600);
        let chain = std::fs::read(out.join("web-1.pem")).unwrap();
        assert_eq!(CertificateDer::pem_slice_iter(&chain).count(), 2);
        // A second node shares the bundle.
        let issued = issue(&ca_dir, "web-2", &out, DEFAULT_NODE_DAYS, false).unwrap();
        assert!(issued[2].unchanged, "{issued:?}");
    }

    #[test]
    fn refuses_to_overwrite_without_force() {
        let dir = tempfile::tempdir().unwrap();
        init("prod.mesh", dir.path(), 1, false).unwrap();
        let key = std::fs::read(dir.path().join(CA_KEY)).unwrap();
        let err = init("prod.mesh", dir.path(), 1, false).unwrap_err();
        assert!(matches!(err, CaError::Exists { .. }), "{err}");
        assert_eq!(std::fs::read(dir.path().join(CA_KEY)).unwrap(), key);
        init("prod.mesh", dir.path(), 1, true).unwrap();
        assert_ne!(std::fs::read(dir.path().join(CA_KEY)).unwrap(), key);

        let out = tempfile::tempdir().unwrap();
        issue(dir.path(), "n1", out.path(), 1, false).unwrap();
        let err = issue(dir.path(), "n1", out.path(), 1, false).unwrap_err();
        assert!(matches!(err, CaError::Exists { .. }), "{err}");
        issue(dir.path(), "n1", out.path(), 1, true).unwrap();
    }

    #[test]
    fn a_bundle_of_another_ca_is_refused_without_force() {
        let (one, two, out) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        init("one.mesh", one.path(), 1, false).unwrap();
        init("two.mesh", two.path(), 1, false).unwrap();
        issue(one.path(), "n1", out.path(), 1, false).unwrap();
        let err = issue(two.path(), "n2", out.path(), 1, false).unwrap_err();
        assert!(
            matches!(&err, CaError::Exists { path } if path.ends_with(BUNDLE)),
            "{err}"
        );
    }

    #[test]
    fn the_ca_files_are_never_written_over() {
        let dir = tempfile::tempdir().unwrap();
        init("prod.mesh", dir.path(), 1, false).unwrap();
        let err = issue(dir.path(), "ca", dir.path(), 1, true).unwrap_err();
        assert!(matches!(err, CaError::CaFile { .. }), "{err}");
    }

    #[test]
    fn ca_files_that_do_not_belong_together_are_named() {
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        init("prod.mesh", one.path(), 1, false).unwrap();
        init("prod.mesh", two.path(), 1, false).unwrap();
        let out = tempfile::tempdir().unwrap();
        // Another CA's key with this CA's certificate.
        std::fs::copy(two.path().join(CA_KEY), one.path().join(CA_KEY)).unwrap();
        let err = issue(one.path(), "n1", out.path(), 1, false).unwrap_err();
        assert!(matches!(err, CaError::Mismatch { .. }), "{err}");
        // A trust domain edited after init.
        std::fs::write(two.path().join(TRUST_DOMAIN), "other.mesh\n").unwrap();
        let err = issue(two.path(), "n1", out.path(), 1, false).unwrap_err();
        assert!(matches!(err, CaError::Mismatch { .. }), "{err}");
        assert!(std::fs::read_dir(out.path()).unwrap().next().is_none());
    }

    #[test]
    fn bad_input_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let err = init("Prod_Mesh", &ca_dir, 1, false).unwrap_err();
        assert!(matches!(err, CaError::Name(NameError::TrustDomain(_))), "{err}");
        assert!(matches!(
            init("prod.mesh", &ca_dir, 0, false),
            Err(CaError::Days { days: 0 })
        ));
        assert!(!ca_dir.exists());
        let err = issue(&ca_dir, "n1", dir.path(), 1, false).unwrap_err();
        assert!(matches!(err, CaError::Missing { .. }), "{err}");
        init("prod.mesh", &ca_dir, 1, false).unwrap();
        let err = issue(&ca_dir, "a/b", dir.path(), 1, false).unwrap_err();
        assert!(matches!(err, CaError::Name(NameError::NodeName(_))), "{err}");
        std::fs::write(ca_dir.join(CA_KEY), "not a key").unwrap();
        let err = issue(&ca_dir, "n1", dir.path(), 1, false).unwrap_err();
        assert!(
            matches!(&err, CaError::Invalid { path, .. } if path.ends_with(CA_KEY)),
            "{err}"
        );
    }

    #[test]
    fn every_valid_node_name_is_a_server_name() {
        for node in ["web-1", "Web_1", "ip-10-0-0-5.ec2.internal", "1n", "a.b1"] {
            crate::names::check_node_name(node).unwrap();
            ServerName::try_from(node).unwrap();
        }
    }
}
