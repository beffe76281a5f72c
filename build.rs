//! Stamps the build: `LOOPMESH_GIT_COMMIT` (the short commit, or `unknown`
//! outside a git checkout, e.g. from a source tarball) and
//! `LOOPMESH_BUILD_TARGET` (the target triple). `loopmesh --version` prints
//! both, so a bug report or a fleet inventory names the exact build, and
//! `loopmesh_build_info{version,commit}` exports the commit.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let commit = own_checkout()
        .then(|| git(&["rev-parse", "--short=7", "HEAD"]))
        .flatten()
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=LOOPMESH_GIT_COMMIT={commit}");
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".to_string());
    println!("cargo:rustc-env=LOOPMESH_BUILD_TARGET={target}");

    // A new commit or a branch switch changes HEAD or the ref it names;
    // the paths come from git itself, as a worktree keeps HEAD apart from
    // the shared refs. Nothing else about git reruns this script.
    println!("cargo:rerun-if-changed=build.rs");
    if own_checkout() {
        for path in watched_git_files() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}

/// Whether the crate is the top of a git checkout: sources unpacked inside
/// some other repository (a vendored copy) must not claim its commit.
fn own_checkout() -> bool {
    let top = git(&["rev-parse", "--show-toplevel"]).and_then(|top| std::fs::canonicalize(top).ok());
    top.is_some() && top == std::fs::canonicalize(manifest_dir()).ok()
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| ".".into()))
}

/// HEAD, the ref it points at, and packed-refs (where `git gc` moves refs).
fn watched_git_files() -> Vec<PathBuf> {
    let mut names = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"]) {
        names.push(reference);
    }
    names
        .iter()
        .filter_map(|name| git(&["rev-parse", "--path-format=absolute", "--git-path", name]))
        .map(PathBuf::from)
        .filter(|path| path.exists())
        .collect()
}

/// One line of git's output, or None when git is missing or this is not a
/// checkout.
fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git")
        .args(args)
        .current_dir(manifest_dir())
        .output()
        .ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let line = text.trim();
    (output.status.success() && !line.is_empty()).then(|| line.to_string())
}
