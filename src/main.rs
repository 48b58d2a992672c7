//! The `giststream` binary: parse flags, run, print errors with their cause chain.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    match giststream::cli::run(giststream::cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // A closed pipe (`giststream compress ... | head`) is not a failure.
            if err
                .chain()
                .filter_map(|e| e.downcast_ref::<std::io::Error>())
                .any(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            {
                return ExitCode::SUCCESS;
            }
            eprintln!("giststream: {err:#}");
            ExitCode::FAILURE
        }
    }
}
