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
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    serde_saphyr::from_str(text).map_err(|err| YamlError {
        message: one_line(&err.without_snippet().to_string()),
    })
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
    fn json_is_yaml() {
        let value: Strict = from_str(r#"{"port": 5432}"#).unwrap();
        assert_eq!(value.port, 5432);
    }
}
