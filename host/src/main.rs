//! The `sandbox` CLI: run commands in per-user sandboxes, inspect and
//! destroy them, check policy components, build the local image.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, CommandFactory, Parser, Subcommand};
use sandbox_host::config::{Flag, Layers, Loaded, MAX_DURATION};
use sandbox_host::exec::{self, ExecOptions, StreamKind};
use sandbox_host::files::{FileError, FileLimits};
use sandbox_host::provider::docker::DockerProvider;
use sandbox_host::{image, policies, Config, PolicySource, Sandbox};
use tracing_subscriber::EnvFilter;

/// Exit code for failures of the sandbox itself (as `docker exec` does).
const EXIT_SANDBOX_ERROR: u8 = 125;

#[derive(Parser)]
#[command(
    name = "sandbox",
    version,
    about = "Per-user Docker sandboxes for AI agents, placed by a WebAssembly policy"
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct GlobalArgs {
    /// TOML configuration file (flags and SANDBOX_* variables override it).
    #[arg(long, global = true, env = "SANDBOX_CONFIG")]
    config: Option<PathBuf>,
    /// Policy component (.wasm) to load instead of the embedded per-user policy.
    #[arg(long, global = true)]
    policy: Option<PathBuf>,
    /// Image for new sandbox containers.
    #[arg(long, global = true)]
    image: Option<String>,
    /// Directory holding the workspaces.
    #[arg(long, global = true)]
    workspace_root: Option<PathBuf>,
    /// Label namespace of this deployment.
    #[arg(long, global = true)]
    namespace: Option<String>,
    /// More logs (-v debug, -vv trace); RUST_LOG takes precedence.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
}

