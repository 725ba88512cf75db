//! The `sandbox` binary as a newcomer types it, beside the tools it sits
//! with: pipes into `head`, docker-style `exec`, and what stderr claims.
//! The exec cases need the Docker engine (and the test image: `cargo
//! test-all` builds it); each runs in a namespace and a root of its own.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output, Stdio};

fn sandbox() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sandbox"))
}

/// A deployment of its own: namespace, workspace root, test image.
struct Deployment {
    namespace: String,
    root: tempfile::TempDir,
}

impl Deployment {
    fn new(tag: &str) -> Self {
        Deployment {
            namespace: format!("cli-{tag}-{}", std::process::id() % 100_000),
            root: tempfile::tempdir().unwrap(),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = sandbox();
        cmd.env("SANDBOX_NAMESPACE", &self.namespace)
            .env("SANDBOX_WORKSPACE_ROOT", self.root.path())
            .env("SANDBOX_MAINTENANCE_INTERVAL_SECS", "0");
        if let Ok(image) = std::env::var("SANDBOX_TEST_IMAGE") {
            cmd.env("SANDBOX_IMAGE", image);
        }
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run sandbox")
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        let _ = self
            .command()
            .args(["destroy", "--force", "--user", "alice"])
            .output();
    }
}

/// Reads one line of `cmd`'s stdout, closes the pipe as `head -1` does,
/// and returns how it ended and its stderr.
fn first_line_then_close(mut cmd: Command) -> (String, std::process::ExitStatus, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sandbox");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // The reader is gone: the next writes meet a closed pipe.
    let output = child.wait_with_output().unwrap();
    (
        line,
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Bug: `sandbox completions bash | head -1` and `sandbox ls | head -3`
/// panicked ("failed printing to stdout: Broken pipe"), `sandbox man |
/// head` printed an error.
#[test]
fn listings_end_quietly_when_their_reader_goes_away() {
    let deployment = Deployment::new("pipe");
    let mut big_ls = deployment.command();
    big_ls.arg("ls");
    for (what, cmd) in [
        ("completions", {
            let mut c = sandbox();
            c.args(["completions", "bash"]);
            c
        }),
        ("man", {
            let mut c = sandbox();
            c.arg("man");
            c
        }),
        ("ls", big_ls),
    ] {
        let (line, status, stderr) = first_line_then_close(cmd);
        assert!(!line.is_empty(), "{what}: printed nothing");
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "{what}: {stderr}"
        );
        assert!(
            status.success() || status.signal() == Some(libc_sigpipe()),
            "{what}: ended {status:?}: {stderr}"
        );
    }
}

fn libc_sigpipe() -> i32 {
    nix::sys::signal::Signal::SIGPIPE as i32
}

/// Bug: `sandbox exec alice-1 echo hi` said "unexpected argument 'echo'";
/// docker users type it without `--`.
#[test]
fn exec_takes_the_command_as_docker_exec_does() {
    let deployment = Deployment::new("exec");
    for args in [
        &["exec", "alice-1", "echo", "hi", "-n"][..],
        &["exec", "alice-1", "--", "echo", "hi", "-n"][..],
        &["exec", "--timeout", "30s", "alice-1", "echo hi -n"][..],
    ] {
        let out = deployment.run(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hi -n\n", "{args:?}");
    }
}

/// Bug: a 3 MB output reached stdout whole, yet stderr said "[the returned
/// output was truncated at 1048576 bytes]".
#[test]
fn exec_never_claims_a_truncation_it_did_not_make() {
    let deployment = Deployment::new("big");
    let out = deployment.run(&["exec", "alice-1", "head -c 3000000 /dev/zero"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), 3_000_000, "the output arrives whole");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("truncated"), "{stderr}");
}

/// Bug: `-` as a destination wrote a local file named `-`, and as a source
/// failed; `cp` of a directory said only "not a regular file".
#[test]
fn cp_streams_stdin_and_stdout_and_says_how_to_copy_a_directory() {
    use std::io::Write;
    let deployment = Deployment::new("cp");
    let mut up = deployment
        .command()
        .args(["cp", "-", "alice-1:from-stdin.txt"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    up.stdin.take().unwrap().write_all(b"piped data\n").unwrap();
    let up = up.wait_with_output().unwrap();
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let cwd = tempfile::tempdir().unwrap();
    let down = deployment
        .command()
        .current_dir(cwd.path())
        .args(["cp", "alice-1:from-stdin.txt", "-"])
        .output()
        .unwrap();
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&down.stdout), "piped data\n");
    assert!(!cwd.path().join("-").exists(), "no local file named -");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.txt"), "in a dir\n").unwrap();
    let out = deployment.run(&["cp", dir.path().to_str().unwrap(), "alice-1:d/"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("is a directory") && stderr.contains("tar"),
        "{stderr}"
    );
    // The recipe it gives works.
    let tar = Command::new("tar")
        .args(["-C", dir.path().to_str().unwrap(), "-cf", "-", "."])
        .output()
        .unwrap();
    let mut untar = deployment
        .command()
        .args([
            "exec",
            "-i",
            "alice-1",
            "--",
            "sh",
            "-c",
            "mkdir -p dest && tar -xf - -C dest",
        ])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    untar.stdin.take().unwrap().write_all(&tar.stdout).unwrap();
    assert!(untar.wait().unwrap().success());
    let out = deployment.run(&["exec", "alice-1", "cat dest/a.txt"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "in a dir\n");
    let out = deployment.run(&["cp", "alice-1:dest", "-"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("tar"), "{stderr}");
}
