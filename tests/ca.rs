//! `loopmesh ca init` and `loopmesh ca issue`, run as the real binary; what
//! they write is checked with the real openssl and a real rustls handshake
//! over loopback, as nodes will use it.

mod common;

use common::run;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

fn path(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `loopmesh ca init` into `dir`, which must succeed.
fn init(dir: &Path, trust_domain: &str) {
    let (ok, stdout, stderr) = run(&["ca", "init", "--trust-domain", trust_domain, "--out", path(dir)]);
    assert!(ok, "ca init: {stderr}");
    for file in ["ca.key", "ca.pem", "trust-domain"] {
        let line = format!("wrote {}", dir.join(file).display());
        assert!(stdout.lines().any(|l| l.starts_with(&line)), "{line} in {stdout}");
    }
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
}

/// `loopmesh ca issue` for `node` into `out`, which must succeed.
fn issue(ca: &Path, node: &str, out: &Path) {
    let (ok, stdout, stderr) = run(&[
        "ca",
        "issue",
        "--ca",
        path(ca),
        "--node",
        node,
        "--out",
        path(out),
    ]);
    assert!(ok, "ca issue {node}: {stderr}");
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
}

fn openssl(args: &[&str]) -> (bool, String) {
    let output = Command::new("openssl").args(args).output().expect("openssl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The one line an operator sees on failure.
fn refused(args: &[&str]) -> String {
    let (ok, stdout, stderr) = run(args);
    assert!(!ok, "{args:?} succeeded: {stdout}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    stderr
}

#[test]
fn init_then_issue_for_two_nodes_gives_certificates_openssl_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, out) = (dir.path().join("ca"), dir.path().join("certs"));
    init(&ca, "prod.mesh");
    assert_eq!(mode(&ca), 0o700);
    assert_eq!(mode(&ca.join("ca.key")), 0o600);
    assert_eq!(
        std::fs::read_to_string(ca.join("trust-domain")).unwrap(),
        "prod.mesh\n"
    );
    let (_, text) = openssl(&["x509", "-in", path(&ca.join("ca.pem")), "-noout", "-text"]);
    assert!(text.contains("CA:TRUE, pathlen:0"), "{text}");
    assert!(text.contains("Certificate Sign, CRL Sign"), "{text}");
    assert!(text.contains("URI:spiffe://prod.mesh"), "{text}");

    issue(&ca, "node-a", &out);
    issue(&ca, "node-b", &out);
    let bundle = out.join("bundle.pem");
    assert_eq!(
        std::fs::read(&bundle).unwrap(),
        std::fs::read(ca.join("ca.pem")).unwrap()
    );
    for node in ["node-a", "node-b"] {
        let cert = out.join(format!("{node}.pem"));
        assert_eq!(mode(&out.join(format!("{node}.key"))), 0o600);
        for purpose in ["sslserver", "sslclient"] {
            let (ok, text) = openssl(&[
                "verify",
                "-purpose",
                purpose,
                "-CAfile",
                path(&bundle),
                path(&cert),
            ]);
            assert!(ok, "{node} as {purpose}: {text}");
        }
        let (_, text) = openssl(&["x509", "-in", path(&cert), "-noout", "-ext", "subjectAltName"]);
        assert!(
            text.contains(&format!("URI:spiffe://prod.mesh/node/{node}")),
            "{text}"
        );
        assert!(text.contains(&format!("DNS:{node}")), "{text}");
        let (_, text) = openssl(&[
            "x509",
            "-in",
            path(&cert),
            "-noout",
            "-ext",
            "extendedKeyUsage,basicConstraints",
        ]);
        assert!(
            text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
            "{text}"
        );
        assert!(text.contains("CA:FALSE"), "{text}");
        // The key is the certificate's.
        let (_, from_cert) = openssl(&["x509", "-in", path(&cert), "-noout", "-pubkey"]);
        let (_, from_key) = openssl(&["pkey", "-in", path(&out.join(format!("{node}.key"))), "-pubout"]);
        assert_eq!(from_cert, from_key);
    }
}

#[test]
fn init_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path(), "prod.mesh");
    let key = std::fs::read(dir.path().join("ca.key")).unwrap();
    let line = refused(&[
        "ca",
        "init",
        "--trust-domain",
        "prod.mesh",
        "--out",
        path(dir.path()),
    ]);
    assert!(
        line.contains("refusing to overwrite") && line.contains("--force"),
        "{line}"
    );
    assert_eq!(std::fs::read(dir.path().join("ca.key")).unwrap(), key);

    let (ok, _, stderr) = run(&[
        "ca",
        "init",
        "--trust-domain",
        "prod.mesh",
        "--out",
        path(dir.path()),
        "--force",
    ]);
    assert!(ok, "{stderr}");
    assert_ne!(std::fs::read(dir.path().join("ca.key")).unwrap(), key);
    assert_eq!(mode(&dir.path().join("ca.key")), 0o600);

    // And issue, for a node's files.
    let out = dir.path().join("certs");
    issue(dir.path(), "n1", &out);
    let args = [
        "ca",
        "issue",
        "--ca",
        path(dir.path()),
        "--node",
        "n1",
        "--out",
        path(&out),
    ];
    let line = refused(&args);
    assert!(line.contains("n1."), "{line}");
    let (ok, _, stderr) = run(&[&args[..], &["--force"]].concat());
    assert!(ok, "{stderr}");
}

