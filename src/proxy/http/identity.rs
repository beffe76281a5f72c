//! Who a request is and where it came from, as it leaves the proxy:
//! `x-request-id` (kept, or made), W3C trace context (`traceparent` with a
//! new span id for this hop, `tracestate` kept), and the client's address
//! appended to `x-forwarded-for` and `forwarded`.

use crate::proxy::balance::random;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use std::net::IpAddr;

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// What the access log records of a request's identity.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub request_id: String,
    pub trace_id: String,
}

/// Sets the identity headers of a request about to be forwarded from `client`.
pub fn stamp(headers: &mut HeaderMap, client: IpAddr) -> Identity {
    let request_id = match headers.get(&REQUEST_ID).and_then(|v| v.to_str().ok()) {
        Some(id) if !id.is_empty() => id.to_string(),
        _ => {
            let id = new_request_id();
            headers.insert(
                REQUEST_ID.clone(),
                HeaderValue::from_str(&id).expect("hex is a valid header value"),
            );
            id
        }
    };
    let parent = headers
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent);
    let (trace_id, flags) = match parent {
        Some((trace_id, flags)) => (trace_id.to_string(), flags.to_string()),
        None => {
            // A new trace: whatever tracestate came without a valid parent
            // belongs to nothing.
            headers.remove("tracestate");
            (format!("{:016x}{:016x}", nonzero(), random()), "00".to_string())
        }
    };
    let traceparent = format!("00-{trace_id}-{:016x}-{flags}", nonzero());
    headers.insert(
        TRACEPARENT.clone(),
        HeaderValue::from_str(&traceparent).expect("hex is a valid header value"),
    );
    append(headers, &X_FORWARDED_FOR, &client.to_string());
    let node = match client {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("\"[{ip}]\""),
    };
    append(headers, &FORWARDED, &format!("for={node};proto=http"));
    Identity { request_id, trace_id }
}

/// Appends `value` to a comma-separated header, folding what is there.
fn append(headers: &mut HeaderMap, name: &HeaderName, value: &str) {
    let existing: Vec<&str> = headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let folded = if existing.is_empty() {
        value.to_string()
    } else {
        format!("{}, {value}", existing.join(", "))
    };
    if let Ok(folded) = HeaderValue::from_str(&folded) {
        headers.insert(name.clone(), folded);
    }
}

/// A version-00 traceparent's trace id and flags, if it is well formed
/// (lowercase hex, ids not all zero).
fn parse_traceparent(value: &str) -> Option<(&str, &str)> {
    let mut parts = value.trim().split('-');
    let (version, trace_id, parent_id, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let valid = version == "00"
        && parts.next().is_none()
        && hex(trace_id, 32)
        && hex(parent_id, 16)
        && hex(flags, 2)
        && trace_id.bytes().any(|b| b != b'0')
        && parent_id.bytes().any(|b| b != b'0');
    valid.then_some((trace_id, flags))
}

/// A random id that is never zero (zero ids are invalid in trace context).
fn nonzero() -> u64 {
    random() | 1
}

/// A random version-4 UUID, the usual shape of a request id.
fn new_request_id() -> String {
    let (high, low) = (random(), random());
    let high = (high & !0xf000) | 0x4000;
    let low = (low & !(0b11 << 62)) | (0b10 << 62);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        high >> 32,
        (high >> 16) & 0xffff,
        high & 0xffff,
        low >> 48,
        low & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_without_identity_gets_one() {
        let mut headers = HeaderMap::new();
        headers.insert("tracestate", HeaderValue::from_static("orphan=1"));
        let identity = stamp(&mut headers, "127.0.0.9".parse().unwrap());
        assert_eq!(identity.request_id.len(), 36);
        assert_eq!(headers[&REQUEST_ID], identity.request_id.as_str());
        let traceparent = headers[&TRACEPARENT].to_str().unwrap();
        let (trace_id, flags) = parse_traceparent(traceparent).expect(traceparent);
        assert_eq!((trace_id, flags), (identity.trace_id.as_str(), "00"));
        assert!(headers.get("tracestate").is_none());
        assert_eq!(headers["x-forwarded-for"], "127.0.0.9");
        assert_eq!(headers["forwarded"], "for=127.0.0.9;proto=http");
    }

    #[test]
    fn an_incoming_identity_is_kept_with_a_new_span_for_this_hop() {
        let mut headers = HeaderMap::new();
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        headers.insert("traceparent", HeaderValue::from_static(parent));
        headers.insert("tracestate", HeaderValue::from_static("congo=t61rcWkgMzE"));
        headers.insert("x-request-id", HeaderValue::from_static("abc"));
        headers.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        let identity = stamp(&mut headers, "127.0.0.9".parse().unwrap());
        assert_eq!(identity.request_id, "abc");
        assert_eq!(identity.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        let traceparent = headers["traceparent"].to_str().unwrap();
        assert!(
            traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{traceparent}"
        );
        assert!(traceparent.ends_with("-01"), "{traceparent}");
        assert_ne!(traceparent, parent, "a new span id");
        assert_eq!(headers["tracestate"], "congo=t61rcWkgMzE");
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1, 127.0.0.9");
    }

    #[test]
    fn malformed_traceparents_start_a_new_trace() {
        for bad in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f-00f067aa0ba902b7-01",
            "garbage",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
    }
}
