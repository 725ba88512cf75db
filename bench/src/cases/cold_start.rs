//! Case 2: a new user's first call (container create, start, exec) against
//! the same create+start+exec with raw bollard and `docker run --rm`: the
//! cost a user pays once.

use bollard::query_parameters::{CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder};
use sandbox_host::internals::{create_body, ownership_labels};
use sandbox_host::ContainerPlan;

use super::Bench;
use crate::baseline::{docker_cli, raw_exec};
use crate::measure::timed;
use crate::report::{med_p95, ratio};

impl Bench {
    /// (2) cold first call for a new user.
    pub(crate) async fn cold_start(&mut self) -> anyhow::Result<()> {
        let owner = self.config.sandbox_user();
        let (mut ours, mut raw, mut cli) = (vec![], vec![], vec![]);
        let n = if self.smoke {
            3
        } else {
            self.iterations.min(20)
        };
        for _ in 0..n {
            let user = self.fresh_user("cold");
            let thread = format!("{user}-1");
            let sandbox = self.sandbox.clone();
            ours.push(
                timed(async {
                    let b = sandbox.get_thread_backend(&thread).await?;
                    Ok(b.execute("true").await?)
                })
                .await?
                .1,
            );
            self.sandbox.destroy_user_backend(&user).await?;

            let raw_user = self.fresh_user("raw");
            let path = self.config.workspace_root.join(&raw_user);
            std::fs::create_dir_all(&path)?;
            std::os::unix::fs::chown(&path, Some(owner.uid), Some(owner.gid))?;
            let raw_backend = sandbox_host::BackendId::parse(&raw_user)?;
            let raw_workspace = sandbox_host::UserId::parse(&raw_user)?.workspace();
            let labels = ownership_labels(
                &self.config.namespace,
                raw_backend.as_str(),
                raw_workspace.as_str(),
                "raw-bollard",
            );
            let profile = self.config.default_profile();
            let plan =
                ContainerPlan::new(&self.config, &profile, &raw_backend, path, owner, labels);
            let docker = &self.docker;
            let (id, took) = timed(async {
                let options = CreateContainerOptionsBuilder::default()
                    .name(&plan.name)
                    .build();
                let created = docker
                    .create_container(Some(options), create_body(&plan))
                    .await?;
                docker.start_container(&created.id, None).await?;
                raw_exec(docker, &created.id).await?;
                Ok(created.id)
            })
            .await?;
            raw.push(took);
            let rm = RemoveContainerOptionsBuilder::default().force(true).build();
            docker.remove_container(&id, Some(rm)).await?;

            let image = self.config.image.clone();
            cli.push(
                timed(docker_cli(&[
                    "run",
                    "--rm",
                    "--network",
                    "none",
                    &image,
                    "true",
                ]))
                .await?
                .1,
            );
        }
        self.table.add(
            "2. cold first call (ensure + exec) vs raw bollard create+start+exec",
            med_p95(&ours),
            med_p95(&raw),
            format!("{:.3}", ratio(&ours, &raw)),
            "(context)",
        );
        self.table.add(
            "2. cold first call vs `docker run --rm IMG true`",
            med_p95(&ours),
            med_p95(&cli),
            format!("{:.3}", ratio(&ours, &cli)),
            "<= 0.6",
        );
        Ok(())
    }
}
