//! The access log: one JSON line per HTTP request (and, on the node that
//! receives them, per mesh stream, with the caller's identity), written by
//! a thread of its own from a bounded queue. The data path never waits for it: when
//! the writer lags and the queue is full, the line is dropped and counted
//! (`loopmesh_http_access_log_dropped_total`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Lines queued for the writer at most.
const QUEUE: usize = 16 * 1024;

/// Where the lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Stderr,
    File(PathBuf),
}

impl Destination {
    /// `-` or `stderr` is standard error; anything else a file, appended to.
    pub fn parse(text: &str) -> Destination {
        match text {
            "-" | "stderr" => Destination::Stderr,
            path => Destination::File(PathBuf::from(path)),
        }
    }
}

/// The sending side; cheap to share.
#[derive(Debug)]
pub struct AccessLog {
    lines: SyncSender<String>,
    dropped: metrics::Counter,
}

/// What one line says of a request.
pub struct Line<'a> {
    pub service: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub duration: Duration,
    pub upstream: Option<&'a str>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// False if the response did not reach its end (client gone, backend broke off).
    pub complete: bool,
    pub retries: u32,
    pub request_id: &'a str,
    pub trace_id: &'a str,
}

impl AccessLog {
    /// Opens the destination and starts the writer thread.
    pub fn open(destination: &Destination) -> std::io::Result<AccessLog> {
        let mut out: Box<dyn Write + Send> = match destination {
            Destination::Stderr => Box::new(std::io::stderr()),
            Destination::File(path) => Box::new(open_append(path)?),
        };
        let (lines, queue) = sync_channel::<String>(QUEUE);
        std::thread::Builder::new()
            .name("loopmesh-access".into())
            .spawn(move || {
                let mut buffer = Vec::with_capacity(64 * 1024);
                while let Ok(line) = queue.recv() {
                    buffer.extend_from_slice(line.as_bytes());
                    // Batch what is queued: one write for many lines.
                    while buffer.len() < 60 * 1024 {
                        match queue.try_recv() {
                            Ok(line) => buffer.extend_from_slice(line.as_bytes()),
                            Err(_) => break,
                        }
                    }
                    if out.write_all(&buffer).and_then(|()| out.flush()).is_err() {
                        metrics::counter!("loopmesh_http_access_log_write_errors_total").increment(1);
                    }
                    buffer.clear();
                }
            })?;
        Ok(AccessLog {
            lines,
            dropped: metrics::counter!("loopmesh_http_access_log_dropped_total"),
        })
    }

    /// Queues a request's line; drops it (counted) if the writer lags.
    pub fn write(&self, line: Line<'_>) {
        self.queue(line.to_json());
    }

    /// Queues a mesh stream's line, the same way.
    pub fn write_stream(&self, line: StreamLine<'_>) {
        self.queue(line.to_json());
    }

    fn queue(&self, line: String) {
        match self.lines.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped.increment(1),
        }
    }
}

/// What one line says of a stream the mesh's inbound listener carried to
/// a backend of this node.
pub struct StreamLine<'a> {
    pub service: &'a str,
    /// The calling node's identity, from its certificate.
    pub caller: &'a str,
    pub peer: std::net::SocketAddr,
    pub target: std::net::SocketAddr,
    pub duration: Duration,
    /// From the caller to the backend.
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl StreamLine<'_> {
    fn to_json(&self) -> String {
        let mut line = serde_json::json!({
            "time": now(),
            "kind": "mesh_inbound",
            "service": self.service,
            "caller": self.caller,
            "peer": self.peer.to_string(),
            "target": self.target.to_string(),
            "duration_ms": millis(self.duration),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        })
        .to_string();
        line.push('\n');
        line
    }
}

/// Seconds since the epoch, to the millisecond.
fn now() -> String {
    let time = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("{}.{:03}", time.as_secs(), time.subsec_millis())
}

/// Milliseconds to the microsecond.
fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().create(true).append(true).open(path)
}

impl Line<'_> {
    fn to_json(&self) -> String {
        let mut line = serde_json::json!({
            "time": now(),
            "kind": "http",
            "service": self.service,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "duration_ms": millis(self.duration),
            "upstream": self.upstream,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "complete": self.complete,
            "retries": self.retries,
            "request_id": self.request_id,
            "trace_id": self.trace_id,
        })
        .to_string();
        line.push('\n');
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_one_parseable_json_object() {
        let line = Line {
            service: "web",
            method: "GET",
            path: "/a \"quoted\"\npath",
            status: 200,
            duration: Duration::from_micros(1500),
            upstream: Some("web-1"),
            bytes_in: 0,
            bytes_out: 12,
            complete: true,
            retries: 1,
            request_id: "r",
            trace_id: "t",
        }
        .to_json();
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["path"], "/a \"quoted\"\npath");
        assert_eq!(parsed["duration_ms"], 1.5);
        assert_eq!(parsed["upstream"], "web-1");
    }
}
