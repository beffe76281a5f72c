//! The admin API's status page (`/` for a browser) and the reading of
//! `/routes` it shares with `loopmesh status`, in the spirit of HAProxy's
//! stats page: readiness, then every service with its backends, their
//! state and traffic.
//!
//! Both read the same JSON the admin API serves at `/routes` and
//! `/instances`, never the daemon's structures: a field added there (a
//! per-backend counter) shows up here as a column without a change. Every
//! value comes from etcd or the network, so every one is HTML-escaped.

use crate::admin::Status;
use serde_json::Value;
use std::fmt::Write as _;

/// Backend fields shown in columns of their own (or folded into the
/// address and state); any other number is a traffic counter.
const BACKEND_FIELDS: [&str; 10] = [
    "id",
    "host",
    "port",
    "weight",
    "zone",
    "state",
    "ejected",
    "active_connections",
    "mesh",
    "peer",
];

/// The traffic counters the backends of `routes` carry: every numeric
/// field that is not one of [`BACKEND_FIELDS`], and the numbers of an
/// object field one level down as `field.name`, sorted.
pub fn counter_fields(routes: &Value) -> Vec<String> {
    let mut names = std::collections::BTreeSet::new();
    for backend in backends_of(routes) {
        let Some(fields) = backend.as_object() else {
            continue;
        };
        for (name, value) in fields {
            if BACKEND_FIELDS.contains(&name.as_str()) {
                continue;
            }
            match value {
                Value::Number(_) => {
                    names.insert(name.clone());
                }
                Value::Object(inner) => {
                    for (field, value) in inner {
                        if value.is_number() {
                            names.insert(format!("{name}.{field}"));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    names.into_iter().collect()
}

/// Every backend of every route.
fn backends_of(routes: &Value) -> impl Iterator<Item = &Value> {
    routes
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|route| route["backends"].as_array().into_iter().flatten())
}

/// A counter's value (`field` or `field.name`), `-` when absent.
pub fn counter(backend: &Value, field: &str) -> String {
    let value = match field.split_once('.') {
        Some((outer, inner)) => &backend[outer][inner],
        None => &backend[field],
    };
    value
        .as_number()
        .map_or_else(|| "-".to_string(), ToString::to_string)
}

/// A backend's state as people read it: `up`, `draining`, `maintenance`,
/// with `,ejected` while outlier detection has it out.
pub fn backend_state(backend: &Value) -> String {
    let state = backend["state"].as_str().unwrap_or("?");
    if backend["ejected"] == true {
        format!("{state},ejected")
    } else {
        state.to_string()
    }
}

/// Where a backend is reached: `host:port`, and through the mesh `via
/// <node's inbound> as <identity>`.
pub fn backend_address(backend: &Value) -> String {
    let address = format!("{}:{}", backend["host"].as_str().unwrap_or("?"), backend["port"]);
    match (backend["mesh"].as_str(), backend["peer"].as_str()) {
        (Some(mesh), Some(peer)) => format!("{address} via {mesh} as {peer}"),
        _ => address,
    }
}

/// Where a route listens: `address:port`.
pub fn route_listen(route: &Value) -> String {
    format!("{}:{}", route["address"].as_str().unwrap_or("?"), route["port"])
}

/// `listening`, or `not listening: <why>`.
pub fn route_status(route: &Value) -> String {
    if route["listening"] == true {
        "listening".to_string()
    } else {
        format!("not listening: {}", route["error"].as_str().unwrap_or("?"))
    }
}

/// `text` safe inside HTML text and quoted attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A JSON value as a cell: strings as they are, the rest as JSON.
fn plain(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

const STYLE: &str = "body{font:13px sans-serif;margin:1em}\
table{border-collapse:collapse;margin:0 0 1em}\
th,td{border:1px solid #999;padding:2px 6px;text-align:left}\
th{background:#ddd}td.n{text-align:right}\
tr.service th{background:#bcd;font-size:14px}\
.up{background:#cfc}.draining{background:#fe9}.maintenance{background:#ccc}\
.ejected,.down{background:#f99}";

/// The status page: readiness, services and backends (the agent),
/// instances (the registrar), and the endpoints.
pub fn render(status: &dyn Status, endpoints: &[(&str, &str)]) -> String {
    let (ready, body) = status.ready();
    let node = status
        .view("/catalog")
        .and_then(|catalog| catalog["node"].as_str().map(String::from))
        .or_else(|| body["node"].as_str().map(String::from));
    let title = match &node {
        Some(node) => format!("loopmesh on {}", escape(node)),
        None => "loopmesh".to_string(),
    };
    let mut page = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title><style>{STYLE}</style></head><body>\n<h1>{title}</h1>\n"
    );
    let _ = write!(
        page,
        "<p class=\"{}\"><b>{}</b>",
        if ready { "up" } else { "down" },
        if ready { "ready" } else { "not ready" }
    );
    for reason in body["reasons"].as_array().into_iter().flatten() {
        let _ = write!(page, "; {}", escape(&plain(reason)));
    }
    page.push_str("</p>\n<p>");
    let facts: Vec<String> = body
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(name, value)| {
            !matches!(name.as_str(), "ready" | "reasons")
                && !value.is_object()
                && !value.is_array()
                && !value.is_null()
        })
        .map(|(name, value)| format!("{}: {}", escape(name), escape(&plain(value))))
        .collect();
    page.push_str(&facts.join(" &middot; "));
    page.push_str("</p>\n");
    if let Some(routes) = status.view("/routes") {
        page.push_str("<h2>Services</h2>\n");
        services(&mut page, &routes);
    }
    if let Some(instances) = status.view("/instances") {
        page.push_str("<h2>Instances</h2>\n");
        objects(&mut page, &instances);
    }
    page.push_str("<h2>Endpoints</h2>\n<ul>\n");
    for (path, what) in endpoints {
        let _ = writeln!(
            page,
            "<li><a href=\"{0}\">{0}</a> {1}</li>",
            escape(path),
            escape(what)
        );
    }
    page.push_str("</ul>\n</body></html>\n");
    page
}

/// One table per service: its listener in a header row, then a row per
/// backend with its state and traffic.
fn services(page: &mut String, routes: &Value) {
    let counters = counter_fields(routes);
    let columns = 6 + counters.len();
    let routes = routes.as_array().map(Vec::as_slice).unwrap_or_default();
    if routes.is_empty() {
        page.push_str("<p>no services</p>\n");
    }
    for route in routes {
        let _ = writeln!(
            page,
            "<table><tr class=\"service\"><th colspan=\"{columns}\">{} &mdash; {} {} &mdash; {}</th></tr>",
            escape(&plain(&route["service"])),
            escape(&route_listen(route)),
            escape(&plain(&route["protocol"])),
            escape(&route_status(route)),
        );
        page.push_str(
            "<tr><th>backend</th><th>address</th><th>zone</th><th>weight</th><th>state</th><th>active</th>",
        );
        for name in &counters {
            let _ = write!(page, "<th>{}</th>", escape(name));
        }
        page.push_str("</tr>\n");
        let backends = route["backends"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        if backends.is_empty() {
            let _ = writeln!(page, "<tr><td colspan=\"{columns}\">no backends</td></tr>");
        }
        for backend in backends {
            let state = backend_state(backend);
            let class = if backend["ejected"] == true {
                "ejected"
            } else {
                backend["state"].as_str().unwrap_or("")
            };
            let _ = write!(
                page,
                "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td>{}</td><td class=\"n\">{}</td>",
                escape(class),
                escape(&plain(&backend["id"])),
                escape(&backend_address(backend)),
                escape(&plain(&backend["zone"])),
                escape(&plain(&backend["weight"])),
                escape(&state),
                escape(&plain(&backend["active_connections"])),
            );
            for name in &counters {
                let _ = write!(page, "<td class=\"n\">{}</td>", escape(&counter(backend, name)));
            }
            page.push_str("</tr>\n");
        }
        page.push_str("</table>\n");
    }
}

/// An array of objects as one table, a column per field (in the order
/// they first appear).
fn objects(page: &mut String, items: &Value) {
    let items = items.as_array().map(Vec::as_slice).unwrap_or_default();
    let mut columns: Vec<&str> = Vec::new();
    for item in items {
        for name in item.as_object().into_iter().flat_map(|o| o.keys()) {
            if !columns.contains(&name.as_str()) {
                columns.push(name);
            }
        }
    }
    if items.is_empty() {
        page.push_str("<p>none</p>\n");
        return;
    }
    page.push_str("<table><tr>");
    for name in &columns {
        let _ = write!(page, "<th>{}</th>", escape(name));
    }
    page.push_str("</tr>\n");
    for item in items {
        let class = if item["healthy"] == false {
            "down"
        } else {
            item["state"].as_str().unwrap_or("")
        };
        let _ = write!(page, "<tr class=\"{}\">", escape(class));
        for name in &columns {
            let _ = write!(page, "<td>{}</td>", escape(&plain(&item[*name])));
        }
        page.push_str("</tr>\n");
    }
    page.push_str("</table>\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Fixed(Value);

    impl Status for Fixed {
        fn ready(&self) -> (bool, Value) {
            (
                false,
                json!({"ready": false, "reasons": ["<b>bad</b> & worse"], "pid": 7}),
            )
        }
        fn view(&self, path: &str) -> Option<Value> {
            (path == "/routes").then(|| self.0.clone())
        }
        fn views(&self) -> &'static [(&'static str, &'static str)] {
            &[("/routes", "routes")]
        }
    }

    #[test]
    fn values_are_escaped_and_counters_become_columns() {
        let routes = json!([{
            "service": "<script>alert(1)</script>", "address": "127.1.0.1", "port": 80,
            "protocol": "tcp", "listening": false, "error": "address \"in\" use",
            "backends": [{
                "id": "b'1", "host": "10.0.0.1", "port": 8080, "weight": 1, "zone": null,
                "state": "draining", "ejected": true, "active_connections": 2,
                "bytes_received": 10, "traffic": {"errors": 3, "note": "x"},
            }],
        }]);
        let page = render(&Fixed(routes.clone()), &[("/metrics", "Prometheus <text>")]);
        assert!(!page.contains("<script>"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "{page}");
        assert!(
            page.contains("not listening: address &quot;in&quot; use"),
            "{page}"
        );
        assert!(page.contains("b&#39;1"), "{page}");
        assert!(page.contains("&lt;b&gt;bad&lt;/b&gt; &amp; worse"), "{page}");
        assert!(page.contains("Prometheus &lt;text&gt;"), "{page}");
        assert!(page.contains("<tr class=\"ejected\">"), "{page}");
        assert!(page.contains("<td>draining,ejected</td>"), "{page}");
        assert_eq!(counter_fields(&routes), ["bytes_received", "traffic.errors"]);
        assert!(
            page.contains("<th>bytes_received</th><th>traffic.errors</th>"),
            "{page}"
        );
        assert!(
            page.contains("<td class=\"n\">10</td><td class=\"n\">3</td>"),
            "{page}"
        );
    }
}
