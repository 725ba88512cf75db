//! The `network` setting against the real Docker engine: `none` (the
//! default) leaves a sandbox nothing but loopback; the name of an operator's
//! network puts every sandbox on it, so they reach what it reaches, each
//! other included, across users.

mod support;

use std::process::Command;
use std::time::Duration;

use sandbox_host::exec::ExecOptions;
use sandbox_host::PolicySource;
use support::{docker, require_engine, test_image, Harness};

/// A user-defined bridge network and a plain listener container on it,
/// both removed on drop, pass or fail. Declare it before the [`Harness`] so
/// the harness removes the sandboxes (endpoints on the network) first.
struct TestNetwork {
    name: String,
    listener: String,
}

impl TestNetwork {
    /// The listener answers `pong` to every connection on port 8080.
    fn create(tag: &str) -> Self {
        require_engine();
        let name = format!("sandbox-it-{tag}-{}", std::process::id());
        let listener = format!("{name}-listener");
        // Registered before anything is created, so a half-made setup is
        // cleaned up as well.
        let net = TestNetwork { name, listener };
        docker(&["network", "create", "--driver", "bridge", &net.name]);
        docker(&[
            "run",
            "-d",
            "--name",
            &net.listener,
            "--network",
            &net.name,
            &test_image(),
            "sh",
            "-c",
            "while true; do echo pong | nc -l -p 8080; done",
        ]);
        net
    }

    /// The IP address of `container` on this network.
    fn ip_of(&self, container: &str) -> String {
        let format = format!(
            "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
            self.name
        );
        let ip = docker(&["inspect", "--format", &format, container])
            .trim()
            .to_owned();
        assert!(
            !ip.is_empty(),
            "{container} has no address on {}",
            self.name
        );
        ip
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        // No assertions here: a panic while unwinding would abort the run.
        let run = |args: &[&str]| {
            let _ = Command::new("docker").args(args).output();
        };
        run(&["rm", "-f", &self.listener]);
        // Endpoints left by a sandbox the harness did not remove.
        if let Ok(out) = Command::new("docker")
            .args([
                "network",
                "inspect",
                "--format",
                "{{range .Containers}}{{.Name}} {{end}}",
                &self.name,
            ])
            .output()
        {
            for c in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                run(&["network", "disconnect", "-f", &self.name, c]);
            }
        }
        run(&["network", "rm", &self.name]);
    }
}

/// Connects to `host:port` from inside a sandbox, retrying while the peer
/// comes up (at most ~10 s); prints what the peer sent.
fn connect(host: &str, port: u16) -> String {
    format!(
        "i=0; while [ $i -lt 50 ]; do nc -w 2 {host} {port} </dev/null && exit 0; \
         i=$((i+1)); sleep 0.2; done; exit 1"
    )
}

/// Issue 9 / the `network` setting: a sandbox on the operator's network
/// reaches a container there by name and by address, while a sandbox with
/// the default `none` has only loopback and reaches nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_named_network_is_reachable_and_the_default_none_is_not() {
    let net = TestNetwork::create("reach");
    let h = Harness::new("net");
    let listener_ip = net.ip_of(&net.listener);

    let on_net = h
        .sandbox_with(
            sandbox_host::Config {
                network: net.name.clone(),
                ..h.config()
            },
            PolicySource::Builtin("per-user".into()),
        )
        .await;
    let alice = on_net.get_thread_backend("alice-1").await.unwrap();
    let by_name = alice.execute(&connect(&net.listener, 8080)).await.unwrap();
    assert_eq!(
        (by_name.exit_code, by_name.stdout.as_str()),
        (0, "pong\n"),
        "a sandbox on {} reaches the listener by name: {by_name:?}",
        net.name
    );
    let by_ip = alice.execute(&connect(&listener_ip, 8080)).await.unwrap();
    assert_eq!(
        // Its retries while the listener re-arms say "refused" on stderr.
        (by_ip.exit_code, by_ip.stdout.as_str()),
        (0, "pong\n"),
        "{by_ip:?}"
    );

    // Same engine, same listener, default config: no way out.
    let isolated = h.sandbox().await;
    let bob = isolated.get_thread_backend("bob-1").await.unwrap();
    let interfaces = bob.execute("ls /sys/class/net").await.unwrap();
    assert_eq!(
        interfaces.output, "lo\n",
        "network none: loopback only: {interfaces:?}"
    );
    let alice_interfaces = alice.execute("ls /sys/class/net").await.unwrap();
    assert!(
        alice_interfaces.output.contains("eth0"),
        "the named network gives an interface: {alice_interfaces:?}"
    );
    let quick = |host: &str| format!("nc -w 2 {host} 8080 </dev/null");
    let r = bob.execute(&quick(&listener_ip)).await.unwrap();
    assert_ne!(r.exit_code, 0, "none must not reach {listener_ip}: {r:?}");
    assert!(!r.output.contains("pong"), "{r:?}");
    let r = bob.execute(&quick(&net.listener)).await.unwrap();
    assert_ne!(
        r.exit_code, 0,
        "none must not resolve or reach the listener: {r:?}"
    );
    assert!(!r.output.contains("pong"), "{r:?}");

    let containers = h.containers();
    assert_eq!(containers.len(), 2, "{containers:?}");
    drop(h);
}

/// What the README says plainly: one shared network joins the sandboxes of
/// different users, so a user reaches another user's sandbox over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sandboxes_of_different_users_on_one_network_reach_each_other() {
    let net = TestNetwork::create("cross");
    let h = Harness::new("netx");
    let sandbox = h
        .sandbox_with(
            sandbox_host::Config {
                network: net.name.clone(),
                ..h.config()
            },
            PolicySource::Builtin("per-user".into()),
        )
        .await;
    let alice = sandbox.get_thread_backend("alice-1").await.unwrap();
    let bob = sandbox.get_thread_backend("bob-1").await.unwrap();
    let bob_container = bob.ensure_container().await.unwrap();
    let bob_ip = net.ip_of(&bob_container.name);

    let listen = bob.execute_with(
        "echo bob-secret | nc -l -p 9000",
        ExecOptions {
            timeout: Some(Duration::from_secs(30)),
            ..ExecOptions::default()
        },
    );
    let dial_command = connect(&bob_ip, 9000);
    let dial = alice.execute(&dial_command);
    let (listened, dialed) = tokio::join!(listen, dial);
    let (listened, dialed) = (listened.unwrap(), dialed.unwrap());
    assert_eq!(
        (dialed.exit_code, dialed.output.as_str()),
        (0, "bob-secret\n"),
        "alice's sandbox reached bob's on the shared network: {dialed:?} / {listened:?}"
    );
    assert!(!listened.timed_out, "{listened:?}");
}
