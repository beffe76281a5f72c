//! How the listing verbs print: an aligned table for people (the
//! default), or one JSON document for scripts (`-o json`) with field names
//! that stay put (the README lists them). A key agents refuse is a row
//! like the others, with its reason in `error` (JSON) or `invalid: <reason>`
//! (table), so neither format hides it.

use super::table::Table;
use super::{InstanceCount, InstanceRow, ServiceDetail, ServiceRow};
use crate::catalog::ServiceSpec;
use crate::names::Label;
use crate::status_page::{
    backend_address, backend_state, counter, counter_fields, route_listen, route_status,
};
use serde::Serialize;
use serde_json::Value;
use std::net::Ipv4Addr;

/// `-o table|json`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns with a header, for people.
    #[default]
    Table,
    /// One JSON document, for scripts.
    Json,
}

/// One service in JSON: `error` is why agents refuse the key (then
/// `port` is null), `address_error` why they refuse its address key.
#[derive(Debug, Serialize)]
struct ServiceJson<'a> {
    service: &'a str,
    port: Option<u16>,
    error: Option<&'a str>,
    address: Option<Ipv4Addr>,
    address_error: Option<&'a str>,
    instances: Option<usize>,
    invalid_instances: Option<usize>,
}

impl<'a> From<&'a ServiceRow> for ServiceJson<'a> {
    fn from(row: &'a ServiceRow) -> Self {
        ServiceJson {
            service: &row.service,
            port: row.definition.as_ref().ok().map(|spec| spec.port),
            error: row.definition.as_ref().err().map(String::as_str),
            address: row.address.as_ref().and_then(|a| a.as_ref().ok().copied()),
            address_error: row
                .address
                .as_ref()
                .and_then(|a| a.as_ref().err().map(String::as_str)),
            instances: row.instances.map(|count| count.valid),
            invalid_instances: row.instances.map(|count| count.invalid),
        }
    }
}

/// `service get -o json`: the row's fields, the key, its stored value and
/// the definition with every default filled in (null when refused).
#[derive(Debug, Serialize)]
struct ServiceDetailJson<'a> {
    #[serde(flatten)]
    row: ServiceJson<'a>,
    key: &'a str,
    value: &'a str,
    definition: Option<&'a ServiceSpec>,
}

/// One instance in JSON; a refused key has `error` and nulls elsewhere.
#[derive(Debug, Serialize)]
struct InstanceJson<'a> {
    service: &'a str,
    id: &'a str,
    error: Option<&'a str>,
    host: Option<&'a str>,
    port: Option<u16>,
    node: Option<&'a Label>,
    zone: Option<&'a Label>,
    tags: Option<&'a [Label]>,
    weight: Option<u32>,
    state: Option<&'static str>,
    mesh: Option<std::net::SocketAddr>,
}

impl<'a> From<&'a InstanceRow> for InstanceJson<'a> {
    fn from(row: &'a InstanceRow) -> Self {
        let ok = row.instance.as_ref().ok();
        InstanceJson {
            service: &row.service,
            id: &row.id,
            error: row.instance.as_ref().err().map(String::as_str),
            host: ok.map(|i| i.host.as_str()),
            port: ok.map(|i| i.port),
            node: ok.and_then(|i| i.node.as_ref()),
            zone: ok.and_then(|i| i.zone.as_ref()),
            tags: ok.map(|i| i.tags.as_slice()),
            weight: ok.map(|i| i.weight),
            state: ok.map(|i| i.state.as_str()),
            mesh: ok.and_then(|i| i.mesh),
        }
    }
}

/// Pretty JSON and a newline. Serializing these types cannot fail (string
/// keys, no maps of other keys); were it to, the output says so as JSON.
fn json(value: &impl Serialize) -> String {
    let mut text = serde_json::to_string_pretty(value)
        .unwrap_or_else(|err| serde_json::json!({ "error": err.to_string() }).to_string());
    text.push('\n');
    text
}

/// A refused value as a table cell.
fn invalid(reason: &str) -> String {
    format!("invalid: {reason}")
}

/// `service list`.
pub fn services(rows: &[ServiceRow], output: Output) -> String {
    match output {
        Output::Json => json(&rows.iter().map(ServiceJson::from).collect::<Vec<_>>()),
        Output::Table => services_table(rows),
    }
}

/// The services table: SERVICE PORT ADDRESS INSTANCES, where INSTANCES
/// counts the instances agents accept (`3 (+1 invalid)`).
fn services_table(rows: &[ServiceRow]) -> String {
    let mut table = Table::new(&["SERVICE", "PORT", "ADDRESS", "INSTANCES"]);
    for row in rows {
        let port = match &row.definition {
            Ok(spec) => spec.port.to_string(),
            Err(reason) => invalid(reason),
        };
        let address = match &row.address {
            None => "-".to_string(),
            Some(Ok(addr)) => addr.to_string(),
            Some(Err(reason)) => invalid(reason),
        };
        let instances = match row.instances {
            None => "-".to_string(),
            Some(InstanceCount { valid, invalid: 0 }) => valid.to_string(),
            Some(InstanceCount { valid, invalid }) => format!("{valid} (+{invalid} invalid)"),
        };
        table.row(&[row.service.as_str(), &port, &address, &instances]);
    }
    table.render()
}

