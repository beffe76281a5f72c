//! What the binary says about itself: `--version` names the build, the man
//! pages cover every subcommand (the clap tree is walked here, so a new
//! subcommand without a page fails) and render cleanly with groff, and the
//! shell completions are produced for each shell, the bash one sourced and
//! asked to complete.

mod common;

use clap::CommandFactory;
use common::{require_tool, run};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

#[test]
fn version_names_the_release_the_commit_and_the_target() {
    let (ok, stdout, stderr) = run(&["--version"]);
    assert!(ok, "{stderr}");
    let manifest = env!("CARGO_MANIFEST_DIR");
    // What git says of this checkout now; build.rs reran when HEAD moved.
    let commit = Command::new("git")
        .args(["-C", manifest, "rev-parse", "--short=7", "HEAD"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".to_string());
    let prefix = format!("loopmesh {} (commit {commit}, ", env!("CARGO_PKG_VERSION"));
    let line = stdout.trim_end();
    assert!(
        line.starts_with(&prefix),
        "{line:?} does not start with {prefix:?}"
    );
    let target = line[prefix.len()..]
        .strip_suffix(')')
        .unwrap_or_else(|| panic!("{line:?}"));
    assert!(
        target.starts_with(&format!("{}-", std::env::consts::ARCH)) && target.contains("-linux-"),
        "{target:?} is not this machine's target triple"
    );
}

/// `loopmesh` and every visible subcommand below it, by the page name
/// clap_mangen gives it (`loopmesh-service-list`).
fn commands(command: &clap::Command, page: &str, pages: &mut BTreeMap<String, clap::Command>) {
    pages.insert(page.to_string(), command.clone());
    for sub in command.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        commands(sub, &format!("{page}-{}", sub.get_name()), pages);
    }
}

/// The long flags a page must document: every visible one of the command.
fn long_flags(command: &clap::Command) -> Vec<String> {
    command
        .get_arguments()
        .filter(|arg| !arg.is_hide_set())
        .filter_map(|arg| arg.get_long())
        .map(|long| format!("--{long}"))
        .collect()
}

#[test]
fn there_is_a_man_page_for_every_subcommand_and_groff_renders_each_cleanly() {
    let groff = require_tool("groff", "groff-base");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man");
    let (ok, stdout, stderr) = run(&["man", "--out", out.to_str().unwrap()]);
    assert!(ok, "{stderr}");

    let mut top = loopmesh::cli::Cli::command();
    top.build();
    let mut wanted = BTreeMap::new();
    commands(&top, "loopmesh", &mut wanted);
    assert!(
        wanted.contains_key("loopmesh-service-list") && wanted.len() > 15,
        "{wanted:?}"
    );
    let written: BTreeSet<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let expected: BTreeSet<String> = wanted.keys().map(|name| format!("{name}.1")).collect();
    assert_eq!(written, expected, "pages written vs the clap tree");
    assert_eq!(
        stdout.lines().count(),
        expected.len(),
        "one `wrote` line a page: {stdout}"
    );

    for (name, command) in &wanted {
        let rendered = render(&groff, &out.join(format!("{name}.1")));
        assert!(
            squeeze(&rendered).contains(&format!("{name} - ")),
            "{name}.1 lacks its NAME line:\n{rendered}"
        );
        if let Some(about) = command.get_about() {
            let first_words: String = about
                .to_string()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ");
            assert!(
                squeeze(&rendered).contains(&first_words),
                "{name}.1 lacks {first_words:?}"
            );
        }
        for flag in long_flags(command) {
            assert!(rendered.contains(&flag), "{name}.1 does not document {flag}");
        }
    }
    let main = render(&groff, &out.join("loopmesh.1"));
    assert!(
        main.contains(&format!("loopmesh {}", env!("CARGO_PKG_VERSION"))),
        "{main}"
    );
}

/// The page as text; groff's warnings (all of them, -ww) fail the test.
fn render(groff: &Path, page: &Path) -> String {
    let output = Command::new(groff)
        .args(["-man", "-rHY=0", "-Tutf8", "-ww", "-P", "-cbou"])
        .arg(page)
        .env("LC_ALL", "C.UTF-8")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stderr.trim().is_empty(),
        "groff on {}: {stderr}",
        page.display()
    );
    // Plain text (-cbou: no overstrike, no escapes; HY=0: no hyphenation),
    // ASCII hyphens.
    String::from_utf8_lossy(&output.stdout)
        .replace("\u{2010}", "-")
        .replace('\u{2212}', "-")
}

fn squeeze(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn completions_come_for_each_shell_and_the_bash_one_completes_subcommands() {
    let mut top = loopmesh::cli::Cli::command();
    top.build();
    let visible: Vec<String> = top
        .get_subcommands()
        .filter(|sub| !sub.is_hide_set() && sub.get_name() != "help")
        .map(|sub| sub.get_name().to_string())
        .collect();
    for shell in ["bash", "zsh", "fish"] {
        let (ok, script, stderr) = run(&["completions", shell]);
        assert!(ok, "{shell}: {stderr}");
        for name in &visible {
            assert!(
                script.contains(name.as_str()),
                "the {shell} script does not complete {name}"
            );
        }
    }
    let (ok, _, stderr) = run(&["completions", "tcsh"]);
    assert!(
        !ok && stderr.contains("tcsh"),
        "an unknown shell is refused: {stderr}"
    );

    let bash = require_tool("bash", "bash");
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("loopmesh.bash");
    let (_, text, _) = run(&["completions", "bash"]);
    std::fs::write(&script, text).unwrap();
    let syntax = Command::new(&bash).arg("-n").arg(&script).output().unwrap();
    assert!(
        syntax.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&syntax.stderr)
    );

    // Sourced as bash-completion would, then asked what `loopmesh ser<TAB>`
    // and `loopmesh service l<TAB>` complete to.
    let complete = |words: &[&str]| -> Vec<String> {
        let program = format!(
            "source {}; COMP_WORDS=({}); COMP_CWORD={}; _loopmesh loopmesh {} {}; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display(),
            words.join(" "),
            words.len() - 1,
            words[words.len() - 1],
            words[words.len() - 2],
        );
        let output = Command::new(&bash).args(["-c", &program]).output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(complete(&["loopmesh", "ser"]), ["service"]);
    assert_eq!(complete(&["loopmesh", "service", "l"]), ["list"]);
    assert!(complete(&["loopmesh", "agent", "--con"]).contains(&"--config".to_string()));
}
