//! The command line: its definition, the options every command shares, and one module per command.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use sandbox_host::config::{Flag, Layers, Loaded, MAX_DURATION};
use sandbox_host::DockerProvider;
use sandbox_host::{Config, PolicySource, Sandbox};

pub mod completions;
pub mod config;
pub mod cp;
pub mod demo;
pub mod destroy;
pub mod exec;
pub mod gc;
pub mod image;
pub mod ls;
pub mod man;
pub mod policy;
pub mod port_forward;
pub mod processes;
#[cfg(feature = "serve")]
pub mod serve;
pub mod shell;
mod stdin;

/// Exit code for failures of the sandbox itself (as `docker exec` does).
pub const EXIT_SANDBOX_ERROR: u8 = 125;

#[derive(Parser)]
#[command(
    name = "sandbox",
    version,
    about = "Per-user Docker sandboxes for AI agents, placed by a WebAssembly policy"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// TOML configuration file (flags and SANDBOX_* variables override it).
    /// Default: ~/.config/sandbox/config.toml, else /etc/sandbox/config.toml,
    /// when one exists.
    #[arg(long, global = true, env = "SANDBOX_CONFIG")]
    pub config: Option<PathBuf>,
    /// Read no configuration file, not even a default one.
    #[arg(long, global = true, conflicts_with = "config")]
    pub no_config: bool,
    /// Policy component (.wasm) to load instead of the embedded per-user policy.
    #[arg(long, global = true)]
    pub policy: Option<PathBuf>,
    /// Image for new sandbox containers.
    #[arg(long, global = true)]
    pub image: Option<String>,
    /// Directory holding the workspaces.
    #[arg(long, global = true)]
    pub workspace_root: Option<PathBuf>,
    /// Label namespace of this deployment.
    #[arg(long, global = true)]
    pub namespace: Option<String>,
    /// More logs (-v debug, -vv trace); RUST_LOG takes precedence.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

// Each command's flags live beside its code; the doc comments here are the
// commands' help texts.
#[derive(Subcommand)]
pub enum Command {
    /// Run a command in the thread's sandbox; exits with the command's code
    /// (with -d: starts it in the background and prints its id).
    Exec(exec::ExecArgs),
    /// List the background processes and terminals of a thread's sandbox.
    Ps(processes::PsArgs),
    /// Print a background process's output (-f: follow it to its end).
    Logs(processes::LogsArgs),
    /// Signal a background process's whole tree (default KILL); --rm forgets it.
    Kill(processes::KillArgs),
    /// Open a terminal in a thread's sandbox (like `docker exec -it`).
    Shell(shell::ShellArgs),
    /// Copy a file into or out of a thread's workspace: `cp LOCAL THREAD:PATH`
    /// or `cp THREAD:PATH LOCAL` (PATH absolute anywhere the sandbox user may go, or relative to /workspace).
    ///
    /// An operand is remote when the text before its first `:` is a valid
    /// thread id (the path may hold more `:`). Into an existing local
    /// directory, or a destination ending in `/`, the file keeps its name.
    /// Write `./NAME` for a local file whose name has a `:`.
    Cp(cp::CpArgs),
    /// Destroy a user's backend, or the backend serving a thread.
    /// Commands running on it get `destroy_grace_secs` (10 s) to finish first.
    Destroy(destroy::DestroyArgs),
    /// List the containers this namespace manages.
    Ls(ls::LsArgs),
    /// Reach a port inside a thread's sandbox from a local port (a dev
    /// server to open in a browser); the sandbox needs no network.
    PortForward(port_forward::PortForwardArgs),
    /// Remove managed containers no backend owns any more (never unlabelled ones).
    Gc(gc::GcArgs),
    /// Serve the JSON HTTP API (see host/openapi.json) until SIGTERM.
    #[cfg(feature = "serve")]
    Serve(serve::ServeArgs),
    /// Show two threads of one user sharing one container (and another user apart).
    Demo,
    /// Policy components.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// The local sandbox image.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Print the effective configuration and where each value came from
    /// (default, the file, an environment variable, a flag).
    Config(config::ConfigArgs),
    /// Print a shell completion script (e.g. `sandbox completions bash >
    /// /etc/bash_completion.d/sandbox`).
    Completions(completions::CompletionsArgs),
    /// Print a manual page (roff; `sandbox man exec | man -l -`), or write
    /// them all with --dir.
    Man(man::ManArgs),
}

/// Defaults, the file, the environment, then these flags.
pub fn load_config(global: &GlobalArgs) -> anyhow::Result<Loaded> {
    let mut layers = if global.no_config {
        let mut layers = Layers::from_process_with(None, &[])?;
        layers.file = None;
        layers
    } else {
        Layers::from_process(
            global
                .config
                .as_deref()
                .filter(|p| !p.as_os_str().is_empty()),
        )?
    };
    let path = |p: &PathBuf| p.to_string_lossy().into_owned();
    let flags = [
        ("--policy", "policy", global.policy.as_ref().map(path)),
        ("--image", "image", global.image.clone()),
        (
            "--workspace-root",
            "workspace_root",
            global.workspace_root.as_ref().map(path),
        ),
        ("--namespace", "namespace", global.namespace.clone()),
    ];
    for (flag, key, value) in flags {
        if let Some(value) = value {
            layers.flags.push(Flag::new(flag, key, value));
        }
    }
    let loaded = Config::load_layers(&layers)?;
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    Ok(loaded)
}

