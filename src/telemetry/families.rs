//! Every metric loopmesh exports, in one table: name, type, labels, when
//! it is present and its HELP text. The recorder gets its descriptions
//! from here, the series rendered at scrape time their HELP and TYPE, and
//! tests hold the README's metric table and every `counter!`, `gauge!` and
//! `histogram!` in the sources to it, so none of them can drift.

/// A metric's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Which daemon exports a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Daemon {
    Agent,
    Registrar,
    Both,
}

/// When a metric's series exist, and who keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Present {
    /// In the recorder, at zero from the daemon's start
    /// ([`super::register`]).
    Start,
    /// In the recorder, registered by the part that knows its labels when
    /// that part starts (the DNS server, the mesh...).
    With(&'static str),
    /// Rendered at scrape time from the service's own state, for every
    /// service used on this node: from its first connection (or failure to
    /// bind), all at once and at zero; gone when the service is deleted.
    /// Not from when it appears in the table: every node's table lists
    /// every service of the fleet, and most are never used on a node.
    Service,
    /// As [`Present::Service`], for services with `protocol: http`.
    HttpService,
    /// Rendered at scrape time for every backend of a service in use (its
    /// backends are compiled at its first connection, all at once, at
    /// zero): gone when the backend or the service is.
    Backend,
    /// As [`Present::Backend`], for services with `protocol: http`.
    HttpBackend,
    /// Rendered at scrape time for every instance the registrar checks.
    Instance,
    /// Read from `/proc` at each scrape.
    Scraped,
}

impl Present {
    /// Whether the series live in the recorder (so the recorder needs the
    /// description) rather than being rendered at scrape time.
    pub fn in_recorder(self) -> bool {
        matches!(self, Present::Start | Present::With(_))
    }

    /// As the README's table says it.
    pub fn describe(self) -> String {
        match self {
            Present::Start | Present::Scraped => "start".into(),
            Present::With(what) => format!("with {what}"),
            Present::Service => "per service".into(),
            Present::HttpService => "per HTTP service".into(),
            Present::Backend => "per backend".into(),
            Present::HttpBackend => "per HTTP backend".into(),
            Present::Instance => "per instance".into(),
        }
    }
}

/// One metric.
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub daemon: Daemon,
    pub present: Present,
    pub help: &'static str,
}

impl Family {
    /// Whether `daemon` exports it.
    pub fn of(&self, daemon: Daemon) -> bool {
        self.daemon == daemon || self.daemon == Daemon::Both
    }
}

macro_rules! families {
    ($($constant:ident: $kind:ident $name:literal [$($label:literal),*] $daemon:ident $present:expr, $help:literal;)*) => {
        $(
            pub const $constant: Family = Family {
                name: $name,
                kind: Kind::$kind,
                labels: &[$($label),*],
                daemon: Daemon::$daemon,
                present: $present,
                help: $help,
            };
        )*
        /// Every metric, in the README's order.
        pub const ALL: &[&Family] = &[$(&$constant),*];
    };
}

use Present::*;

