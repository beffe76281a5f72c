//! The direct path of HTTP/2 requests, as the HTTP/1.1 fast path is for
//! HTTP/1.1 ones: a bodiless request to a service whose backends speak
//! HTTP/1.1 goes upstream as bytes written straight from its decoded
//! header block, and the backend's response head comes back HPACK-encoded
//! straight from the bytes it sent; no `HeaderMap`, no `Request` between.
//! Anything it does not take (a body, CONNECT, HTTP/2 backends, a field
//! it would have to check more closely) goes through `super::super::handle`.

use super::hpack::{self, Fields};
use crate::policy::UpstreamProtocol;
use crate::proxy::http::body::ResponseBody;
use crate::proxy::http::h1::{self, Bodiless, Known, Tries, Upstream, MAX_HEADERS};
use crate::proxy::http::route::Head;
use crate::proxy::http::{refuse, request_hash, Begun, Client, Exchange, Logged, Refusal};
use crate::proxy::service::ServiceState;
use hyper::Method;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

/// A request the direct path takes, its upstream head written.
pub(super) struct Prepared {
    state: Arc<ServiceState>,
    /// `None`: its route sends it to a service this node does not know.
    target: Option<Arc<ServiceState>>,
    among: Option<Vec<usize>>,
    key: u64,
    method: Method,
    up: Vec<u8>,
    logged: Option<Logged>,
    started: Instant,
}

/// A request's fields as routing reads them.
struct View<'a> {
    method: &'a str,
    path: &'a str,
    fields: &'a Fields,
    /// Index of the first regular field (after the pseudo-headers).
    regular: usize,
}

impl Head for View<'_> {
    fn method(&self) -> &str {
        self.method
    }

    fn path(&self) -> &str {
        self.path.split_once('?').map_or(self.path, |(path, _)| path)
    }

    fn any_header(&self, name: &str, test: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        self.fields
            .iter()
            .skip(self.regular)
            .filter(|(n, _)| *n == name.as_bytes())
            .any(|(_, value)| test(value))
    }
}

/// A token character (RFC 9110 5.6.2), lowercase for names.
fn token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Bytes that may not be in a field value (RFC 9113 8.2.1).
fn bad_in_value(b: &u8) -> bool {
    matches!(b, 0 | b'\r' | b'\n')
}

