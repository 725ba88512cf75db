//! `sandbox image`: build the local busybox sandbox image without a registry.

use std::path::PathBuf;
use std::process::ExitCode;

use sandbox_host::provider::docker::DockerProvider;
use sandbox_host::Config;

#[derive(clap::Subcommand)]
pub enum ImageCommand {
    /// Build the busybox image from host/image/ with no registry.
    Build {
        #[arg(long, default_value = sandbox_host::config::DEFAULT_IMAGE)]
        tag: String,
        /// A statically linked busybox binary (default: /bin/busybox when it is
        /// static, else Debian's busybox-static fetched with `apt-get download`).
        #[arg(long)]
        busybox: Option<PathBuf>,
    },
}

pub async fn run(config: Config, command: ImageCommand) -> anyhow::Result<ExitCode> {
    match command {
        ImageCommand::Build { tag, busybox } => {
            let provider = DockerProvider::from_config(&config);
            sandbox_host::image::build(&provider, &tag, busybox.as_deref()).await?;
            println!("built {tag}");
            Ok(ExitCode::SUCCESS)
        }
    }
}