#[test]
fn a_bad_trust_domain_or_node_name_is_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    for bad in ["Prod.Mesh", "prod..mesh", "prod_mesh", "spiffe://prod.mesh"] {
        let line = refused(&["ca", "init", "--trust-domain", bad, "--out", path(&ca)]);
        assert!(line.contains(&format!("trust domain {bad:?}")), "{line}");
    }
    assert!(!ca.exists());
    init(&ca, "prod.mesh");
    for bad in ["a/b", "web 1", "-web", "node:1", "10.0.0.5"] {
        let line = refused(&[
            "ca",
            "issue",
            "--ca",
            path(&ca),
            &format!("--node={bad}"),
            "--out",
            path(dir.path()),
        ]);
        assert!(line.contains(&format!("node name {bad:?}")), "{line}");
    }
    let line = refused(&[
        "ca",
        "issue",
        "--ca",
        path(&dir.path().join("none")),
        "--node",
        "n1",
        "--out",
        path(dir.path()),
    ]);
    assert!(line.contains("none/trust-domain does not exist"), "{line}");
    assert!(!dir.path().join("n1.pem").exists());
}

#[test]
fn a_certificate_from_another_ca_does_not_verify() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    init(&one, "prod.mesh");
    init(&two, "prod.mesh");
    issue(&one, "node-a", &dir.path().join("a"));
    issue(&two, "node-x", &dir.path().join("x"));
    let bundle = dir.path().join("a/bundle.pem");
    let (ok, text) = openssl(&[
        "verify",
        "-CAfile",
        path(&bundle),
        path(&dir.path().join("x/node-x.pem")),
    ]);
    assert!(!ok, "{text}");
}

/// A node's certificate chain and key, as a node would load them.
fn credentials(dir: &Path, node: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain = CertificateDer::pem_file_iter(dir.join(format!("{node}.pem")))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    assert_eq!(chain.len(), 2, "the node's certificate, then the CA's");
    let key = PrivateKeyDer::from_pem_file(dir.join(format!("{node}.key"))).unwrap();
    (chain, key)
}

fn roots(bundle: &Path) -> Arc<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(bundle).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    Arc::new(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.3 only, a client certificate required, chained to `bundle`.
fn server_config(dir: &Path, node: &str, bundle: &Path) -> Arc<rustls::ServerConfig> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(bundle), provider())
        .build()
        .unwrap();
    let (chain, key) = credentials(dir, node);
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    Arc::new(config)
}

fn client_config(credentials: Option<(&Path, &str)>, bundle: &Path) -> Arc<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(bundle));
    let config = match credentials {
        Some((dir, node)) => {
            let (chain, key) = self::credentials(dir, node);
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// One connection to a server presenting node-a's certificate: what the
/// server saw (the client's certificate, or its error) and whether the
/// client got the server's echo of a byte.
async fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> (Result<CertificateDer<'static>, String>, bool) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = tokio_rustls::TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .map_err(|err| err.to_string())?;
        let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map_err(|err| err.to_string())?;
        tls.write_all(&byte).await.map_err(|err| err.to_string())?;
        tls.shutdown().await.map_err(|err| err.to_string())?;
        Ok(peer)
    };
    let dial = async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("node-a").unwrap();
        let Ok(mut tls) = tokio_rustls::TlsConnector::from(client).connect(name, tcp).await else {
            return false;
        };
        // TLS 1.3: the server judges the client's certificate after the
        // client's side of the handshake is done; a refusal arrives as an
        // alert on the first read.
        let mut byte = [0u8; 1];
        tls.write_all(b"x").await.is_ok() && tls.read_exact(&mut byte).await.is_ok() && &byte == b"x"
    };
    tokio::join!(serve, dial)
}

