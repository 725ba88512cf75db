//! `network = "egress"` against the real engine: a sandbox with nothing but
//! loopback reaches the allow-list through the host's proxy, and nothing
//! else: not the upstream directly, not an unlisted name, not a listed name
//! that resolves to a private or loopback address, not the host's own
//! services, not the metadata address.

mod support;

use sandbox_host::config::EgressConfig;
use support::{docker, require_engine, test_image, Harness};

/// A bridge network with a web server on it (`hello-upstream` at `/`),
/// removed on drop. Declared before the harness, so it outlives the
/// sandboxes.
struct Upstream {
    network: String,
    server: String,
}

impl Upstream {
    fn start(tag: &str) -> Self {
        require_engine();
        let network = format!("sandbox-it-{tag}-{}", std::process::id());
        let up = Upstream {
            server: format!("{network}-web"),
            network,
        };
        docker(&["network", "create", "--driver", "bridge", &up.network]);
        docker(&[
            "run",
            "-d",
            "--name",
            &up.server,
            "--network",
            &up.network,
            &test_image(),
            "sh",
            "-c",
            "mkdir -p /tmp/www && echo hello-upstream > /tmp/www/index.html \
             && exec httpd -f -p 80 -h /tmp/www",
        ]);
        up
    }

    fn ip(&self) -> String {
        let format = format!(
            "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
            self.network
        );
        let ip = docker(&["inspect", "--format", &format, &self.server])
            .trim()
            .to_owned();
        assert!(!ip.is_empty(), "the upstream has no address");
        ip
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f", &self.server])
            .output();
        let _ = std::process::Command::new("docker")
            .args(["network", "rm", &self.network])
            .output();
    }
}

