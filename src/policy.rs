//! The HTTP part of a service's traffic policy (`http:` in a service value,
//! for `protocol: http` services): timeouts, retries and their budget,
//! upstream pools, routes and weighted splits, request hashing, limits and
//! the access log. Part of the one schema ([`crate::catalog::ServiceSpec`]):
//! strict here, shared by the catalog value and the route file.

use crate::names::{check_service_name, Label};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// How a service's traffic between nodes is protected (`tls:`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsPolicy {
    /// `None`: the mesh-wide default (`mesh.default_mode`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<TlsMode>,
}

impl TlsPolicy {
    pub fn is_default(&self) -> bool {
        *self == TlsPolicy::default()
    }
}

/// Whether traffic between nodes goes through mTLS tunnels.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Only through the mesh: instances without a mesh address are not
    /// used, and the inbound listener is the only way in.
    Required,
    /// Through the mesh where an instance has a mesh address, directly
    /// where it has none; inbound accepts both (a fleet moving to mTLS).
    #[default]
    Permissive,
    /// Directly, never through the mesh.
    Off,
}

/// Checks an `allow` entry: a SPIFFE ID, or a glob of one.
pub fn check_allow_pattern(pattern: &str) -> Result<(), String> {
    let ok = pattern.starts_with("spiffe://") || pattern == "*";
    let chars = pattern
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._/:*".contains(&b));
    if ok && chars {
        Ok(())
    } else {
        Err(format!(
            "allow entry {pattern:?} must be a SPIFFE ID like spiffe://prod.mesh/node/web-1, or a glob of one (*)"
        ))
    }
}

/// Most other backends a connection or request may try after a failure.
pub const MAX_RETRIES: u32 = 16;

/// How a service's HTTP requests are handled.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpPolicy {
    /// What the backends speak: HTTP/1.1 (a keep-alive pool per backend) or
    /// HTTP/2 (one multiplexed connection per backend).
    pub upstream_protocol: UpstreamProtocol,
    /// Time for a whole request, retries included; past it: 504.
    #[serde(with = "crate::duration")]
    pub request_timeout: Duration,
    /// Time for one attempt (defaults to the request timeout).
    #[serde(with = "crate::duration::optional", skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    pub retry: RetryPolicy,
    /// Consistent hashing on a header or cookie instead of the client
    /// address (with `balance: consistent_hash`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<HashOn>,
    /// Ordered rules; the first that matches sends the request; none: every
    /// instance of the service.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<HttpRoute>,
    /// Requests in flight at once; the excess gets 503 at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Requests waiting for an upstream connection at once; the excess gets
    /// 503 at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Connections to one backend at most (HTTP/1.1 pools).
    pub max_connections_per_backend: u32,
    /// An idle pooled connection is closed after this long.
    #[serde(with = "crate::duration")]
    pub pool_idle_timeout: Duration,
    /// One JSON line per request to the proxy's access log.
    pub access_log: bool,
}

impl Default for HttpPolicy {
    fn default() -> Self {
        HttpPolicy {
            upstream_protocol: UpstreamProtocol::Http1,
            request_timeout: Duration::from_secs(15),
            per_try_timeout: None,
            retry: RetryPolicy::default(),
            hash_on: None,
            routes: Vec::new(),
            max_requests: None,
            max_pending_requests: None,
            max_connections_per_backend: 64,
            pool_idle_timeout: Duration::from_secs(90),
            access_log: false,
        }
    }
}

/// The protocol spoken to backends.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    Http2,
}

/// Retries of requests that failed on one backend, on another.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts after the first. A request that never reached a backend
    /// (connect failure) is always retried; one that did only if its
    /// method is idempotent and its body empty.
    pub attempts: u32,
    /// Response statuses retried (besides resets).
    pub statuses: Vec<u16>,
    /// Retries allowed as a share of requests, in percent, so a failing
    /// backend cannot multiply the load (linkerd2-proxy's and Envoy's
    /// retry budget)...
    pub budget_percent: u32,
    /// ...plus this many a second whatever the traffic.
    pub min_per_second: u32,
    /// Pause before a retry, doubling each time, with jitter.
    #[serde(with = "crate::duration")]
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 2,
            statuses: vec![502, 503, 504],
            budget_percent: 20,
            min_per_second: 10,
            backoff: Duration::from_millis(25),
        }
    }
}

/// What a request is hashed on.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
pub enum HashOn {
    Header(String),
    Cookie(String),
}

/// A routing rule: what it matches and where it sends.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpRoute {
    #[serde(rename = "match", default)]
    pub matches: RouteMatch,
    /// Weighted targets; one is drawn per request.
    pub to: Vec<Split>,
}

/// Conditions a request must meet, all of them (none: everything).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Header name (lowercase) → exact value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// One weighted target: the instances carrying every tag listed (none:
/// all of them), or another service.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Split {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<Label>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default = "default_split_weight")]
    pub weight: u32,
}

fn default_split_weight() -> u32 {
    1
}

/// Highest split weight.
pub const MAX_SPLIT_WEIGHT: u32 = 1_000_000;

fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl HttpPolicy {
    /// Whether nothing is set (then the route file leaves it out).
    pub fn is_default(&self) -> bool {
        *self == HttpPolicy::default()
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.request_timeout.is_zero() {
            return Err("http.request_timeout must be greater than zero".into());
        }
        if let Some(per_try) = self.per_try_timeout {
            if per_try.is_zero() || per_try > self.request_timeout {
                return Err(format!(
                    "http.per_try_timeout {} must be greater than zero and at most request_timeout {}",
                    crate::duration::format(per_try),
                    crate::duration::format(self.request_timeout)
                ));
            }
        }
        let retry = &self.retry;
        if retry.attempts > MAX_RETRIES {
            return Err(format!(
                "http.retry.attempts {} exceeds the limit of {MAX_RETRIES}",
                retry.attempts
            ));
        }
        if retry.budget_percent > 100 {
            return Err(format!(
                "http.retry.budget_percent {} exceeds 100",
                retry.budget_percent
            ));
        }
        if let Some(status) = retry.statuses.iter().find(|s| !(100..=599).contains(*s)) {
            return Err(format!("http.retry.statuses: {status} is not an HTTP status"));
        }
        if self.max_requests == Some(0) || self.max_pending_requests == Some(0) {
            return Err(
                "http.max_requests and max_pending_requests must be at least 1 (omit them for no limit)"
                    .into(),
            );
        }
        if self.max_connections_per_backend == 0 {
            return Err("http.max_connections_per_backend must be at least 1".into());
        }
        if self.pool_idle_timeout.is_zero() {
            return Err("http.pool_idle_timeout must be greater than zero".into());
        }
        match &self.hash_on {
            Some(HashOn::Header(name) | HashOn::Cookie(name)) if !is_token(name) => {
                return Err(format!("http.hash_on: {name:?} is not a header or cookie name"));
            }
            _ => {}
        }
        for (index, route) in self.routes.iter().enumerate() {
            route
                .validate()
                .map_err(|reason| format!("http.routes[{index}]: {reason}"))?;
        }
        Ok(())
    }
}

impl HttpRoute {
    fn validate(&self) -> Result<(), String> {
        let m = &self.matches;
        for path in m.path_exact.iter().chain(&m.path_prefix) {
            if !path.starts_with('/') {
                return Err(format!("path {path:?} must start with /"));
            }
        }
        if let Some(method) = &m.method {
            if !is_token(method) || method.bytes().any(|b| b.is_ascii_lowercase()) {
                return Err(format!("method {method:?} must be an uppercase token like GET"));
            }
        }
        for name in m.headers.keys() {
            if !is_token(name) || name.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(format!("header name {name:?} must be a lowercase token"));
            }
        }
        if self.to.is_empty() {
            return Err("to: needs at least one target".into());
        }
        let mut total: u64 = 0;
        for split in &self.to {
            if split.service.is_some() && !split.tags.is_empty() {
                return Err("a target names tags or a service, not both".into());
            }
            if let Some(service) = &split.service {
                check_service_name(service).map_err(|e| e.to_string())?;
            }
            if split.weight > MAX_SPLIT_WEIGHT {
                return Err(format!("weight {} exceeds {MAX_SPLIT_WEIGHT}", split.weight));
            }
            total += u64::from(split.weight);
        }
        if total == 0 {
            return Err("to: the weights add up to 0".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::catalog::parse_service;

    #[test]
    fn a_canary_split_and_a_header_route_parse() {
        let spec = parse_service(
            b"{port: 80, protocol: http, http: {routes: [{match: {headers: {x-canary: '1'}}, to: [{tags: [v2]}]}, {to: [{tags: [v2], weight: 5}, {tags: [v1], weight: 95}]}], hash_on: {header: x-user-id}}}",
        )
        .unwrap();
        assert_eq!(spec.http.routes.len(), 2);
        assert_eq!(spec.http.routes[1].to[1].weight, 95);
        assert_eq!(spec.http.retry.attempts, 2, "defaults fill what is left out");
    }

    #[test]
    fn bad_http_policies_are_refused_naming_the_field() {
        for (value, reason) in [
            (
                "{port: 80, http: {retry: {attempts: 99}}}",
                "http.retry.attempts 99",
            ),
            (
                "{port: 80, http: {request_timeout: 1s, per_try_timeout: 2s}}",
                "per_try_timeout 2s",
            ),
            (
                "{port: 80, http: {routes: [{to: []}]}}",
                "http.routes[0]: to: needs",
            ),
            ("{port: 80, http: {routes: [{to: [{weight: 0}]}]}}", "add up to 0"),
            (
                "{port: 80, http: {routes: [{match: {path_prefix: api}, to: [{}]}]}}",
                "must start with /",
            ),
            (
                "{port: 80, http: {routes: [{match: {headers: {X-A: b}}, to: [{}]}]}}",
                "lowercase token",
            ),
            ("{port: 80, http: {routes: [{to: [{service: Bad}]}]}}", "Bad"),
            ("{port: 80, http: {retires: {}}}", "retires"),
        ] {
            let err = parse_service(value.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(reason), "{value}: {err}");
        }
    }
}
