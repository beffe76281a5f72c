//! Names the catalog and the policies share: service names (DNS labels),
//! instance ids, and labels (node names, zones, tags), interned; and the
//! stricter names a node's mTLS identity is made of (trust domain, node
//! name), which end up in certificates.
//!
//! The lowest floor: it imports nothing of the crate.

use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::Arc;

/// A name that cannot be used.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum NameError {
    #[error(
        "service name {0:?} is not a DNS label ([a-z0-9-], 1-63 characters, no leading or trailing '-')"
    )]
    ServiceName(String),
    #[error("instance id {0:?} must be 1-253 characters of [A-Za-z0-9._:-]")]
    InstanceId(String),
    #[error(
        "trust domain {0:?} must be 1-64 characters of [a-z0-9-] in dot-separated labels, like prod.mesh"
    )]
    TrustDomain(String),
    #[error(
        "node name {0:?} must be 1-64 characters of [A-Za-z0-9_-] in dot-separated labels (no label starting or ending with '-', the last not all digits), like web-1 or web-1.eu-west-1: it becomes a DNS name and a SPIFFE ID in the node's certificate"
    )]
    NodeName(String),
}

/// Checks a service name: a DNS label.
pub fn check_service_name(name: &str) -> Result<(), NameError> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(NameError::ServiceName(name.to_string()))
    }
}

/// Checks an instance id.
pub fn check_instance_id(id: &str) -> Result<(), NameError> {
    let ok = (1..=253).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
        && id != "."
        && id != "..";
    if ok {
        Ok(())
    } else {
        Err(NameError::InstanceId(id.to_string()))
    }
}

/// The longest trust domain or node name that goes into a certificate: each
/// is a subject's common name there, which X.509 caps at 64 characters
/// (SPIFFE would allow a 255-character trust domain).
pub const MAX_IDENTITY_NAME: usize = 64;

/// Checks a trust domain, the authority part of the mesh's SPIFFE IDs
/// (`spiffe://<trust domain>/node/<node>`): SPIFFE's rule (lowercase
/// letters, digits, dots, hyphens; underscores left out) with no empty label.
pub fn check_trust_domain(domain: &str) -> Result<(), NameError> {
    let ok = (1..=MAX_IDENTITY_NAME).contains(&domain.len())
        && domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && domain.split('.').all(|label| !label.is_empty());
    if ok {
        Ok(())
    } else {
        Err(NameError::TrustDomain(domain.to_string()))
    }
}

/// Checks a node name for a node's certificate, where it is both a DNS name
/// (a subject alternative name a TLS client can ask for) and a SPIFFE ID's
/// last path segment: a DNS name as rustls accepts one (labels of
/// [A-Za-z0-9_-], 1-63 characters, no leading or trailing '-', the last
/// label not all digits), at most [`MAX_IDENTITY_NAME`] characters. Every
/// hostname qualifies; the agent's own `node` setting is looser.
pub fn check_node_name(node: &str) -> Result<(), NameError> {
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    let ok = (1..=MAX_IDENTITY_NAME).contains(&node.len())
        && node.split('.').all(label_ok)
        && !node
            .rsplit('.')
            .next()
            .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()));
    if ok {
        Ok(())
    } else {
        Err(NameError::NodeName(node.to_string()))
    }
}

/// A node name, zone or tag: a short string that a fleet repeats across
/// thousands of instances (a few hundred nodes, a few zones), so each
/// distinct value is held once and shared: 100k instances with a node and
/// a zone each save about 8 MiB.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Label(Arc<str>);

/// Every label in use; a value no instance holds any more is dropped by
/// [`Label::prune`].
static LABELS: std::sync::Mutex<Option<HashSet<Arc<str>>>> = std::sync::Mutex::new(None);

impl Label {
    /// The shared label for `text`.
    pub fn new(text: &str) -> Label {
        let mut labels = LABELS.lock().unwrap_or_else(|e| e.into_inner());
        let labels = labels.get_or_insert_with(HashSet::new);
        if let Some(existing) = labels.get(text) {
            return Label(existing.clone());
        }
        let label: Arc<str> = text.into();
        labels.insert(label.clone());
        Label(label)
    }

    /// Forgets labels nothing holds any more (after a snapshot replaced
    /// the catalog, say).
    pub fn prune() {
        let mut labels = LABELS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(labels) = labels.as_mut() {
            labels.retain(|label| Arc::strong_count(label) > 1);
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether two labels are one allocation.
    pub fn shares_with(&self, other: &Label) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::ops::Deref for Label {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Label {
    fn from(text: &str) -> Label {
        Label::new(text)
    }
}

impl Serialize for Label {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Label {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Label, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Label;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Label, E> {
                Ok(Label::new(text))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

/// Whether `text` is held as a label now (for tests of pruning).
pub fn label_is_interned(text: &str) -> bool {
    let labels = LABELS.lock().unwrap_or_else(|e| e.into_inner());
    labels.as_ref().is_some_and(|labels| labels.contains(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_domains() {
        for good in ["prod.mesh", "mesh", "a-b.c9", "x"] {
            assert_eq!(check_trust_domain(good), Ok(()), "{good}");
        }
        let long = "a".repeat(65);
        for bad in [
            "",
            "Prod.mesh",
            "prod..mesh",
            ".mesh",
            "mesh.",
            "a_b",
            "a/b",
            "a:1",
            &long,
        ] {
            assert_eq!(
                check_trust_domain(bad),
                Err(NameError::TrustDomain(bad.to_string())),
                "{bad}"
            );
        }
    }

    #[test]
    fn node_names() {
        for good in ["web-1", "Web_1", "ip-10-0-0-5.ec2.internal", "n1", "1n", "a.b1"] {
            assert_eq!(check_node_name(good), Ok(()), "{good}");
        }
        let long = "a".repeat(65);
        for bad in [
            "", "-web", "web-", "a..b", ".a", "a.", "a/b", "a b", "node:1", "10.0.0.5", "123", "a.1", &long,
        ] {
            assert_eq!(
                check_node_name(bad),
                Err(NameError::NodeName(bad.to_string())),
                "{bad}"
            );
        }
    }
}
