//! What templates see: plain, serializable views of the catalog.
//!
//! Field names here are the template API; they are documented in the README
//! and kept stable. Views hold only served services (defined, addressed, not
//! losing an address clash); instances are included only for templates that
//! declared the `instances` key, which keeps zone-style renders cheap.

use crate::catalog::{Catalog, Instance, ServiceSpec};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// Values every template sees.
#[derive(Debug, Clone, Serialize)]
pub struct Globals {
    /// DNS zone apex, fully qualified (`mesh.internal.`).
    pub zone: String,
    /// The zone without its final dot (`mesh.internal`), for host names.
    pub zone_name: String,
    /// TTL of the mesh's DNS records.
    pub ttl: u32,
    /// Address the agent's DNS server answers on (the zone's NS glue).
    pub dns_address: Ipv4Addr,
    pub node: String,
    pub node_zone: Option<String>,
    /// Catalog revision of this render (the zone's SOA serial uses it).
    pub revision: i64,
}

/// One served service.
///
/// `spec` is the catalog's service definition as is (the one schema, with
/// every default filled in) and `instances` the catalog's instances by id:
/// templates print them, or pass them whole to `json_encode`, and a new
/// field reaches every template without a change here.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceView<'a> {
    pub name: &'a str,
    /// The name as an environment variable prefix (`my-db` -> `MY_DB`).
    pub env_name: String,
    pub address: Ipv4Addr,
    pub spec: &'a ServiceSpec,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instances: Option<&'a BTreeMap<String, Instance>>,
}

/// A template context: the globals plus one more entry (`services` for a
/// whole-catalog template, `service` for a per-service one).
pub struct Context<'a, T> {
    pub globals: &'a Globals,
    pub key: &'static str,
    pub value: T,
}

impl<T: Serialize> Serialize for Context<'_, T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let g = self.globals;
        let mut out = serializer.serialize_map(Some(8))?;
        out.serialize_entry("zone", &g.zone)?;
        out.serialize_entry("zone_name", &g.zone_name)?;
        out.serialize_entry("ttl", &g.ttl)?;
        out.serialize_entry("dns_address", &g.dns_address)?;
        out.serialize_entry("node", &g.node)?;
        out.serialize_entry("node_zone", &g.node_zone)?;
        out.serialize_entry("revision", &g.revision)?;
        out.serialize_entry(self.key, &self.value)?;
        out.end()
    }
}

/// `my-db` -> `MY_DB`; a leading digit gets an underscore in front.
pub fn env_name(service: &str) -> String {
    let upper = service.to_ascii_uppercase().replace('-', "_");
    if upper.starts_with(|c: char| c.is_ascii_digit()) {
        format!("_{upper}")
    } else {
        upper
    }
}

/// The view of `service` if it is served.
pub fn service_view<'a>(
    catalog: &'a Catalog,
    service: &'a str,
    with_instances: bool,
) -> Option<ServiceView<'a>> {
    let (_, address) = catalog.serving_state(service).ok()?;
    let entry = catalog.entry(service)?;
    Some(ServiceView {
        name: service,
        env_name: env_name(service),
        address,
        spec: entry.spec.as_deref()?,
        instances: with_instances.then_some(&entry.instances),
    })
}

/// Views of every served service, by name.
pub fn service_views(catalog: &Catalog, with_instances: bool) -> Vec<ServiceView<'_>> {
    catalog
        .entries()
        .keys()
        .filter_map(|name| service_view(catalog, name, with_instances))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names() {
        assert_eq!(env_name("postgres"), "POSTGRES");
        assert_eq!(env_name("my-db"), "MY_DB");
        assert_eq!(env_name("3scale"), "_3SCALE");
    }
}
