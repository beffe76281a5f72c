//! Human durations in config and catalog values: `250ms`, `5s`, `2m`, `1h`.
//!
//! Operators write timeouts the way HAProxy and Envoy configs do; a bare
//! number is refused because its unit would be a guess.

use serde::{Deserialize, Deserializer, Serializer};
use std::time::Duration;

/// A duration string that does not parse.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid duration {text:?}: expected a number with a unit (ms, s, m, h), like 250ms or 5s")]
pub struct DurationError {
    text: String,
}

/// Parses `250ms`, `5s`, `1.5s`, `2m`, `1h`.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let err = || DurationError {
        text: text.to_string(),
    };
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(err)?;
    let (number, unit) = trimmed.split_at(split);
    let value: f64 = number.parse().map_err(|_| err())?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(err()),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| err())
}

/// Formats a duration the way [`parse`] reads it back.
pub fn format(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis.is_multiple_of(1000) {
        format!("{}s", millis / 1000)
    } else {
        format!("{millis}ms")
    }
}

/// `#[serde(with = "crate::duration")]` for `Duration` fields.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse(&text).map_err(serde::de::Error::custom)
}

/// Serializes a `Duration` as its human form.
pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format(*duration))
}

/// `#[serde(with = "crate::duration::optional")]` for `Option<Duration>`
/// fields.
pub mod optional {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(deserializer)? {
            Some(text) => super::parse(&text).map(Some).map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }

    pub fn serialize<S: Serializer>(duration: &Option<Duration>, serializer: S) -> Result<S::Ok, S::Error> {
        match duration {
            Some(duration) => serializer.serialize_str(&super::format(*duration)),
            None => serializer.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
    }

    #[test]
    fn refuses_bare_numbers_and_unknown_units() {
        assert!(parse("5").is_err());
        assert!(parse("5 parsecs").is_err());
        assert!(parse("ms").is_err());
        assert!(parse("-1s").is_err());
    }

    #[test]
    fn format_round_trips() {
        for text in ["250ms", "5s", "1500ms"] {
            assert_eq!(format(parse(text).unwrap()), text);
        }
    }
}