/// A raw request to the sandbox's proxy, as the workload sends it (busybox
/// `nc` stops reading when its input ends: the input lasts a while).
fn raw(request: &str) -> String {
    format!("{{ printf '{request}'; sleep 1; }} | nc 127.0.0.1 3128")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sandbox_reaches_the_allow_list_through_the_proxy_and_nothing_else() {
    let upstream = Upstream::start("egress");
    let ip = upstream.ip();
    // A service of the host's own, on its loopback.
    let host_service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host_port = host_service.local_addr().unwrap().port();
    let h = Harness::new("egress");
    let mut config = h.config();
    config.network = "egress".into();
    config.egress = EgressConfig {
        allow: vec![
            "allowed.test".into(),
            format!("{ip}:80"),
            "private.test".into(),
            "localhost".into(),
        ],
        hosts: [
            ("allowed.test".to_owned(), ip.clone()),
            ("other.test".to_owned(), ip.clone()),
            ("private.test".to_owned(), "10.255.255.1".to_owned()),
        ]
        .into(),
        metrics_per_user: false,
    };
    let sandbox = h
        .sandbox_with(
            config,
            sandbox_host::PolicySource::Builtin("per-user".into()),
        )
        .await;
    let alice = sandbox.get_thread_backend("alice-1").await.unwrap();
    let run = |command: String| {
        let alice = alice.clone();
        async move { alice.execute(&command).await.unwrap() }
    };

    // Allowed: through the proxy variables, and through a CONNECT tunnel.
    let r = run("wget -qO- http://allowed.test/".into()).await;
    assert_eq!(r.output, "hello-upstream\n", "{r:?}");
    let r = run(raw(
        "CONNECT allowed.test:80 HTTP/1.1\\r\\nHost: allowed.test:80\\r\\n\\r\\nGET / HTTP/1.0\\r\\n\\r\\n",
    ))
    .await;
    assert!(r.output.starts_with("HTTP/1.1 200"), "{r:?}");
    assert!(r.output.contains("hello-upstream"), "{r:?}");

    // Refused by the proxy, each saying why.
    let refused = |target: &str, says: &[&str], out: &str| {
        assert!(out.starts_with("HTTP/1.0 403"), "{target}: {out}");
        for word in says {
            assert!(out.contains(word), "{target}: {word:?} in {out}");
        }
    };
    let get = |url: &str| raw(&format!("GET {url} HTTP/1.0\\r\\n\\r\\n"));
    let out = run(get("http://other.test/")).await.output;
    refused("unlisted", &["other.test:80", "[egress] allow"], &out);
    let out = run(get("http://private.test/")).await.output;
    refused(
        "private",
        &["10.255.255.1", "private", "list the address"],
        &out,
    );
    let out = run(get(&format!("http://localhost:{host_port}/")))
        .await
        .output;
    refused("loopback", &["127.0.0.1", "loopback"], &out);
    let out = run(get(&format!("http://127.0.0.1:{host_port}/")))
        .await
        .output;
    refused("host service", &[&format!("127.0.0.1:{host_port}")], &out);
    let out = run(get("http://169.254.169.254/latest/meta-data/"))
        .await
        .output;
    refused("metadata", &["169.254.169.254:80"], &out);
    let out = run(get(&format!("http://{ip}:8080/"))).await.output;
    refused("listed address, other port", &[&format!("{ip}:8080")], &out);

    // Nothing but loopback: no direct way to the upstream, the host or the
    // metadata address.
    let r = run("grep : /proc/net/dev | cut -d: -f1 | tr -d ' '".into()).await;
    assert_eq!(r.output, "lo\n", "{r:?}");
    for target in [
        format!("http://{ip}/"),
        "http://169.254.169.254/".to_owned(),
    ] {
        let r = run(format!("http_proxy= wget -T 3 -qO- {target}")).await;
        assert_ne!(r.exit_code, 0, "{target} reached directly: {r:?}");
    }

    // Counted, by user.
    let counts = sandbox.egress_counts();
    let (user, alice_counts) = counts.first().expect("alice's egress counted");
    assert_eq!(user, "alice");
    assert!(
        alice_counts.bytes_in > 0 && alice_counts.bytes_out > 0,
        "{alice_counts:?}"
    );
    assert!(alice_counts.refused >= 6, "{alice_counts:?}");
    drop(host_service);
}

/// The policy picks each user's profile among the operator's: alice's
/// `open` profile reaches the upstream through the proxy; bob, on the
/// `default` profile (`network = "none"`), has no proxy at all, and never
/// reaches alice's socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_policy_gives_alice_egress_and_bob_none() {
    use sandbox_host::config::{ProfileConfig, ProfileEgress};
    let upstream = Upstream::start("profiles");
    let ip = upstream.ip();
    let h = Harness::new("profiles");
    let mut config = h.config();
    config.network = "none".into();
    config.egress.hosts = [("allowed.test".to_owned(), ip.clone())].into();
    config.profiles.insert(
        "open".into(),
        ProfileConfig {
            network: Some("egress".into()),
            egress: Some(ProfileEgress {
                allow: vec!["allowed.test:80".into(), format!("{ip}:80")],
            }),
            ..ProfileConfig::default()
        },
    );
    config
        .policy_config
        .insert("profile.open".into(), "alice".into());
    let sandbox = h
        .sandbox_with(
            config,
            sandbox_host::PolicySource::Builtin("per-user".into()),
        )
        .await;
    let alice = sandbox.get_thread_backend("alice-1").await.unwrap();
    let bob = sandbox.get_thread_backend("bob-1").await.unwrap();

    let r = alice
        .execute("wget -qO- http://allowed.test/")
        .await
        .unwrap();
    assert_eq!(r.output, "hello-upstream\n", "{r:?}");
    let r = alice
        .execute(&raw("GET http://other.test/ HTTP/1.0\\r\\n\\r\\n"))
        .await
        .unwrap();
    assert!(r.output.starts_with("HTTP/1.0 403"), "{r:?}");

    let r = bob
        .execute(
            "grep : /proc/net/dev | cut -d: -f1 | tr -d ' '; env | grep -ci proxy; ls /.sandbox",
        )
        .await
        .unwrap();
    // No egress directory: the agent, and its plane (the host's link to
    // the agent, no way out).
    assert_eq!(
        r.output, "lo\n0\nagent\nplane\n",
        "bob: no interface, proxy or socket: {r:?}"
    );
    let r = bob
        .execute("wget -T 3 -qO- http://allowed.test/ || echo failed")
        .await
        .unwrap();
    // stdout only: busybox's static wget may also crash on the failed
    // lookup (a "Segmentation fault" on stderr, in either order).
    assert_eq!(r.stdout, "failed\n", "{r:?}");
    let r = bob
        .execute("nc -w 2 127.0.0.1 3128 </dev/null; echo $?")
        .await
        .unwrap();
    assert_ne!(r.output.trim(), "0", "no relay in bob's sandbox: {r:?}");

    let profiles: Vec<(String, String)> = sandbox
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.backend_id.clone(), c.profile.clone()))
        .collect();
    assert!(
        profiles.contains(&("alice".into(), "open".into())),
        "{profiles:?}"
    );
    assert!(
        profiles.contains(&("bob".into(), "default".into())),
        "{profiles:?}"
    );
    drop(upstream);
}

