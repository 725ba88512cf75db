//! Test harness for integration tests against the real Docker engine.
//!
//! Each test gets its own label namespace and workspace root, and removes
//! every container of its namespace when it ends, pass or fail. A test that
//! cannot reach the engine panics with the reason: it never passes silently.

#![allow(dead_code)]

pub mod proxy;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};

use sandbox_host::config::{Config, DEFAULT_IMAGE};
use sandbox_host::DockerProvider;
use sandbox_host::{image, PolicySource, Sandbox};

static ENGINE: Once = Once::new();
static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Panics unless the engine answers and the test image exists (building it
/// from the recipe when missing).
pub fn require_engine() {
    // On its own thread: tests call this from inside their tokio runtime.
    ENGINE.call_once(|| {
        let setup = std::thread::spawn(|| {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(prepare_engine())
        });
        if let Err(panic) = setup.join() {
            std::panic::resume_unwind(panic);
        }
    });
}

async fn prepare_engine() {
    {
        {
            let provider = DockerProvider::new(std::time::Duration::from_secs(10));
            if let Err(e) = sandbox_host::ContainerProvider::ping(&provider).await {
                panic!(
                    "these tests need a reachable Docker engine (DOCKER_HOST or /var/run/docker.sock): {e}. \
                     `.ci/run` starts one."
                );
            }
            image::ensure(&provider, &test_image())
                .await
                .unwrap_or_else(|e| {
                    panic!("the test image is missing and could not be built: {e:#}")
                });
        }
    }
}

/// The Python-ready image (`cargo test-all` builds it before the Rust
/// suites; `SANDBOX_PYTHON_IMAGE` overrides): Debian's `sh` is dash. Panics
/// with how to build it when missing.
pub fn python_image() -> String {
    let image =
        std::env::var("SANDBOX_PYTHON_IMAGE").unwrap_or_else(|_| "sandbox-python:latest".into());
    let found = std::process::Command::new("docker")
        .args(["image", "inspect", &image])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "image {image} is missing: `sandbox image build --python` (cargo test-all does)"
    );
    image
}

/// The OCI runtime the suites run their containers on (`SANDBOX_TEST_RUNTIME`;
/// the engine's default when unset).
pub fn test_runtime() -> Option<String> {
    std::env::var("SANDBOX_TEST_RUNTIME")
        .ok()
        .filter(|r| !r.is_empty())
}

pub fn test_image() -> String {
    std::env::var("SANDBOX_TEST_IMAGE").unwrap_or_else(|_| DEFAULT_IMAGE.to_owned())
}

/// One test's namespace, workspace root and cleanup.
pub struct Harness {
    pub namespace: String,
    pub root: tempfile::TempDir,
    /// Containers made outside the sandbox (victims), removed at the end too.
    extra: std::sync::Mutex<Vec<String>>,
}

impl Harness {
    pub fn new(tag: &str) -> Self {
        require_engine();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let namespace = format!("it-{tag}-{}-{n}", std::process::id() % 100_000);
        assert!(namespace.len() <= 32, "namespace {namespace} too long");
        Harness {
            namespace,
            root: tempfile::tempdir().expect("temp workspace root"),
            extra: Default::default(),
        }
    }

    /// The plane directory of `container` in this harness's state (moved
    /// away, no plane pipe can be offered and calls take the engine's way).
    pub fn plane_dir(&self, container: &str) -> std::path::PathBuf {
        let name = docker(&["inspect", "--format", "{{.Name}}", container]);
        let nonce = docker(&[
            "inspect",
            "--format",
            "{{index .Config.Labels \"sandbox.plane\"}}",
            container,
        ]);
        self.config()
            .workspace_root
            .join(".sandbox/plane")
            .join(format!(
                "{}.{}",
                name.trim().trim_start_matches('/'),
                nonce.trim()
            ))
    }

    /// A running container without sandbox labels, as another tenant of the
    /// engine would have. Returns its id.
    pub fn victim(&self) -> String {
        let name = format!("victim-{}", self.namespace);
        let id = docker(&[
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            "none",
            &test_image(),
            "sleep",
            "infinity",
        ])
        .trim()
        .to_owned();
        self.extra.lock().unwrap().push(id.clone());
        id
    }

