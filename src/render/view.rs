//! What templates see: plain, serializable views of the catalog.
//!
//! Field names here are the template API; they are documented in the README
//! and kept stable. Views hold only served services (defined, addressed, not
//! losing an address clash); instances are included only for templates that
//! declared the `instances` key, which keeps zone-style renders cheap.

use crate::catalog::{Balance, Catalog, Instance, Outlier, Protocol};
use serde::Serialize;
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
#[derive(Debug, Clone, Serialize)]
pub struct ServiceView<'a> {
    pub name: &'a str,
    /// The name as an environment variable prefix (`my-db` -> `MY_DB`).
    pub env_name: String,
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub balance: Balance,
    pub connect_timeout: String,
    pub idle_timeout: String,
    pub retries: u32,
    pub max_connections: Option<u32>,
    pub outlier: Outlier,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instances: Option<Vec<InstanceView<'a>>>,
}

/// One instance of a service, with its id.
///
/// Serialized by hand: `#[serde(flatten)]` buffers every field through an
/// intermediate map, which dominated per-service render time at scale.
#[derive(Debug, Clone)]
pub struct InstanceView<'a> {
    pub id: &'a str,
    pub instance: &'a Instance,
}

impl Serialize for InstanceView<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let i = self.instance;
        let mut out = serializer.serialize_struct("Instance", 8)?;
        out.serialize_field("id", self.id)?;
        out.serialize_field("host", &i.host)?;
        out.serialize_field("port", &i.port)?;
        out.serialize_field("node", &i.node)?;
        out.serialize_field("zone", &i.zone)?;
        out.serialize_field("tags", &i.tags)?;
        out.serialize_field("weight", &i.weight)?;
        out.serialize_field("state", &i.state)?;
        out.end()
    }
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
    let (spec, address) = catalog.serving_state(service).ok()?;
    let entry = catalog.entry(service)?;
    let instances = with_instances.then(|| {
        entry
            .instances
            .iter()
            .map(|(id, instance)| InstanceView { id, instance })
            .collect()
    });
    Some(ServiceView {
        name: service,
        env_name: env_name(service),
        address,
        port: spec.port,
        protocol: spec.protocol,
        balance: spec.balance,
        connect_timeout: crate::duration::format(spec.connect_timeout),
        idle_timeout: crate::duration::format(spec.idle_timeout),
        retries: spec.retries,
        max_connections: spec.max_connections,
        outlier: spec.outlier,
        instances,
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
