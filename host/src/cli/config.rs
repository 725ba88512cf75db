//! `sandbox config`: print the effective configuration and where each value came from.

use std::process::ExitCode;

use sandbox_host::config::Loaded;

#[derive(clap::Args)]
pub struct ConfigArgs {
    /// Print the configuration and each key's source as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What a key left unset means: its effective value where the host
/// computes one.
fn unset(key: &str, config: &sandbox_host::Config) -> String {
    match key {
        "sandbox_user" => {
            let ids = config.sandbox_user();
            format!("(unset: {}:{})", ids.uid, ids.gid)
        }
        "docker_host" => format!(
            "(unset: {})",
            std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into())
        ),
        "policy" => "(unset: the embedded per-user policy)".to_owned(),
        "runtime" => "(unset: the engine's default)".to_owned(),
        _ => "(unset)".to_owned(),
    }
}

/// Every key, its value and where it came from.
pub fn run(loaded: &Loaded, args: ConfigArgs) -> anyhow::Result<ExitCode> {
    let ConfigArgs { json } = args;
    let entries = loaded.sources();
    if json {
        let sources: serde_json::Map<String, serde_json::Value> = entries
            .iter()
            .map(|(key, _, origin)| Ok((key.clone(), serde_json::to_value(origin)?)))
            .collect::<serde_json::Result<_>>()?;
        let out = serde_json::json!({ "config": loaded.config, "sources": sources });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<(String, String, String)> = entries
        .into_iter()
        .map(|(key, value, origin)| {
            let value = match value {
                serde_json::Value::Null => unset(&key, &loaded.config),
                value => value.to_string(),
            };
            (key, value, origin.to_string())
        })
        .collect();
    match &loaded.file {
        Some(path) => eprintln!("configuration file: {}", path.display()),
        None => eprintln!(
            "configuration file: none (looked for {})",
            sandbox_host::config::default_files()
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
    let key_width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let value_width = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
    println!("{:<key_width$}  {:<value_width$}  SOURCE", "KEY", "VALUE");
    for (key, value, origin) in rows {
        println!("{key:<key_width$}  {value:<value_width$}  {origin}");
    }
    // Settings for the policy are its own; the shipped ones' keys are known.
    let shipped = match &loaded.config.policy {
        None => Some(sandbox_host::policies::PER_USER.to_vec()),
        Some(path) => std::fs::read(path)
            .ok()
            .filter(|b| sandbox_host::policies::known_digest(b).is_some()),
    };
    if let Some(component) = shipped {
        for key in
            sandbox_host::policies::unread_keys(&component, loaded.config.policy_config.keys())
        {
            eprintln!(
                "warning: policy_config.{key} is not read by the shipped policies (they read {})",
                sandbox_host::policies::SHIPPED_KEYS.join(", ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
