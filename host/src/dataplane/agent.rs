//! `sandbox-agent`, the host's static helper inside every container (see
//! `agent/`): embedded at build time, installed once per digest into the
//! host's state directory, and bind-mounted read-only at [`AGENT_MOUNT`].
//!
//! It is each container's main process (`init`, keeping `serve` up), which
//! takes executes over the attach stream (`provider::agent_link`) and runs
//! each as a child subreaper, so a timeout ends every process the call
//! started, including ones that cleared their environment, double-forked or
//! called `setsid`. Through `docker exec` (the fallback) it runs as `reap`.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::SandboxError;

/// Where the agent appears inside every container (read-only).
pub use sandbox_agent::protocol::AGENT_MOUNT;

/// The label that says a container has the agent mounted: [`AGENT_SERVES`]
/// when the agent is also its main process (see [`AgentMode`]).
pub const AGENT_LABEL: &str = "sandbox.agent";

/// The label value of a container whose main process is the agent, serving
/// the wire of [`sandbox_agent::protocol::PROTOCOL_VERSION`]: `serve-v` and
/// the version. A container keeps the agent it was created with, so the
/// label tells, before any attach, whether this host speaks its wire.
pub const AGENT_SERVES: &str = "serve-v4";

/// What a container has of the agent, from its label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AgentMode {
    /// Not mounted (created without it): `docker exec` and the kill script.
    #[default]
    Absent,
    /// Mounted, but not serving this host's wire: its main process idles,
    /// or is an agent serving another protocol version (`serve`, with no
    /// version, from the hosts before versions; `serve-vN` from another
    /// host). Each execute runs `docker exec` under `reap`, which every
    /// version of the agent keeps.
    Mounted,
    /// Mounted and the main process (`init` keeping `serve` up), speaking
    /// this host's protocol version: executes go over the attach stream,
    /// `docker exec` is the fallback.
    Serves,
}

impl AgentMode {
    /// The mode a container's labels say.
    pub fn of(labels: &std::collections::HashMap<String, String>) -> Self {
        match labels.get(AGENT_LABEL).map(String::as_str) {
            None => AgentMode::Absent,
            Some(AGENT_SERVES) => AgentMode::Serves,
            Some(_) => AgentMode::Mounted,
        }
    }
}

/// The container's main command when the agent serves: it runs every
/// command as the sandbox user `uid:gid`.
pub fn init_argv(uid: u32, gid: u32) -> Vec<String> {
    vec![
        AGENT_MOUNT.to_owned(),
        "init".to_owned(),
        "--user".to_owned(),
        format!("{uid}:{gid}"),
    ]
}

const BINARY: &[u8] = sandbox_artifacts::AGENT;
const DIGEST: &str = sandbox_artifacts::AGENT_SHA256;

/// Installs the agent (once per build) and returns its host path. The file
/// is written to a temporary name and renamed, so a container never mounts
/// a half-written agent; mode 0555, so not even its owner rewrites it in place.
pub fn install(workspace_root: &Path) -> Result<PathBuf, SandboxError> {
    let dir = crate::state::dir(workspace_root);
    let path = dir.join(format!("sandbox-agent-{}", &DIGEST[..16]));
    if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file() && m.len() == BINARY.len() as u64)
    {
        return Ok(path);
    }
    let fail = |what: &str, e: std::io::Error| {
        SandboxError::Other(format!(
            "installing sandbox-agent: {what} {}: {e}",
            dir.display()
        ))
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| fail("creating", e))?;
    let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(|e| fail("writing into", e))?;
    tmp.write_all(BINARY).map_err(|e| fail("writing into", e))?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o555))
        .map_err(|e| fail("writing into", e))?;
    tmp.persist(&path)
        .map_err(|e| fail("writing into", e.error))?;
    Ok(path)
}

/// The argv that runs `command` under the agent with `timeout`.
pub fn reap_argv(command: &str, timeout: std::time::Duration) -> Vec<String> {
    vec![
        AGENT_MOUNT.to_owned(),
        "reap".to_owned(),
        "--timeout-ms".to_owned(),
        timeout.as_millis().to_string(),
        "--".to_owned(),
        "sh".to_owned(),
        "-c".to_owned(),
        command.to_owned(),
    ]
}

/// [`reap_argv`] run as root in a container whose agent serves: `reap`
/// gives the command away to the sandbox user `user` (`UID:GID`) in the
/// call group `group`, which a timeout or a kill then ends whole, and which
/// the workload can neither leave nor escape by killing its `reap` (root).
pub fn reap_argv_as(
    command: &str,
    timeout: std::time::Duration,
    user: &str,
    group: u32,
) -> Vec<String> {
    let mut argv = reap_argv(command, timeout);
    let options = [
        "--user".to_owned(),
        user.to_owned(),
        "--group".to_owned(),
        group.to_string(),
    ];
    // After `--timeout-ms N`, before `--`.
    argv.splice(4..4, options);
    argv
}

