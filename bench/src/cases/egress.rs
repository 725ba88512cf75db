//! Case 11: a large download through the egress proxy (`network =
//! "egress"`: the workload's `wget` -> the agent's relay on 127.0.0.1:3128
//! -> the host's proxy over a Unix socket -> the upstream) against the same
//! download from a container on a plain bridge (no proxy, no relay).

use std::time::{Duration, Instant};

use sandbox_host::config::Config;
use sandbox_host::{DockerProvider, PolicySource, Sandbox};

use super::Bench;
use crate::baseline::docker_cli;
use crate::report::{ms, percentile, ratio};

/// A bridge network with a web server serving `big` (and a container on
/// the same bridge for the baseline), removed on drop.
struct Upstream {
    network: String,
    server: String,
    client: String,
}

impl Upstream {
    async fn start(image: &str, size_mib: usize) -> anyhow::Result<Self> {
        let network = format!("sandbox-bench-egress-{}", std::process::id());
        let up = Upstream {
            server: format!("{network}-web"),
            client: format!("{network}-client"),
            network,
        };
        docker_cli(&["network", "create", "--driver", "bridge", &up.network]).await?;
        let serve = format!(
            "mkdir -p /tmp/www && dd if=/dev/zero of=/tmp/www/big bs=1M count={size_mib} \
             2>/dev/null && exec httpd -f -p 80 -h /tmp/www"
        );
        docker_cli(&[
            "run",
            "-d",
            "--name",
            &up.server,
            "--network",
            &up.network,
            image,
            "sh",
            "-c",
            &serve,
        ])
        .await?;
        docker_cli(&[
            "run",
            "-d",
            "--name",
            &up.client,
            "--network",
            &up.network,
            image,
            "sleep",
            "infinity",
        ])
        .await?;
        Ok(up)
    }

    async fn ip(&self) -> anyhow::Result<String> {
        let format = format!(
            "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
            self.network
        );
        let out = tokio::process::Command::new("docker")
            .args(["inspect", "--format", &format, &self.server])
            .output()
            .await?;
        let ip = String::from_utf8(out.stdout)?.trim().to_owned();
        anyhow::ensure!(!ip.is_empty(), "the upstream has no address");
        Ok(ip)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for args in [
            vec!["rm", "-f", &self.server, &self.client],
            vec!["network", "rm", &self.network],
        ] {
            let _ = std::process::Command::new("docker").args(args).output();
        }
    }
}

impl Bench {
    /// (11) a 100 MB download through the egress proxy vs from a container
    /// on a plain bridge.
    pub(crate) async fn egress(&mut self) -> anyhow::Result<()> {
        let size_mib = if self.smoke { 10 } else { 100 };
        let upstream = Upstream::start(&self.config.image, size_mib).await?;
        let ip = upstream.ip().await?;
        let mut config = Config {
            namespace: format!("{}-egress", self.config.namespace),
            network: "egress".into(),
            ..self.config.clone()
        };
        config.egress.allow = vec!["upstream.bench:80".into(), format!("{ip}:80")];
        config.egress.hosts = [("upstream.bench".to_owned(), ip.clone())].into();
        let provider = std::sync::Arc::new(DockerProvider::from_config(&config));
        let sandbox =
            Sandbox::with_provider(config, provider, PolicySource::Builtin("per-user".into()))
                .await?;
        let b = sandbox.get_thread_backend("egress-1").await?;
        b.execute("true").await?;
        // Every byte read and dropped inside the container, both ways.
        let download = |url: &str| format!("wget -qO- {url} | wc -c");
        let expected = format!("{}\n", size_mib << 20);
        let (mut ours, mut plain) = (vec![], vec![]);
        for _ in 0..3 {
            let t = Instant::now();
            let r = b.execute(&download("http://upstream.bench/big")).await?;
            ours.push(t.elapsed());
            anyhow::ensure!(r.output == expected, "through the proxy: {r:?}");

            let t = Instant::now();
            let out = tokio::process::Command::new("docker")
                .args(["exec", &upstream.client, "sh", "-c"])
                .arg(download(&format!("http://{ip}/big")))
                .output()
                .await?;
            plain.push(t.elapsed());
            anyhow::ensure!(
                String::from_utf8_lossy(&out.stdout) == expected,
                "on the bridge: {out:?}"
            );
        }
        let _ = sandbox.destroy_user_backend("egress").await;
        let rate =
            |d: Duration| format!("{:.0} MB/s", size_mib as f64 * 1.048576 / d.as_secs_f64());
        self.table.add(
            &format!(
                "11. {size_mib} MiB download: through the egress proxy vs a container on a plain bridge"
            ),
            format!(
                "{} ({})",
                ms(percentile(&ours, 0.5)),
                rate(percentile(&ours, 0.5))
            ),
            format!(
                "{} ({})",
                ms(percentile(&plain, 0.5)),
                rate(percentile(&plain, 0.5))
            ),
            format!("{:.3}", ratio(&ours, &plain)),
            "(report)",
        );
        Ok(())
    }
}
