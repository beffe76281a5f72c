//! Who a node is: its SPIFFE ID, `spiffe://<trust_domain>/node/<node>`,
//! read from the URI SAN of the certificate it presented (after rustls has
//! verified the chain), and matched against `allow` lists (exact, or `*`
//! globs).
//!
//! Reading the SAN needs only a walk down the DER to one extension, so it
//! is done here rather than with a general X.509 parser (webpki, which
//! verifies the chain, does not hand URI names out).

use std::fmt;

/// A SPIFFE ID naming a node of the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeIdentity {
    pub trust_domain: String,
    pub node: String,
}

impl NodeIdentity {
    pub fn new(trust_domain: &str, node: &str) -> NodeIdentity {
        NodeIdentity {
            trust_domain: trust_domain.to_string(),
            node: node.to_string(),
        }
    }

    /// Parses `spiffe://<trust_domain>/node/<node>`.
    pub fn parse(uri: &str) -> Option<NodeIdentity> {
        let rest = uri.strip_prefix("spiffe://")?;
        let (trust_domain, path) = rest.split_once('/')?;
        let node = path.strip_prefix("node/")?;
        let valid = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        };
        (valid(trust_domain) && valid(node)).then(|| NodeIdentity::new(trust_domain, node))
    }
}

impl fmt::Display for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/node/{}", self.trust_domain, self.node)
    }
}

/// Whether `identity` is allowed by `pattern`: equal, or a glob where `*`
/// stands for any run of characters (`spiffe://prod.mesh/node/web-*`).
pub fn allowed(pattern: &str, identity: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = identity.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// The URI names of a DER certificate's subjectAltName extension; empty if
/// it has none or the DER does not parse.
pub fn uri_sans(certificate: &[u8]) -> Vec<String> {
    sans(certificate).unwrap_or_default()
}

/// The first SPIFFE node identity among a certificate's URI names.
pub fn node_identity(certificate: &[u8]) -> Option<NodeIdentity> {
    uri_sans(certificate)
        .iter()
        .find_map(|uri| NodeIdentity::parse(uri))
}

const SEQUENCE: u8 = 0x30;
const OID: u8 = 0x06;
const BOOLEAN: u8 = 0x01;
const OCTET_STRING: u8 = 0x04;
/// `[3]` EXPLICIT, constructed: tbsCertificate's extensions.
const EXTENSIONS: u8 = 0xa3;
/// `[6]` IMPLICIT IA5String: a GeneralName's uniformResourceIdentifier.
const URI_NAME: u8 = 0x86;
/// 2.5.29.17, subjectAltName.
const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

/// One DER element: its tag and contents, and what follows it.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (length, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let length = rest[..count]
            .iter()
            .fold(0usize, |n, &b| (n << 8) | usize::from(b));
        (length, &rest[count..])
    };
    (rest.len() >= length).then(|| (tag, &rest[..length], &rest[length..]))
}

/// The elements of a constructed value's contents.
fn elements(mut input: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let (tag, contents, rest) = element(input)?;
        input = rest;
        Some((tag, contents))
    })
}

fn sans(certificate: &[u8]) -> Option<Vec<String>> {
    let (tag, certificate, _) = element(certificate)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = element(certificate)?;
    if tag != SEQUENCE {
        return None;
    }
    let (_, extensions) = elements(tbs).find(|(tag, _)| *tag == EXTENSIONS)?;
    let (tag, list, _) = element(extensions)?;
    if tag != SEQUENCE {
        return None;
    }
    for (tag, extension) in elements(list) {
        if tag != SEQUENCE {
            continue;
        }
        let mut fields = elements(extension);
        let Some((OID, oid)) = fields.next() else { continue };
        if oid != SUBJECT_ALT_NAME {
            continue;
        }
        let value = fields
            .find(|(tag, _)| *tag != BOOLEAN)
            .filter(|(tag, _)| *tag == OCTET_STRING)?
            .1;
        let (tag, names, _) = element(value)?;
        if tag != SEQUENCE {
            return None;
        }
        return Some(
            elements(names)
                .filter(|(tag, _)| *tag == URI_NAME)
                .filter_map(|(_, uri)| std::str::from_utf8(uri).ok().map(str::to_string))
                .collect(),
        );
    }
    Some(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_identities_round_trip_and_bad_ones_are_refused() {
        let id = NodeIdentity::parse("spiffe://prod.mesh/node/web-1").unwrap();
        assert_eq!(id, NodeIdentity::new("prod.mesh", "web-1"));
        assert_eq!(id.to_string(), "spiffe://prod.mesh/node/web-1");
        for bad in [
            "https://prod.mesh/node/web-1",
            "spiffe://prod.mesh/service/web",
            "spiffe://prod.mesh/node/",
            "spiffe:///node/a",
            "spiffe://Prod/node/a",
        ] {
            assert_eq!(NodeIdentity::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn allow_patterns_match_exactly_or_by_glob() {
        let id = "spiffe://prod.mesh/node/web-12";
        assert!(allowed(id, id));
        assert!(allowed("spiffe://prod.mesh/node/web-*", id));
        assert!(allowed("spiffe://prod.mesh/*", id));
        assert!(allowed("*", id));
        assert!(allowed("spiffe://*/node/web-*2", id));
        assert!(!allowed("spiffe://prod.mesh/node/web-1", id));
        assert!(!allowed("spiffe://prod.mesh/node/db-*", id));
        assert!(!allowed("spiffe://other.mesh/*", id));
        assert!(!allowed("spiffe://prod.mesh/node/web-*3", id));
    }

    #[test]
    fn garbage_has_no_names() {
        assert!(uri_sans(b"").is_empty());
        assert!(uri_sans(&[0x30, 0x82, 0xff]).is_empty());
        assert!(uri_sans(&[0x30, 0x03, 0x30, 0x01, 0x00]).is_empty());
    }
}
