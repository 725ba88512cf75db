//! `sandbox completions`: print a shell completion script generated from the command definitions.

use std::process::ExitCode;

use clap::CommandFactory;

use super::Cli;

#[derive(clap::Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    pub shell: clap_complete::Shell,
}

/// Needs no configuration, logging or runtime: it only reads the definitions.
pub fn run(args: &CompletionsArgs) -> ExitCode {
    clap_complete::generate(
        args.shell,
        &mut Cli::command(),
        "sandbox",
        &mut std::io::stdout(),
    );
    ExitCode::SUCCESS
}