/// The argv of a port's connection through the engine: `sandbox-agent
/// connect PORT`, and where `given_away` names the sandbox user
/// (`UID:GID`) and a call group, under a root `reap` that gives it away to
/// that user, as the plane's ports do. A `docker exec` that starts as the
/// sandbox user can be stopped by the workload before it execs, and the
/// engine then holds its lock on the container for good.
pub fn connect_argv(port: u16, given_away: Option<(&str, u32)>) -> Vec<String> {
    let mut argv = vec![AGENT_MOUNT.to_owned()];
    if let Some((user, group)) = given_away {
        argv.extend([
            "reap".to_owned(),
            "--user".to_owned(),
            user.to_owned(),
            "--group".to_owned(),
            group.to_string(),
            "--".to_owned(),
            AGENT_MOUNT.to_owned(),
        ]);
    }
    argv.extend(["connect".to_owned(), port.to_string()]);
    argv
}

/// A call group for a call the host runs through the engine: drawn at
/// random from the agent's range (2^30 to 2^30 + 2^29), like serve's.
pub fn engine_call_group() -> u32 {
    let id = crate::dataplane::exec::new_execution_id();
    let bits = u32::from_str_radix(&id[..8], 16).unwrap_or(0);
    (1 << 30) + bits % (1 << 29)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_given_away_connects_under_a_root_reap_as_the_user() {
        let argv = connect_argv(8080, Some(("1000:1000", 1 << 30)));
        assert_eq!(
            argv[1..],
            [
                "reap",
                "--user",
                "1000:1000",
                "--group",
                "1073741824",
                "--",
                AGENT_MOUNT,
                "connect",
                "8080"
            ]
        );
        assert_eq!(connect_argv(9, None)[1..], ["connect", "9"]);
    }

    #[test]
    fn a_reap_as_the_sandbox_user_names_it_and_its_group_before_the_command() {
        let argv = reap_argv_as(
            "echo hi",
            std::time::Duration::from_millis(1500),
            "1000:1000",
            1 << 30,
        );
        assert_eq!(
            argv[1..],
            [
                "reap",
                "--timeout-ms",
                "1500",
                "--user",
                "1000:1000",
                "--group",
                "1073741824",
                "--",
                "sh",
                "-c",
                "echo hi"
            ]
        );
        let group = engine_call_group();
        assert!(((1 << 30)..(1 << 30) + (1 << 29)).contains(&group));
    }

    #[test]
    fn the_serve_label_names_the_protocol_version() {
        assert_eq!(
            AGENT_SERVES,
            format!("serve-v{}", sandbox_agent::protocol::PROTOCOL_VERSION)
        );
    }

    /// Containers keep the agent they were created with: only a label of
    /// this host's version goes over the attach stream; the others (an
    /// older host's `serve`, another version's) run through `docker exec`.
    #[test]
    fn only_this_versions_serve_label_serves() {
        let mode = |value: Option<&str>| {
            AgentMode::of(
                &value
                    .map(|v| (AGENT_LABEL.to_owned(), v.to_owned()))
                    .into_iter()
                    .collect(),
            )
        };
        assert_eq!(mode(None), AgentMode::Absent);
        assert_eq!(mode(Some(AGENT_SERVES)), AgentMode::Serves);
        for other in [
            "serve",
            "serve-v0",
            "serve-v1",
            "serve-v2",
            "serve-v3",
            "serve-v10",
            "mounted",
            "",
        ] {
            assert_eq!(mode(Some(other)), AgentMode::Mounted, "{other:?}");
        }
    }

    #[test]
    fn the_embedded_agent_is_a_static_executable_installed_once() {
        assert_eq!(&BINARY[..4], b"\x7fELF");
        let dir = tempfile::tempdir().unwrap();
        let a = install(dir.path()).unwrap();
        let b = install(dir.path()).unwrap();
        assert_eq!(a, b);
        let mode = std::fs::metadata(&a).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o555);
        // A fork elsewhere in the test process may still hold the file open
        // for writing for a moment ("text file busy"): retried.
        let run = || std::process::Command::new(&a).arg("help").output();
        let mut out = run();
        for _ in 0..50 {
            match &out {
                Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    out = run();
                }
                _ => break,
            }
        }
        let out = out.unwrap();
        assert_eq!(
            out.status.code(),
            Some(i32::from(sandbox_agent::protocol::EXIT_AGENT_FAILED)),
            "usage error from the agent itself"
        );
    }
}
