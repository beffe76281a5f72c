//! What the daemons export to Prometheus, as one whole.
//!
//! Two kinds of series make up `/metrics`:
//! - those of the `metrics` facade, in the recorder: counters and gauges of
//!   the daemon as a whole, at zero from the start ([`register`]), with the
//!   HELP text of [`families`];
//! - those of things that come and go (services, backends, a registrar's
//!   instances), kept in the state of the thing itself ([`series`]) and
//!   rendered at scrape time after the recorder's ([`Exposition`]), so a
//!   deleted service's series leave with it. The recorder cannot delete
//!   one series (its idle timeout would also drop live series that saw no
//!   event, the zeros a dashboard needs), and a reload re-registering a
//!   service's handles would otherwise keep every name ever served.
//!
//! Plus the `process_*` metrics ([`process`]) and `loopmesh_build_info`.

pub mod exposition;
pub mod families;
pub mod process;
pub mod series;

pub use crate::admin::BUCKETS;
pub use exposition::Exposition;
pub use families::Daemon;
use families::{Family, Kind, Present};
pub use series::{Counter, Gauge, Histogram};

/// The build's git commit, set by the build script (`unknown` without one).
pub const COMMIT: &str = match option_env!("LOOPMESH_GIT_COMMIT") {
    Some(commit) => commit,
    None => "unknown",
};

/// Gives the recorder the HELP text of every metric it holds, and
/// registers at zero the metrics of `daemon` that exist from the start,
/// so a counter is there before its first event (`rate()` and `absent()`
/// need it). Call once the recorder is installed; calling again is harmless.
pub fn register(daemon: Daemon) {
    for family in families::ALL.iter().filter(|f| f.present.in_recorder()) {
        describe(family);
    }
    for family in families::ALL
        .iter()
        .filter(|f| f.of(daemon) && f.present == Present::Start)
    {
        match (family.name, family.kind) {
            ("loopmesh_build_info", _) => {
                metrics::gauge!(family.name, "version" => env!("CARGO_PKG_VERSION"), "commit" => COMMIT)
                    .set(1.0);
            }
            // Its one reason so far.
            ("loopmesh_store_resyncs_total", _) => {
                let _ = metrics::counter!(family.name, "reason" => "compacted");
            }
            (name, Kind::Counter) => {
                let _ = metrics::counter!(name);
            }
            (name, Kind::Gauge) => {
                let _ = metrics::gauge!(name);
            }
            (name, Kind::Histogram) => {
                let _ = metrics::histogram!(name);
            }
        }
    }
}

fn describe(family: &'static Family) {
    let unit = if family.name.ends_with("_seconds") {
        Some(metrics::Unit::Seconds)
    } else if family.name.ends_with("_bytes") {
        Some(metrics::Unit::Bytes)
    } else {
        None
    };
    let (name, help) = (family.name, family.help);
    match (family.kind, unit) {
        (Kind::Counter, Some(unit)) => metrics::describe_counter!(name, unit, help),
        (Kind::Counter, None) => metrics::describe_counter!(name, help),
        (Kind::Gauge, Some(unit)) => metrics::describe_gauge!(name, unit, help),
        (Kind::Gauge, None) => metrics::describe_gauge!(name, help),
        (Kind::Histogram, Some(unit)) => metrics::describe_histogram!(name, unit, help),
        (Kind::Histogram, None) => metrics::describe_histogram!(name, help),
    }
}

/// The whole `/metrics` text: the recorder's series, then those `extra`
/// renders from the daemon's own state, then the process's.
pub fn scrape(
    recorder: &metrics_exporter_prometheus::PrometheusHandle,
    extra: impl FnOnce(&mut Exposition<'_>),
) -> String {
    let mut out = recorder.render();
    let mut exposition = Exposition::new(&mut out);
    extra(&mut exposition);
    process::render(&mut exposition);
    out
}

#[cfg(test)]
mod tests;
