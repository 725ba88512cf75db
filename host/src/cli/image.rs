//! `sandbox image`: build the local sandbox images without a registry.

use std::path::PathBuf;
use std::process::ExitCode;

use sandbox_host::config::{DEFAULT_IMAGE, PYTHON_IMAGE};
use sandbox_host::Config;
use sandbox_host::DockerProvider;

#[derive(clap::Subcommand)]
pub enum ImageCommand {
    /// Build the busybox image from host/image/ with no registry, or with
    /// --python the Python-ready Debian image (mmdebstrap).
    Build {
        /// The tag to build (default: sandbox-busybox:latest, with --python
        /// sandbox-python:latest).
        #[arg(long)]
        tag: Option<String>,
        /// A statically linked busybox binary (default: /bin/busybox when it is
        /// static, else Debian's busybox-static fetched with `apt-get download`).
        #[arg(long, conflicts_with = "python")]
        busybox: Option<PathBuf>,
        /// Build the Python image for deepagents' BaseSandbox (python3, GNU
        /// grep, findutils, coreutils, ripgrep; `python` too): a Debian minbase made by
        /// mmdebstrap (`apt-get install mmdebstrap`) from this machine's apt
        /// sources, imported into the engine.
        #[arg(long)]
        python: bool,
    },
}

pub async fn run(config: Config, command: ImageCommand) -> anyhow::Result<ExitCode> {
    match command {
        ImageCommand::Build {
            tag,
            busybox,
            python,
        } => {
            let provider = DockerProvider::from_config(&config);
            if python {
                let tag = tag.as_deref().unwrap_or(PYTHON_IMAGE);
                let started = std::time::Instant::now();
                let built = sandbox_host::image::build_python(&provider, tag).await?;
                println!(
                    "built {tag} ({:.1} MB, {:.0}s)",
                    built.size as f64 / 1e6,
                    started.elapsed().as_secs_f64()
                );
            } else {
                let tag = tag.as_deref().unwrap_or(DEFAULT_IMAGE);
                sandbox_host::image::build(&provider, tag, busybox.as_deref()).await?;
                println!("built {tag}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
