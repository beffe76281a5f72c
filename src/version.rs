//! What this build is: the package version, the git commit and the target
//! triple, stamped by build.rs, so a bug report or a fleet inventory names
//! the exact build.

/// The short git commit the binary was built from, `unknown` outside a git
/// checkout (a source tarball).
pub const COMMIT: &str = env!("LOOPMESH_GIT_COMMIT");

/// `loopmesh --version` after the name:
/// `0.1.0 (commit 5661c38, x86_64-unknown-linux-gnu)`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("LOOPMESH_GIT_COMMIT"),
    ", ",
    env!("LOOPMESH_BUILD_TARGET"),
    ")"
);
