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
pub const AGENT_MOUNT: &str = "/.sandbox/agent";

/// The label that says a container has the agent mounted: `serve` when the
/// agent is also its main process (see [`AgentMode`]).
pub const AGENT_LABEL: &str = "sandbox.agent";

/// The label value of a container whose main process is the agent.
pub const AGENT_SERVES: &str = "serve";

/// What a container has of the agent, from its label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AgentMode {
    /// Not mounted (created without it): `docker exec` and the kill script.
    #[default]
    Absent,
    /// Mounted, the main process idles (an older host created it): each
    /// execute runs `docker exec` under `reap`.
    Mounted,
    /// Mounted and the main process (`init` keeping `serve` up): executes
    /// go over the attach stream, `docker exec` is the fallback.
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

/// The container's main command when the agent serves.
pub fn init_argv() -> Vec<String> {
    vec![AGENT_MOUNT.to_owned(), "init".to_owned()]
}

const BINARY: &[u8] = sandbox_artifacts::AGENT;
const DIGEST: &str = sandbox_artifacts::AGENT_SHA256;

/// The directory under the workspace root that holds host state. Workspace
/// names cannot start with `.`, so no workspace can be (or mount) it.
pub fn state_dir(workspace_root: &Path) -> PathBuf {
    workspace_root.join(".sandbox")
}

/// Installs the agent (once per build) and returns its host path. The file
/// is written to a temporary name and renamed, so a container never mounts
/// a half-written agent; mode 0555, so not even its owner rewrites it in place.
pub fn install(workspace_root: &Path) -> Result<PathBuf, SandboxError> {
    let dir = state_dir(workspace_root);
    let path = dir.join(format!("sandbox-agent-{}", &DIGEST[..16]));
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == BINARY.len() as u64) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_agent_is_a_static_executable_installed_once() {
        assert_eq!(&BINARY[..4], b"\x7fELF");
        let dir = tempfile::tempdir().unwrap();
        let a = install(dir.path()).unwrap();
        let b = install(dir.path()).unwrap();
        assert_eq!(a, b);
        let mode = std::fs::metadata(&a).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o555);
        let out = std::process::Command::new(&a).arg("help").output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(125),
            "usage error from the agent itself"
        );
    }
}
