//! The metric table against the sources and the README.

use super::families::{self, Kind, Present, ALL};
use std::path::Path;

/// The metric names given as a literal to `counter!`, `gauge!` and
/// `histogram!` in the sources under `dir`, with where.
fn recorder_names(dir: &Path, found: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            recorder_names(&path, found);
            continue;
        }
        if path.extension().is_none_or(|ext| ext != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for kind in ["counter", "gauge", "histogram"] {
            let macro_name = format!("{kind}!(");
            for (at, _) in text.match_indices(&macro_name) {
                let after = text[at + macro_name.len()..].trim_start();
                // A name given by a variable (the table's own) is not a use.
                let Some(quoted) = after.strip_prefix('"') else {
                    continue;
                };
                let name = &quoted[..quoted.find('"').unwrap()];
                found.push((name.to_string(), path.display().to_string()));
            }
        }
    }
}

#[test]
fn every_metric_the_sources_record_is_in_the_table_with_its_help() {
    let mut found = Vec::new();
    recorder_names(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut found);
    assert!(found.len() > 30, "the scan found too few metrics: {found:?}");
    for (name, file) in &found {
        let family = ALL.iter().find(|f| f.name == name);
        assert!(
            family.is_some_and(|f| f.present.in_recorder()),
            "{file} records {name}, which telemetry::families does not list as a recorder metric (rendered \
             families are written through telemetry::Exposition, not the facade)"
        );
    }
    // And the other way: each recorder family is recorded somewhere (or
    // registered by telemetry::register itself).
    for family in ALL.iter().filter(|f| f.present.in_recorder()) {
        assert!(
            family.present == Present::Start || found.iter().any(|(name, _)| name == family.name),
            "{} is in the table but nothing records it",
            family.name
        );
    }
}

#[test]
fn names_are_unique_and_follow_the_conventions() {
    for (i, family) in ALL.iter().enumerate() {
        assert!(
            ALL[i + 1..].iter().all(|other| other.name != family.name),
            "{} twice",
            family.name
        );
        assert!(
            family.name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{}",
            family.name
        );
        assert_eq!(
            family.kind == Kind::Counter,
            family.name.ends_with("_total"),
            "{}: counters, and only they, end in _total",
            family.name
        );
        assert!(
            !family.help.contains('|') && family.help.ends_with('.'),
            "{}: HELP is one sentence or more, without a table's '|'",
            family.name
        );
    }
}

#[test]
fn the_dns_latency_help_states_the_sampling() {
    let help = families::DNS_QUERY_DURATION_SECONDS.help;
    assert!(
        help.contains(&format!("one query in {} is sampled", crate::dns::LATENCY_SAMPLE)),
        "{help}"
    );
}

/// A family as the README's table has it.
fn readme_row(family: &families::Family) -> String {
    let kind = match family.kind {
        Kind::Counter => "counter",
        Kind::Gauge => "gauge",
        Kind::Histogram => "histogram",
    };
    let labels: Vec<String> = family.labels.iter().map(|l| format!("`{l}`")).collect();
    let labels = if labels.is_empty() {
        "—".to_string()
    } else {
        labels.join(", ")
    };
    format!(
        "| `{}` | {kind} | {labels} | {} | {} |",
        family.name,
        family.present.describe(),
        family.help
    )
}

#[test]
fn the_readme_lists_every_metric_as_the_table_does() {
    let readme = include_str!("../../README.md");
    let rows: Vec<&str> = readme
        .lines()
        .filter(|line| {
            line.starts_with("| `")
                && [" counter |", " gauge |", " histogram |"]
                    .iter()
                    .any(|kind| line.contains(kind))
        })
        .collect();
    let expected: Vec<String> = ALL.iter().map(|f| readme_row(f)).collect();
    for (row, want) in rows.iter().zip(&expected) {
        assert_eq!(
            row, want,
            "README.md's metric table differs from telemetry::families"
        );
    }
    assert_eq!(
        rows.len(),
        expected.len(),
        "README.md's metric table should have these rows:\n{}",
        expected.join("\n")
    );
}