#[derive(Subcommand)]
enum Command {
    /// Run a command in the thread's sandbox; exits with the command's code.
    Exec {
        thread_id: String,
        /// Wall-clock limit: 2s, 500ms, 1m30s, or plain seconds (2, 0.5); at
        /// most 24h (default: exec_timeout_secs).
        #[arg(long, value_name = "DURATION", value_parser = timeout_arg)]
        timeout: Option<Duration>,
        /// Environment variable for the command, KEY=VALUE (repeatable).
        #[arg(short, long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Working directory under /workspace, created when missing.
        #[arg(short, long)]
        workdir: Option<String>,
        /// Pass this process's stdin to the command.
        #[arg(short, long)]
        interactive: bool,
        /// The command: one argument is a shell string, several are quoted and joined.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Copy a file into or out of a thread's workspace: `cp LOCAL THREAD:PATH`
    /// or `cp THREAD:PATH LOCAL` (PATH relative to /workspace or under it).
    ///
    /// An operand is remote when the text before its first `:` is a valid
    /// thread id (the path may hold more `:`). Into an existing local
    /// directory, or a destination ending in `/`, the file keeps its name.
    /// Write `./NAME` for a local file whose name has a `:`.
    Cp { source: String, destination: String },
    /// Destroy a user's backend, or the backend serving a thread.
    /// Commands running on it get `destroy_grace_secs` (10 s) to finish first.
    Destroy {
        #[arg(long, conflicts_with = "thread", required_unless_present = "thread")]
        user: Option<String>,
        #[arg(long)]
        thread: Option<String>,
        /// Do not wait for commands in flight: kill them now.
        #[arg(long)]
        force: bool,
    },
    /// List the containers this namespace manages.
    Ls {
        #[arg(long)]
        json: bool,
        /// Also memory and CPU time from the engine.
        #[arg(long)]
        stats: bool,
    },
    /// Remove managed containers no backend owns any more (never unlabelled ones).
    Gc {
        /// Only list what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// Also remove containers created longer ago than this: 12h, 7d,
        /// 90m, or plain seconds.
        #[arg(long, visible_alias = "max-age-secs", value_name = "DURATION", value_parser = age_arg)]
        max_age: Option<Duration>,
        #[arg(long)]
        json: bool,
    },
    /// Serve the JSON HTTP API (see host/openapi.json) until SIGTERM.
    Serve {
        /// Address to listen on; anything but loopback requires --token.
        #[arg(long, default_value = "127.0.0.1:8765")]
        listen: std::net::SocketAddr,
        /// Bearer token required on every request (but /healthz).
        #[arg(long, env = "SANDBOX_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Largest JSON request body in bytes (the raw file routes stream,
        /// bounded by max_file_bytes).
        #[arg(long, default_value_t = sandbox_host::serve::DEFAULT_BODY_LIMIT)]
        body_limit_bytes: usize,
        /// Host name accepted when no token is set (repeatable; loopback
        /// names by default): guards against DNS rebinding.
        #[arg(long = "allowed-host", value_name = "NAME")]
        allowed_hosts: Vec<String>,
    },
    /// Show two threads of one user sharing one container (and another user apart).
    Demo,
    /// Policy components.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// The local sandbox image.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Print the effective configuration and where each value came from
    /// (default, the file, an environment variable, a flag).
    Config {
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (e.g. `sandbox completions bash >
    /// /etc/bash_completion.d/sandbox`).
    Completions { shell: clap_complete::Shell },
    /// Print the manual page (roff; `sandbox man | man -l -`).
    Man,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Load a component, check it targets the `sandbox` world and passes the self-check.
    Check { path: PathBuf },
    /// Write a built-in policy component (per-user, per-thread) to a file.
    Export { name: String, output: PathBuf },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build the busybox image from host/image/ with no registry.
    Build {
        #[arg(long, default_value = sandbox_host::config::DEFAULT_IMAGE)]
        tag: String,
        /// A statically linked busybox binary (default: /bin/busybox when it is
        /// static, else Debian's busybox-static fetched with `apt-get download`).
        #[arg(long)]
        busybox: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Generated from the definitions above: no configuration needed.
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "sandbox",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Command::Man => {
            return match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: writing the manual page: {e}");
                    ExitCode::from(EXIT_SANDBOX_ERROR)
                }
            };
        }
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

/// Defaults, the file, the environment, then these flags.
fn load_config(global: &GlobalArgs) -> anyhow::Result<Loaded> {
    let mut layers = Layers::from_process(global.config.as_deref())?;
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

fn timeout_arg(text: &str) -> Result<Duration, String> {
    parse_duration(text, false, MAX_DURATION)
}

fn age_arg(text: &str) -> Result<Duration, String> {
    parse_duration(text, true, Duration::from_secs(10 * 365 * 24 * 60 * 60))
}

async fn open(config: Config, need_image: bool) -> anyhow::Result<Sandbox> {
    let provider = Arc::new(DockerProvider::from_config(&config));
    if need_image {
        image::ensure(&provider, &config.image).await?;
    }
    let source = PolicySource::from_config(&config);
    Ok(Sandbox::with_provider(config, provider, source).await?)
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let loaded = load_config(&cli.global)?;
    if let Command::Config { json } = cli.command {
        print_config(&loaded, json)?;
        return Ok(ExitCode::SUCCESS);
    }
    let config = loaded.config;
    match cli.command {
        Command::Exec {
            thread_id,
            timeout,
            env,
            workdir,
            interactive,
            command,
        } => {
            let command = match command.as_slice() {
                [single] => single.clone(),
                many => shlex::try_join(many.iter().map(String::as_str))
                    .context("quoting the command")?,
            };
            let env = env
                .iter()
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .with_context(|| format!("--env {kv:?}: expected KEY=VALUE"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            // Streamed, not buffered: input of any size costs a few chunks.
            let mut stdin = interactive.then(|| exec::blocking_reader(std::io::stdin()));
            let options = ExecOptions {
                timeout,
                env,
                workdir,
                stdin: None,
            };
            let sandbox = open(config, true).await?;
            let backend = sandbox.get_thread_backend(&thread_id).await?;
            // Live output: each chunk is printed as it arrives.
            let print = |kind, bytes: &[u8]| {
                use std::io::Write;
                let _ = match kind {
                    StreamKind::Stdout => std::io::stdout()
                        .write_all(bytes)
                        .and_then(|()| std::io::stdout().flush()),
                    StreamKind::Stderr => std::io::stderr().write_all(bytes),
                };
            };
            let run = async {
                match stdin.as_mut() {
                    Some(stdin) => {
                        backend
                            .execute_streaming_stdin(&command, options, stdin, print)
                            .await
                    }
                    None => backend.execute_streaming(&command, options, print).await,
                }
            };
            // Ctrl-C kills the remote command too (`docker exec` leaves it
            // running): dropping the call kills its processes.
            let interrupted = {
                tokio::pin!(run);
                tokio::select! {
                    response = &mut run => Some(response?),
                    _ = tokio::signal::ctrl_c() => None,
                }
                // `run` is dropped here: an unfinished call is killed.
            };
            let Some(response) = interrupted else {
                eprintln!("[interrupted: the command was killed]");
                sandbox.settle().await;
                return Ok(ExitCode::from(130));
            };
            if response.truncated {
                eprintln!(
                    "[the returned output was truncated at {} bytes]",
                    sandbox.config().output_limit_bytes
                );
            }
            if response.timed_out {
                eprintln!("[timed out: every process of the command was killed]");
            }
            Ok(ExitCode::from(
                u8::try_from(response.exit_code).unwrap_or(EXIT_SANDBOX_ERROR),
            ))
        }
        Command::Cp {
            source,
            destination,
        } => {
            let (from, to) = (operand(&source)?, operand(&destination)?);
            let sandbox = open(config, true).await?;
            match (from, to) {
                // Both directions stream: memory stays bounded whatever the
                // size; files over the cap fail before any byte moves.
                (Operand::Local(local), Operand::Remote { thread, path }) => {
                    let mut file = tokio::fs::File::open(local)
                        .await
                        .with_context(|| format!("reading {local}"))?;
                    let meta = file.metadata().await?;
                    if !meta.is_file() {
                        bail!("{local}: not a regular file");
                    }
                    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
                    let backend = sandbox.get_thread_backend(thread).await?;
                    let limits = backend.file_limits();
                    let target = remote_target(path, local)?;
                    let result = backend
                        .upload_from(&target, &mut file, meta.len(), Some(mode), &limits)
                        .await?;
                    if let Some(error) = result.error {
                        bail!("{destination}: {}", file_error(error, &limits));
                    }
                }
                (Operand::Remote { thread, path }, Operand::Local(local)) => {
                    let target = local_target(local, path)?;
                    let backend = sandbox.get_thread_backend(thread).await?;
                    let limits = backend.file_limits();
                    // Written beside the target under a temporary name, never
                    // through a symlink, without setuid / setgid / sticky /
                    // world-writable bits, renamed into place when complete.
                    if let Err(error) = backend.download_to_file(path, &target, &limits).await? {
                        bail!("{source}: {}", file_error(error, &limits));
                    }
                }
                _ => bail!("exactly one of SOURCE and DESTINATION must be THREAD:PATH"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Destroy {
            user,
            thread,
            force,
        } => {
            let grace = if force {
                std::time::Duration::ZERO
            } else {
                std::time::Duration::from_secs_f64(config.destroy_grace_secs)
            };
            let sandbox = open(config, false).await?;
            let destroyed = match (user, thread) {
                (Some(user), _) => sandbox.destroy_user_backend_within(&user, grace).await?,
                (None, Some(thread)) => {
                    sandbox
                        .destroy_thread_backend_within(&thread, grace)
                        .await?
                }
                (None, None) => bail!("give --user or --thread"),
            };
            println!(
                "{}",
                if destroyed {
                    "destroyed"
                } else {
                    "nothing to destroy"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Ls { json, stats } => {
            let sandbox = open(config, false).await?;
            let containers = sandbox.list().await?;
            let now = sandbox_host::now_ms();
            let mut rows = Vec::new();
            for c in containers {
                let usage = if stats && c.status == sandbox_host::provider::Status::Running {
                    sandbox.stats(&c.id).await.ok()
                } else {
                    None
                };
                let idle_secs = now.saturating_sub(c.last_used_ms) / 1000;
                rows.push((c, idle_secs, usage));
            }
            if json {
                let value: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|(c, idle, usage)| {
                        let mut v = serde_json::to_value(c).unwrap_or_default();
                        v["idle_secs"] = (*idle).into();
                        if let Some(u) = usage {
                            v["stats"] = serde_json::to_value(u).unwrap_or_default();
                        }
                        v
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!(
                    "{:<24} {:<14} {:<10} {:<12} {:>8} {:>9}",
                    "BACKEND", "CONTAINER", "STATE", "POLICY", "IDLE", "IN-FLIGHT"
                );
                if stats {
                    print!(" {:>10} {:>9}", "MEMORY", "CPU");
                }
                println!("  NAME");
                for (c, idle, usage) in rows {
                    let short = &c.id[..c.id.len().min(12)];
                    let state = format!("{:?}", c.status).to_lowercase();
                    print!(
                        "{:<24} {short:<14} {state:<10} {:<12} {:>7}s {:>9}",
                        c.backend_id, c.policy, idle, c.in_flight
                    );
                    if stats {
                        match usage {
                            Some(u) => print!(
                                " {:>8.1}Mi {:>8.2}s",
                                u.memory_bytes as f64 / 1048576.0,
                                u.cpu_seconds
                            ),
                            None => print!(" {:>10} {:>9}", "-", "-"),
                        }
                    }
                    println!("  {}", c.name);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Gc {
            dry_run,
            max_age,
            json,
        } => {
            let sandbox = open(config, false).await?;
            let entries = sandbox.gc(max_age, dry_run).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                let verb = if dry_run { "would remove" } else { "removed" };
                for e in &entries {
                    println!(
                        "{verb} {} (backend {}): {}",
                        e.container.name, e.container.backend_id, e.reason
                    );
                }
                println!("{} container(s) {verb}", entries.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            listen,
            token,
            body_limit_bytes,
            allowed_hosts,
        } => {
            let allowed_hosts = if allowed_hosts.is_empty() {
                sandbox_host::serve::LOOPBACK_HOSTS
                    .iter()
                    .map(|h| h.to_string())
                    .collect()
            } else {
                allowed_hosts
            };
            let options = sandbox_host::serve::ServeOptions {
                listen,
                token: token.filter(|t| !t.is_empty()),
                body_limit_bytes,
                policy_path: config.policy.clone(),
                allowed_hosts,
                grace: std::time::Duration::from_secs_f64(config.destroy_grace_secs),
            };
            options.check()?;
            let sandbox = open(config, true).await?;
            sandbox_host::serve::serve(sandbox, options).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo => demo(config).await,
        Command::Policy(PolicyCommand::Check { path }) => {
            let sandbox = open(
                Config {
                    policy: Some(path.clone()),
                    ..config
                },
                false,
            )
            .await?;
            let backend = sandbox.backend_id("alice-1").await?;
            println!(
                "{}: ok, policy {:?} targets the sandbox world (alice-1 -> backend {backend})",
                path.display(),
                sandbox.policy_name()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy(PolicyCommand::Export { name, output }) => {
            let bytes = policies::builtin(&name)
                .with_context(|| format!("no built-in policy {name:?} (per-user, per-thread)"))?;
            std::fs::write(&output, bytes)
                .with_context(|| format!("writing {}", output.display()))?;
            println!("wrote {} ({} bytes)", output.display(), bytes.len());
            Ok(ExitCode::SUCCESS)
        }
        Command::Image(ImageCommand::Build { tag, busybox }) => {
            let provider = DockerProvider::from_config(&config);
            image::build(&provider, &tag, busybox.as_deref()).await?;
            println!("built {tag}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Config { .. } | Command::Completions { .. } | Command::Man => {
            unreachable!("handled before the configuration is used")
        }
    }
}

/// `sandbox config`: every key, its value and where it came from.
fn print_config(loaded: &Loaded, json: bool) -> anyhow::Result<()> {
    let entries = loaded.sources();
    if json {
        let sources: serde_json::Map<String, serde_json::Value> = entries
            .iter()
            .map(|(key, _, origin)| Ok((key.clone(), serde_json::to_value(origin)?)))
            .collect::<serde_json::Result<_>>()?;
        let out = serde_json::json!({ "config": loaded.config, "sources": sources });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let rows: Vec<(String, String, String)> = entries
        .into_iter()
        .map(|(key, value, origin)| {
            let value = match value {
                serde_json::Value::Null => "(unset)".to_owned(),
                value => value.to_string(),
            };
            (key, value, origin.to_string())
        })
        .collect();
    let key_width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let value_width = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
    println!("{:<key_width$}  {:<value_width$}  SOURCE", "KEY", "VALUE");
    for (key, value, origin) in rows {
        println!("{key:<key_width$}  {value:<value_width$}  {origin}");
    }
    Ok(())
}

/// The README's first command: two threads of alice share one container and
/// one workspace; bob gets his own.
async fn demo(config: Config) -> anyhow::Result<ExitCode> {
    let root = config.workspace_root.clone();
    let sandbox = open(config, true).await?;
    println!(
        "policy: {}, workspaces under {}",
        sandbox.policy_name(),
        root.display()
    );
    let mut seen = Vec::new();
    for (thread, command) in [
        (
            "alice-1",
            "echo written by thread alice-1 > note.txt; echo \"container $(hostname)\"",
        ),
        ("alice-2", "echo \"container $(hostname)\"; cat note.txt"),
        (
            "bob-1",
            "echo \"container $(hostname)\"; ls note.txt 2>&1 || true",
        ),
    ] {
        let backend = sandbox.get_thread_backend(thread).await?;
        let out = backend.execute(command).await?;
        let container = backend.ensure_container().await?;
        let shown = shlex::try_quote(command).unwrap_or(command.into());
        println!("\n$ sandbox exec {thread} -- {shown}");
        println!("  backend {} -> container {}", backend.id(), container.name);
        for line in out.output.lines() {
            println!("  | {line}");
        }
        seen.push((thread, container.id));
    }
    let shared = seen[0].1 == seen[1].1;
    let apart = seen[0].1 != seen[2].1;
    println!(
        "\nalice-1 and alice-2 share one container: {}; bob-1 has another: {}",
        yes(shared),
        yes(apart)
    );
    println!("clean up with: sandbox destroy --user alice && sandbox destroy --user bob");
    Ok(if shared && apart {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A `cp` operand.
#[derive(Debug, PartialEq)]
enum Operand<'a> {
    Remote { thread: &'a str, path: &'a str },
    Local(&'a str),
}

/// `THREAD:PATH` when the text before the first `:` is a valid thread id
/// (the path may contain more `:`); else a local path. Text with a `:` that
/// is neither (no thread id before it, no such local file, no `/` before the
/// `:`) is refused rather than guessed.
fn operand(arg: &str) -> anyhow::Result<Operand<'_>> {
    match arg.split_once(':') {
        Some((thread, path)) if sandbox_host::ThreadId::parse(thread).is_ok() => {
            Ok(Operand::Remote { thread, path })
        }
        Some((before, _)) if !before.contains('/') && !Path::new(arg).exists() => bail!(
            "{arg:?}: {before:?} is not a valid thread id (a remote file is THREAD:PATH); \
             write ./{arg} for a local file whose name has a ':'"
        ),
        _ => Ok(Operand::Local(arg)),
    }
}

/// Where a download goes: `local`, or `local/NAME` when `local` is a
/// directory or ends with `/` (NAME: the remote file's base name).
fn local_target(local: &str, remote_path: &str) -> anyhow::Result<PathBuf> {
    // A symlink is not a directory here: one the workload planted at the
    // destination must not redirect the write.
    let real_dir = std::fs::symlink_metadata(local).is_ok_and(|m| m.is_dir());
    if !(local.ends_with('/') || real_dir) {
        return Ok(PathBuf::from(local));
    }
    let name = Path::new(remote_path)
        .file_name()
        .with_context(|| format!("{remote_path:?} has no file name to copy into {local}"))?;
    Ok(Path::new(local).join(name))
}

/// Where an upload goes: `path`, or `path/NAME` when `path` is empty, `.`,
/// `/workspace` or ends with `/` (NAME: the local file's base name).
fn remote_target(path: &str, local: &str) -> anyhow::Result<String> {
    if !(path.is_empty() || path.ends_with('/') || matches!(path, "." | "/workspace")) {
        return Ok(path.to_owned());
    }
    let name = Path::new(local)
        .file_name()
        .with_context(|| format!("{local:?} has no file name"))?;
    let name = name
        .to_str()
        .with_context(|| format!("{local:?}: the file name is not valid UTF-8"))?;
    let dir = path.trim_end_matches('/');
    Ok(if dir.is_empty() || dir == "." {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    })
}

/// A per-file error of `cp`, with the cap when it is the size.
fn file_error(error: FileError, limits: &FileLimits) -> String {
    match error {
        FileError::FileTooLarge => format!(
            "{error} (over the {}-byte cap; {} raises it)",
            limits.max_file_bytes,
            sandbox_host::files::MAX_FILE_BYTES_ENV
        ),
        other => other.to_string(),
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "NO"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let Command::Exec { timeout, .. } = cli.command else {
            panic!("not exec")
        };
        assert_eq!(timeout, Some(Duration::from_secs(2)));
        let err = Cli::try_parse_from(["sandbox", "exec", "--timeout", "nan", "a", "--", "true"])
            .err()
            .expect("nan is refused");
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        let gc = Cli::try_parse_from(["sandbox", "gc", "--max-age-secs", "3600"]).unwrap();
        let Command::Gc { max_age, .. } = gc.command else {
            panic!("not gc")
        };
        assert_eq!(max_age, Some(Duration::from_secs(3600)), "the old spelling");
    }

    /// Bug: colour escapes were written to stderr when it was a file or a
    /// pipe.
    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(!colour(false, None), "a pipe or a file gets no escapes");
        assert!(!colour(true, Some("1".into())), "NO_COLOR is honoured");
        assert!(colour(true, Some("".into())), "an empty NO_COLOR is unset");
    }

    /// Bug: `sandbox cp alice-1:out.txt .` failed with "Is a directory".
    #[test]
    fn a_download_into_a_directory_keeps_the_remote_name() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        assert_eq!(
            local_target(d, "out/x.txt").unwrap(),
            dir.path().join("x.txt")
        );
        assert_eq!(
            local_target(".", "/workspace/x.txt").unwrap(),
            Path::new(".").join("x.txt")
        );
        assert_eq!(
            local_target("new/", "x.txt").unwrap(),
            Path::new("new/x.txt"),
            "a trailing / names a directory"
        );
        let file = format!("{d}/y.txt");
        assert_eq!(local_target(&file, "x.txt").unwrap(), Path::new(&file));
        assert!(local_target(d, "").is_err(), "no file name to copy into it");
    }

    #[test]
    fn an_upload_into_a_remote_directory_keeps_the_local_name() {
        assert_eq!(remote_target("in/", "/tmp/a.txt").unwrap(), "in/a.txt");
        assert_eq!(remote_target("", "a.txt").unwrap(), "a.txt");
        assert_eq!(remote_target(".", "./d/a.txt").unwrap(), "a.txt");
        assert_eq!(
            remote_target("/workspace/", "a.txt").unwrap(),
            "/workspace/a.txt"
        );
        assert_eq!(
            remote_target("/workspace", "a.txt").unwrap(),
            "/workspace/a.txt"
        );
        assert_eq!(remote_target("in/b.txt", "a.txt").unwrap(), "in/b.txt");
    }

    /// Bug: `cp 'a:b-1:x' dst` was ambiguous, and text with a `:` but no
    /// thread id before it was silently taken as a local path.
    #[test]
    fn operands_split_at_the_first_colon_after_a_thread_id() {
        assert_eq!(
            operand("alice-1:out.txt").unwrap(),
            Operand::Remote {
                thread: "alice-1",
                path: "out.txt"
            }
        );
        assert_eq!(
            operand("a:b-1:x").unwrap(),
            Operand::Remote {
                thread: "a",
                path: "b-1:x"
            },
            "the path keeps its own ':'"
        );
        assert_eq!(operand("notes.txt").unwrap(), Operand::Local("notes.txt"));
        assert_eq!(operand("./x:y").unwrap(), Operand::Local("./x:y"));
        let err = operand("Bad Thread:x").unwrap_err().to_string();
        assert!(err.contains("not a valid thread id"), "{err}");
        assert!(err.contains("./Bad Thread:x"), "{err}");
        // An existing local file with such a name is still a local file.
        let dir = tempfile::tempdir().unwrap();
        let existing = dir.path().join("A:b");
        std::fs::write(&existing, "").unwrap();
        let existing = existing.to_str().unwrap();
        assert_eq!(operand(existing).unwrap(), Operand::Local(existing));
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
