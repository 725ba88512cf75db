//! `sandbox man [COMMAND] [--dir DIR]`: the manual pages (roff), generated
//! from the command definitions, with the sections clap does not know:
//! ENVIRONMENT, FILES, EXIT STATUS and EXAMPLES.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::CommandFactory;

use super::{Cli, EXIT_SANDBOX_ERROR};

#[derive(clap::Args)]
pub struct ManArgs {
    /// The subcommand whose page to print (`exec` for sandbox-exec(1));
    /// none: sandbox(1).
    pub command: Option<String>,
    /// Write every page (sandbox.1, sandbox-exec.1, ...) into this
    /// directory instead, e.g. /usr/local/share/man/man1.
    #[arg(long, value_name = "DIR", conflicts_with = "command")]
    pub dir: Option<PathBuf>,
}

/// Needs no configuration, logging or runtime: it only reads the definitions.
pub fn run(args: &ManArgs) -> ExitCode {
    let done = match (&args.dir, &args.command) {
        (Some(dir), _) => write_all(dir),
        (None, name) => page(name.as_deref())
            .and_then(|page| std::io::stdout().write_all(&page).map_err(Into::into)),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_SANDBOX_ERROR)
        }
    }
}

/// The page of `sandbox` (no name) or of one of its subcommands.
pub fn page(name: Option<&str>) -> anyhow::Result<Vec<u8>> {
    let mut top = Cli::command().disable_help_subcommand(true);
    top.build();
    let cmd = match name {
        None => top,
        Some(name) => top
            .find_subcommand(name)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no subcommand {name:?}: see `sandbox --help`"))?,
    };
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd).render(&mut out)?;
    out.extend(extra_sections(name).as_bytes());
    Ok(out)
}

fn write_all(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let top = Cli::command();
    let names: Vec<String> = top
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .map(|s| s.get_name().to_owned())
        .collect();
    std::fs::write(dir.join("sandbox.1"), page(None)?)?;
    for name in names {
        std::fs::write(dir.join(format!("sandbox-{name}.1")), page(Some(&name))?)?;
    }
    eprintln!("wrote the manual pages into {}", dir.display());
    Ok(())
}

/// ENVIRONMENT, FILES, EXIT STATUS and EXAMPLES in roff.
fn extra_sections(name: Option<&str>) -> String {
    let mut roff = String::new();
    section(&mut roff, "ENVIRONMENT", ENVIRONMENT);
    section(&mut roff, "FILES", FILES);
    section(&mut roff, "EXIT STATUS", exit_status(name));
    let examples = examples(name);
    if !examples.is_empty() {
        roff.push_str(".SH EXAMPLES\n");
        for (what, command) in examples {
            roff.push_str(&format!(".TP\n{}\n{}\n", escape(what), escape(command)));
        }
    }
    if name.is_none() {
        section(
            &mut roff,
            "SEE ALSO",
            &[
                "sandbox-exec(1), sandbox-cp(1), sandbox-ls(1), sandbox-destroy(1), \
                 sandbox-gc(1), sandbox-serve(1), sandbox-config(1); the README.",
            ],
        );
    }
    roff
}

fn section(roff: &mut String, title: &str, paragraphs: &[&str]) {
    roff.push_str(&format!(".SH {title}\n"));
    for (i, text) in paragraphs.iter().enumerate() {
        if i > 0 {
            roff.push_str(".PP\n");
        }
        roff.push_str(&escape(text));
        roff.push('\n');
    }
}

/// Text safe on a roff line: no leading `.` or `'`, backslashes doubled.
fn escape(text: &str) -> String {
    let text = text.replace('\\', "\\e").replace('-', "\\-");
    if text.starts_with('.') || text.starts_with('\'') {
        format!("\\&{text}")
    } else {
        text
    }
}

const ENVIRONMENT: &[&str] = &[
    "SANDBOX_CONFIG: the configuration file (empty: none).",
    "SANDBOX_<KEY>: every configuration key, upper case, with __ between a table and its key \
     (SANDBOX_EXEC_TIMEOUT_SECS=60, SANDBOX_LIMITS__PIDS=10, SANDBOX_POLICY_CONFIG__IDLE_TTL_SECS=900); \
     `sandbox config` lists them all with their sources.",
    "SANDBOX_USER: the sandbox user, uid:gid. WORKSPACE_ROOT and DOCKER_IMAGE: the replaced \
     manager's spellings of workspace_root and image (the SANDBOX_ ones win).",
    "DOCKER_HOST: the Docker engine, as for the docker CLI (SANDBOX_DOCKER_HOST overrides it).",
    "SANDBOX_TOKEN: the bearer token of `sandbox serve`.",
    "RUST_LOG: log filter (overrides -v); NO_COLOR: no colour in logs.",
];

