//! The agent's DNS server over real UDP and TCP: every record type of the
//! mesh zone, REFUSED outside it, answers following etcd, truncation with
//! TCP fallback, and a broken zone file leaving the old answers in place.

mod common;

use common::{eventually_async, Etcd, Loopmesh};
use hickory_server::net::client::{Client, ClientHandle};
use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::net::tcp::TcpClientStream;
use hickory_server::net::udp::UdpClientStream;
use hickory_server::proto::op::DnsResponse;
use hickory_server::proto::op::ResponseCode;
use hickory_server::proto::rr::{DNSClass, Name, RData, RecordType};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

async fn udp_client(addr: SocketAddr) -> Client<TokioRuntimeProvider> {
    let stream = UdpClientStream::builder(addr, TokioRuntimeProvider::new())
        .with_timeout(Some(Duration::from_secs(2)))
        .build();
    let (client, background) = Client::<TokioRuntimeProvider>::from_sender(stream);
    tokio::spawn(background);
    client
}

async fn tcp_client(addr: SocketAddr) -> Client<TokioRuntimeProvider> {
    let (stream, sender) = TcpClientStream::new(
        addr,
        None,
        Some(Duration::from_secs(2)),
        TokioRuntimeProvider::new(),
    );
    let (client, background) = Client::<TokioRuntimeProvider>::new(stream.await.unwrap(), sender);
    tokio::spawn(background);
    client
}

async fn ask(client: &mut Client<TokioRuntimeProvider>, name: &str, rtype: RecordType) -> DnsResponse {
    client
        .query(Name::from_ascii(name).unwrap(), DNSClass::IN, rtype)
        .await
        .unwrap_or_else(|err| panic!("{name} {rtype}: {err}"))
}

/// The IPv4 addresses of the A records in `response`'s answers.
fn addresses(response: &DnsResponse) -> Vec<Ipv4Addr> {
    response
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

/// Waits until `name` resolves (over UDP) to exactly `expected`.
async fn wait_for_a(dns: SocketAddr, name: &str, expected: &[Ipv4Addr]) {
    eventually_async(&format!("{name} A = {expected:?} from {dns}"), || async {
        let mut client = udp_client(dns).await;
        let response = client
            .query(Name::from_ascii(name).unwrap(), DNSClass::IN, RecordType::A)
            .await
            .ok()?;
        (addresses(&response) == expected).then_some(())
    })
    .await;
}

/// Waits until `name` gets NXDOMAIN.
async fn wait_for_nxdomain(dns: SocketAddr, name: &str) {
    eventually_async(&format!("{name} NXDOMAIN from {dns}"), || async {
        let mut client = udp_client(dns).await;
        let response = client
            .query(Name::from_ascii(name).unwrap(), DNSClass::IN, RecordType::A)
            .await
            .ok()?;
        (response.metadata.response_code == ResponseCode::NXDomain).then_some(())
    })
    .await;
}

/// Runs dig against the agent; its trimmed output.
fn dig(server: SocketAddr, args: &[&str]) -> String {
    let output = std::process::Command::new("dig")
        .args([
            format!("@{}", server.ip()),
            "-p".into(),
            server.port().to_string(),
        ])
        .args(["+time=2", "+tries=1"])
        .args(args)
        .output()
        .expect("dig runs (apt-get install bind9-dnsutils)");
    let text = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert!(output.status.success(), "dig {args:?} failed: {text}");
    text
}

fn etcd_agent_config(dir: &Path, etcd: &Etcd) -> std::path::PathBuf {
    let config = dir.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "store: {{etcd: {{endpoints: [{}], retry_max: 200ms}}}}\nstate_dir: state\nproxy: {{enabled: false}}\n",
            etcd.endpoint()
        ),
    )
    .unwrap();
    config
}

