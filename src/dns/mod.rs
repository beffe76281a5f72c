//! The agent's DNS server: authoritative for the mesh zone and nothing else.
//!
//! It answers from the zone file the agent renders (`<state_dir>/mesh.zone`),
//! so what it says is what an operator reads on disk. A new zone is parsed,
//! validated and built into answers beside the running one, then swapped in
//! whole; a zone that fails to parse leaves the old one answering. Names
//! outside the zone get REFUSED: the agent is never an open or recursive
//! resolver.
//!
//! UDP and TCP answer from the same [`Answers`] through one lean path of
//! our own ([`wire`]); UDP on a thread of its own, TCP on the runtime
//! ([`tcp`]). hickory parses the zone.

pub mod answers;
mod tcp;
pub mod wire;

use answers::{in_zone, wire_name, Answers, Lookup};
use hickory_server::proto::rr::Name;
use metrics::{Counter, Histogram};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use wire::{rcode, Answered, Transport};

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("dns.zone {zone:?} is not a valid domain name: {reason}")]
    ZoneName { zone: String, reason: String },
    #[error("cannot read zone file {path}: {source}")]
    ReadZone { path: PathBuf, source: std::io::Error },
    #[error("zone file {path} refused: {reason}")]
    BadZone { path: PathBuf, reason: String },
    #[error("cannot listen for DNS on {addr} ({transport}): {source}")]
    Bind {
        addr: SocketAddr,
        transport: &'static str,
        source: std::io::Error,
    },
}

/// What the server answers from at one moment: the zone's apex, and the
/// answers once a zone has loaded.
#[derive(Debug)]
pub struct Served {
    origin_wire: Vec<u8>,
    answers: Option<Answers>,
}

impl Served {
    /// The serial of the zone served, if one is loaded.
    pub fn serial(&self) -> Option<u32> {
        self.answers.as_ref().map(Answers::serial)
    }

    /// Records in the zone served.
    pub fn records(&self) -> usize {
        self.answers.as_ref().map_or(0, Answers::len)
    }

    /// Answers a question (`name` in lowercase wire form).
    pub fn lookup(&self, name: &[u8], rtype: u16) -> Lookup<'_> {
        match &self.answers {
            Some(answers) => answers.lookup(name, rtype),
            None if in_zone(name, &self.origin_wire) => Lookup::NotLoaded,
            None => Lookup::Refused,
        }
    }
}

/// The zone being served, swapped whole on reload. Readers on the hot path
/// keep their own `Arc` and only take the lock when the version moved.
#[derive(Debug)]
pub struct ZoneCell {
    current: RwLock<Arc<Served>>,
    version: AtomicU64,
}

impl ZoneCell {
    fn new(served: Served) -> Self {
        ZoneCell {
            current: RwLock::new(Arc::new(served)),
            version: AtomicU64::new(0),
        }
    }

    /// The zone now.
    pub fn current(&self) -> Arc<Served> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    fn swap(&self, served: Served) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(served);
        self.version.fetch_add(1, Ordering::Release);
    }
}

/// Record types with a label of their own in the query metrics.
const METRIC_TYPES: [(u16, &str); 9] = [
    (1, "A"),
    (28, "AAAA"),
    (33, "SRV"),
    (6, "SOA"),
    (2, "NS"),
    (5, "CNAME"),
    (12, "PTR"),
    (16, "TXT"),
    (255, "ANY"),
];

const METRIC_RCODES: [(u16, &str); 7] = [
    (rcode::NOERROR, "NOERROR"),
    (rcode::FORMERR, "FORMERR"),
    (rcode::SERVFAIL, "SERVFAIL"),
    (rcode::NXDOMAIN, "NXDOMAIN"),
    (rcode::NOTIMP, "NOTIMP"),
    (rcode::REFUSED, "REFUSED"),
    (rcode::BADVERS, "BADVERS"),
];

/// Query counters by transport, type and response code, registered once so
/// a query costs an index, not a registry lookup.
pub struct QueryMetrics {
    /// [transport][type (last: other)][rcode (last: other)]
    queries: Vec<Vec<Vec<Counter>>>,
    duration: [Histogram; 2],
    truncated: Counter,
}

