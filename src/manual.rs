//! Man pages and shell completions, generated from the clap definitions in
//! [`crate::cli`]: a flag added there is documented and completed with no
//! second copy to keep in step. The Debian package runs `loopmesh man --out
//! DIR` and `loopmesh completions SHELL` on the binary it ships.

use crate::cli::Cli;
use clap::CommandFactory;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The section of every page: loopmesh is a command operators run as well
/// as a daemon, and clap_mangen names pages `loopmesh-agent.1`.
pub const SECTION: &str = "1";

/// Why a page or a completion script was not written.
#[derive(Debug, thiserror::Error)]
pub enum ManualError {
    #[error("cannot write man pages into {}: {source}", dir.display())]
    Pages { dir: PathBuf, source: std::io::Error },
    #[error("cannot write the {shell} completion script: {source}")]
    Completion {
        shell: clap_complete::Shell,
        source: std::io::Error,
    },
}

/// Writes `loopmesh.1` and one page per visible subcommand, at any depth
/// (`loopmesh-service-list.1`), into `dir`, created if missing; returns
/// the paths written, the main page first.
pub fn write_man_pages(dir: &Path) -> Result<Vec<PathBuf>, ManualError> {
    let error = |source| ManualError::Pages {
        dir: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(error)?;
    // Built once from the top, so every subcommand carries its full
    // display name (`loopmesh-service-list`) and usage line.
    let mut top = Cli::command().disable_help_subcommand(true);
    top.build();
    let mut written = Vec::new();
    let mut pending = vec![top];
    while let Some(command) = pending.pop() {
        pending.extend(
            command
                .get_subcommands()
                .filter(|sub| !sub.is_hide_set())
                .cloned(),
        );
        let page = clap_mangen::Man::new(command)
            .section(SECTION)
            .source(format!("loopmesh {}", env!("CARGO_PKG_VERSION")))
            .manual("loopmesh manual");
        written.push(page.generate_to(dir).map_err(error)?);
    }
    Ok(written)
}

/// The completion script for `shell`, whole: generated in memory first,
/// since clap_complete panics on a failed write (stdout closed by `head`).
pub fn completion(shell: clap_complete::Shell) -> Vec<u8> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "loopmesh", &mut script);
    script
}

/// Prints the completion script for `shell` to stdout.
pub fn print_completion(shell: clap_complete::Shell) -> Result<(), ManualError> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&completion(shell))
        .and_then(|()| stdout.flush())
        .map_err(|source| ManualError::Completion { shell, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shell_gets_a_script_naming_the_binary() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let script = String::from_utf8(completion(shell)).unwrap();
            assert!(script.contains("loopmesh"), "{shell}: {script}");
            assert!(script.contains("registrar"), "{shell} completes subcommands");
        }
    }
}
