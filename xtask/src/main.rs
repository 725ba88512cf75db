//! `cargo test-all` (alias of `cargo xtask test`): the README's test command. On a machine with only a
//! Rust toolchain and a Docker engine it prepares what the suites need and
//! runs them all, stopping at the first failure:
//!
//! 1. the wasm target (the policy components are built for it);
//! 2. format and lints (native and wasm), the library's docs (no broken
//!    or private links), then the host library's layer
//!    order (`cargo xtask layers`, xtask/src/layers.rs: the `# Layers`
//!    block of host/src/lib.rs; no module names a higher layer, the
//!    face-only layer names lower ones only through the crate root, no
//!    cycles between modules);
//! 3. the local sandbox image (`sandbox image build` when it is missing);
//! 4. the Python policy components (guest/python-per-user,
//!    guest/python-minimal and the failing test fixture), built with
//!    componentize-py (pinned in the guest's pyproject.toml) from a
//!    virtualenv `target/xtask/venv-componentize` into `target/policies/`;
//! 5. the Python-ready image `sandbox-python:latest` (`SANDBOX_PYTHON_IMAGE`
//!    overrides) when it is missing: `sandbox image build --python`, which
//!    needs Debian's `mmdebstrap` (installed, test-only, when missing); then
//!    a check that it runs python3 and the GNU tools as uid 1000;
//! 6. gVisor's `runsc` registered with the engine (Debian's package
//!    installed, test-only, when missing; /etc/docker/daemon.json gains
//!    `runtimes.runsc` and the engine a SIGHUP, never a restart); then unit,
//!    integration and doc tests (they find the above through
//!    `SANDBOX_PYTHON_IMAGE`, `SANDBOX_PYTHON_POLICY`,
//!    `SANDBOX_PYTHON_FAILING_POLICY` and `SANDBOX_PYTHON_MINIMAL_POLICY`),
//!    and the agent, file, process and port suites again under gVisor
//!    (`SANDBOX_TEST_RUNTIME=runsc`), in the background beside step 7;
//! 7. a virtualenv under `target/xtask/venv` with the Python client's test
//!    and deepagents dependencies (installs Debian's `python3-venv` when
//!    `venv` is missing), and the Python suite against `sandbox serve`;
//!    then langchain-tests' standard sandbox suite in `venv-conformance`,
//!    with the deepagents release that suite was written for;
//! 8. the benchmark's smoke run; the server image's deploy smoke test.
//!
//! The deploy smoke's static binary (a musl build of the whole host, the
//! longest build of a cold run) compiles in the background from step 3 on,
//! at the lowest CPU priority and in its own target dir (`target/deploy`, so
//! it never waits on the foreground's lock): it takes the CPU the Docker
//! suites, downloads and image builds leave idle, and yields it to them.
//! Each step's time is printed at the end, the background build's beside them.
//!
//! `cargo xtask layers [WORKSPACE_ROOT]` runs the layer check alone (on a
//! copy of the workspace when given its root).
//!
//! Only std: this must build in seconds before anything else exists.

mod layers;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

