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
        let domain_ok = !trust_domain.is_empty()
            && trust_domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        // As `names::check_node_name` allows node names.
        let node_ok = !node.is_empty()
            && node
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        (domain_ok && node_ok).then(|| NodeIdentity::new(trust_domain, node))
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

/// When a DER certificate expires (its notAfter), if it parses.
pub fn not_after(certificate: &[u8]) -> Option<std::time::SystemTime> {
    let (_, certificate, _) = element(certificate)?;
    let (_, tbs, _) = element(certificate)?;
    // version [0] (optional), serial, signature, issuer, validity.
    let mut fields = elements(tbs).filter(|(tag, _)| *tag != 0xa0);
    let (_, validity) = fields.nth(3)?;
    let (tag, time) = elements(validity).nth(1)?;
    let text = std::str::from_utf8(time).ok()?.strip_suffix('Z')?;
    // UTCTime has a two-digit year (50-99: 19xx), GeneralizedTime four.
    let (year, rest) = match tag {
        0x17 => {
            let yy: i64 = text.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, text.get(2..)?)
        }
        0x18 => (text.get(..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    let number = |at: usize| -> Option<i64> { rest.get(at..at + 2)?.parse().ok() };
    let (month, day, hour, minute, second) = (number(0)?, number(2)?, number(4)?, number(6)?, number(8)?);
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second;
    u64::try_from(seconds)
        .ok()
        .map(|s| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s))
}

/// A time as `YYYY-MM-DD HH:MM:SS UTC`, for log lines about certificates.
pub fn format_utc(time: std::time::SystemTime) -> String {
    let seconds = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (days, rest) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
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
    fn civil_dates_count_days_from_the_epoch() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2026, 12, 3), 20_790);
        let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(20_790 * 86_400 + 3723);
        assert_eq!(format_utc(time), "2026-12-03 01:02:03 UTC");
    }

    #[test]
    fn garbage_has_no_names() {
        assert!(uri_sans(b"").is_empty());
        assert!(uri_sans(&[0x30, 0x82, 0xff]).is_empty());
        assert!(uri_sans(&[0x30, 0x03, 0x30, 0x01, 0x00]).is_empty());
    }
}
