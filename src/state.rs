//! Last known good: what the agent last rendered, and from which revision.
//!
//! Written after every render pass to `<state_dir>/state.json`. An agent
//! that restarts while the store is unreachable keeps the rendered files as
//! they are and uses this record to say how old they are.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// File name of the record inside the state directory.
pub const STATE_FILE: &str = "state.json";

/// The state record cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a loopmesh state record: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write state record: {0}")]
    Write(#[from] crate::render::RenderError),
    #[error("cannot lock {path}: {source}")]
    Lock { path: PathBuf, source: std::io::Error },
    #[error("state directory {dir} is in use by a running agent ({holder}); nothing was rendered. Stop it, or render elsewhere with --state-dir DIR")]
    Held { dir: PathBuf, holder: String },
}

/// File name of the lock a running agent holds in its state directory.
pub const LOCK_FILE: &str = ".agent.lock";

/// An exclusive hold on a state directory: one agent (or one `render
/// --once`) writes a state directory at a time. Released when dropped, or
/// by the kernel when the process ends however it ends (flock(2)).
#[derive(Debug)]
pub struct StateLock {
    file: std::fs::File,
}

/// Takes the state directory's lock, or says who holds it (the pid the
/// holder wrote into the lock file).
pub fn lock(state_dir: &Path) -> Result<StateLock, StateError> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    let path = state_dir.join(LOCK_FILE);
    let locking = |source| StateError::Lock {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(state_dir).map_err(locking)?;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(locking)?;
    // SAFETY: flock(2) on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(locking(err));
        }
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = match holder.trim() {
            "" => "pid unknown".to_string(),
            pid => format!("pid {pid}"),
        };
        return Err(StateError::Held {
            dir: state_dir.to_path_buf(),
            holder,
        });
    }
    file.set_len(0).map_err(locking)?;
    file.rewind().map_err(locking)?;
    writeln!(file, "{}", std::process::id()).map_err(locking)?;
    Ok(StateLock { file })
}

/// Holds the lock a predecessor handed over (`--takeover`): the flock
/// belongs to the open file both processes share, so it stays held when
/// the predecessor exits. The file is made to name this process.
pub fn adopt_lock(state_dir: &Path, fd: std::os::fd::OwnedFd) -> Result<StateLock, StateError> {
    use std::io::{Seek, Write};
    let path = state_dir.join(LOCK_FILE);
    let locking = |source| StateError::Lock {
        path: path.clone(),
        source,
    };
    let mut file = std::fs::File::from(fd);
    file.set_len(0).map_err(locking)?;
    file.rewind().map_err(locking)?;
    writeln!(file, "{}", std::process::id()).map_err(locking)?;
    Ok(StateLock { file })
}

impl StateLock {
    /// The lock file's descriptor, for a successor.
    pub fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.file.as_raw_fd()
    }
}

/// What the agent last applied.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LastKnownGood {
    /// Store revision the rendered files reflect.
    pub revision: i64,
    /// When the files were last rendered (seconds since the epoch).
    pub rendered_at: u64,
    /// The store they came from (`etcd ...` or `file catalog ...`).
    pub store: String,
    /// True while the store is unreachable or not yet synced.
    pub stale: bool,
    /// Catalog keys whose values were refused.
    pub invalid_keys: Vec<String>,
}

/// Seconds since the epoch, now.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Reads the record; `Ok(None)` if the agent never rendered here.
pub fn load(state_dir: &Path) -> Result<Option<LastKnownGood>, StateError> {
    let path = state_dir.join(STATE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StateError::Read { path, source }),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| StateError::Parse { path, source })
}

/// Writes the record atomically.
pub fn save(state_dir: &Path, record: &LastKnownGood) -> Result<(), StateError> {
    let mut text = serde_json::to_string_pretty(record).expect("state record serializes");
    text.push('\n');
    let spec = crate::render::sync::FileSpec::default();
    crate::render::sync::sync_file(&state_dir.join(STATE_FILE), text.as_bytes(), &spec)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_state_directory_names_its_holder_and_frees_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock(dir.path()).unwrap();
        let err = lock(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        assert!(err.contains("in use by a running agent"), "{err}");
        drop(held);
        lock(dir.path()).unwrap();
    }

    #[test]
    fn round_trips_and_reports_corruption() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let record = LastKnownGood {
            revision: 42,
            rendered_at: 1,
            store: "etcd".into(),
            stale: false,
            invalid_keys: vec!["services/x".into()],
        };
        save(dir.path(), &record).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(record));
        std::fs::write(dir.path().join(STATE_FILE), "{").unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("state.json"), "{err}");
    }
}