const USAGE: &str = "usage: cargo xtask test [--no-lint] [--skip STEP]...\n\
       cargo xtask python-policies\n\
       cargo xtask layers [WORKSPACE_ROOT]\n\
steps: lint, rust, python, bench, deploy";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("python-policies") => match python_policies(&workspace_root()) {
            Ok(built) => {
                for (var, path) in built {
                    println!("{var}={}", path.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("python-policies: {e}");
                ExitCode::FAILURE
            }
        },
        Some("layers") => {
            let root = args.get(1).map_or_else(workspace_root, PathBuf::from);
            match layers::check(&root) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("layers: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some("test") => match Options::parse(&args[1..]) {
            Ok(options) => report(test(&options)),
            Err(e) => {
                eprintln!("{e}\n{USAGE}");
                ExitCode::from(2)
            }
        },
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

struct Options {
    skip: Vec<String>,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options, String> {
        let mut skip = Vec::new();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--no-lint" => skip.push("lint".to_owned()),
                "--skip" => skip.push(it.next().ok_or("--skip needs a step")?.clone()),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(Options { skip })
    }

    fn runs(&self, step: &str) -> bool {
        !self.skip.iter().any(|s| s == step)
    }
}

fn report(result: Result<Vec<(String, f64)>, String>) -> ExitCode {
    match result {
        Ok(timings) => {
            println!("\n==> all suites passed");
            for (step, secs) in timings {
                println!("    {secs:>7.1}s  {step}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\n==> FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn test(options: &Options) -> Result<Vec<(String, f64)>, String> {
    let root = workspace_root();
    std::env::set_current_dir(&root).map_err(|e| format!("cd {}: {e}", root.display()))?;
    let mut steps = Steps::default();

    steps.run("docker engine", || {
        // Tests against the engine must fail loudly, never skip.
        sh(Command::new("docker").args([
            "version",
            "--format",
            "engine {{.Server.Version}} (API {{.Server.APIVersion}})",
        ]))
        .map_err(|e| format!("{e}: the tests need a running Docker engine"))
    })?;
    steps.run("wasm target", || {
        sh(Command::new("rustup").args(["target", "add", "wasm32-wasip2"]))
    })?;
    if options.runs("lint") {
        steps.run("format and lints", || {
            cargo(&["fmt", "--all", "--", "--check"])?;
            cargo(&[
                "clippy",
                "--workspace",
                "--all-targets",
                "--locked",
                "--",
                "-D",
                "warnings",
            ])?;
            let mut wasm = vec!["clippy", "--target", "wasm32-wasip2", "--locked"];
            for crate_name in WASM_CRATES {
                wasm.extend(["-p", crate_name]);
            }
            wasm.extend(["--", "-D", "warnings"]);
            cargo(&wasm)?;
            // The library without the HTTP API still builds, warning-free.
            cargo(&[
                "clippy",
                "-p",
                "sandbox-host",
                "--no-default-features",
                "--locked",
                "--",
                "-D",
                "warnings",
            ])?;
            // The library's face, as users read it: no broken or private
            // links.
            let cargo_bin = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            sh(Command::new(cargo_bin)
                .args(["doc", "-p", "sandbox-host", "--no-deps", "--locked"])
                .env("RUSTDOCFLAGS", "-D warnings"))?;
            layers::check(&root).map_err(|e| format!("layers: {e}"))
        })?;
    }
    let deploy = options.runs("deploy") && root.join("deploy/smoke.sh").exists();
    let mut deploy_build = if deploy {
        Some(
            steps.run("deploy binary: start its build in the background", || {
                DeployBuild::start(&root)
            })?,
        )
    } else {
        None
    };
    steps.run("binaries and the sandbox image", || {
        cargo(&["build", "--locked", "--bins"])?;
        let image = std::env::var("SANDBOX_TEST_IMAGE")
            .unwrap_or_else(|_| "sandbox-busybox:latest".to_owned());
        if docker_image_present(&image) {
            println!("{image} is present");
            Ok(())
        } else {
            sh(Command::new(sandbox_bin(&root)).args(["image", "build", "--tag", &image]))
        }
    })?;
    // tests/python_policy.rs, the Python suite's live swap and bench case
    // 10 need them, and fail without them.
    let python_policies = if ["rust", "python", "bench"].iter().any(|s| options.runs(s)) {
        steps.run("Python policy components (componentize-py)", || {
            python_policies(&root)
        })?
    } else {
        Vec::new()
    };
    let policy_env = || python_policies.iter().map(|(var, path)| (*var, path));
    // The Rust suites run a dash-shelled sandbox in it (tests/sharing.rs),
    // the Python ones deepagents' file tools.
    let python_image =
        std::env::var("SANDBOX_PYTHON_IMAGE").unwrap_or_else(|_| PYTHON_IMAGE.to_owned());
    if options.runs("rust") || options.runs("python") {
        steps.run("the Python image", || {
            python_image_step(&root, &python_image)
        })?;
    }
    let mut gvisor_pass: Option<Background> = None;
    if options.runs("rust") {
        steps.run("gVisor (runsc) registered with the engine", gvisor_step)?;
        steps.run("rust tests (unit, integration against Docker, doc)", || {
            let cargo_bin = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            sh(Command::new(cargo_bin)
                .args(["test", "--workspace", "--locked"])
                .env("SANDBOX_PYTHON_IMAGE", &python_image)
                .envs(policy_env()))
        })?;
        // Its binaries are built: it runs beside the Python steps (which
        // use no cargo), and is waited for before the benchmark's build.
        let cargo_bin = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut pass = Command::new(cargo_bin);
        pass.args(["test", "--locked", "-p", "sandbox-host"])
            .args([
                "--test",
                "exec_agent",
                "--test",
                "files",
                "--test",
                "processes",
                "--test",
                "ports",
            ])
            .env("SANDBOX_TEST_RUNTIME", "runsc")
            .env("SANDBOX_PYTHON_IMAGE", &python_image)
            .envs(policy_env());
        gvisor_pass = Some(steps.run(
            "the agent, file, process and port suites under gVisor: start them in the background",
            || Background::start(&root, "gvisor-pass", pass),
        )?);
    }
    if options.runs("python") {
        let python = steps.run("python virtualenv", || {
            python_venv(&root, "venv", "clients/python[test,deepagents]")
        })?;
        steps.run("python client tests against sandbox serve", || {
            sh(Command::new(&python)
                .args(["-m", "pytest", "-q", "clients/python/tests"])
                .args(["--ignore", STANDARD_SUITE])
                .env("SANDBOX_BIN", sandbox_bin(&root))
                .env("SANDBOX_PYTHON_IMAGE", &python_image)
                .envs(policy_env()))
        })?;
        // langchain-tests' standard suite asserts BaseSandbox behaviour that
        // deepagents 0.7 changed (write overwrites, glob answers absolute
        // paths and regular files only): it runs in full with the deepagents
        // release it was written for, then with the one users get, where
        // those 7 tests are strict expected failures (conftest.py).
        for (venv, extra, what) in [
            (
                "venv-conformance",
                "conformance",
                "deepagents 0.6.12, in full",
            ),
            (
                "venv-conformance-current",
                "conformance-current",
                "deepagents 0.7.32, 7 expected failures",
            ),
        ] {
            let python = steps.run(
                &format!("python virtualenv (standard suite, {what})"),
                || python_venv(&root, venv, &format!("clients/python[{extra}]")),
            )?;
            steps.run(
                &format!("deepagents standard sandbox suite against sandbox serve ({what})"),
                || {
                    sh(Command::new(&python)
                        .args(["-m", "pytest", "-q", "-rA", STANDARD_SUITE])
                        .env("SANDBOX_BIN", sandbox_bin(&root))
                        .env("SANDBOX_PYTHON_IMAGE", &python_image))
                },
            )?;
        }
    }
    if let Some(pass) = gvisor_pass.take() {
        let took = steps.run(
            "the agent, file, process and port suites under gVisor: wait for them",
            || pass.wait(),
        )?;
        steps
            .timings
            .push(("  (the gVisor pass itself)".to_owned(), took));
    }
    if options.runs("bench") {
        steps.run("benchmark smoke run", || {
            // Its own crate (bench/), outside the default members: cargo
            // builds it here. Case 6 finds the `sandbox` binary built above
            // next to it.
            let cargo_bin = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            sh(Command::new(cargo_bin)
                .args(["run", "--locked", "-p", "sandbox-bench", "--", "--smoke"])
                .envs(policy_env()))
        })?;
    }
    if let Some(build) = deploy_build.take() {
        let built_in = steps.run("deploy binary: wait for the background build", || {
            build.wait()
        })?;
        steps.timings.push((
            "  (the background deploy build itself)".to_owned(),
            built_in,
        ));
        steps.run("server image deploy smoke test", || {
            // Built above: its cargo build finds everything fresh.
            sh(Command::new("bash")
                .arg("deploy/smoke.sh")
                .env("SANDBOX_BUILD_PROFILE", DEPLOY_PROFILE)
                .env("CARGO_TARGET_DIR", root.join(DEPLOY_TARGET_DIR)))
        })?;
    }
    Ok(steps.timings)
}

/// The deploy smoke's binary: a dev-profile static build (the recipe is
/// what is checked, and it compiles in half the time of a release one).
const DEPLOY_PROFILE: &str = "dev";
/// Its own target dir: the foreground's cargo never waits on its lock.
const DEPLOY_TARGET_DIR: &str = "target/deploy";
const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// The deploy smoke's static binary, building in the background.
struct DeployBuild {
    child: std::process::Child,
    log: PathBuf,
    started: Instant,
}

impl DeployBuild {
    /// Starts `cargo build` of the static `sandbox` binary as
    /// deploy/build-image.sh would (same target, C compiler and profile), at
    /// nice 19, its output in `target/xtask/deploy-build.log`.
    fn start(root: &Path) -> Result<DeployBuild, String> {
        let installed = Command::new("rustup")
            .args(["target", "list", "--installed"])
            .output()
            .map_err(|e| format!("rustup: {e}"))?;
        if !String::from_utf8_lossy(&installed.stdout)
            .lines()
            .any(|t| t == MUSL_TARGET)
        {
            sh(Command::new("rustup").args(["target", "add", MUSL_TARGET]))?;
        }
        let compiler =
            if sh(Command::new("sh").args(["-c", "command -v musl-gcc >/dev/null"])).is_ok() {
                "musl-gcc"
            } else {
                "cc"
            };
        let log = root.join("target/xtask/deploy-build.log");
        std::fs::create_dir_all(root.join("target/xtask")).map_err(|e| e.to_string())?;
        let out = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let cargo_bin = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let child = Command::new("nice")
            .args(["-n", "19"])
            .arg(cargo_bin)
            .args([
                "build",
                "--locked",
                "--profile",
                DEPLOY_PROFILE,
                "--target",
                MUSL_TARGET,
            ])
            .args(["-p", "sandbox-host", "--bin", "sandbox"])
            .env("CARGO_TARGET_DIR", root.join(DEPLOY_TARGET_DIR))
            .env("CC_x86_64_unknown_linux_musl", compiler)
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting the deploy build: {e}"))?;
        println!(
            "building the static binary in the background: {}",
            log.display()
        );
        Ok(DeployBuild {
            child,
            log,
            started: Instant::now(),
        })
    }

    /// Waits for the build; its log is shown when it failed. Returns how
    /// long it took from its start.
    fn wait(mut self) -> Result<f64, String> {
        let status = self.child.wait().map_err(|e| e.to_string())?;
        let took = self.started.elapsed().as_secs_f64();
        if status.success() {
            println!("built in {took:.1}s (from its start)");
            return Ok(took);
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        for line in tail.iter().rev() {
            eprintln!("{line}");
        }
        Err(format!(
            "the deploy build failed ({status}); log: {}",
            self.log.display()
        ))
    }
}

impl Drop for DeployBuild {
    /// A failed step before the deploy step ends the background build too.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A suite run in the background beside other steps, its output in
/// `target/xtask/NAME.log` (shown when it fails), killed if a step before
/// its wait fails.
struct Background {
    child: std::process::Child,
    log: PathBuf,
    started: Instant,
}

impl Background {
    fn start(root: &Path, name: &str, mut cmd: Command) -> Result<Background, String> {
        let log = root.join(format!("target/xtask/{name}.log"));
        std::fs::create_dir_all(root.join("target/xtask")).map_err(|e| e.to_string())?;
        let out = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {name}: {e}"))?;
        println!("running in the background: {}", log.display());
        Ok(Background {
            child,
            log,
            started: Instant::now(),
        })
    }

    /// Waits for it: its output, and how long it took from its start.
    fn wait(mut self) -> Result<f64, String> {
        let status = self.child.wait().map_err(|e| e.to_string())?;
        let took = self.started.elapsed().as_secs_f64();
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let shown: Vec<&str> = log
            .lines()
            .filter(|l| l.starts_with("test ") || l.contains("test result") || !status.success())
            .collect();
        for line in shown.iter().rev().take(400).rev() {
            println!("{line}");
        }
        if status.success() {
            Ok(took)
        } else {
            Err(format!("failed ({status}); log: {}", self.log.display()))
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The Python policy components: (source dir, output file, the variable
/// the tests read its path from).
const PYTHON_POLICIES: [(&str, &str, &str); 3] = [
    (
        "guest/python-per-user",
        "python-per-user.wasm",
        "SANDBOX_PYTHON_POLICY",
    ),
    (
        "tests/fixtures/python-failing",
        "python-failing.wasm",
        "SANDBOX_PYTHON_FAILING_POLICY",
    ),
    (
        "guest/python-minimal",
        "python-minimal.wasm",
        "SANDBOX_PYTHON_MINIMAL_POLICY",
    ),
];

/// Where the pinned componentize-py is read from: its `componentize-py==`
/// requirement is the only source of the version.
const COMPONENTIZE_PIN_FILE: &str = "guest/python-per-user/pyproject.toml";

/// Builds the Python policies into `target/policies/` with the pinned
/// componentize-py (installed into `target/xtask/venv-componentize` when
/// that version is not there yet). Nothing it builds is tracked by git.
/// Returns each component's variable and path.
fn python_policies(root: &Path) -> Result<Vec<(&'static str, PathBuf)>, String> {
    let pin_file = root.join(COMPONENTIZE_PIN_FILE);
    let pyproject = std::fs::read_to_string(&pin_file)
        .map_err(|e| format!("reading {}: {e}", pin_file.display()))?;
    let requirement = pyproject
        .split('"')
        .find(|s| s.starts_with("componentize-py=="))
        .ok_or_else(|| format!("no \"componentize-py==VERSION\" in {}", pin_file.display()))?;
    let version = &requirement["componentize-py==".len()..];

    let venv = root.join("target/xtask/venv-componentize");
    let tool = venv.join("bin/componentize-py");
    let installed = Command::new(&tool)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if installed.as_deref() != Some(&format!("componentize-py {version}")) {
        println!("installing {requirement} into {}", venv.display());
        let python = python_venv_bare(&venv)?;
        sh(Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            requirement,
        ]))?;
    }

    let out_dir = root.join("target/policies");
    std::fs::create_dir_all(&out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let mut built = Vec::new();
    for (source, file, var) in PYTHON_POLICIES {
        let out = out_dir.join(file);
        // componentize-py's output differs from build to build, and the
        // host compiles (and caches) a component by its bytes: ~3 minutes
        // for this one in a debug host. Rebuild only when an input changed.
        let stamp = out_dir.join(format!("{file}.inputs"));
        let inputs = inputs_digest(root, &[source, "wit"], requirement)?;
        if out.is_file() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&inputs) {
            println!("{} is up to date", out.display());
            built.push((var, out));
            continue;
        }
        sh(Command::new(&tool)
            .args(["--quiet", "-d"])
            .arg(root.join("wit"))
            .args(["-w", "sandbox", "componentize", "-p"])
            .arg(root.join(source))
            .args(["app", "-o"])
            .arg(&out)
            // Only the app's own directory: no site-packages of a venv the
            // caller happens to have active.
            .env_remove("VIRTUAL_ENV"))?;
        std::fs::write(&stamp, &inputs).map_err(|e| format!("{}: {e}", stamp.display()))?;
        println!("built {}", out.display());
        built.push((var, out));
    }
    Ok(built)
}

/// A digest of every file under `dirs` (paths and contents, caches
/// excluded) and of the tool's requirement.
fn inputs_digest(root: &Path, dirs: &[&str], requirement: &str) -> Result<String, String> {
    use std::hash::{Hash, Hasher};
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<(), String> {
        let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for entry in entries {
            let path = entry.map_err(|e| e.to_string())?.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "__pycache__") {
                    walk(&path, files)?;
                }
            } else {
                files.push(path);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    for dir in dirs {
        walk(&root.join(dir), &mut files)?;
    }
    files.sort();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    requirement.hash(&mut hasher);
    for file in &files {
        file.hash(&mut hasher);
        std::fs::read(file)
            .map_err(|e| format!("{}: {e}", file.display()))?
            .hash(&mut hasher);
    }
    Ok(format!("{:016x} {} files\n", hasher.finish(), files.len()))
}

/// The guest crates, linted for the target they are built for.
const WASM_CRATES: [&str; 7] = [
    "per-user",
    "per-thread",
    "policy-core",
    "hostile-policy",
    "broken-policy",
    "other-world",
    "policy-v03",
];

#[derive(Default)]
struct Steps {
    timings: Vec<(String, f64)>,
}

impl Steps {
    fn run<T>(
        &mut self,
        name: &str,
        step: impl FnOnce() -> Result<T, String>,
    ) -> Result<T, String> {
        println!("\n==> {name}");
        let started = Instant::now();
        let out = step().map_err(|e| format!("{name}: {e}"))?;
        let secs = started.elapsed().as_secs_f64();
        println!("    ({secs:.1}s)");
        self.timings.push((name.to_owned(), secs));
        Ok(out)
    }
}

/// The host's `sandbox_host::config::PYTHON_IMAGE` (xtask stays std-only).
const PYTHON_IMAGE: &str = "sandbox-python:latest";

/// What deepagents' `BaseSandbox` runs, checked in the image as the sandbox
/// user: python3 with the modules its file tools import, GNU grep and find,
/// and the coreutils it relies on.
const PYTHON_IMAGE_CHECK: &str = "set -e; cd /tmp; \
python3 -c 'import base64, glob, json, os, sys; print(\"python\", sys.version.split()[0])'; \
python -c 'pass'; \
grep --version | head -n 1 | grep -q GNU; find --version | head -n 1 | grep -q GNU; \
echo x > f; stat -c %s f >/dev/null; readlink -f f >/dev/null; \
dd if=/dev/zero of=g bs=1k count=1 2>/dev/null; echo GNU grep, find, stat, readlink, dd: ok; \
ps -e >/dev/null; git --version; pip --version >/dev/null; python3 -m venv --help >/dev/null; \
make --version | head -n 1; unzip -v | head -n 1; less --version | head -n 1; curl --version | head -n 1";

/// Builds the Python image when it is missing, then checks it.
fn python_image_step(root: &Path, image: &str) -> Result<(), String> {
    let wanted = python_recipe(root)?;
    let found = image_label(image, "sandbox.recipe");
    if found.as_deref() == Some(wanted.as_str()) {
        println!("{image} is present ({wanted})");
    } else {
        if let Some(found) = found {
            println!("{image} is of recipe {found:?}, not {wanted:?}: rebuilding it");
        }
        if sh(Command::new("mmdebstrap")
            .arg("--version")
            .stdout(std::process::Stdio::null()))
        .is_err()
        {
            // A system package, needed only to build this image for the tests.
            println!("installing Debian's mmdebstrap (test-only system package: builds {image})");
            apt_install(&["mmdebstrap"])?;
        }
        sh(Command::new(sandbox_bin(root)).args(["image", "build", "--python", "--tag", image]))?;
    }
    sh(Command::new("docker").args([
        "run",
        "--rm",
        "--network",
        "none",
        "--user",
        "1000:1000",
        image,
        "sh",
        "-c",
        PYTHON_IMAGE_CHECK,
    ]))
}

/// gVisor's `runsc` as an engine runtime, for tests/isolation.rs and the
/// gVisor pass: Debian's package installed when missing (test-only), added
/// to /etc/docker/daemon.json when the engine does not list it, and the
/// engine reloaded with SIGHUP (never restarted). `--network=none`: the
/// sandboxes have none, and runsc refuses to build one from a network
/// namespace it cannot enter on some engines.
fn gvisor_step() -> Result<(), String> {
    let listed = || {
        Command::new("docker")
            .args(["info", "--format", "{{json .Runtimes}}"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("\"runsc\""))
    };
    if !listed() {
        if !Path::new(RUNSC).exists() {
            println!("installing Debian's runsc (gVisor; test-only system package)");
            apt_install(&["runsc"])?;
        }
        println!("registering runsc in {DAEMON_JSON} and reloading the engine (SIGHUP)");
        sh(Command::new("python3").args(["-c", REGISTER_RUNSC, DAEMON_JSON, RUNSC]))?;
        let pid = Command::new("pidof")
            .arg("dockerd")
            .output()
            .map_err(|e| format!("pidof dockerd: {e}"))?;
        let pid = String::from_utf8_lossy(&pid.stdout).trim().to_owned();
        if pid.is_empty() {
            return Err(format!(
                "runsc is in {DAEMON_JSON} but no dockerd runs here to reload: reload the engine \
                 yourself"
            ));
        }
        sh(Command::new("kill").args(["-HUP", &pid]))?;
        let until = Instant::now() + std::time::Duration::from_secs(10);
        while !listed() {
            if Instant::now() > until {
                return Err("the engine does not list runsc 10 s after its reload".into());
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    sh(Command::new("docker").args([
        "run",
        "--rm",
        "--runtime=runsc",
        "--network",
        "none",
        "sandbox-busybox:latest",
        "sh",
        "-c",
        "dmesg | grep -q gVisor",
    ]))
    .map_err(|e| format!("{e}: runsc is registered but does not run a container"))
}

const RUNSC: &str = "/usr/bin/runsc";
const DAEMON_JSON: &str = "/etc/docker/daemon.json";
/// Adds `runtimes.runsc` to the engine's daemon.json (created when
/// missing), keeping everything else.
const REGISTER_RUNSC: &str = r#"
import json, os, sys
path, runsc = sys.argv[1], sys.argv[2]
conf = json.load(open(path)) if os.path.exists(path) else {}
conf.setdefault("runtimes", {})["runsc"] = {"path": runsc, "runtimeArgs": ["--network=none"]}
tmp = path + ".sandbox-tmp"
with open(tmp, "w") as f:
    json.dump(conf, f, indent=2)
os.replace(tmp, path)
"#;

/// The Python image's recipe label, as the host's recipe states it
/// (`LABEL sandbox.recipe=...` in host/src/image/python.rs).
fn python_recipe(root: &Path) -> Result<String, String> {
    let path = root.join("host/src/image/python.rs");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.split("LABEL sandbox.recipe=")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .map(str::to_owned)
        .ok_or_else(|| format!("{}: no `LABEL sandbox.recipe=`", path.display()))
}

/// A label of a local image; `None` when the image or the label is missing.
fn image_label(image: &str, label: &str) -> Option<String> {
    let out = Command::new("docker")
        .args(["image", "inspect", "--format"])
        .arg(format!("{{{{index .Config.Labels \"{label}\"}}}}"))
        .arg(image)
        .output()
        .ok()?;
    let value = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !value.is_empty() && value != "<no value>").then_some(value)
}

fn docker_image_present(image: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", image])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The `sandbox` binary built above, wherever cargo's target dir is
/// (`SANDBOX_BIN` overrides).
fn sandbox_bin(root: &Path) -> PathBuf {
    if let Some(bin) = std::env::var_os("SANDBOX_BIN") {
        return bin.into();
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("debug")
        .join("sandbox")
}

/// langchain-tests' `SandboxIntegrationTests`, subclassed as partner
/// packages do.
const STANDARD_SUITE: &str = "clients/python/tests/test_standard_suite.py";

/// A virtualenv `target/xtask/NAME` with the Python client installed with
/// `spec`'s extras, created once.
fn python_venv(root: &Path, name: &str, spec: &str) -> Result<PathBuf, String> {
    let python = python_venv_bare(&root.join("target/xtask").join(name))?;
    sh(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "-e",
        spec,
    ]))?;
    Ok(python)
}

/// The python of the virtualenv `venv`, created when missing.
fn python_venv_bare(venv: &Path) -> Result<PathBuf, String> {
    let python = venv.join("bin/python");
    if !python.exists() && sh(Command::new("python3").args(["-m", "venv"]).arg(venv)).is_err() {
        // Debian splits venv (and ensurepip) into python3-venv.
        println!("python3 -m venv failed; installing Debian's python3-venv (test-only)");
        let _ = std::fs::remove_dir_all(venv);
        apt_install(&["python3-venv"])?;
        sh(Command::new("python3").args(["-m", "venv"]).arg(venv))?;
    }
    Ok(python)
}

fn apt_install(packages: &[&str]) -> Result<(), String> {
    let install = || {
        sh(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages))
    };
    install().or_else(|_| {
        sh(Command::new("apt-get").arg("update"))?;
        install()
    })
}

fn cargo(args: &[&str]) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    sh(Command::new(cargo).args(args))
}

fn sh(cmd: &mut Command) -> Result<(), String> {
    let shown = format!("{cmd:?}");
    match cmd.status() {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(format!("{shown} failed ({status})")),
        Err(e) => Err(format!("{shown} could not start: {e}")),
    }
}

fn workspace_root() -> PathBuf {
    // xtask/ sits in the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ has a parent")
        .to_path_buf()
}
