use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = loopmesh::cli::Cli::parse();
    match loopmesh::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("loopmesh: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
