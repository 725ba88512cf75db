//! The baselines every latency case is compared with: an exec driven with
//! raw bollard (the floor any Docker client pays) and the docker CLI (what
//! an agent platform would otherwise shell out to).

use bollard::exec::StartExecResults;
use bollard::models::ExecConfig;
use bollard::Docker;
use futures_util::StreamExt;

pub(crate) async fn raw_exec(docker: &Docker, container: &str) -> anyhow::Result<()> {
    let exec = docker
        .create_exec(
            container,
            ExecConfig {
                cmd: Some(vec!["sh".into(), "-c".into(), "true".into()]),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            },
        )
        .await?;
    if let StartExecResults::Attached { mut output, .. } = docker.start_exec(&exec.id, None).await?
    {
        while let Some(chunk) = output.next().await {
            chunk?;
        }
    }
    let inspected = docker.inspect_exec(&exec.id).await?;
    anyhow::ensure!(inspected.exit_code == Some(0), "raw exec failed");
    Ok(())
}

pub(crate) async fn docker_cli(args: &[&str]) -> anyhow::Result<()> {
    let status = tokio::process::Command::new("docker")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .await?;
    anyhow::ensure!(status.success(), "docker {args:?} failed");
    Ok(())
}
