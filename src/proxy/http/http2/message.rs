//! What HTTP/2 header blocks carry, as the general path needs it: a
//! request's head checked and made a hyper request's parts, trailers, and
//! a response's head encoded.

use super::hpack;
use crate::proxy::http::body::ResponseBody;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::{Method, Response, StatusCode, Uri};

/// A response's head as an HPACK block (connection-specific fields left
/// out), and its body.
pub(super) fn encode_response(response: Response<ResponseBody>) -> (Vec<u8>, ResponseBody) {
    let (parts, body) = response.into_parts();
    let mut block = Vec::with_capacity(128);
    hpack::encode_status(&mut block, parts.status.as_u16());
    for (name, value) in &parts.headers {
        if !connection_specific(name) {
            hpack::encode_field(&mut block, name.as_str(), value.as_bytes());
        }
    }
    (block, body)
}

/// Headers HTTP/2 forbids (RFC 9113 8.2.2): they concern one connection.
pub(super) fn connection_specific(name: &HeaderName) -> bool {
    use hyper::header;
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// What a request's header block says.
pub(super) struct RequestHead {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub content_length: Option<u64>,
}

/// A request the proxy does not take.
pub(super) struct Malformed;

impl RequestHead {
    /// Reads and checks a request's fields (RFC 9113 8.3.1): pseudo-headers
    /// first and once each, names lowercase, no connection-specific ones.
    pub(super) fn from_fields(fields: &hpack::Fields, end_stream: bool) -> Result<RequestHead, Malformed> {
        let (mut method, mut scheme, mut authority, mut path) = (None, None, None, None);
        let mut headers = HeaderMap::with_capacity(fields.fields.len());
        let mut cookies: Option<Vec<u8>> = None;
        let mut content_length = None;
        let mut regular = false;
        for (name, value) in fields.iter() {
            if let Some(pseudo) = name.strip_prefix(b":") {
                let slot = match pseudo {
                    _ if regular => return Err(Malformed),
                    b"method" => &mut method,
                    b"scheme" => &mut scheme,
                    b"authority" => &mut authority,
                    b"path" => &mut path,
                    _ => return Err(Malformed),
                };
                if slot.replace(value).is_some() {
                    return Err(Malformed);
                }
                continue;
            }
            regular = true;
            let name = HeaderName::from_lowercase(name).map_err(|_| Malformed)?;
            if connection_specific(&name) {
                return Err(Malformed);
            }
            if name == hyper::header::TE && value != b"trailers" {
                return Err(Malformed);
            }
            if name == hyper::header::COOKIE {
                // Split by the client; one header again for HTTP/1.1 (RFC 9113 8.2.3).
                let joined = cookies.get_or_insert_with(Vec::new);
                if !joined.is_empty() {
                    joined.extend_from_slice(b"; ");
                }
                joined.extend_from_slice(value);
                continue;
            }
            if name == hyper::header::CONTENT_LENGTH {
                let len = std::str::from_utf8(value)
                    .ok()
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or(Malformed)?;
                if content_length.is_some_and(|seen| seen != len) || (end_stream && len != 0) {
                    return Err(Malformed);
                }
                content_length = Some(len);
            }
            let value = HeaderValue::from_bytes(value).map_err(|_| Malformed)?;
            headers.append(name, value);
        }
        if let Some(cookies) = cookies {
            let value = HeaderValue::from_bytes(&cookies).map_err(|_| Malformed)?;
            headers.insert(hyper::header::COOKIE, value);
        }
        let method = Method::from_bytes(method.ok_or(Malformed)?).map_err(|_| Malformed)?;
        let authority = authority
            .map(|a| Authority::try_from(a).map_err(|_| Malformed))
            .transpose()?;
        let uri = if method == Method::CONNECT {
            if scheme.is_some() || path.is_some() {
                return Err(Malformed);
            }
            let mut parts = hyper::http::uri::Parts::default();
            parts.authority = Some(authority.ok_or(Malformed)?);
            Uri::from_parts(parts).map_err(|_| Malformed)?
        } else {
            let path = path.filter(|p| !p.is_empty()).ok_or(Malformed)?;
            let scheme = match scheme.ok_or(Malformed)? {
                b"http" => Scheme::HTTP,
                b"https" => Scheme::HTTPS,
                other => Scheme::try_from(other).map_err(|_| Malformed)?,
            };
            let mut parts = hyper::http::uri::Parts::default();
            parts.path_and_query = Some(PathAndQuery::try_from(path).map_err(|_| Malformed)?);
            if let Some(authority) = authority {
                parts.scheme = Some(scheme);
                parts.authority = Some(authority);
            }
            Uri::from_parts(parts).map_err(|_| Malformed)?
        };
        Ok(RequestHead {
            method,
            uri,
            headers,
            content_length: if end_stream { None } else { content_length },
        })
    }
}

/// A trailer block's fields as headers: no pseudo-headers, names lowercase.
pub(super) fn trailer_map(fields: &hpack::Fields) -> Option<HeaderMap> {
    let mut trailers = HeaderMap::with_capacity(fields.fields.len());
    for (name, value) in fields.iter() {
        let name = HeaderName::from_lowercase(name).ok()?;
        if connection_specific(&name) {
            return None;
        }
        trailers.append(name, HeaderValue::from_bytes(value).ok()?);
    }
    Some(trailers)
}

/// The answer to an HTTP/2 CONNECT.
pub(super) fn connect_refused() -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::local("", None));
    *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    response.headers_mut().insert(
        &crate::proxy::http::ERROR_HEADER,
        HeaderValue::from_static("connect-not-supported"),
    );
    response
}
