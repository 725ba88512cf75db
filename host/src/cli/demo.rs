//! `sandbox demo`: show two threads of one user sharing one container, and another user apart.

use std::process::ExitCode;

use sandbox_host::Config;

use super::{open, GlobalArgs};

/// The README's first command: two threads of alice share one container and
/// one workspace; bob gets his own.
pub async fn run(config: Config, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let root = config.workspace_root.clone();
    let sandbox = open(config, true).await?;
    println!(
        "policy: {}, workspaces under {}",
        sandbox.policy_name(),
        root.display()
    );
    let mut seen = Vec::new();
    for (thread, command) in [
        (
            "alice-1",
            "echo written by thread alice-1 > note.txt; echo \"container $(hostname)\"",
        ),
        ("alice-2", "echo \"container $(hostname)\"; cat note.txt"),
        (
            "bob-1",
            "echo \"container $(hostname)\"; ls note.txt 2>&1 || true",
        ),
    ] {
        let backend = sandbox.get_thread_backend(thread).await?;
        let out = backend.execute(command).await?;
        let container = backend.ensure_container().await?;
        let shown = shlex::try_quote(command).unwrap_or(command.into());
        println!("\n$ sandbox exec {thread} -- {shown}");
        println!("  backend {} -> container {}", backend.id(), container.name);
        for line in out.output.lines() {
            println!("  | {line}");
        }
        seen.push((thread, container.id));
    }
    let shared = seen[0].1 == seen[1].1;
    let apart = seen[0].1 != seen[2].1;
    println!(
        "\nalice-1 and alice-2 share one container: {}; bob-1 has another: {}",
        yes(shared),
        yes(apart)
    );
    let again = cleanup_command(global);
    println!("clean up with: {again} destroy --user alice && {again} destroy --user bob");
    Ok(if shared && apart {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "NO"
    }
}

/// `sandbox` with the global flags this run was given, quoted for a shell:
/// the cleanup hint must reach the same deployment (namespace, root).
fn cleanup_command(global: &GlobalArgs) -> String {
    let mut words = vec!["sandbox".to_owned()];
    let path = |p: &std::path::PathBuf| p.display().to_string();
    for (flag, value) in [
        ("--config", global.config.as_ref().map(path)),
        ("--policy", global.policy.as_ref().map(path)),
        ("--image", global.image.clone()),
        ("--workspace-root", global.workspace_root.as_ref().map(path)),
        ("--namespace", global.namespace.clone()),
    ] {
        if let Some(value) = value {
            words.push(flag.to_owned());
            words.push(shlex::try_quote(&value).map_or(value.clone(), |q| q.into_owned()));
        }
    }
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cleanup_hint_keeps_the_flags_it_was_given() {
        let global = GlobalArgs {
            config: None,
            no_config: false,
            policy: None,
            image: None,
            workspace_root: Some("/srv/my ws".into()),
            namespace: Some("trial".into()),
            verbose: 0,
        };
        assert_eq!(
            cleanup_command(&global),
            "sandbox --workspace-root '/srv/my ws' --namespace trial"
        );
    }
}