#[tokio::test(flavor = "multi_thread")]
async fn every_record_type_over_udp_and_tcp_and_answers_follow_etcd() {
    let etcd = Etcd::start();
    let mut etcd_client = etcd.client().await;
    etcd_client
        .put("/loopmesh/addresses/web", "127.100.42.1", None)
        .await
        .unwrap();
    etcd_client
        .put("/loopmesh/services/web", "port: 8080", None)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = etcd_agent_config(dir.path(), &etcd);
    let agent = Loopmesh::spawn(&["agent", "--config", config.to_str().unwrap()], dir.path());
    let dns = agent.dns.unwrap();
    let web = Ipv4Addr::new(127, 100, 42, 1);
    wait_for_a(dns, "web.mesh.internal.", &[web]).await;

    for (transport, mut client) in [("udp", udp_client(dns).await), ("tcp", tcp_client(dns).await)] {
        let a = ask(&mut client, "WEB.mesh.internal.", RecordType::A).await;
        assert_eq!(addresses(&a), [web], "{transport}: A, any case");
        assert!(a.metadata.authoritative, "{transport}: AA");
        assert!(
            !a.metadata.recursion_available,
            "{transport}: not a recursive resolver"
        );
        assert_eq!(a.answers[0].ttl, 300, "{transport}: the configured TTL");

        let srv = ask(&mut client, "_web._tcp.mesh.internal.", RecordType::SRV).await;
        let RData::SRV(record) = &srv.answers[0].data else {
            panic!("{transport}: not an SRV answer: {srv:?}");
        };
        assert_eq!(
            (record.port, record.target.to_ascii().as_str()),
            (8080, "web.mesh.internal.")
        );
        assert!(
            srv.additionals.iter().any(|r| r.data == RData::A(web.into())),
            "{transport}: the SRV target's address in the additional section"
        );

        let soa = ask(&mut client, "mesh.internal.", RecordType::SOA).await;
        assert!(matches!(soa.answers[0].data, RData::SOA(_)), "{transport}: SOA");
        let ns = ask(&mut client, "mesh.internal.", RecordType::NS).await;
        let RData::NS(server) = &ns.answers[0].data else {
            panic!("{transport}: not an NS answer: {ns:?}");
        };
        assert_eq!(server.0.to_ascii(), "ns.mesh.internal.");
        let SocketAddr::V4(dns_v4) = dns else {
            unreachable!()
        };
        assert!(
            ns.additionals
                .iter()
                .any(|r| r.data == RData::A((*dns_v4.ip()).into())),
            "{transport}: NS glue is the agent's DNS address"
        );

        let aaaa = ask(&mut client, "web.mesh.internal.", RecordType::AAAA).await;
        assert_eq!(
            aaaa.metadata.response_code,
            ResponseCode::NoError,
            "{transport}: AAAA is NODATA"
        );
        assert!(aaaa.answers.is_empty());
        assert!(
            matches!(aaaa.authorities[0].data, RData::SOA(_)),
            "{transport}: SOA for negative caching"
        );

        let nx = ask(&mut client, "nope.mesh.internal.", RecordType::A).await;
        assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain, "{transport}");
        assert!(nx.metadata.authoritative);
        assert!(
            matches!(nx.authorities[0].data, RData::SOA(_)),
            "{transport}: SOA with NXDOMAIN"
        );
        assert_eq!(
            nx.authorities[0].ttl, 30,
            "{transport}: negative TTL is the SOA minimum"
        );

        let outside = ask(&mut client, "example.com.", RecordType::A).await;
        assert_eq!(
            outside.metadata.response_code,
            ResponseCode::Refused,
            "{transport}: not an open resolver"
        );
        assert!(outside.answers.is_empty());
    }

    // dig, the tool an operator reaches for, sees the same.
    assert_eq!(dig(dns, &["+short", "web.mesh.internal", "A"]), "127.100.42.1");
    assert_eq!(
        dig(dns, &["+tcp", "+short", "_web._tcp.mesh.internal", "SRV"]),
        "0 0 8080 web.mesh.internal."
    );
    assert!(dig(dns, &["example.com", "A"]).contains("status: REFUSED"));
    // QCLASS ANY (RFC 1035 "any class") is answered from the only class
    // served, IN, as BIND does; any other class is refused (README).
    let any_class = dig(dns, &["-c", "ANY", "web.mesh.internal", "A"]);
    assert!(any_class.contains("status: NOERROR"), "{any_class}");
    assert!(
        any_class.contains("web.mesh.internal.\t300\tIN\tA\t127.100.42.1"),
        "{any_class}"
    );
    for class in ["CH", "HS"] {
        let other = dig(dns, &["-c", class, "web.mesh.internal", "A"]);
        assert!(other.contains("status: REFUSED"), "class {class}: {other}");
        let tcp = dig(dns, &["+tcp", "-c", class, "web.mesh.internal", "A"]);
        assert!(tcp.contains("status: REFUSED"), "class {class} over tcp: {tcp}");
    }

    // A service written to etcd resolves; a deleted one stops resolving.
    etcd_client
        .put("/loopmesh/addresses/api", "127.100.42.2", None)
        .await
        .unwrap();
    etcd_client
        .put("/loopmesh/services/api", "port: 7090", None)
        .await
        .unwrap();
    wait_for_a(dns, "api.mesh.internal.", &[Ipv4Addr::new(127, 100, 42, 2)]).await;
    etcd_client.delete("/loopmesh/services/web", None).await.unwrap();
    wait_for_nxdomain(dns, "web.mesh.internal.").await;
    agent.stop();
}

