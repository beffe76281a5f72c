//! The Prometheus text format, for the series rendered at scrape time
//! (appended to the recorder's): one family at a time, HELP and TYPE from
//! the family's entry in [`super::families`], then its samples.

use super::families::{Family, Kind};
use super::series::Histogram;
use super::BUCKETS;
use std::fmt::Write;

/// Text in the exposition format, written family by family.
pub struct Exposition<'a> {
    out: &'a mut String,
}

impl<'a> Exposition<'a> {
    /// Appends to `out`.
    pub fn new(out: &'a mut String) -> Self {
        Exposition { out }
    }

    /// Starts `family`: its HELP and TYPE lines, then the samples written
    /// through the writer returned (none is fine: the family is still
    /// listed, with its HELP).
    pub fn family(&mut self, family: &'static Family) -> Samples<'_> {
        let kind = match family.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let _ = writeln!(self.out, "# HELP {} {}", family.name, escape_help(family.help));
        let _ = writeln!(self.out, "# TYPE {} {kind}", family.name);
        Samples {
            out: self.out,
            family,
        }
    }
}

/// The samples of one family.
pub struct Samples<'a> {
    out: &'a mut String,
    family: &'static Family,
}

impl Samples<'_> {
    /// One sample of a counter or gauge, with its label values in the
    /// order of the family's labels.
    pub fn value(&mut self, values: &[&str], value: impl std::fmt::Display) {
        debug_assert_eq!(values.len(), self.family.labels.len(), "{}", self.family.name);
        self.line("", values, None, value);
    }

    /// The buckets, sum and count of one histogram.
    pub fn histogram(&mut self, values: &[&str], histogram: &Histogram) {
        let (cumulative, sum) = histogram.snapshot();
        for (bound, count) in BUCKETS.iter().zip(cumulative) {
            self.line("_bucket", values, Some(&bound.to_string()), count);
        }
        let count = cumulative[BUCKETS.len()];
        self.line("_bucket", values, Some("+Inf"), count);
        self.line("_sum", values, None, sum);
        self.line("_count", values, None, count);
    }

    fn line(&mut self, suffix: &str, values: &[&str], le: Option<&str>, value: impl std::fmt::Display) {
        let out = &mut *self.out;
        out.push_str(self.family.name);
        out.push_str(suffix);
        let mut labels = self
            .family
            .labels
            .iter()
            .zip(values)
            .map(|(l, v)| (*l, *v))
            .peekable();
        if labels.peek().is_some() || le.is_some() {
            out.push('{');
            let mut first = true;
            for (label, value) in labels.chain(le.map(|le| ("le", le))) {
                if !first {
                    out.push(',');
                }
                first = false;
                out.push_str(label);
                out.push_str("=\"");
                escape_value(out, value);
                out.push('"');
            }
            out.push('}');
        }
        let _ = writeln!(out, " {value}");
    }
}

/// A label value as the format wants it: backslash, double quote and
/// newline escaped.
fn escape_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// HELP text: backslash and newline escaped.
fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::families;

    #[test]
    fn samples_carry_their_labels_escaped_and_histograms_their_buckets() {
        let mut out = String::new();
        let mut exposition = Exposition::new(&mut out);
        exposition
            .family(&families::MESH_DENIED_TOTAL)
            .value(&["db", "spiffe://a/\"b\"\\\n"], 3);
        let histogram = Histogram::default();
        histogram.record(0.002);
        exposition
            .family(&families::PROXY_CONNECT_DURATION_SECONDS)
            .histogram(&["db"], &histogram);
        exposition.family(&families::PROCESS_OPEN_FDS).value(&[], 7);
        assert!(out.starts_with("# HELP loopmesh_mesh_denied_total "), "{out}");
        assert!(
            out.contains("# TYPE loopmesh_mesh_denied_total counter\n"),
            "{out}"
        );
        assert!(
            out.contains(
                "loopmesh_mesh_denied_total{service=\"db\",caller=\"spiffe://a/\\\"b\\\"\\\\\\n\"} 3\n"
            ),
            "{out}"
        );
        assert!(
            out.contains("loopmesh_proxy_connect_duration_seconds_bucket{service=\"db\",le=\"0.001\"} 0\n"),
            "{out}"
        );
        assert!(
            out.contains("loopmesh_proxy_connect_duration_seconds_bucket{service=\"db\",le=\"0.0025\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("loopmesh_proxy_connect_duration_seconds_bucket{service=\"db\",le=\"+Inf\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("loopmesh_proxy_connect_duration_seconds_sum{service=\"db\"} 0.002\n"),
            "{out}"
        );
        assert!(
            out.contains("loopmesh_proxy_connect_duration_seconds_count{service=\"db\"} 1\n"),
            "{out}"
        );
        assert!(out.ends_with("process_open_fds 7\n"), "{out}");
    }
}
