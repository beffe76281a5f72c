use clap::Parser;

fn main() -> std::process::ExitCode {
    // Before anything can replace the binary: a successor (takeover) runs
    // the file at this path.
    loopmesh::takeover::remember_command_line();
    let cli = loopmesh::cli::Cli::parse();
    match loopmesh::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{}", loopmesh::logging::error_line(&one_line(&err)));
            std::process::ExitCode::from(loopmesh::cli::exit_code(&err))
        }
    }
}

/// The error and any cause its message does not already include, on one line.
fn one_line(err: &anyhow::Error) -> String {
    let mut message = err.to_string();
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
    }
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}