const FILES: &[&str] = &[
    "~/.config/sandbox/config.toml ($XDG_CONFIG_HOME), else /etc/sandbox/config.toml: the \
     configuration file read when none is named (--config, SANDBOX_CONFIG; --no-config reads none).",
    "{workspace_root}/{user}: a user's workspace, mounted at /workspace in its sandbox. The \
     default root is ~/.local/share/sandbox/workspaces.",
    "{workspace_root}/.sandbox/: the host's state (work in flight, last use, threads, the agent); \
     every host process with that root shares it.",
    "~/.cache/sandbox/components: compiled policy components.",
];

fn exit_status(name: Option<&str>) -> &'static [&'static str] {
    match name {
        Some("exec") => &[
            "The command's own exit code.",
            "124: it ran past its timeout; every process it started was killed.",
            "130: it was cancelled, or interrupted with Ctrl-C (which kills the remote command).",
            "137: it was killed: out of memory (the sandbox's memory limit), or its backend was \
             destroyed while it ran; stderr says which.",
            "125: the sandbox could not run it (an invalid thread id, an unreachable engine, a \
             refused configuration); stderr says why.",
        ],
        _ => &[
            "0: success.",
            "1: the command did not find what it checks (demo: the threads did not share).",
            "2: a usage error (an unknown flag, a missing argument).",
            "125: an error of the sandbox or the engine; stderr says what and why.",
        ],
    }
}

fn examples(name: Option<&str>) -> &'static [(&'static str, &'static str)] {
    match name {
        None => &[
            (
                "Show two threads of alice sharing one container:",
                "sandbox demo",
            ),
            (
                "Run a command in alice's sandbox:",
                "sandbox exec alice-1 uname -a",
            ),
            ("List the sandboxes:", "sandbox ls"),
            (
                "Serve the HTTP API on loopback:",
                "sandbox serve --listen 8765",
            ),
        ],
        Some("exec") => &[
            (
                "Run a command (as docker exec does):",
                "sandbox exec alice-1 ls -la /workspace",
            ),
            (
                "A shell string, with a timeout:",
                "sandbox exec --timeout 30s alice-1 'make test 2>&1 | tail'",
            ),
            (
                "Feed stdin:",
                "tar -cf - src | sandbox exec -i alice-1 -- tar -xf - -C /workspace",
            ),
            (
                "Keep a job running after the command:",
                "sandbox exec alice-1 'nohup npm run dev >/tmp/dev.log 2>&1 &'",
            ),
        ],
        Some("cp") => &[
            (
                "Upload a file into the workspace:",
                "sandbox cp report.csv alice-1:data/",
            ),
            ("Download a file:", "sandbox cp alice-1:/tmp/out.json ."),
            (
                "Stream through stdin and stdout:",
                "echo hi | sandbox cp - alice-1:hi.txt; sandbox cp alice-1:hi.txt -",
            ),
        ],
        Some("destroy") => &[
            (
                "Remove alice's container (her workspace stays):",
                "sandbox destroy --user alice",
            ),
            ("Destroy one thread:", "sandbox destroy --thread alice-1"),
        ],
        Some("ls") => &[
            ("With memory and CPU:", "sandbox ls --stats"),
            ("As JSON:", "sandbox ls --json"),
        ],
        Some("gc") => &[
            ("Preview:", "sandbox gc --dry-run"),
            (
                "Also containers older than a week:",
                "sandbox gc --max-age 7d",
            ),
        ],
        Some("serve") => &[
            (
                "On loopback, no token:",
                "sandbox serve --listen 127.0.0.1:8765",
            ),
            (
                "On every interface:",
                "SANDBOX_TOKEN=secret sandbox serve --listen 0.0.0.0:8765",
            ),
        ],
        Some("config") => &[("Where each value comes from:", "sandbox config")],
        Some("policy") => &[
            ("Check a component:", "sandbox policy check my-policy.wasm"),
            (
                "Start from a shipped one:",
                "sandbox policy export per-thread per-thread.wasm",
            ),
        ],
        Some("image") => &[
            ("Build the default image:", "sandbox image build"),
            ("Build the Python image:", "sandbox image build --python"),
        ],
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subcommand_has_a_page_with_the_sections_clap_does_not_write() {
        let top = Cli::command();
        let names: Vec<String> = top
            .get_subcommands()
            .map(|s| s.get_name().to_owned())
            .collect();
        for name in names.iter().map(|n| Some(n.as_str())).chain([None]) {
            let page = String::from_utf8(page(name).unwrap()).unwrap();
            let title = match name {
                Some(name) => format!(".TH sandbox-{name} 1"),
                None => ".TH sandbox 1".to_owned(),
            };
            assert!(
                page.contains(&title),
                "{name:?}: {}",
                &page[..page.len().min(300)]
            );
            for heading in ["ENVIRONMENT", "FILES", "EXIT STATUS"] {
                assert!(
                    page.contains(&format!(".SH {heading}")),
                    "{name:?} lacks {heading}"
                );
            }
        }
        let exec = String::from_utf8(page(Some("exec")).unwrap()).unwrap();
        assert!(exec.contains(".SH EXAMPLES") && exec.contains("124"));
        assert!(page(Some("nope")).is_err());
    }
}