/// `service get`: the value as stored without `-o` (it round-trips through
/// `service put --file`), its `service list` row as a table, or JSON.
pub fn service(detail: &ServiceDetail, output: Option<Output>) -> String {
    match output {
        None => {
            let mut text = detail.value.clone();
            if !text.ends_with('\n') {
                text.push('\n');
            }
            text
        }
        Some(Output::Table) => services_table(std::slice::from_ref(&detail.row)),
        Some(Output::Json) => json(&ServiceDetailJson {
            row: ServiceJson::from(&detail.row),
            key: &detail.key,
            value: &detail.value,
            definition: detail.row.definition.as_ref().ok(),
        }),
    }
}

/// `instance list`; a refused key says why in the ADDRESS column and has
/// `-` in the others.
pub fn instances(rows: &[InstanceRow], output: Output) -> String {
    if output == Output::Json {
        return json(&rows.iter().map(InstanceJson::from).collect::<Vec<_>>());
    }
    let mut table = Table::new(&[
        "SERVICE", "INSTANCE", "ADDRESS", "NODE", "ZONE", "WEIGHT", "STATE", "MESH",
    ]);
    for row in rows {
        match &row.instance {
            Ok(i) => table.row(&[
                row.service.clone(),
                row.id.clone(),
                format!("{}:{}", i.host, i.port),
                i.node.as_deref().unwrap_or("-").to_string(),
                i.zone.as_deref().unwrap_or("-").to_string(),
                i.weight.to_string(),
                i.state.as_str().to_string(),
                // Reached through the mesh at its node's inbound address.
                i.mesh.map_or_else(|| "-".to_string(), |mesh| mesh.to_string()),
            ]),
            Err(reason) => table.row(&[row.service.clone(), row.id.clone(), invalid(reason)]),
        }
    }
    table.render()
}

/// `loopmesh routes`: the agent's `/routes` as it serves it (JSON), or a
/// line per service with its backends as `id=host:port(state...)`.
pub fn routes(routes: &Value, output: Output) -> String {
    if output == Output::Json {
        return json(routes);
    }
    let mut table = Table::new(&["SERVICE", "LISTEN", "STATUS", "BACKENDS"]);
    for route in routes.as_array().into_iter().flatten() {
        let backends: Vec<String> = route["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| {
                // Through the mesh: via which node, and the identity it must show.
                let peer = match (b["mesh"].as_str(), b["peer"].as_str()) {
                    (Some(mesh), Some(peer)) => format!(",via {mesh} as {peer}"),
                    _ => String::new(),
                };
                format!(
                    "{}={}:{}({}{peer})",
                    b["id"].as_str().unwrap_or("?"),
                    b["host"].as_str().unwrap_or("?"),
                    b["port"],
                    backend_state(b)
                )
            })
            .collect();
        table.row(&[
            route["service"].as_str().unwrap_or("?").to_string(),
            route_listen(route),
            route_status(route),
            backends.join(" "),
        ]);
    }
    table.render()
}

/// `loopmesh status`: the agent's readiness, then a row per backend with
/// its state and traffic (every counter `/routes` carries); JSON is
/// `{"ready": <the /ready body>, "routes": <the /routes array>}`.
pub fn status(ready: &Value, routes: &Value, output: Output) -> String {
    if output == Output::Json {
        return json(&serde_json::json!({ "ready": ready, "routes": routes }));
    }
    let mut out = if ready["ready"] == true {
        "ready".to_string()
    } else {
        let reasons: Vec<String> = ready["reasons"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| r.as_str().unwrap_or("?").to_string())
            .collect();
        format!("not ready: {}", reasons.join("; "))
    };
    for field in ["pid", "store", "revision", "stale"] {
        if !ready[field].is_null() {
            out.push_str(&format!(
                ", {field} {}",
                ready[field].to_string().trim_matches('"')
            ));
        }
    }
    out.push_str("\n\n");
    let counters = counter_fields(routes);
    let mut header = vec!["SERVICE", "LISTEN", "BACKEND", "ADDRESS", "STATE", "ACTIVE"];
    let upper: Vec<String> = counters.iter().map(|c| c.to_uppercase()).collect();
    header.extend(upper.iter().map(String::as_str));
    let mut table = Table::new(&header);
    for route in routes.as_array().into_iter().flatten() {
        let service = route["service"].as_str().unwrap_or("?").to_string();
        let backends = route["backends"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        if route["listening"] != true || backends.is_empty() {
            let state = match route["listening"] == true {
                true => "no backends".to_string(),
                false => route_status(route),
            };
            table.row(&[
                service.clone(),
                route_listen(route),
                "-".into(),
                "-".into(),
                state,
            ]);
        }
        for backend in backends {
            let mut row = vec![
                service.clone(),
                route_listen(route),
                backend["id"].as_str().unwrap_or("?").to_string(),
                backend_address(backend),
                backend_state(backend),
                counter(backend, "active_connections"),
            ];
            row.extend(counters.iter().map(|name| counter(backend, name)));
            table.row(&row);
        }
    }
    out.push_str(&table.render());
    out
}
