//! Logs on stderr, for a terminal, a file or the journal.
//!
//! Under systemd, stderr is the journal's stream and `JOURNAL_STREAM`
//! names it (`<device>:<inode>`); there each line starts with its syslog
//! priority as `<N>` (sd-daemon(3): `<3>` error, `<4>` warning, `<6>` info,
//! `<7>` debug and trace), so `journalctl -p err` finds the errors, and has
//! no timestamp of its own, since journald stamps every line. The variable
//! alone is not enough: a child keeps it when its stderr goes elsewhere, so
//! the stream must be stderr itself. Elsewhere, lines are as before: a
//! timestamp, the level, the message.
//!
//! The filter (`RUST_LOG`, else the config's `log_level`, else info) can
//! be changed while running, through the admin API's `/logging`.

use std::sync::OnceLock;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error(
        "{level:?} is not a log level (off, error, warn, info, debug or trace); the filter stays {current:?}"
    )]
    Level { level: String, current: String },
    #[error("{filter:?} is not a log filter: {reason}; the filter stays {current:?}")]
    Filter {
        filter: String,
        reason: String,
        current: String,
    },
    #[error("logging is not set up in this process")]
    NotSetUp,
    #[error("cannot change the log filter: {0}")]
    Reload(String),
}

/// hickory-server logs every DNS response at info: its crates stay at warn
/// unless the filter names them (later directives win).
const HICKORY_AT_WARN: &str = "hickory_server=warn,hickory_proto=warn,hickory_net=warn";

/// The filter without `RUST_LOG` or a configured level.
const DEFAULT_LEVEL: &str = "info";

/// The live filter, once [`init`] has run.
static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// The filter a plain level makes: hickory at warn, then the level.
fn level_filter(level: &str) -> String {
    format!("{HICKORY_AT_WARN},{level}")
}

/// Sets up logging: `RUST_LOG` wins, else `level` (the config's
/// `log_level`), else info. Plain text, no colours; in the journal's
/// format when stderr is the journal.
pub fn init(level: Option<&str>) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(level_filter(level.unwrap_or(DEFAULT_LEVEL))));
    let (filter, handle) = reload::Layer::new(filter);
    let journal = to_journal();
    let plain = (!journal).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .with_target(false)
    });
    let journald = journal.then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .event_format(Journal)
    });
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(plain)
        .with(journald)
        .try_init();
    if installed.is_ok() {
        let _ = FILTER.set(handle);
    }
}

/// Whether stderr is the journal stream `JOURNAL_STREAM` names.
pub fn to_journal() -> bool {
    std::env::var("JOURNAL_STREAM")
        .ok()
        .and_then(|stream| parse_stream(&stream))
        .is_some_and(|named| stderr_identity() == Some(named))
}

/// `<device>:<inode>`, both decimal, as systemd writes JOURNAL_STREAM.
fn parse_stream(text: &str) -> Option<(u64, u64)> {
    let (device, inode) = text.trim().split_once(':')?;
    Some((device.parse().ok()?, inode.parse().ok()?))
}

/// stderr's device and inode, as fstat(2) gives them.
fn stderr_identity() -> Option<(u64, u64)> {
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat(2) fills `stat` on success; it is read only then.
    let stat = unsafe {
        if libc::fstat(libc::STDERR_FILENO, stat.as_mut_ptr()) != 0 {
            return None;
        }
        stat.assume_init()
    };
    Some((stat.st_dev, stat.st_ino))
}

/// A level's syslog priority, as journald reads the `<N>` prefix.
fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// A line for the journal: priority, level, message; no timestamp.
struct Journal;

impl<S, N> FormatEvent<S, N> for Journal
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let level = *event.metadata().level();
        write!(writer, "<{}>{level} ", priority(level))?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// The last line of a command that failed (`loopmesh: <error>`), with the
/// error priority when stderr is the journal.
pub fn error_line(message: &str) -> String {
    let line = format!("loopmesh: {message}");
    if to_journal() {
        format!("<{}>{line}", priority(Level::ERROR))
    } else {
        line
    }
}

/// The filter in force.
pub fn filter() -> Result<String, LoggingError> {
    let handle = FILTER.get().ok_or(LoggingError::NotSetUp)?;
    handle
        .with_current(ToString::to_string)
        .map_err(|err| LoggingError::Reload(err.to_string()))
}

/// Sets the filter to one level (`debug`), hickory's crates staying at
/// warn as at start; anything else is refused and the filter kept.
pub fn set_level(level: &str) -> Result<String, LoggingError> {
    let current = filter()?;
    if level.parse::<LevelFilter>().is_err() {
        return Err(LoggingError::Level {
            level: level.to_string(),
            current,
        });
    }
    replace(&level_filter(&level.to_ascii_lowercase()), current)
}

/// Sets the filter to `directives` (EnvFilter syntax, as in `RUST_LOG`:
/// `loopmesh::proxy=debug,info`); a filter that does not parse is refused
/// and the filter kept.
///
/// A bare word is read as a level: EnvFilter would take `verbose` as a
/// target enabled at trace with everything else off, which is never what
/// a person typing it meant.
pub fn set_filter(directives: &str) -> Result<String, LoggingError> {
    let current = filter()?;
    let directives = directives.trim();
    let bare = |d: &str| !d.contains(['=', '[', ':']);
    let not_a_level = directives
        .split(',')
        .map(str::trim)
        .find(|d| d.is_empty() || (bare(d) && d.parse::<LevelFilter>().is_err()));
    if let Some(word) = not_a_level {
        return Err(LoggingError::Filter {
            filter: directives.to_string(),
            reason: format!("{word:?} is neither a level nor TARGET=LEVEL"),
            current,
        });
    }
    replace(directives, current)
}

/// Parses and installs `directives`, giving the filter now in force.
fn replace(directives: &str, current: String) -> Result<String, LoggingError> {
    let handle = FILTER.get().ok_or(LoggingError::NotSetUp)?;
    let new = EnvFilter::builder()
        .with_regex(false)
        .parse(directives)
        .map_err(|err| LoggingError::Filter {
            filter: directives.to_string(),
            reason: err.to_string(),
            current,
        })?;
    handle
        .reload(new)
        .map_err(|err| LoggingError::Reload(err.to_string()))?;
    filter()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_is_device_colon_inode() {
        assert_eq!(parse_stream("8:12345\n"), Some((8, 12345)));
        assert_eq!(parse_stream("8-12345"), None);
        assert_eq!(parse_stream("x:1"), None);
    }

    #[test]
    fn priorities_follow_sd_daemon() {
        let got: Vec<u8> = [Level::ERROR, Level::WARN, Level::INFO, Level::DEBUG, Level::TRACE]
            .into_iter()
            .map(priority)
            .collect();
        assert_eq!(got, [3, 4, 6, 7, 7]);
    }
}