families! {
    BUILD_INFO: Gauge "loopmesh_build_info" ["version", "commit"] Both Start,
        "Always 1; the labels say which build runs (the version and the git commit it was built from).";
    PROCESS_CPU_SECONDS_TOTAL: Counter "process_cpu_seconds_total" [] Both Scraped,
        "CPU time the process used, user and system, in seconds.";
    PROCESS_RESIDENT_MEMORY_BYTES: Gauge "process_resident_memory_bytes" [] Both Scraped,
        "Resident memory of the process, in bytes.";
    PROCESS_VIRTUAL_MEMORY_BYTES: Gauge "process_virtual_memory_bytes" [] Both Scraped,
        "Virtual memory of the process, in bytes.";
    PROCESS_OPEN_FDS: Gauge "process_open_fds" [] Both Scraped,
        "File descriptors the process has open.";
    PROCESS_MAX_FDS: Gauge "process_max_fds" [] Both Scraped,
        "The process's limit of open file descriptors (the soft RLIMIT_NOFILE).";
    PROCESS_START_TIME_SECONDS: Gauge "process_start_time_seconds" [] Both Scraped,
        "When the process started, in seconds since the Unix epoch.";
    CONNECTION_BUDGET: Gauge "loopmesh_connection_budget" ["purpose"] Both With("its listener"),
        "Connections that may be open at once, by purpose (proxy: the data plane; admin: this API).";
    CONNECTION_BUDGET_EXHAUSTED_TOTAL: Counter "loopmesh_connection_budget_exhausted_total" ["purpose"] Both With("its listener"),
        "Times a listener found every connection slot of its purpose taken and left new connections in the kernel's backlog.";

    STORE_UNREACHABLE_TOTAL: Counter "loopmesh_store_unreachable_total" [] Agent Start,
        "Failed attempts to reach the catalog store, retries included; meanwhile the last known good files are served.";
    STORE_ERRORS_TOTAL: Counter "loopmesh_store_errors_total" [] Agent Start,
        "etcd errors that ended the catalog watch (it is set up again).";
    STORE_RESYNCS_TOTAL: Counter "loopmesh_store_resyncs_total" ["reason"] Agent Start,
        "Fresh catalog snapshots taken because etcd compacted the history the watch needed (reason: compacted).";
    CATALOG_REVISION: Gauge "loopmesh_catalog_revision" [] Agent Start,
        "The catalog revision the agent has applied.";
    CATALOG_INVALID_KEYS: Gauge "loopmesh_catalog_invalid_keys" [] Agent Start,
        "Catalog keys whose value is refused now (listed in /catalog).";
    CATALOG_STALE: Gauge "loopmesh_catalog_stale" [] Agent Start,
        "1 while the store is unreachable and the last known good state is served, else 0.";
    CATALOG_EMPTIED_TOTAL: Counter "loopmesh_catalog_emptied_total" [] Agent Start,
        "Times the catalog went from some services to none (usually a wrong prefix or directory).";
    CATALOG_ADDRESS_CONFLICTS_TOTAL: Counter "loopmesh_catalog_address_conflicts_total" [] Agent Start,
        "Addresses claimed by two services; only the earlier claim is served.";
    CATALOG_INVALID_VALUES_TOTAL: Counter "loopmesh_catalog_invalid_values_total" [] Agent Start,
        "Catalog values refused because they do not parse or validate.";
    ADDRESS_ALLOCATION_FAILURES_TOTAL: Counter "loopmesh_address_allocation_failures_total" [] Agent Start,
        "Passes in which addresses for new services could not be allocated (retried).";
    ADDRESS_ALLOCATION_RETRIES_TOTAL: Counter "loopmesh_address_allocation_retries_total" [] Agent Start,
        "Address allocations tried again because another agent changed the addresses first.";
    RENDER_PASSES_TOTAL: Counter "loopmesh_render_passes_total" [] Agent Start,
        "Render passes run.";
    RENDER_FAILURES_TOTAL: Counter "loopmesh_render_failures_total" [] Agent Start,
        "Files that failed to render, check or reload; each keeps its previous version.";
    RENDER_DURATION_SECONDS: Histogram "loopmesh_render_duration_seconds" [] Agent Start,
        "Time taken by each render pass, in seconds.";
    TAKEOVERS_TOTAL: Counter "loopmesh_takeovers_total" [] Agent Start,
        "Takeovers in which this agent handed its sockets to a successor.";

    PROXY_LISTENERS: Gauge "loopmesh_proxy_listeners" [] Agent Start,
        "Services listening.";
    PROXY_LISTENERS_FAILED: Gauge "loopmesh_proxy_listeners_failed" [] Agent Start,
        "Services that cannot listen (their address is taken or cannot be bound).";
    PROXY_RELOADS_TOTAL: Counter "loopmesh_proxy_reloads_total" [] Agent Start,
        "Routing table changes applied to the data plane.";
    PROXY_TABLE_REFUSALS_TOTAL: Counter "loopmesh_proxy_table_refusals_total" [] Agent Start,
        "Routing tables or route files refused by validation; the running data plane stays.";
    PROXY_ROUTE_REFUSALS_TOTAL: Counter "loopmesh_proxy_route_refusals_total" [] Agent Start,
        "Routes refused because their address is another service's; the service keeps its previous route.";
    PROXY_CONGESTION_CONTROL_FAILURES_TOTAL: Counter "loopmesh_proxy_congestion_control_failures_total" [] Agent Start,
        "1 once proxy.loopback_congestion could not be set on a loopback connection (said once; those keep the system default).";
    PROXY_KERNEL_FORWARDING: Gauge "loopmesh_proxy_kernel_forwarding" [] Agent Start,
        "1 when connections are forwarded in the kernel (sockmap), 0 when they are copied in user space.";
    PROXY_KERNEL_CONNECTIONS: Gauge "loopmesh_proxy_kernel_connections" [] Agent Start,
        "Connections forwarded in the kernel now.";
    PROXY_KERNEL_DEFERRED_TOTAL: Counter "loopmesh_proxy_kernel_deferred_total" [] Agent Start,
        "Connections ready for forwarding in the kernel that stayed in user space because the proxy was busy.";
    HTTP_ACCESS_LOG_WRITE_ERRORS_TOTAL: Counter "loopmesh_http_access_log_write_errors_total" [] Agent Start,
        "Failed writes of access log lines.";
    HTTP_ACCESS_LOG_DROPPED_TOTAL: Counter "loopmesh_http_access_log_dropped_total" [] Agent Start,
        "Access log lines dropped because the writer lagged.";

    PROXY_CONNECTIONS_TOTAL: Counter "loopmesh_proxy_connections_total" ["service"] Agent Service,
        "Client connections accepted and served (not refused by max_connections).";
    PROXY_CONNECTIONS_ACTIVE: Gauge "loopmesh_proxy_connections_active" ["service"] Agent Service,
        "Client connections open now.";
    PROXY_CONNECT_DURATION_SECONDS: Histogram "loopmesh_proxy_connect_duration_seconds" ["service"] Agent Service,
        "Time to connect to a backend, for connects that succeeded, in seconds.";
    PROXY_BYTES_TOTAL: Counter "loopmesh_proxy_bytes_total" ["service", "direction"] Agent Service,
        "Bytes copied by TCP services, by direction (to_backend, to_client), counted when each connection ends.";
    PROXY_REFUSED_TOTAL: Counter "loopmesh_proxy_refused_total" ["service", "reason"] Agent Service,
        "Client connections refused: max_connections (the circuit breaker), no_backend (none up), connect_failed (no backend answered).";
    PROXY_IDLE_TIMEOUTS_TOTAL: Counter "loopmesh_proxy_idle_timeouts_total" ["service"] Agent Service,
        "Connections closed after idle_timeout without traffic.";
    PROXY_DRAIN_KILLS_TOTAL: Counter "loopmesh_proxy_drain_kills_total" ["service"] Agent Service,
        "Connections closed at the drain deadline (a removed service, a stopping agent).";
    PROXY_ACCEPT_ERRORS_TOTAL: Counter "loopmesh_proxy_accept_errors_total" ["service"] Agent Service,
        "Failed accepts (out of file descriptors and the like).";
    PROXY_BIND_FAILURES_TOTAL: Counter "loopmesh_proxy_bind_failures_total" ["service"] Agent Service,
        "Failed attempts to bind the service's address (retried every 2 s).";
    HTTP_REQUESTS_TOTAL: Counter "loopmesh_http_requests_total" ["service", "code_class"] Agent HttpService,
        "HTTP requests answered, by status class (1xx to 5xx), the proxy's own answers included.";
    HTTP_REQUEST_DURATION_SECONDS: Histogram "loopmesh_http_request_duration_seconds" ["service"] Agent HttpService,
        "Time from an HTTP request's arrival to the end of its response, in seconds.";
    HTTP_RETRIES_TOTAL: Counter "loopmesh_http_retries_total" ["service"] Agent HttpService,
        "HTTP requests sent again, to another backend (retries allowed by the budget).";
    HTTP_REFUSED_TOTAL: Counter "loopmesh_http_refused_total" ["service", "reason"] Agent HttpService,
        "HTTP requests the proxy answered itself, by reason (no_healthy_backend, max_requests, connect_failed, request_timeout...).";
    HTTP_UPSTREAM_CONNECTIONS: Gauge "loopmesh_http_upstream_connections" ["service"] Agent HttpService,
        "Connections open to the service's backends (pooled, busy or upgraded).";

    BACKEND_CONNECTIONS_TOTAL: Counter "loopmesh_backend_connections_total" ["service", "backend"] Agent Backend,
        "Connections made to the backend: one per client connection for TCP services, pooled upstream connections for HTTP.";
    BACKEND_ACTIVE: Gauge "loopmesh_backend_active" ["service", "backend"] Agent Backend,
        "Connections open to the backend (TCP services) or requests in flight to it (HTTP), as balancing counts them.";
    BACKEND_BYTES_TOTAL: Counter "loopmesh_backend_bytes_total" ["service", "backend", "direction"] Agent Backend,
        "Bytes copied between clients and the backend by TCP services, by direction (to_backend, to_client), counted when each connection ends.";
    BACKEND_CONNECT_ERRORS_TOTAL: Counter "loopmesh_backend_connect_errors_total" ["service", "backend", "kind"] Agent Backend,
        "Failed connects to the backend, by kind (refused, reset, timeout, denied, unreachable, other).";
    BACKEND_EJECTIONS_TOTAL: Counter "loopmesh_backend_ejections_total" ["service", "backend"] Agent Backend,
        "Times outlier detection ejected the backend.";
    BACKEND_REQUESTS_TOTAL: Counter "loopmesh_backend_requests_total" ["service", "backend"] Agent HttpBackend,
        "HTTP requests sent to the backend, each attempt (retries included).";

    DNS_BIND_FAILURES_TOTAL: Counter "loopmesh_dns_bind_failures_total" [] Agent Start,
        "Failed attempts to bind the DNS server's address (retried every 2 s).";
    DNS_QUERIES_TOTAL: Counter "loopmesh_dns_queries_total" ["transport", "type", "rcode"] Agent With("the DNS server"),
        "DNS queries answered, by transport, query type and response code.";
    DNS_QUERY_DURATION_SECONDS: Histogram "loopmesh_dns_query_duration_seconds" ["transport"] Agent With("the DNS server"),
        "Time to answer a DNS query, in seconds; over UDP one query in 64 is sampled (recording each costs memory at high rates), over TCP every one.";
    DNS_TRUNCATED_TOTAL: Counter "loopmesh_dns_truncated_total" [] Agent Start,
        "UDP answers sent truncated (TC) because they did not fit; the client asks again over TCP.";
    DNS_RELOADS_TOTAL: Counter "loopmesh_dns_reloads_total" [] Agent Start,
        "Zone files loaded and swapped in.";
    DNS_RELOAD_FAILURES_TOTAL: Counter "loopmesh_dns_reload_failures_total" [] Agent Start,
        "Zone files refused (unreadable or invalid); the zone already served stays.";
    DNS_ZONE_RECORDS: Gauge "loopmesh_dns_zone_records" [] Agent Start,
        "Records in the zone served.";
    DNS_ZONE_SERIAL: Gauge "loopmesh_dns_zone_serial" [] Agent Start,
        "SOA serial of the zone served.";

    MESH_PEER_CONNECTIONS_TOTAL: Counter "loopmesh_mesh_peer_connections_total" [] Agent Start,
        "mTLS connections made to peer nodes.";
    MESH_INBOUND_CONNECTIONS_TOTAL: Counter "loopmesh_mesh_inbound_connections_total" [] Agent Start,
        "mTLS connections the inbound listener accepted (handshake done).";
    MESH_HANDSHAKE_FAILURES_TOTAL: Counter "loopmesh_mesh_handshake_failures_total" [] Agent Start,
        "Inbound mTLS handshakes that failed or timed out.";
    MESH_CERT_EXPIRY_TIMESTAMP_SECONDS: Gauge "loopmesh_mesh_cert_expiry_timestamp_seconds" [] Agent With("mTLS configured"),
        "When the node's mesh certificate expires, in seconds since the Unix epoch.";
    MESH_INBOUND_STREAMS_TOTAL: Counter "loopmesh_mesh_inbound_streams_total" ["service"] Agent Service,
        "Streams from peers through the inbound listener to this node's backends of the service.";
    MESH_DENIED_TOTAL: Counter "loopmesh_mesh_denied_total" ["service", "caller"] Agent Service,
        "Inbound mTLS streams refused because the caller is not in the service's allow list (a series per caller, from its first refusal).";

    REGISTRAR_REGISTERED: Gauge "loopmesh_registrar_registered" ["service", "instance"] Registrar Instance,
        "1 while the instance passes its checks and is registered, else 0.";
    REGISTRAR_CHECKS_TOTAL: Counter "loopmesh_registrar_checks_total" ["service", "instance", "result"] Registrar Instance,
        "Health checks run, by result (pass, fail).";
    REGISTRAR_CHECK_DURATION_SECONDS: Histogram "loopmesh_registrar_check_duration_seconds" ["service", "instance"] Registrar Instance,
        "Time each health check took, in seconds.";
    REGISTRAR_LEASE_GRANTS_TOTAL: Counter "loopmesh_registrar_lease_grants_total" [] Registrar Start,
        "etcd leases granted to the registrar.";
    REGISTRAR_KEEPALIVE_FAILURES_TOTAL: Counter "loopmesh_registrar_keepalive_failures_total" [] Registrar Start,
        "Lease keep-alives that failed (retried; the lease lives on until its TTL).";
    REGISTRAR_LEASES_LOST_TOTAL: Counter "loopmesh_registrar_leases_lost_total" [] Registrar Start,
        "Leases found gone (expired or revoked); every instance is registered again under a new one.";
    REGISTRAR_STORE_ERRORS_TOTAL: Counter "loopmesh_registrar_store_errors_total" [] Registrar Start,
        "Failed writes and calls to the store (retried).";
    REGISTRAR_CONFIG_ERRORS_TOTAL: Counter "loopmesh_registrar_config_errors_total" [] Registrar Start,
        "Service files refused on reload; the previous backends stay.";
}
