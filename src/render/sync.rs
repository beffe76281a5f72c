//! Putting one rendered file in place, confd's way.
//!
//! Stage the new content beside the destination (same filesystem, so the
//! rename is atomic), skip if nothing changed, run the checks on the staged
//! file, fix owner and mode, then rename over the old file. Any failure
//! removes the staged file and leaves the old one exactly as it was.

use super::RenderError;
use crate::config::BuiltinCheck;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

static STAGE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// How a file must be written and checked.
#[derive(Debug, Clone, Default)]
pub struct FileSpec {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub check_cmd: Option<String>,
    pub check: Option<BuiltinCheck>,
    pub command_timeout: Duration,
}

/// What happened to a destination file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Unchanged,
    Written,
}

/// Writes `content` to `dest` if it differs, after the checks pass.
pub fn sync_file(dest: &Path, content: &[u8], spec: &FileSpec) -> Result<Outcome, RenderError> {
    let (current, current_mode) = read_current(dest);
    let mode_ok = spec.mode.is_none() || spec.mode == current_mode;
    if current.as_deref() == Some(content) && mode_ok {
        return Ok(Outcome::Unchanged);
    }
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RenderError::Write { path, source }
    };
    let staged = staged_path(dest);
    let mut file = match create_new(&staged) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            // First file in a directory that does not exist yet.
            let parent = dest.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(parent).map_err(write_err(parent))?;
            create_new(&staged)
        }
        other => other,
    }
    .map_err(write_err(&staged))?;
    let result = (|| {
        file.write_all(content).map_err(write_err(&staged))?;
        let mode = spec.mode.or(current_mode).unwrap_or(0o644);
        // fchmod on the open file: exact bits whatever the umask.
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(write_err(&staged))?;
        if spec.uid.is_some() || spec.gid.is_some() {
            std::os::unix::fs::fchown(&file, spec.uid, spec.gid).map_err(write_err(&staged))?;
        }
        drop(file);
        if let Some(check) = spec.check {
            builtin_check(check, content).map_err(|reason| RenderError::Check {
                dest: dest.to_path_buf(),
                what: "route validation".into(),
                reason,
            })?;
        }
        if let Some(cmd) = &spec.check_cmd {
            let cmd = cmd
                .replace("{{src}}", &staged.to_string_lossy())
                .replace("{{ src }}", &staged.to_string_lossy());
            run_command(&cmd, spec.command_timeout).map_err(|reason| RenderError::Check {
                dest: dest.to_path_buf(),
                what: format!("check_cmd `{cmd}`"),
                reason,
            })?;
        }
        std::fs::rename(&staged, dest).map_err(write_err(dest))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&staged);
    }
    result.map(|()| Outcome::Written)
}

/// The current content and permission bits of `dest`, from one open.
fn read_current(dest: &Path) -> (Option<Vec<u8>>, Option<u32>) {
    let Ok(mut file) = std::fs::File::open(dest) else {
        return (None, None);
    };
    let mode = file.metadata().ok().map(|m| m.permissions().mode() & 0o7777);
    let mut content = Vec::new();
    match file.read_to_end(&mut content) {
        Ok(_) => (Some(content), mode),
        Err(_) => (None, mode),
    }
}

fn create_new(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

/// Removes a rendered file; `Ok(false)` if it was already gone.
pub fn remove_file(dest: &Path) -> Result<bool, RenderError> {
    match std::fs::remove_file(dest) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(RenderError::Write {
            path: dest.to_path_buf(),
            source,
        }),
    }
}

