//! The `sandbox` CLI: run commands in per-user sandboxes, inspect and
//! destroy them, check policy components, build the local image.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use sandbox_host::exec::{ExecOptions, StreamKind};
use sandbox_host::files::{FileError, Upload};
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
        /// Wall-clock limit in seconds (default: exec_timeout_secs).
        #[arg(long)]
        timeout: Option<f64>,
        /// Environment variable for the command, KEY=VALUE (repeatable).
        #[arg(short, long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Working directory under /workspace.
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
    Cp { source: String, destination: String },
    /// Destroy a user's backend, or the backend serving a thread.
    Destroy {
        #[arg(long, conflicts_with = "thread", required_unless_present = "thread")]
        user: Option<String>,
        #[arg(long)]
        thread: Option<String>,
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
        /// Also remove containers created longer ago than this many seconds.
        #[arg(long)]
        max_age_secs: Option<u64>,
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
        /// Largest request body in bytes.
        #[arg(long, default_value_t = sandbox_host::serve::DEFAULT_BODY_LIMIT)]
        body_limit_bytes: usize,
    },
    /// Show two threads of one user sharing one container (and another user apart).
    Demo,
    /// Policy components.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// The local sandbox image.
    #[command(subcommand)]
    Image(ImageCommand),
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
        .with_target(false)
        .init();
}

fn load_config(global: &GlobalArgs) -> anyhow::Result<Config> {
    let mut config = Config::load(global.config.as_deref())?;
    if let Some(p) = &global.policy {
        config.policy = Some(p.clone());
    }
    if let Some(i) = &global.image {
        config.image = i.clone();
    }
    if let Some(w) = &global.workspace_root {
        config.workspace_root = w.clone();
    }
    if let Some(n) = &global.namespace {
        config.namespace = n.clone();
    }
    config.validate()?;
    Ok(config)
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
    let config = load_config(&cli.global)?;
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
            let stdin = if interactive {
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
                    .context("reading stdin")?;
                Some(buf)
            } else {
                None
            };
            let options = ExecOptions {
                timeout: timeout.map(std::time::Duration::from_secs_f64),
                env,
                workdir,
                stdin,
            };
            let sandbox = open(config, true).await?;
            let backend = sandbox.get_thread_backend(&thread_id).await?;
            // Live output: each chunk is printed as it arrives.
            let response = backend
                .execute_streaming(&command, options, |kind, bytes| {
                    use std::io::Write;
                    let _ = match kind {
                        StreamKind::Stdout => std::io::stdout()
                            .write_all(bytes)
                            .and_then(|()| std::io::stdout().flush()),
                        StreamKind::Stderr => std::io::stderr().write_all(bytes),
                    };
                })
                .await?;
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
            let sandbox = open(config, true).await?;
            match (remote(&source), remote(&destination)) {
                (None, Some((thread, path))) => {
                    let content =
                        std::fs::read(&source).with_context(|| format!("reading {source}"))?;
                    let mode = std::os::unix::fs::PermissionsExt::mode(
                        &std::fs::metadata(&source)?.permissions(),
                    );
                    let backend = sandbox.get_thread_backend(thread).await?;
                    let upload = Upload {
                        path: path.to_owned(),
                        content,
                        mode: Some(mode & 0o7777),
                    };
                    let result = backend.upload_files(vec![upload]).await?.remove(0);
                    if let Some(error) = result.error {
                        bail!("{destination}: {error:?}");
                    }
                }
                (Some((thread, path)), None) => {
                    let backend = sandbox.get_thread_backend(thread).await?;
                    let result = backend.download_files(&[path.to_owned()]).await?.remove(0);
                    match (result.content, result.error) {
                        (Some(content), None) => {
                            std::fs::write(&destination, content)
                                .with_context(|| format!("writing {destination}"))?;
                            if let Some(mode) = result.mode {
                                use std::os::unix::fs::PermissionsExt;
                                std::fs::set_permissions(
                                    &destination,
                                    std::fs::Permissions::from_mode(mode),
                                )?;
                            }
                        }
                        (_, error) => {
                            bail!("{source}: {:?}", error.unwrap_or(FileError::FileNotFound))
                        }
                    }
                }
                _ => bail!("exactly one of SOURCE and DESTINATION must be THREAD:PATH"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Destroy { user, thread } => {
            let sandbox = open(config, false).await?;
            let destroyed = match (user, thread) {
                (Some(user), _) => sandbox.destroy_user_backend(&user).await?,
                (None, Some(thread)) => sandbox.destroy_thread_backend(&thread).await?,
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
            let now = sandbox_host::capabilities::now_ms();
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
                    "{:<24} {:<14} {:<10} {:<12} {:>8}",
                    "BACKEND", "CONTAINER", "STATE", "POLICY", "IDLE"
                );
                if stats {
                    print!(" {:>10} {:>9}", "MEMORY", "CPU");
                }
                println!("  NAME");
                for (c, idle, usage) in rows {
                    let short = &c.id[..c.id.len().min(12)];
                    let state = format!("{:?}", c.status).to_lowercase();
                    print!(
                        "{:<24} {short:<14} {state:<10} {:<12} {:>7}s",
                        c.backend_id, c.policy, idle
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
            max_age_secs,
            json,
        } => {
            let sandbox = open(config, false).await?;
            let max_age = max_age_secs.map(std::time::Duration::from_secs);
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
        } => {
            let options = sandbox_host::serve::ServeOptions {
                listen,
                token: token.filter(|t| !t.is_empty()),
                body_limit_bytes,
                policy_path: config.policy.clone(),
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
    }
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

/// `THREAD:PATH` when the part before the first `:` is a valid thread id.
fn remote(arg: &str) -> Option<(&str, &str)> {
    let (thread, path) = arg.split_once(':')?;
    policy_core::ids::parse_thread(thread).ok()?;
    Some((thread, path))
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "NO"
    }
}
