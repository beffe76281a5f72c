//! A node's mesh credentials: its certificate chain and key, and the
//! mesh's trust bundle, read from files; and the rustls configurations
//! made from them: the inbound listener's (TLS 1.3, a client certificate
//! chained to the bundle required, ALPN `h2`) and the dialer's (its own
//! certificate presented; the peer must chain to the bundle and be the
//! node the catalog says hosts the instance).
//!
//! [`Credentials::reload`] reads the files again; a bad or mismatched set
//! keeps the previous one (the caller logs why), so a rotation half done
//! never takes the mesh down. Open tunnels keep the session they made.

use super::identity::{node_identity, not_after, NodeIdentity};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

/// What can be wrong with a set of credential files.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error(
        "{path}: the certificate names no node of the mesh (a URI SAN spiffe://<trust_domain>/node/<node>)"
    )]
    NoIdentity { path: PathBuf },
    #[error("{path} is for {found}, but this node is {expected}")]
    WrongNode {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("{path} does not chain to the trust bundle {bundle}: {reason}")]
    Untrusted {
        path: PathBuf,
        bundle: PathBuf,
        reason: String,
    },
    #[error("the key {key} does not go with the certificate {cert}: {reason}")]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// Where the credentials are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialFiles {
    /// The node's certificate, then any intermediates (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// The mesh's trust bundle: the CA certificates (PEM).
    pub bundle: PathBuf,
}

/// One loaded set, and the configurations made from it.
#[derive(Debug)]
pub struct Loaded {
    pub identity: NodeIdentity,
    /// When the node's certificate expires.
    pub expires: SystemTime,
    /// For the inbound listener.
    pub server: Arc<ServerConfig>,
    /// For dialing peers; the server name given to a connection is the
    /// peer's node name, which its certificate must carry.
    pub client: Arc<ClientConfig>,
}

/// The node's current credentials, replaced whole by a reload.
#[derive(Debug)]
pub struct Credentials {
    files: CredentialFiles,
    /// This node's name: the certificate must say so.
    node: String,
    current: RwLock<Arc<Loaded>>,
}

/// ALPN of the mesh's tunnels: HTTP/2, as ztunnel's HBONE.
pub const ALPN: &[u8] = b"h2";

impl Credentials {
    /// Reads the files of node `node`.
    pub fn load(files: CredentialFiles, node: &str) -> Result<Credentials, CredentialsError> {
        let loaded = load(&files, node)?;
        Ok(Credentials {
            files,
            node: node.to_string(),
            current: RwLock::new(Arc::new(loaded)),
        })
    }

    /// The credentials now.
    pub fn current(&self) -> Arc<Loaded> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The files they are read from.
    pub fn files(&self) -> &CredentialFiles {
        &self.files
    }

    /// Reads the files again; on error the previous credentials stay.
    pub fn reload(&self) -> Result<Arc<Loaded>, CredentialsError> {
        let loaded = Arc::new(load(&self.files, &self.node)?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = loaded.clone();
        Ok(loaded)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_error(path: &Path, err: impl std::fmt::Display) -> CredentialsError {
    CredentialsError::Read {
        path: path.to_path_buf(),
        reason: err.to_string(),
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, CredentialsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| read_error(path, err))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| read_error(path, err))?;
    if certs.is_empty() {
        return Err(CredentialsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn load(files: &CredentialFiles, node: &str) -> Result<Loaded, CredentialsError> {
    let chain = certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|err| read_error(&files.key, err))?;
    let mut roots = RootCertStore::empty();
    for ca in certificates(&files.bundle)? {
        roots.add(ca).map_err(|err| read_error(&files.bundle, err))?;
    }
    let roots = Arc::new(roots);
    let identity = node_identity(&chain[0]).ok_or_else(|| CredentialsError::NoIdentity {
        path: files.cert.clone(),
    })?;
    if identity.node != node {
        return Err(CredentialsError::WrongNode {
            path: files.cert.clone(),
            found: identity.to_string(),
            expected: node.to_string(),
        });
    }
    let provider = provider();
    // Our own certificate must be one our peers accept.
    let parsed = ParsedCertificate::try_from(&chain[0]).map_err(|err| read_error(&files.cert, err))?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        &chain[1..],
        UnixTime::now(),
        provider.signature_verification_algorithms.all,
    )
    .map_err(|err| CredentialsError::Untrusted {
        path: files.cert.clone(),
        bundle: files.bundle.clone(),
        reason: err.to_string(),
    })?;
    let expires = not_after(&chain[0]).unwrap_or(SystemTime::UNIX_EPOCH);
    let mismatch = |err: rustls::Error| CredentialsError::KeyMismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
        reason: err.to_string(),
    };
    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|err| read_error(&files.bundle, err))?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(mismatch)?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(mismatch)?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    let peer_verifier = Arc::new(PeerVerifier {
        roots,
        trust_domain: identity.trust_domain.clone(),
        provider: provider.clone(),
    });
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(mismatch)?
        .dangerous()
        .with_custom_certificate_verifier(peer_verifier)
        .with_client_auth_cert(chain, key)
        .map_err(mismatch)?;
    client.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Loaded {
        identity,
        expires,
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

/// Verifies a peer node: its chain against the trust bundle, and its
/// identity against the node the dialer expects (given as the server
/// name): a certificate of another node of the same mesh is refused too.
#[derive(Debug)]
struct PeerVerifier {
    roots: Arc<RootCertStore>,
    trust_domain: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let expected = match server_name {
            ServerName::DnsName(name) => NodeIdentity::new(&self.trust_domain, name.as_ref()),
            _ => return Err(rustls::Error::General("peers are named by node".into())),
        };
        match node_identity(end_entity) {
            Some(found) if found == expected => Ok(ServerCertVerified::assertion()),
            Some(found) => Err(rustls::Error::General(format!(
                "peer is {found}, expected {expected}"
            ))),
            None => Err(rustls::Error::General(format!(
                "peer's certificate names no node; expected {expected}"
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The identity of the peer of an accepted connection, from its
/// certificate (already verified against the bundle by the handshake).
pub fn peer_identity(certificates: Option<&[CertificateDer<'_>]>) -> Option<NodeIdentity> {
    node_identity(certificates?.first()?)
}
