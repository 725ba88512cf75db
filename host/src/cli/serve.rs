//! `sandbox serve`: serve the JSON HTTP API until SIGTERM.

use std::process::ExitCode;

use sandbox_host::Config;

use super::open;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on: IP:PORT, HOST:PORT (`localhost:8765`, the
    /// first address it resolves to), or a bare PORT (on 127.0.0.1);
    /// anything but loopback requires --token.
    #[arg(long, default_value = "127.0.0.1:8765", value_parser = listen_arg)]
    pub listen: std::net::SocketAddr,
    /// Bearer token required on every request (but /healthz).
    #[arg(long, env = "SANDBOX_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Largest JSON request body in bytes (the raw file routes stream,
    /// bounded by max_file_bytes).
    #[arg(long, default_value_t = sandbox_host::serve::DEFAULT_BODY_LIMIT)]
    pub body_limit_bytes: usize,
    /// Host name accepted when no token is set (repeatable; loopback
    /// names by default): guards against DNS rebinding.
    #[arg(long = "allowed-host", value_name = "NAME")]
    pub allowed_hosts: Vec<String>,
}

pub async fn run(config: Config, args: ServeArgs) -> anyhow::Result<ExitCode> {
    let ServeArgs {
        listen,
        token,
        body_limit_bytes,
        allowed_hosts,
    } = args;
    let allowed_hosts = if allowed_hosts.is_empty() {
        sandbox_host::serve::LOOPBACK_HOSTS
            .iter()
            .map(|h| h.to_string())
            .collect()
    } else {
        allowed_hosts
    };
    let options = sandbox_host::serve::ServeOptions {
        listen,
        token: token.filter(|t| !t.is_empty()),
        body_limit_bytes,
        policy_path: config.policy.clone(),
        allowed_hosts,
        grace: std::time::Duration::from_secs_f64(config.destroy_grace_secs),
    };
    options.check()?;
    same_path_on_the_host(&config).await?;
    // A reload sent while the image is checked and the policy compiled
    // (systemd's `ExecReload` may come that early) must not end the
    // service: held until `serve` takes SIGHUP itself (then it reloads).
    let early_hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let sandbox = open(config, true).await?;
    drop(early_hangups);
    sandbox_host::serve::serve(sandbox, options).await?;
    Ok(ExitCode::SUCCESS)
}

/// In a container (the deployment image), the engine resolves the paths of
/// the mounts the server asks for on the *host*: the workspace root must be
/// mounted at the same path, or every sandbox gets an empty directory the
/// engine makes (and the agent mounts nothing that runs). Refused at start,
/// with the mount to use; unknown (the container cannot be inspected: a
/// custom hostname) is a warning.
async fn same_path_on_the_host(config: &Config) -> anyhow::Result<()> {
    if !std::path::Path::new("/.dockerenv").exists() {
        return Ok(());
    }
    let me = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let me = me.trim();
    let root = config
        .workspace_root
        .canonicalize()
        .unwrap_or_else(|_| config.workspace_root.clone());
    let provider = sandbox_host::DockerProvider::from_config(config);
    match provider.host_path_of(me, &root).await {
        Ok(Some(host)) if host == root => Ok(()),
        Ok(Some(host)) => anyhow::bail!(
            "the workspace root {root} is mounted from {host} on the host, and the engine \
             resolves the sandboxes' mounts on the host: mount it at the same path \
             (-v {host}:{host} -e SANDBOX_WORKSPACE_ROOT={host})",
            root = root.display(),
            host = host.display()
        ),
        Ok(None) => anyhow::bail!(
            "sandbox serve runs in a container, but its workspace root {root} is not mounted \
             from the host: the engine would give every sandbox an empty directory. Mount it \
             at the same path (-v {root}:{root})",
            root = root.display()
        ),
        Err(e) => {
            tracing::warn!(container = me, error = %e, "cannot check that the workspace root is mounted at the same path on the host");
            Ok(())
        }
    }
}

/// `--listen`: `IP:PORT`, `HOST:PORT` (resolved; loopback names stay
/// loopback), or a bare port on 127.0.0.1.
fn listen_arg(text: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(port) = text.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let mut found = text
        .to_socket_addrs()
        .map_err(|e| format!("expected IP:PORT, HOST:PORT or a port: {e}"))?;
    found
        .next()
        .ok_or_else(|| format!("{text} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_takes_a_port_a_host_and_port_or_an_address() {
        assert_eq!(listen_arg("18765").unwrap().to_string(), "127.0.0.1:18765");
        assert_eq!(listen_arg("0.0.0.0:80").unwrap().to_string(), "0.0.0.0:80");
        assert!(listen_arg("localhost:18765").unwrap().ip().is_loopback());
        assert!(listen_arg("18765x").is_err());
        assert!(listen_arg("localhost").is_err());
    }
}