    /// Docker's `State.Status` of a container, or "gone".
    pub fn state(&self, id: &str) -> String {
        let out = Command::new("docker")
            .args(["inspect", "--format", "{{.State.Status}}", id])
            .output()
            .expect("docker inspect");
        if out.status.success() {
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        } else {
            "gone".to_owned()
        }
    }

    /// The test configuration; under `SANDBOX_TEST_RUNTIME` (`runsc`: the
    /// gVisor pass of `cargo test-all`) its containers run on that runtime.
    pub fn config(&self) -> Config {
        Config {
            workspace_root: self.root.path().to_owned(),
            namespace: self.namespace.clone(),
            image: test_image(),
            runtime: test_runtime(),
            ..Config::default()
        }
    }

    pub async fn sandbox(&self) -> Sandbox {
        self.sandbox_with(self.config(), PolicySource::Builtin("per-user".into()))
            .await
    }

    /// A sandbox of `config` with the embedded per-user policy.
    pub async fn sandbox_of(&self, config: Config) -> Sandbox {
        self.sandbox_with(config, PolicySource::Builtin("per-user".into()))
            .await
    }

    pub async fn sandbox_with(&self, config: Config, policy: PolicySource) -> Sandbox {
        let provider = Arc::new(DockerProvider::from_config(&config));
        Sandbox::with_provider(config, provider, policy)
            .await
            .expect("sandbox starts")
    }

    /// `(name, id, state)` of every container of this namespace, by name.
    /// The id of `user`'s container (panics when it has none).
    pub fn container_of(&self, user: &str) -> String {
        self.containers()
            .into_iter()
            .find(|(name, _, _)| name.ends_with(&format!(".{user}")))
            .map(|(_, id, _)| id)
            .expect("the user's container")
    }

    /// Replaces `user`'s container behind the host's back with one as a
    /// host before privilege separation made it: the same name, ownership
    /// labels and mounts, the `sandbox.agent` label `agent_label`, every
    /// process as the sandbox user with no capability (unless the label is
    /// this host's version: then root with the agent's capabilities), the
    /// main command `cmd` under tini (stdin open, nothing logged). The new
    /// container's id.
    pub fn replace_as_older_host(&self, user: &str, agent_label: &str, cmd: &[&str]) -> String {
        let id = self.container_of(user);
        let inspected = docker(&[
            "inspect",
            "--format",
            "{{.Name}}|{{.Config.Image}}|{{json .Config.Labels}}|{{range .Mounts}}{{.Source}}:{{.Destination}}:{{if .RW}}rw{{else}}ro{{end}} {{end}}",
            &id,
        ]);
        let fields: Vec<&str> = inspected.trim().split('|').collect();
        let (name, image) = (fields[0].trim_start_matches('/'), fields[1]);
        let mut labels: std::collections::BTreeMap<String, String> =
            serde_json::from_str(fields[2]).unwrap();
        labels.insert("sandbox.agent".into(), agent_label.into());
        // An older host made no plane (nor does the stand-in agent `cmd`
        // connect to one).
        labels.remove("sandbox.plane");
        let mounts: Vec<&str> = fields[3]
            .split_whitespace()
            .filter(|m| !m.contains(":/.sandbox/plane:"))
            .collect();
        // Labelled with this host's version: made as this host makes them
        // (root for the agent, with its three capabilities).
        let current =
            agent_label == format!("serve-v{}", sandbox_agent::protocol::PROTOCOL_VERSION);
        let user = self.config().sandbox_user();
        let user = if current {
            "0:0".to_owned()
        } else {
            format!("{}:{}", user.uid, user.gid)
        };
        docker(&["rm", "-f", &id]);
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut args = vec![
            "run",
            "-d",
            "-i",
            "--init",
            "--name",
            name,
            "--user",
            &user,
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--network",
            "none",
            "--log-driver",
            "none",
            "--workdir",
            "/workspace",
        ];
        if current {
            args.extend([
                "--cap-add",
                "SETUID",
                "--cap-add",
                "SETGID",
                "--cap-add",
                "KILL",
            ]);
        }
        for label in &labels {
            args.extend(["--label", label]);
        }
        for mount in &mounts {
            args.extend(["-v", mount]);
        }
        args.push(image);
        args.extend(cmd);
        docker(&args).trim().to_owned()
    }

