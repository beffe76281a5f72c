//! The one place that names the YAML crate.
//!
//! serde_yaml is archived; loopmesh reads YAML through `serde-saphyr`, a
//! maintained, panic-free parser. Everything else calls [`from_str`] so the
//! crate can be swapped here without touching the rest of the code, and so
//! every YAML error reaches the operator as one line with its position.

use serde::de::DeserializeOwned;

/// A YAML document that did not parse into the expected type.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct YamlError {
    message: String,
}

/// Parses `text` into `T`, folding the parser's report into one line.
/// A value the type refuses (`port: 70000`) is reported with its field
/// and value first, since the parser names only a type and a position.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    serde_saphyr::from_str(text).map_err(|err| {
        let report = one_line(&err.without_snippet().to_string());
        let message = match position(&report).and_then(|(line, column)| field_at(text, line, column)) {
            Some((field, value)) => format!("{field}: {value} is not valid: {}", with_rule(&report)),
            None => report,
        };
        YamlError { message }
    })
}

/// The `line N, column M` a report points at (both from 1).
fn position(report: &str) -> Option<(usize, usize)> {
    let rest = &report[report.find("line ")? + 5..];
    let (line, rest) = rest.split_once(", column ")?;
    let column: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((line.trim().parse().ok()?, column.parse().ok()?))
}

/// The key and the scalar at `line`, `column` of `text`, in block
/// (`port: 70000`) or flow (`{port: 70000}`) style.
fn field_at(text: &str, line: usize, column: usize) -> Option<(String, String)> {
    let row = text.lines().nth(line.checked_sub(1)?)?;
    let at = row.char_indices().nth(column.checked_sub(1)?).map(|(i, _)| i)?;
    let (before, after) = row.split_at(at);
    let value: String = after
        .chars()
        .take_while(|c| !matches!(c, ',' | '}' | ']' | '#') && !c.is_whitespace())
        .collect();
    let key = before.trim_end().strip_suffix(':')?;
    let key = key
        .rsplit(|c: char| matches!(c, '{' | ',' | '[') || c.is_whitespace())
        .next()?
        .trim_matches(|c| c == '"' || c == '\'');
    (!key.is_empty() && !value.is_empty()).then(|| (key.to_string(), value))
}

/// The report, with the range a bounded integer type allows.
fn with_rule(report: &str) -> String {
    let rule = [
        ("u8", "0 to 255"),
        ("u16", "0 to 65535"),
        ("u32", "0 to 4294967295"),
        ("u64", "0 to 18446744073709551615"),
    ]
    .iter()
    .find(|(ty, _)| report.contains(&format!("invalid {ty} ")) || report.contains(&format!("invalid {ty}:")));
    match rule {
        Some((_, range)) => format!("a whole number from {range} ({report})"),
        None => report.to_string(),
    }
}

/// Joins a multi-line report into one line so log lines stay greppable.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Strict {
        port: u16,
    }

    #[test]
    fn unknown_field_is_one_line_naming_it() {
        let err = from_str::<Strict>("port: 1\nprot: 2\n").unwrap_err().to_string();
        assert!(err.contains("prot"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn an_out_of_range_value_names_its_field_value_and_rule() {
        for text in ["{port: 70000}", "port: 70000\n", "{\"port\": 70000}"] {
            let err = from_str::<Strict>(text).unwrap_err().to_string();
            assert!(
                err.starts_with("port: 70000 is not valid: a whole number from 0 to 65535"),
                "{text}: {err}"
            );
            assert!(err.contains("line 1"), "{err}");
        }
    }

    #[test]
    fn json_is_yaml() {
        let value: Strict = from_str(r#"{"port": 5432}"#).unwrap();
        assert_eq!(value.port, 5432);
    }
}