#[tokio::test]
async fn nodes_of_one_ca_complete_a_mutual_tls_handshake_and_another_cas_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let (certs, other): (PathBuf, PathBuf) = (dir.path().join("certs"), dir.path().join("other"));
    init(&one, "prod.mesh");
    init(&two, "prod.mesh");
    issue(&one, "node-a", &certs);
    issue(&one, "node-b", &certs);
    issue(&two, "node-a", &other);
    issue(&two, "node-b", &other);
    let bundle = certs.join("bundle.pem");
    let server = server_config(&certs, "node-a", &bundle);

    let (seen, echoed) = handshake(server.clone(), client_config(Some((&certs, "node-b")), &bundle)).await;
    assert!(echoed, "server: {seen:?}");
    assert_eq!(
        seen.unwrap(),
        credentials(&certs, "node-b").0[0],
        "node-b's certificate"
    );

    // The same node name and trust domain, but another CA.
    let (seen, echoed) = handshake(server.clone(), client_config(Some((&other, "node-b")), &bundle)).await;
    assert!(!echoed);
    let err = seen.unwrap_err();
    assert!(
        err.contains("UnknownIssuer") || err.contains("BadSignature"),
        "{err}"
    );

    // No certificate at all.
    let (seen, echoed) = handshake(server, client_config(None, &bundle)).await;
    assert!(!echoed);
    let err = seen.unwrap_err();
    assert!(err.contains("peer sent no certificates"), "{err}");

    // And a client of the first CA refuses a node-a of the other.
    let server = server_config(&other, "node-a", &other.join("bundle.pem"));
    let (seen, echoed) = handshake(server, client_config(Some((&certs, "node-b")), &bundle)).await;
    assert!(!echoed);
    assert!(seen.is_err());
}

/// The README's openssl recipe, for operators with a CA of their own (here
/// loopmesh's, whose key openssl reads): its certificate is accepted by a
/// node whose certificate `loopmesh ca` issued.
#[tokio::test]
async fn the_readme_openssl_recipe_makes_a_certificate_nodes_accept() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, certs) = (dir.path().join("ca"), dir.path().join("certs"));
    init(&ca, "prod.mesh");
    issue(&ca, "node-a", &certs);
    let (node, td) = ("web-1", "prod.mesh");
    let file = |ext: &str| certs.join(format!("{node}.{ext}"));
    let (ok, text) = openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        path(&file("key")),
        "-subj",
        &format!("/CN={node}"),
        "-out",
        path(&file("csr")),
    ]);
    assert!(ok, "{text}");
    std::fs::write(
        file("ext"),
        format!(
            "subjectAltName = URI:spiffe://{td}/node/{node}, DNS:{node}\n\
             extendedKeyUsage = serverAuth, clientAuth\n\
             keyUsage = critical, digitalSignature\n\
             basicConstraints = critical, CA:FALSE\n"
        ),
    )
    .unwrap();
    let (ok, text) = openssl(&[
        "x509",
        "-req",
        "-in",
        path(&file("csr")),
        "-CA",
        path(&ca.join("ca.pem")),
        "-CAkey",
        path(&ca.join("ca.key")),
        "-CAcreateserial",
        "-CAserial",
        path(&file("srl")),
        "-days",
        "90",
        "-extfile",
        path(&file("ext")),
        "-out",
        path(&file("crt")),
    ]);
    assert!(ok, "{text}");
    let chain = [
        std::fs::read(file("crt")).unwrap(),
        std::fs::read(ca.join("ca.pem")).unwrap(),
    ]
    .concat();
    std::fs::write(file("pem"), chain).unwrap();

    let bundle = certs.join("bundle.pem");
    let server = server_config(&certs, "node-a", &bundle);
    let (seen, echoed) = handshake(server, client_config(Some((&certs, node)), &bundle)).await;
    assert!(echoed, "server: {seen:?}");
    assert_eq!(seen.unwrap(), credentials(&certs, node).0[0]);
}