    pub fn containers(&self) -> Vec<(String, String, String)> {
        let out = docker(&[
            "ps",
            "-a",
            "--filter",
            &format!("label=sandbox.namespace={}", self.namespace),
            "--format",
            "{{.Names}} {{.ID}} {{.State}}",
        ]);
        let mut found: Vec<_> = out
            .lines()
            .filter_map(|l| {
                let mut parts = l.split_whitespace();
                Some((
                    parts.next()?.to_owned(),
                    parts.next()?.to_owned(),
                    parts.next()?.to_owned(),
                ))
            })
            .collect();
        found.sort();
        found
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let mut ids: Vec<String> = self.containers().into_iter().map(|(_, id, _)| id).collect();
        ids.extend(self.extra.lock().unwrap().drain(..));
        if ids.is_empty() {
            return;
        }
        // A removal may already be under way (the sandbox's maintenance,
        // a destroy racing the end of the test): only what is left counts.
        for _ in 0..20 {
            let mut args = vec!["rm", "-f"];
            args.extend(ids.iter().map(String::as_str));
            let done = Command::new("docker").args(&args).output();
            if done.is_ok_and(|o| o.status.success()) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
            ids.retain(|id| {
                Command::new("docker")
                    .args(["inspect", "--format", "{{.Id}}", id])
                    .output()
                    .is_ok_and(|o| o.status.success())
            });
            if ids.is_empty() {
                return;
            }
        }
        panic!("containers of this test are left behind: {ids:?}");
    }
}

/// `docker pause`, tried again while the kernel cannot freeze the
/// container yet ("unable to freeze": a task in an uninterruptible sleep,
/// seen under load), for up to 5 s.
pub fn pause(container: &str) {
    for _ in 0..25 {
        let out = Command::new("docker")
            .args(["pause", container])
            .output()
            .expect("running the docker CLI");
        if out.status.success() {
            return;
        }
        let why = String::from_utf8_lossy(&out.stderr);
        assert!(
            why.contains("unable to freeze"),
            "docker pause {container} failed: {why}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    panic!("docker pause {container}: the kernel could not freeze it for 5 s");
}

/// Runs the docker CLI (to act behind the sandbox's back) and returns stdout.
/// Panics unless the engine answers an inspect of `container` within
/// 10 s (a wedged engine holds its lock on it).
pub fn assert_engine_answers_for(container: &str) {
    let inspect = std::process::Command::new("timeout")
        .args([
            "10",
            "docker",
            "inspect",
            "-f",
            "{{.State.Status}}",
            container,
        ])
        .output()
        .unwrap();
    assert!(
        inspect.status.success(),
        "the engine hangs on the container: {}",
        String::from_utf8_lossy(&inspect.stderr)
    );
}

pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("running the docker CLI");
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `script` with `sh -c` as root in `container` (beside the
/// workload, out of its reach): its stdout.
pub fn root_sh(container: &str, script: &str) -> String {
    docker(&["exec", "-u", "0:0", container, "sh", "-c", script])
}

/// The path of the test-only fixture component `crate_name` (e.g.
/// `hostile-policy`), built with the host by `artifacts/build.rs`.
pub fn fixture(crate_name: &str) -> std::path::PathBuf {
    use sandbox_artifacts::fixtures;
    let path = match crate_name {
        "hostile-policy" => fixtures::HOSTILE_POLICY_PATH,
        "broken-policy" => fixtures::BROKEN_POLICY_PATH,
        "other-world" => fixtures::OTHER_WORLD_PATH,
        "policy-v03" => fixtures::POLICY_V03_PATH,
        other => panic!("no fixture component {other:?} in tests/fixtures"),
    };
    path.into()
}