impl QueryMetrics {
    fn new() -> Self {
        let transports = ["udp", "tcp"];
        let types: Vec<&str> = METRIC_TYPES.iter().map(|(_, n)| *n).chain(["other"]).collect();
        let codes: Vec<&str> = METRIC_RCODES.iter().map(|(_, n)| *n).chain(["other"]).collect();
        let queries = transports
            .iter()
            .map(|transport| {
                types
                    .iter()
                    .map(|qtype| {
                        codes
                            .iter()
                            .map(|code| {
                                metrics::counter!("loopmesh_dns_queries_total",
                                    "transport" => *transport, "type" => *qtype, "rcode" => *code)
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect();
        QueryMetrics {
            queries,
            duration: transports
                .map(|transport| metrics::histogram!("loopmesh_dns_query_duration_seconds", "transport" => transport)),
            truncated: metrics::counter!("loopmesh_dns_truncated_total"),
        }
    }

    /// Counts one answered query; `took` goes into the latency histogram
    /// when given (UDP samples it, see [`LATENCY_SAMPLE`]).
    pub fn record(&self, answered: Answered, transport: &str, took: Option<Duration>) {
        let t = usize::from(transport == "tcp");
        let qtype = METRIC_TYPES
            .iter()
            .position(|(code, _)| *code == answered.qtype)
            .unwrap_or(METRIC_TYPES.len());
        let code = METRIC_RCODES
            .iter()
            .position(|(code, _)| *code == answered.rcode)
            .unwrap_or(METRIC_RCODES.len());
        self.queries[t][qtype][code].increment(1);
        if let Some(took) = took {
            self.duration[t].record(took.as_secs_f64());
        }
        if answered.truncated {
            self.truncated.increment(1);
        }
    }
}

/// One UDP query in this many has its latency recorded. The Prometheus
/// recorder keeps every sample until its next upkeep: at 150k queries/s,
/// recording each one grew RSS from 9 to 21 MiB in the DNS benchmark.
pub const LATENCY_SAMPLE: u32 = 64;

/// The DNS server of one agent.
pub struct DnsServer {
    zone: Name,
    zone_path: PathBuf,
    listen: SocketAddr,
    cell: Arc<ZoneCell>,
    metrics: Arc<QueryMetrics>,
    running: Option<Running>,
    /// Whether a bind was tried (to log the first failure loudly, not each retry).
    tried: bool,
    /// Sockets handed over by a predecessor, used instead of binding.
    inherited: Option<(std::net::UdpSocket, std::net::TcpListener)>,
    /// Hash of the zone text served, so an unchanged file is not rebuilt.
    loaded: std::sync::Mutex<Option<u64>>,
}

struct Running {
    udp: UdpThread,
    tcp: tcp::TcpServer,
}

/// The UDP answer loop on a thread of its own: blocking recvfrom/sendto,
/// two syscalls a query, no task wake-ups, and it stays on one core. On the
/// runtime it cost a quarter more CPU per query with a 10k-name zone
/// (wake-ups, and caches cold each time the task moved between workers).
struct UdpThread {
    socket: Arc<std::net::UdpSocket>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl UdpThread {
    fn spawn(
        socket: std::net::UdpSocket,
        cell: Arc<ZoneCell>,
        metrics: Arc<QueryMetrics>,
    ) -> std::io::Result<Self> {
        let socket = Arc::new(socket);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("loopmesh-dns-udp".into())
            .spawn({
                let (socket, stop) = (socket.clone(), stop.clone());
                move || serve_udp(&socket, &stop, &cell, &metrics)
            })?;
        Ok(UdpThread { socket, stop, thread })
    }

    /// Stops the loop. `wake`: shutdown(2) wakes a blocked recvfrom at
    /// once, for a stop; a socket handed to a successor must not be shut
    /// down (it is the successor's socket too), so a handover waits out the
    /// receive timeout instead.
    async fn stop(self, wake: bool) {
        self.stop.store(true, Ordering::Release);
        if wake {
            // SAFETY: shutdown(2) on a socket this struct keeps open.
            unsafe { libc::shutdown(self.socket.as_raw_fd(), libc::SHUT_RDWR) };
        }
        let _ = tokio::task::spawn_blocking(move || self.thread.join()).await;
    }
}

impl DnsServer {
    /// A server for `zone` (e.g. `mesh.internal.`) reading `zone_path`,
    /// to listen on `listen`. Nothing is bound or loaded yet.
    pub fn new(zone: &str, zone_path: &Path, listen: SocketAddr) -> Result<DnsServer, DnsError> {
        let name = Name::from_ascii(zone).map_err(|err| DnsError::ZoneName {
            zone: zone.to_string(),
            reason: err.to_string(),
        })?;
        let served = Served {
            origin_wire: wire_name(&name),
            answers: None,
        };
        Ok(DnsServer {
            zone: name,
            zone_path: zone_path.to_path_buf(),
            listen,
            cell: Arc::new(ZoneCell::new(served)),
            metrics: Arc::new(QueryMetrics::new()),
            running: None,
            tried: false,
            inherited: None,
            loaded: std::sync::Mutex::new(None),
        })
    }

    /// Loads the zone file and swaps it in (a file identical to the one
    /// served is left alone). On failure the zone already served stays.
    pub fn reload(&self) -> Result<(), DnsError> {
        let started = Instant::now();
        let text = std::fs::read_to_string(&self.zone_path).map_err(|source| {
            metrics::counter!("loopmesh_dns_reload_failures_total").increment(1);
            DnsError::ReadZone {
                path: self.zone_path.clone(),
                source,
            }
        })?;
        let hash = {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            text.hash(&mut hasher);
            hasher.finish()
        };
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if *loaded == Some(hash) {
            return Ok(());
        }
        let answers = Answers::parse(&text, &self.zone).map_err(|reason| {
            metrics::counter!("loopmesh_dns_reload_failures_total").increment(1);
            DnsError::BadZone {
                path: self.zone_path.clone(),
                reason,
            }
        })?;
        *loaded = Some(hash);
        drop(text);
        tracing::info!(
            "dns: serving zone {} serial {} ({} records) from {}, built in {:.1} ms",
            self.zone,
            answers.serial(),
            answers.len(),
            self.zone_path.display(),
            started.elapsed().as_secs_f64() * 1000.0
        );
        metrics::counter!("loopmesh_dns_reloads_total").increment(1);
        metrics::gauge!("loopmesh_dns_zone_records").set(answers.len() as f64);
        metrics::gauge!("loopmesh_dns_zone_serial").set(f64::from(answers.serial()));
        self.cell.swap(Served {
            origin_wire: wire_name(&self.zone),
            answers: Some(answers),
        });
        // The parser's intermediate maps are garbage now (and so is the old
        // zone once the UDP loop lets go of it).
        crate::memory::release_freed();
        Ok(())
    }

    /// Reloads, logging a failure with what stays served.
    pub fn reload_or_keep(&self) {
        if let Err(err) = self.reload() {
            let kept = match &self.cell.current().answers {
                Some(answers) => format!("still answering from serial {}", answers.serial()),
                None => "no zone loaded yet: in-zone names get SERVFAIL".to_string(),
            };
            tracing::error!("dns: {err}; {kept}");
        }
    }

    /// The zone served now (for tests and the admin API).
    pub fn current(&self) -> Arc<Served> {
        self.cell.current()
    }

    /// Whether UDP and TCP are bound and answering.
    pub fn is_listening(&self) -> bool {
        self.running.is_some()
    }

    /// The address queries go to.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// The zone file served.
    pub fn zone_path(&self) -> &Path {
        &self.zone_path
    }

    /// Whether [`DnsServer::start`] was called before.
    pub fn has_tried_to_bind(&self) -> bool {
        self.tried
    }

    /// Binds UDP and TCP and starts answering. A failure leaves the server
    /// down (call again to retry) and nothing half-bound.
    pub async fn start(&mut self) -> Result<(), DnsError> {
        if self.running.is_some() {
            return Ok(());
        }
        self.tried = true;
        let addr = self.listen;
        let bind_error = |transport| {
            move |source| DnsError::Bind {
                addr,
                transport,
                source,
            }
        };
        let (udp, tcp) = match self.inherited.take() {
            Some((udp, tcp)) => {
                tcp.set_nonblocking(true).map_err(bind_error("tcp"))?;
                (udp, TcpListener::from_std(tcp).map_err(bind_error("tcp"))?)
            }
            None => {
                let udp = std::net::UdpSocket::bind(addr).map_err(bind_error("udp"))?;
                widen_receive_buffer(&udp);
                (udp, TcpListener::bind(addr).await.map_err(bind_error("tcp"))?)
            }
        };
        udp.set_read_timeout(Some(UDP_WAKE_UP))
            .map_err(bind_error("udp"))?;
        let udp =
            UdpThread::spawn(udp, self.cell.clone(), self.metrics.clone()).map_err(bind_error("udp"))?;
        let tcp = tcp::TcpServer::start(tcp, self.cell.clone(), self.metrics.clone());
        self.running = Some(Running { udp, tcp });
        tracing::info!("dns: answering for {} on {addr} (udp and tcp)", self.zone);
        Ok(())
    }

    /// Stops answering.
    pub async fn shutdown(&mut self) {
        self.stop(true).await;
    }

    /// Takes a predecessor's UDP socket and TCP listener for the next
    /// [`DnsServer::start`]: queries go on being answered across a restart.
    pub fn adopt(&mut self, udp: OwnedFd, tcp: OwnedFd) {
        self.inherited = Some((udp.into(), tcp.into()));
    }

    /// The UDP and TCP descriptors while answering, for a successor.
    pub fn fds(&self) -> Option<(RawFd, RawFd)> {
        let running = self.running.as_ref()?;
        Some((running.udp.socket.as_raw_fd(), running.tcp.fd()))
    }

    /// Stops answering on sockets a successor now answers on: nothing is
    /// shut down, this process only lets go of its copies.
    pub async fn release(&mut self) {
        self.stop(false).await;
    }

    async fn stop(&mut self, wake: bool) {
        if let Some(running) = self.running.take() {
            running.udp.stop(wake).await;
            running.tcp.stop().await;
        }
    }
}

/// How long the UDP loop blocks in recvfrom before it looks whether it
/// should stop (after a handover, when it cannot be woken).
const UDP_WAKE_UP: Duration = Duration::from_millis(200);

/// Receive buffer asked for the UDP socket (the kernel caps it at
/// net.core.rmem_max). The default (about 200 KiB, some 270 queries with
/// their overhead) overflowed during short stalls under dnsperf's 400
/// outstanding queries, and an overflow is a lost query.
const UDP_RECEIVE_BUFFER: libc::c_int = 4 * 1024 * 1024;

fn widen_receive_buffer(socket: &std::net::UdpSocket) {
    use std::os::fd::AsRawFd;
    let size = UDP_RECEIVE_BUFFER;
    // SAFETY: setsockopt on a socket we own, with a c_int option value.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result != 0 {
        tracing::debug!(
            "dns: cannot widen the UDP receive buffer: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Largest query read; anything longer is cut and answered FORMERR.
const MAX_QUERY: usize = 4096;

/// Answers UDP queries until `stop` is set (and the socket shut down).
fn serve_udp(socket: &std::net::UdpSocket, stop: &AtomicBool, cell: &ZoneCell, metrics: &QueryMetrics) {
    let mut query = vec![0u8; MAX_QUERY];
    let mut response = Vec::with_capacity(MAX_QUERY);
    let mut version = cell.version();
    let mut served = cell.current();
    let mut queries: u32 = 0;
    while !stop.load(Ordering::Acquire) {
        let (len, peer) = match receive(socket, &mut query) {
            Ok(Some(received)) => received,
            // Woken by shutdown(2) (no datagram, no peer): look at `stop`.
            Ok(None) => continue,
            // The receive timeout: look at `stop`.
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(err) => {
                if !stop.load(Ordering::Acquire) {
                    // A lasting error must not spin the thread.
                    tracing::debug!("dns: udp receive failed: {err}");
                    std::thread::sleep(Duration::from_millis(1));
                }
                continue;
            }
        };
        queries = queries.wrapping_add(1);
        let started = queries.is_multiple_of(LATENCY_SAMPLE).then(Instant::now);
        if peer.port() == 0 {
            continue;
        }
        if cell.version() != version {
            version = cell.version();
            served = cell.current();
        }
        let Some(answered) = wire::respond(&served, &query[..len], &mut response, Transport::Udp) else {
            continue;
        };
        if let Err(err) = socket.send_to(&response, peer) {
            tracing::debug!("dns: cannot answer {peer}: {err}");
            continue;
        }
        metrics.record(answered, "udp", started.map(|s| s.elapsed()));
    }
}

/// One datagram and its sender; `None` when recvfrom returned without one
/// (as it does once [`UdpThread::stop`] shut the socket down).
///
/// Not `std::net::UdpSocket::recv_from`: std decodes the sender address
/// with an assertion on its length, and the address left behind by a
/// shutdown wake-up (length 0, family of the previous datagram) made it
/// panic on every stop after a query. socket2 hands back the address as
/// the kernel filled it in, and an empty one decodes to nothing.
fn receive(socket: &std::net::UdpSocket, buffer: &mut [u8]) -> std::io::Result<Option<(usize, SocketAddr)>> {
    // SAFETY: `buffer` is initialised; recvfrom only writes bytes into it,
    // never uninitialised ones, which is what MaybeUninit<u8> permits.
    let uninit = unsafe { &mut *(buffer as *mut [u8] as *mut [std::mem::MaybeUninit<u8>]) };
    let (len, from) = socket2::SockRef::from(socket).recv_from(uninit)?;
    Ok(from.as_socket().map(|peer| (len, peer)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_shutdown_after_a_query_wakes_the_receiver_with_nothing_and_no_panic() {
        let socket = Arc::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
        let addr = socket.local_addr().unwrap();
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let receiver = std::thread::spawn({
            let socket = socket.clone();
            move || {
                let mut buffer = [0u8; 512];
                first_tx.send(receive(&socket, &mut buffer).unwrap()).unwrap();
                receive(&socket, &mut buffer).unwrap()
            }
        });
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"query", addr).unwrap();
        let first = first_rx.recv().unwrap();
        assert_eq!(first, Some((5, client.local_addr().unwrap())));
        // The receiver blocks again (or is about to): shut down until it
        // has returned, as UdpThread::stop does once.
        while !receiver.is_finished() {
            // SAFETY: shutdown(2) on a socket this test keeps open.
            unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) };
            std::thread::yield_now();
        }
        let woken = receiver.join().expect("the receiver does not panic");
        assert_eq!(woken, None);
    }
}