/// A hidden sibling of `dest`, unique to this process and call.
fn staged_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(
        ".{name}.loopmesh-{}-{}.tmp",
        std::process::id(),
        STAGE_COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

fn builtin_check(check: BuiltinCheck, content: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(content).map_err(|_| "not UTF-8".to_string())?;
    match check {
        BuiltinCheck::Route => crate::routing::Route::parse(text).map(drop),
    }
}

/// Runs `cmd` with `sh -c`; an error carries the exit status and stderr tail.
pub fn run_command(cmd: &str, timeout: Duration) -> Result<(), String> {
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|err| format!("cannot start: {err}"))?;
    let pid = child.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait_with_output());
    });
    let output = match done_rx.recv_timeout(timeout) {
        Ok(Ok(output)) => output,
        Ok(Err(err)) => return Err(format!("cannot wait: {err}")),
        Err(_) => {
            // SAFETY: kill(2) on the child's pid; it is ours and not yet reaped.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            return Err(format!("timed out after {timeout:?} and was killed"));
        }
    };
    if output.status.success() {
        return Ok(());
    }
    // What the command said: its stderr, else its stdout (many checkers,
    // `nginx -t` and shell scripts among them, report on either).
    let said = if output.stderr.iter().any(|b| !b.is_ascii_whitespace()) {
        String::from_utf8_lossy(&output.stderr)
    } else {
        String::from_utf8_lossy(&output.stdout)
    };
    let tail: Vec<&str> = said.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = tail[tail.len().saturating_sub(3)..].join(" | ");
    Err(format!(
        "{}{}",
        output.status,
        if tail.is_empty() {
            String::new()
        } else {
            format!(": {tail}")
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FileSpec {
        FileSpec {
            command_timeout: Duration::from_secs(10),
            ..FileSpec::default()
        }
    }

    #[test]
    fn writes_then_skips_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("sub/out.conf");
        assert_eq!(sync_file(&dest, b"a", &spec()).unwrap(), Outcome::Written);
        assert_eq!(sync_file(&dest, b"a", &spec()).unwrap(), Outcome::Unchanged);
        assert_eq!(std::fs::read(&dest).unwrap(), b"a");
        let mode = std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
    }

    #[test]
    fn a_failing_command_that_reports_on_stdout_is_heard() {
        let err = run_command("echo 'line 3: unknown keyword'; exit 1", Duration::from_secs(5)).unwrap_err();
        assert!(
            err.contains("line 3: unknown keyword") && err.contains("exit status: 1"),
            "{err}"
        );
    }

    #[test]
    fn failing_check_keeps_the_old_file_and_leaves_no_staging() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.conf");
        std::fs::write(&dest, "old").unwrap();
        let failing = FileSpec {
            check_cmd: Some("grep -q good {{src}} || { echo 'no good here' >&2; exit 3; }".into()),
            ..spec()
        };
        let err = sync_file(&dest, b"bad", &failing).unwrap_err().to_string();
        assert!(err.contains("no good here") && err.contains("out.conf"), "{err}");
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert_eq!(sync_file(&dest, b"good", &failing).unwrap(), Outcome::Written);
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "good");
    }

    #[test]
    fn check_cmd_sees_the_staged_content() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.conf");
        let seen = dir.path().join("seen");
        let spec = FileSpec {
            check_cmd: Some(format!("cp {{{{src}}}} {}", seen.display())),
            ..spec()
        };
        sync_file(&dest, b"new content", &spec).unwrap();
        assert_eq!(std::fs::read_to_string(seen).unwrap(), "new content");
    }

    #[test]
    fn mode_is_applied() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("secret.env");
        let spec = FileSpec {
            mode: Some(0o600),
            ..spec()
        };
        sync_file(&dest, b"x", &spec).unwrap();
        assert_eq!(
            std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn builtin_route_check_refuses_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("pg.yaml");
        let spec = FileSpec {
            check: Some(BuiltinCheck::Route),
            ..spec()
        };
        assert!(sync_file(&dest, b"service: pg\n", &spec).is_err());
        assert!(!dest.exists());
    }

    #[test]
    fn command_timeout_kills() {
        let err = run_command("sleep 5", Duration::from_millis(100)).unwrap_err();
        assert!(err.contains("timed out"), "{err}");
    }
}
