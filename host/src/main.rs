//! The `sandbox` CLI: run commands in per-user sandboxes, inspect and
//! destroy them, check policy components, build the local image.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

mod cli;

use cli::{Cli, Command, EXIT_SANDBOX_ERROR};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Listing commands die quietly when their reader goes away (`sandbox ls
    // | head`), as Unix tools do. `exec` and `serve` keep the write error
    // instead: `exec` must still end its remote command, `serve` its peers.
    if !matches!(
        cli.command,
        Command::Exec(_) | Command::Cp(_) | Command::Shell(_) | Command::Logs(_)
    ) && !is_serve(&cli.command)
    {
        // SAFETY: restoring the default disposition, before any thread.
        unsafe {
            let _ = nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            );
        }
    }
    // Generated from the definitions: no configuration needed.
    match &cli.command {
        Command::Completions(args) => return cli::completions::run(args),
        Command::Man(args) => return cli::man::run(args),
        _ => {}
    }
    init_logging(cli.global.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(EXIT_SANDBOX_ERROR);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_SANDBOX_ERROR)
        }
    }
}

fn is_serve(command: &Command) -> bool {
    #[cfg(feature = "serve")]
    if matches!(command, Command::Serve(_)) {
        return true;
    }
    let _ = command;
    false
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn,sandbox_host=info",
        1 => "info,sandbox_host=debug",
        _ => "debug,sandbox_host=trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR"),
        ))
        .with_target(false)
        .init();
}

/// Colour only on a terminal, and not when `NO_COLOR` is set (to anything
/// but the empty string, as no-color.org says).
fn colour(stderr_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let loaded = cli::load_config(&cli.global)?;
    match cli.command {
        Command::Config(args) => cli::config::run(&loaded, args),
        Command::Exec(args) => cli::exec::run(loaded.config, args).await,
        Command::Ps(args) => cli::processes::ps(loaded.config, args).await,
        Command::Logs(args) => cli::processes::logs(loaded.config, args).await,
        Command::Kill(args) => cli::processes::kill(loaded.config, args).await,
        Command::Shell(args) => cli::shell::run(loaded.config, args).await,
        Command::Cp(args) => cli::cp::run(loaded.config, args).await,
        Command::Destroy(args) => cli::destroy::run(loaded.config, args).await,
        Command::Ls(args) => cli::ls::run(loaded.config, args).await,
        Command::PortForward(args) => cli::port_forward::run(loaded.config, args).await,
        Command::Gc(args) => cli::gc::run(loaded.config, args).await,
        #[cfg(feature = "serve")]
        Command::Serve(args) => cli::serve::run(loaded.config, args).await,
        Command::Demo => cli::demo::run(loaded.config, &cli.global).await,
        Command::Policy(command) => cli::policy::run(loaded.config, command).await,
        Command::Image(command) => cli::image::run(loaded.config, command).await,
        Command::Completions(_) | Command::Man(_) => {
            unreachable!("handled before the configuration is loaded")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bug: colour escapes were written to stderr when it was a file or a
    /// pipe.
    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(!colour(false, None), "a pipe or a file gets no escapes");
        assert!(!colour(true, Some("1".into())), "NO_COLOR is honoured");
        assert!(colour(true, Some("".into())), "an empty NO_COLOR is unset");
    }
}
