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

/// Sets the identity headers of a request about to be forwarded from
/// `client`; gives the request and trace ids when `keep` (for the access
/// log: otherwise nothing is copied out).
pub fn stamp(headers: &mut HeaderMap, client: IpAddr, keep: bool) -> Option<Identity> {
    let mut scratch = Vec::with_capacity(64);
    let incoming_id = headers.get(&REQUEST_ID).filter(|v| !v.is_empty());
    let request_id = match incoming_id {
        Some(id) => keep.then(|| String::from_utf8_lossy(id.as_bytes()).into_owned()),
        None => {
            write_request_id(&mut scratch);
            let kept = keep.then(|| String::from_utf8_lossy(&scratch).into_owned());
            if let Ok(id) = HeaderValue::from_bytes(&scratch) {
                headers.insert(REQUEST_ID.clone(), id);
            }
            kept
        }
    };
    scratch.clear();
    let parent = parent(headers.get(&TRACEPARENT).map(HeaderValue::as_bytes));
    write_traceparent(&mut scratch, parent);
    let continued = parent.is_some();
    if !continued {
        // A new trace: whatever tracestate came without a valid parent
        // belongs to nothing.
        headers.remove("tracestate");
    }
    let trace_id = keep.then(|| trace_id(&scratch).to_string());
    if let Ok(traceparent) = HeaderValue::from_bytes(&scratch) {
        headers.insert(TRACEPARENT.clone(), traceparent);
    }
    for (name, write) in [
        (&X_FORWARDED_FOR, write_forwarded_for as fn(&mut Vec<u8>, IpAddr)),
        (&FORWARDED, write_forwarded),
    ] {
        scratch.clear();
        for existing in headers.get_all(name) {
            scratch.extend_from_slice(existing.as_bytes());
            scratch.extend_from_slice(b", ");
        }
        write(&mut scratch, client);
        if let Ok(folded) = HeaderValue::from_bytes(&scratch) {
            headers.insert(name.clone(), folded);
        }
    }
    Some(Identity {
        request_id: request_id?,
        trace_id: trace_id?,
    })
}

/// The trace id and flags of an incoming `traceparent` this hop continues
/// (its `tracestate` then stays); `None` when it is absent or malformed.
pub fn parent(incoming: Option<&[u8]>) -> Option<(&str, &str)> {
    incoming
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(parse_traceparent)
}

/// Writes the `traceparent` this hop sends: the [`parent`] trace with a new
/// span id, or a new trace.
pub fn write_traceparent(out: &mut Vec<u8>, parent: Option<(&str, &str)>) {
    out.extend_from_slice(b"00-");
    match parent {
        Some((trace_id, _)) => out.extend_from_slice(trace_id.as_bytes()),
        None => {
            hex(out, nonzero(), 16);
            hex(out, random(), 16);
        }
    }
    out.push(b'-');
    hex(out, nonzero(), 16);
    out.push(b'-');
    out.extend_from_slice(parent.map_or("00", |(_, flags)| flags).as_bytes());
}

/// Writes the low `digits` hex digits of `value`, lowercase (on every
/// request: without the formatting machinery).
fn hex(out: &mut Vec<u8>, value: u64, digits: u32) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.extend(
        (0..digits)
            .rev()
            .map(|i| DIGITS[(value >> (i * 4)) as usize & 0xf]),
    );
}

/// The trace id of a traceparent [`write_traceparent`] wrote.
pub fn trace_id(traceparent: &[u8]) -> &str {
    traceparent
        .get(3..35)
        .and_then(|id| std::str::from_utf8(id).ok())
        .unwrap_or("")
}

/// Writes this hop's element of `x-forwarded-for`.
pub fn write_forwarded_for(out: &mut Vec<u8>, client: IpAddr) {
    use std::io::Write;
    let _ = write!(out, "{client}");
}

/// Writes this hop's element of `forwarded` (RFC 7239).
pub fn write_forwarded(out: &mut Vec<u8>, client: IpAddr) {
    use std::io::Write;
    let _ = match client {
        IpAddr::V4(ip) => write!(out, "for={ip};proto=http"),
        IpAddr::V6(ip) => write!(out, "for=\"[{ip}]\";proto=http"),
    };
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

/// Writes a random version-4 UUID, the usual shape of a request id.
pub fn write_request_id(out: &mut Vec<u8>) {
    let (high, low) = (random(), random());
    let high = (high & !0xf000) | 0x4000;
    let low = (low & !(0b11 << 62)) | (0b10 << 62);
    hex(out, high >> 32, 8);
    out.push(b'-');
    hex(out, high >> 16, 4);
    out.push(b'-');
    hex(out, high, 4);
    out.push(b'-');
    hex(out, low >> 48, 4);
    out.push(b'-');
    hex(out, low, 12);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_without_identity_gets_one() {
        let mut headers = HeaderMap::new();
        headers.insert("tracestate", HeaderValue::from_static("orphan=1"));
        let identity = stamp(&mut headers, "127.0.0.9".parse().unwrap(), true).unwrap();
        assert_eq!(identity.request_id.len(), 36);
        let uuid = identity.request_id.as_bytes();
        assert_eq!(
            (uuid[8], uuid[13], uuid[14], uuid[18], uuid[23]),
            (b'-', b'-', b'4', b'-', b'-')
        );
        assert!(b"89ab".contains(&uuid[19]), "{}", identity.request_id);
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
        assert!(stamp(&mut headers.clone(), "127.0.0.9".parse().unwrap(), false).is_none());
        let identity = stamp(&mut headers, "127.0.0.9".parse().unwrap(), true).unwrap();
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
