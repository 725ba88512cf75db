//! `sandbox man`: print the manual page (roff) generated from the command definitions.

use std::process::ExitCode;

use clap::CommandFactory;

use super::{Cli, EXIT_SANDBOX_ERROR};

/// Needs no configuration, logging or runtime: it only reads the definitions.
pub fn run() -> ExitCode {
    match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: writing the manual page: {e}");
            ExitCode::from(EXIT_SANDBOX_ERROR)
        }
    }
}