/// Reads a bodiless request's decoded fields for the direct path and
/// writes what goes upstream; `None` when the direct path does not take
/// it (the general path builds, and checks, a `Request` instead).
pub(super) fn prepare(
    fields: &Fields,
    client: &Client,
    forwarded_for: &[u8],
    forwarded: &[u8],
) -> Option<Prepared> {
    let started = Instant::now();
    let state = client.cell.current();
    let http = &state.spec.http;
    if http.upstream_protocol != UpstreamProtocol::Http1 {
        return None;
    }
    let (mut method, mut path, mut authority, mut scheme) = (None, None, None, false);
    let mut regular = fields.fields.len();
    for (i, (name, value)) in fields.iter().enumerate() {
        match name {
            b":method" if method.is_none() => method = Some(value),
            b":path" if path.is_none() => path = Some(value),
            b":authority" if authority.is_none() => authority = Some(value),
            b":scheme" if !scheme => scheme = true,
            _ if name.first() == Some(&b':') => return None,
            _ => {
                regular = i;
                break;
            }
        }
    }
    let method = std::str::from_utf8(method?)
        .ok()
        .filter(|m| !m.is_empty() && m.bytes().all(token))?;
    let path = std::str::from_utf8(path?)
        .ok()
        .filter(|p| p.starts_with('/') && p.bytes().all(|b| b > b' ' && b != 0x7f))?;
    if method == "CONNECT" || !scheme || authority.is_some_and(|a| a.iter().any(|&b| b <= b' ' || b == 0x7f))
    {
        return None;
    }
    let mut cookies = 0;
    let mut trailers = false;
    // Each field read and classified once; more than the HTTP/1.1 fast
    // path takes go the general way.
    let mut regular_fields = [("", &b""[..], Known::Other); MAX_HEADERS];
    let mut count = 0;
    for (name, value) in fields.iter().skip(regular) {
        let lowercase_token = |b: &u8| token(*b) && !b.is_ascii_uppercase();
        if name.is_empty() || !name.iter().all(lowercase_token) || value.iter().any(bad_in_value) {
            return None;
        }
        let name = std::str::from_utf8(name).ok()?;
        let kind = Known::of(name);
        *regular_fields.get_mut(count)? = (name, value, kind);
        count += 1;
        match kind {
            Known::Connection
            | Known::HopByHop
            | Known::TransferEncoding
            | Known::Upgrade
            | Known::Expect => return None,
            Known::Te if value != b"trailers" => return None,
            Known::Te => trailers = true,
            Known::ContentLength if value != b"0" => return None,
            // Split by the client, one header for HTTP/1.1: the general path joins them.
            Known::Other if name == "cookie" => {
                cookies += 1;
                if cookies > 1 {
                    return None;
                }
            }
            _ => {}
        }
    }
    let view = View {
        method,
        path,
        fields,
        regular,
    };
    let (target, among) = h1::route_http1(&state, &view)?;
    let key = request_hash(http, &view, client.peer);
    let mut up = Vec::with_capacity(512);
    h1::request_line(&mut up, method, path);
    let logging = http.access_log || state.context.access_log_all;
    let identity = h1::write_fields(
        &mut up,
        regular_fields[..count].iter().copied(),
        Upstream {
            authority,
            service: state.address,
            trailers,
            forwarded_for,
            forwarded,
            logging,
        },
    );
    up.extend_from_slice(b"\r\n");
    let logged = identity.map(|identity| Logged {
        path: view.path().into(),
        identity,
    });
    Some(Prepared {
        method: Method::from_bytes(method.as_bytes()).ok()?,
        state,
        target,
        among,
        key,
        up,
        logged,
        started,
    })
}

/// Sends a prepared request and answers with the response head as an
/// HPACK block, and its body.
pub(super) async fn send(prepared: Prepared) -> (Vec<u8>, ResponseBody) {
    let Prepared {
        state,
        target,
        among,
        key,
        method,
        up,
        logged,
        started,
    } = prepared;
    let bytes_in = logged.is_some().then(|| Arc::new(AtomicU64::new(0)));
    let mut exchange = match Exchange::begin(&state, method.clone(), logged, started) {
        Begun::Admitted(exchange) => exchange,
        Begun::OverMaxRequests(exchange) => {
            return super::message::encode_response(refuse(Refusal::MaxRequests, Some(exchange)))
        }
    };
    exchange.bytes_in = bytes_in;
    let Some(target) = target else {
        return super::message::encode_response(refuse(Refusal::NoSuchService, Some(exchange)));
    };
    let Ok(backends) = target.backends() else {
        return super::message::encode_response(refuse(Refusal::NoHealthyBackend, Some(exchange)));
    };
    let tries = Tries {
        state: &state,
        target: &target,
        backends,
        among: among.as_deref(),
        key,
        method: &method,
        bodiless: true,
        head_request: method == Method::HEAD,
        started,
    };
    let answer = h1::exchange_bodiless(tries, up, exchange, |status, fields| {
        let mut block = Vec::with_capacity(128);
        hpack::encode_status(&mut block, status);
        for field in fields {
            let kind = Known::of(field.name);
            // The body comes unframed: HTTP/2 frames it.
            if !kind.hop_by_hop_in_response() && kind != Known::TransferEncoding {
                hpack::encode_field(&mut block, field.name, field.value);
            }
        }
        block
    })
    .await;
    match answer {
        Bodiless::Answered(block, body) => (block, body),
        Bodiless::Refused(response) => super::message::encode_response(response),
    }
}