const STATIC_ZONE: &str = "$ORIGIN mesh.internal.
$TTL 300
@ IN SOA ns.mesh.internal. hostmaster.mesh.internal. ( 1 3600 600 86400 30 )
@ IN NS ns.mesh.internal.
web IN A 127.100.0.8
";

/// Replaces a file the way the renderer does: a staged copy renamed over it.
fn replace(path: &Path, text: &str) {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, text).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_zone_keeps_the_old_answers_and_big_answers_fall_back_to_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let zone = state.join("mesh.zone");
    let big: String = (0..60).map(|i| format!("big IN A 10.0.0.{i}\n")).collect();
    std::fs::write(&zone, format!("{STATIC_ZONE}{big}")).unwrap();
    let agent = Loopmesh::spawn(
        &["agent", "--static", "--state-dir", state.to_str().unwrap()],
        dir.path(),
    );
    let dns = agent.dns.unwrap();
    wait_for_a(dns, "web.mesh.internal.", &[Ipv4Addr::new(127, 100, 0, 8)]).await;

    // 60 addresses do not fit 512 bytes: truncated over UDP, whole over TCP.
    let mut udp = udp_client(dns).await;
    udp.disable_edns();
    let truncated = ask(&mut udp, "big.mesh.internal.", RecordType::A).await;
    assert!(truncated.metadata.truncation, "TC set");
    assert!(truncated.answers.is_empty(), "no partial record set");
    let mut tcp = tcp_client(dns).await;
    let whole = ask(&mut tcp, "big.mesh.internal.", RecordType::A).await;
    assert!(!whole.metadata.truncation);
    assert_eq!(whole.answers.len(), 60);

    // A zone that does not parse changes nothing, and says so.
    replace(
        &zone,
        &STATIC_ZONE.replace("127.100.0.8", "127.100.0.9\nbad IN A not-an-address"),
    );
    agent.wait_log("refused: line 6");
    assert!(
        agent.log_text().contains("still answering from serial 1"),
        "{}",
        agent.log_text()
    );
    let after = ask(&mut udp_client(dns).await, "web.mesh.internal.", RecordType::A).await;
    assert_eq!(
        addresses(&after),
        [Ipv4Addr::new(127, 100, 0, 8)],
        "the old zone still answers"
    );

    // The next good zone is served.
    replace(
        &zone,
        &STATIC_ZONE
            .replace("127.100.0.8", "127.100.0.9")
            .replace("( 1 ", "( 2 "),
    );
    wait_for_a(dns, "web.mesh.internal.", &[Ipv4Addr::new(127, 100, 0, 9)]).await;
    agent.stop();
}