/// `2s`, `500ms`, `1m30s` (humantime), or plain seconds (`2`, `0.5`);
/// positive (or zero when `zero_ok`) and at most `max`. Clap shows the
/// value with the message.
fn parse_duration(text: &str, zero_ok: bool, max: Duration) -> Result<Duration, String> {
    let too_long = || format!("longer than {}h", max.as_secs() / 3600);
    let text = text.trim();
    let duration = match text.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => {
            if secs > max.as_secs_f64() {
                return Err(too_long());
            }
            Duration::from_secs_f64(secs)
        }
        Ok(_) => return Err("not a duration: give 2s, 500ms, 1m, or plain seconds".into()),
        Err(_) => humantime::parse_duration(text)
            .map_err(|e| format!("{e}: give 2s, 500ms, 1m, or plain seconds"))?,
    };
    if duration.is_zero() && !zero_ok {
        return Err("must be more than zero".into());
    }
    if duration > max {
        return Err(too_long());
    }
    Ok(duration)
}

pub fn timeout_arg(text: &str) -> Result<Duration, String> {
    parse_duration(text, false, MAX_DURATION)
}

pub fn age_arg(text: &str) -> Result<Duration, String> {
    parse_duration(text, true, Duration::from_secs(10 * 365 * 24 * 60 * 60))
}

/// A sandbox on the Docker engine; `need_image` first makes sure the image
/// is there, for commands that may create containers.
pub async fn open(config: Config, need_image: bool) -> anyhow::Result<Sandbox> {
    let provider = Arc::new(DockerProvider::from_config(&config));
    if need_image {
        sandbox_host::image::ensure(&provider, &config.image).await?;
    }
    let source = PolicySource::from_config(&config);
    Ok(Sandbox::with_provider(config, provider, source).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_argument_of_every_command_says_what_it_is() {
        use clap::CommandFactory;
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() && sub.get_long_about().is_none() {
                    missing.push(format!("{path} {} (the command)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "sandbox", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Bug: `exec --timeout 2s` was refused and `-1`, `nan`, `1e30` panicked
    /// (exit 101) in `Duration::from_secs_f64`.
    #[test]
    fn durations_take_units_or_plain_seconds_and_refuse_the_rest() {
        for (text, expected) in [
            ("2s", Duration::from_secs(2)),
            ("500ms", Duration::from_millis(500)),
            ("1m", Duration::from_secs(60)),
            ("1m30s", Duration::from_secs(90)),
            ("2", Duration::from_secs(2)),
            ("0.5", Duration::from_millis(500)),
            ("24h", MAX_DURATION),
        ] {
            assert_eq!(timeout_arg(text), Ok(expected), "{text}");
        }
        for bad in [
            "-1",
            "nan",
            "NaN",
            "inf",
            "-inf",
            "1e30",
            "0",
            "0s",
            "1e-12",
            "25h",
            "86401",
            "abc",
            "2 parsecs",
            "",
        ] {
            assert!(timeout_arg(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(
            age_arg("0"),
            Ok(Duration::ZERO),
            "gc --max-age 0: everything"
        );
        assert_eq!(age_arg("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert!(age_arg("-5").is_err());
        // Through clap, as a user types them.
        let cli = Cli::try_parse_from([
            "sandbox",
            "exec",
            "--timeout",
            "2s",
            "alice-1",
            "--",
            "true",
        ])
        .unwrap();
        let Command::Exec(exec::ExecArgs { timeout, .. }) = cli.command else {
            panic!("not exec")
        };
        assert_eq!(timeout, Some(Duration::from_secs(2)));
        let err = Cli::try_parse_from(["sandbox", "exec", "--timeout", "nan", "a", "--", "true"])
            .err()
            .expect("nan is refused");
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        let gc = Cli::try_parse_from(["sandbox", "gc", "--max-age-secs", "3600"]).unwrap();
        let Command::Gc(gc::GcArgs { max_age, .. }) = gc.command else {
            panic!("not gc")
        };
        assert_eq!(max_age, Some(Duration::from_secs(3600)), "the old spelling");
    }

    #[test]
    fn completions_and_the_manual_page_come_from_the_definitions() {
        let mut script = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut Cli::command(),
            "sandbox",
            &mut script,
        );
        let script = String::from_utf8(script).unwrap();
        for word in ["completions", "config", "--timeout", "--max-age"] {
            assert!(
                script.contains(word),
                "{word} missing from the bash completions"
            );
        }
        let mut page = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut page)
            .unwrap();
        let page = String::from_utf8(page).unwrap();
        assert!(page.starts_with(".ie"), "{}", &page[..page.len().min(200)]);
        assert!(page.contains(".TH sandbox"), "roff title");
        assert!(page.contains("completions"), "subcommands listed");
    }
}