/// `sandbox exec` run alone (no server): the CLI process serves the proxy
/// socket while it runs, removes it when it ends, and the next `exec`
/// serves it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_exec_alone_serves_its_own_egress() {
    let upstream = Upstream::start("cli");
    let ip = upstream.ip();
    let h = Harness::new("egresscli");
    let exec = |command: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sandbox"))
            .arg("--workspace-root")
            .arg(h.root.path())
            .args([
                "--namespace",
                &h.namespace,
                "--image",
                &support::test_image(),
            ])
            .env_remove("SANDBOX_CONFIG")
            .env("SANDBOX_NETWORK", "egress")
            .env("SANDBOX_EGRESS__ALLOW", format!("allowed.test:80,{ip}:80"))
            .env("SANDBOX_EGRESS__HOSTS", format!("allowed.test={ip}"))
            .args(["exec", "alice-1", "--", "sh", "-c", command])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for round in 0..2 {
        let (code, stdout, stderr) = exec("wget -qO- http://allowed.test/");
        assert_eq!(code, Some(0), "round {round}: {stdout} {stderr}");
        assert_eq!(stdout, "hello-upstream\n", "round {round}: {stderr}");
    }
    let (_, stdout, _) = exec(&raw("GET http://other.test/ HTTP/1.0\\r\\n\\r\\n"));
    assert!(stdout.starts_with("HTTP/1.0 403"), "{stdout}");
    // Between the two, no process served it: the socket was removed.
    let sockets = h.root.path().join(".sandbox/egress/sockets");
    let served: Vec<_> = std::fs::read_dir(&sockets)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().join("proxy.sock").exists())
                .map(|e| e.file_name())
                .collect()
        })
        .unwrap_or_default();
    assert!(served.is_empty(), "sockets left served: {served:?}");
    drop(upstream);
}

/// The bug (an attack): CONNECT tunnels opened straight on the proxy
/// socket were not counted against the user's 64 connections, so one
/// sandbox could open thousands and exhaust the host process's file
/// descriptors, taking egress (and the API) from every user. Each tunnel
/// now holds its slot until it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tunnels_count_against_the_users_connection_cap() {
    let upstream = Upstream::start("tunnels");
    let ip = upstream.ip();
    let h = Harness::new("tunnels");
    let mut config = h.config();
    config.image = support::python_image();
    config.network = "egress".into();
    config.egress = EgressConfig {
        allow: vec!["allowed.test:80".into(), format!("{ip}:80")],
        hosts: [("allowed.test".to_owned(), ip.clone())].into(),
        metrics_per_user: false,
    };
    let sandbox = h
        .sandbox_with(
            config,
            sandbox_host::PolicySource::Builtin("per-user".into()),
        )
        .await;
    let alice = sandbox.get_thread_backend("alice-1").await.unwrap();
    let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    alice.execute("true").await.unwrap();
    let before = fds();
    // 200 tunnels on the socket itself (not through the relay's 32), each
    // established, then held while the host's descriptors are counted.
    let program = r#"
import socket, time
held = []
for _ in range(200):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect("/.sandbox/egress/proxy.sock")
        s.sendall(b"CONNECT allowed.test:80 HTTP/1.1\r\nHost: allowed.test:80\r\n\r\n")
        s.settimeout(2)
        ok = s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        ok = False
    if ok:
        held.append(s)
print(len(held), flush=True)
open("/tmp/held", "w").write(str(len(held)))
time.sleep(8)
"#;
    let run = alice.execute_with(
        "python3 -",
        sandbox_host::ExecOptions {
            stdin: Some(program.as_bytes().to_vec()),
            ..Default::default()
        },
    );
    let watch = async {
        // While the tunnels are held: the host's descriptors grew by at
        // most two per allowed connection (the sandbox's, the upstream's).
        tokio::time::sleep(std::time::Duration::from_secs(6)).await;
        fds()
    };
    let (r, during) = tokio::join!(run, watch);
    let r = r.unwrap();
    assert_eq!(r.stdout.trim(), "64", "{r:?}");
    assert!(
        during <= before + 2 * 64 + 16,
        "the host's descriptors grew from {before} to {during}"
    );
    let counts = sandbox.egress_counts();
    assert!(counts[0].1.refused >= 100, "{counts:?}");
    drop(upstream);
}
