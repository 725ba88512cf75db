//! The sandbox image: present locally, else (the default image) an upstream
//! busybox pulled from a registry when one answers, else built from the
//! recipe in `host/image/` around a static busybox: the machine's own, or
//! Debian's busybox-static fetched with `apt-get download` into a temporary
//! directory (nothing is installed system-wide).
//!
//! The Python image ([`python`], `sandbox image build --python`) is a
//! Debian minbase root file system made by `mmdebstrap` from the machine's
//! apt sources; [`ensure`] pulls `python:3-slim` for it first where a
//! registry answers.

use std::io::Read;
use std::path::{Path, PathBuf};

use bollard::query_parameters::{
    BuildImageOptionsBuilder, CreateImageOptionsBuilder, TagImageOptionsBuilder,
};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

use crate::{DockerProvider, ProviderError};

pub mod python;

pub use python::{build_python, Built, UPSTREAM_PYTHON};

const DOCKERFILE: &str = include_str!("../image/Dockerfile");
const PASSWD: &str = include_str!("../image/passwd");
const GROUP: &str = include_str!("../image/group");

/// Where Debian's busybox-static installs its binary.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// The upstream image tagged as the default one where a registry answers
/// (statically linked, like the recipe's).
pub const UPSTREAM_BUSYBOX: &str = "busybox:musl";

/// The Debian package whose `/bin/busybox` the recipe is built around.
const BUSYBOX_PACKAGE: &str = "busybox-static";

/// What to do when no usable static busybox is at hand.
const BUSYBOX_HINT: &str =
    "pass --busybox PATH to a statically linked busybox (Debian: busybox-static)";

/// Why the sandbox image could not be found, pulled or built.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The Docker engine could not be reached.
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// A Docker API call failed; `action` says which (`pulling busybox:musl`).
    #[error("{action}")]
    Docker {
        /// What was being done, for the message.
        action: String,
        /// The engine's error.
        #[source]
        source: bollard::errors::Error,
    },
    /// The engine reported an error in a build step.
    #[error("building {tag}: {message}")]
    BuildStep {
        /// The tag being built.
        tag: String,
        /// The engine's error message for the step.
        message: String,
    },
    /// The default image was neither present nor pullable, and building it
    /// failed.
    #[error("building the default image {image}")]
    DefaultImage {
        /// The default image's tag ([`crate::config::DEFAULT_IMAGE`]).
        image: String,
        /// Why building it failed.
        #[source]
        source: Box<ImageError>,
    },
    /// Another image, not present, could not be pulled.
    #[error(
        "image {image:?} is not available and pulling it failed. Build a local image with \
         `sandbox image build --tag {image}`, or point SANDBOX_IMAGE at an image you have \
         (`docker images`)"
    )]
    Unavailable {
        /// The configured image.
        image: String,
        /// Why pulling it failed.
        #[source]
        source: Box<ImageError>,
    },
    /// Neither a static local busybox nor apt-get to fetch Debian's.
    #[error(
        "a static busybox is needed to build the sandbox image, and this machine has neither \
         {DEFAULT_BUSYBOX} (static) nor apt-get to fetch Debian's {BUSYBOX_PACKAGE}: pass \
         --busybox PATH to a statically linked busybox, or set SANDBOX_IMAGE to an image you \
         have"
    )]
    NoApt(#[source] std::io::Error),
    /// apt's package lists are empty (a fresh image): `apt-get update` first.
    #[error(
        "apt-get knows no package {BUSYBOX_PACKAGE}: the package lists are empty, as on \
         many fresh images. Run `apt-get update` (as root) and try again, or pass \
         --busybox PATH to a statically linked busybox"
    )]
    NoPackage,
    /// `apt-get download` failed otherwise; with its stderr.
    #[error("`apt-get download {BUSYBOX_PACKAGE}` failed: {stderr}")]
    AptFailed {
        /// What apt-get wrote to stderr.
        stderr: String,
    },
    /// `apt-get download` succeeded without leaving a package.
    #[error("apt-get download reported success but left no .deb")]
    NoDeb,
    /// `dpkg-deb` could not be started.
    #[error("running dpkg-deb (Debian's dpkg) to extract busybox-static")]
    Dpkg(#[source] std::io::Error),
    /// `dpkg-deb -x` failed.
    #[error("dpkg-deb -x {} failed ({status})", deb.display())]
    DpkgFailed {
        /// The downloaded package.
        deb: PathBuf,
        /// How dpkg-deb exited.
        status: std::process::ExitStatus,
    },
    /// The busybox binary could not be read.
    #[error("reading {}: {BUSYBOX_HINT}", path.display())]
    ReadBusybox {
        /// The binary's path (`--busybox`, or the default).
        path: PathBuf,
        /// Why reading it failed.
        #[source]
        source: std::io::Error,
    },
    /// The busybox binary needs a dynamic loader the image does not have.
    #[error(
        "{} is dynamically linked and cannot run in an image built FROM scratch: {BUSYBOX_HINT}",
        path.display()
    )]
    DynamicBusybox {
        /// The binary's path.
        path: PathBuf,
    },
    /// The busybox "binary" is not a 64-bit ELF executable.
    #[error("{} is not a 64-bit ELF executable: {BUSYBOX_HINT}", path.display())]
    NotElf {
        /// The file's path.
        path: PathBuf,
    },
    /// The Python image was neither present nor pullable, and building it
    /// failed.
    #[error("building the Python image {image}")]
    PythonImage {
        /// The Python image's tag ([`crate::config::PYTHON_IMAGE`]).
        image: String,
        /// Why building it failed.
        #[source]
        source: Box<ImageError>,
    },
    /// `mmdebstrap` is not installed (or does not run).
    #[error(
        "building the Python image (`sandbox image build --python`) needs mmdebstrap, which \
         is not installed: it is a system package, not a cargo one. Install it with \
         `apt-get install mmdebstrap` (as root; Debian and Ubuntu), or pull a Python image \
         where a registry answers and set SANDBOX_IMAGE to it"
    )]
    NoMmdebstrap(#[source] std::io::Error),
    /// The machine's release code name is unknown.
    #[error(
        "{} has no VERSION_CODENAME: the Python image is built for the machine's own \
         Debian (or Ubuntu) release, with its apt sources",
        path.display()
    )]
    NoCodename {
        /// The os-release file read (or looked for).
        path: PathBuf,
    },
    /// No apt source serves the machine's release.
    #[error(
        "no apt source in /etc/apt/sources.list or /etc/apt/sources.list.d/ serves \
         {codename} with the main component: the Python image is built from the \
         machine's own apt sources"
    )]
    NoSources {
        /// The machine's release code name.
        codename: String,
    },
    /// `mmdebstrap` failed; with the end of its output.
    #[error("mmdebstrap failed ({status}):\n{stderr}")]
    MmdebstrapFailed {
        /// How it exited.
        status: std::process::ExitStatus,
        /// Its last lines on stderr.
        stderr: String,
    },
    /// Local file work failed: `action` says which.
    #[error("{action}")]
    Io {
        /// What was being done, for the message.
        action: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl ImageError {
    fn docker(action: impl Into<String>) -> impl FnOnce(bollard::errors::Error) -> ImageError {
        let action = action.into();
        move |source| ImageError::Docker { action, source }
    }

    fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
        let action = action.into();
        move |source| ImageError::Io { action, source }
    }
}

/// Whether the image exists locally.
pub async fn exists(provider: &DockerProvider, image: &str) -> Result<bool, ImageError> {
    let docker = provider.client().await?;
    match docker.inspect_image(image).await {
        Ok(_) => Ok(true),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(false),
        Err(e) => Err(ImageError::docker(format!(
            "inspecting the image {image} (Docker at {})",
            provider.endpoint()
        ))(e)),
    }
}

/// Makes sure `image` is available. The default and Python images, our own
/// tags, can never be pulled as such: an upstream image (busybox, python)
/// is pulled and tagged when a registry answers, else the recipe is built.
/// Any other image is pulled.
pub async fn ensure(provider: &DockerProvider, image: &str) -> Result<(), ImageError> {
    if exists(provider, image).await? {
        return Ok(());
    }
    if image == crate::config::DEFAULT_IMAGE {
        match pull_and_tag(provider, UPSTREAM_BUSYBOX, image).await {
            Ok(()) => return Ok(()),
            Err(e) => tracing::info!(
                image,
                error = &e as &dyn std::error::Error,
                "no registry for {UPSTREAM_BUSYBOX}; building the image locally"
            ),
        }
        return build(provider, image, None)
            .await
            .map_err(|e| ImageError::DefaultImage {
                image: image.to_owned(),
                source: Box::new(e),
            });
    }
    if image == crate::config::PYTHON_IMAGE {
        match pull_and_tag(provider, UPSTREAM_PYTHON, image).await {
            Ok(()) => return Ok(()),
            Err(e) => tracing::info!(
                image,
                error = &e as &dyn std::error::Error,
                "no registry for {UPSTREAM_PYTHON}; building the image locally"
            ),
        }
        return build_python(provider, image).await.map(drop).map_err(|e| {
            ImageError::PythonImage {
                image: image.to_owned(),
                source: Box::new(e),
            }
        });
    }
    tracing::info!(image, "image not present locally; trying to pull it");
    pull(provider, image)
        .await
        .map_err(|e| ImageError::Unavailable {
            image: image.to_owned(),
            source: Box::new(e),
        })
}

async fn pull_and_tag(
    provider: &DockerProvider,
    upstream: &str,
    tag: &str,
) -> Result<(), ImageError> {
    pull(provider, upstream).await?;
    let (repo, version) = split_tag(tag);
    let options = TagImageOptionsBuilder::default()
        .repo(repo)
        .tag(version)
        .build();
    let docker = provider.client().await?;
    docker
        .tag_image(upstream, Some(options))
        .await
        .map_err(ImageError::docker(format!("tagging {upstream} as {tag}")))?;
    tracing::info!(image = tag, upstream, "pulled and tagged the sandbox image");
    Ok(())
}

/// Pulls an image, showing progress.
pub async fn pull(provider: &DockerProvider, image: &str) -> Result<(), ImageError> {
    let docker = provider.client().await?;
    let options = CreateImageOptionsBuilder::default()
        .from_image(image)
        .build();
    let bar = spinner(format!("pulling {image}"));
    let mut stream = docker.create_image(Some(options), None, None);
    while let Some(item) = stream.next().await {
        let info = item.map_err(ImageError::docker(format!("pulling {image}")))?;
        if let Some(status) = info.status {
            bar.set_message(format!("pulling {image}: {status}"));
        }
    }
    bar.finish_and_clear();
    Ok(())
}

/// Builds the recipe image around the static busybox at `busybox`, or, when
/// `None`, the machine's `/bin/busybox` if static, else Debian's
/// busybox-static fetched into a temporary directory.
pub async fn build(
    provider: &DockerProvider,
    tag: &str,
    busybox: Option<&Path>,
) -> Result<(), ImageError> {
    let binary = match busybox {
        Some(path) => read_static_busybox(path)?,
        None => match read_static_busybox(Path::new(DEFAULT_BUSYBOX)) {
            Ok(bytes) => bytes,
            Err(local) => {
                tracing::debug!(
                    error = &local as &dyn std::error::Error,
                    "no usable local busybox"
                );
                fetch_debian_busybox().await?
            }
        },
    };
    let context = build_context(&binary)?;
    let docker = provider.client().await?;
    let options = BuildImageOptionsBuilder::default()
        .t(tag)
        .rm(true)
        .forcerm(true)
        .networkmode("none")
        .build();
    let bar = spinner(format!("building {tag}"));
    let mut stream = docker.build_image(options, None, Some(bollard::body_full(context.into())));
    while let Some(item) = stream.next().await {
        let info = item.map_err(ImageError::docker(format!("building {tag}")))?;
        if let Some(message) = info.error_detail.and_then(|d| d.message) {
            bar.finish_and_clear();
            return Err(ImageError::BuildStep {
                tag: tag.to_owned(),
                message,
            });
        }
        if let Some(line) = info
            .stream
            .as_deref()
            .map(str::trim)
            .filter(|l| !l.is_empty())
        {
            bar.set_message(format!("building {tag}: {line}"));
        }
    }
    bar.finish_and_clear();
    tracing::info!(image = tag, "built the sandbox image");
    Ok(())
}

/// The in-memory tar context: Dockerfile, passwd, group, busybox.
pub fn build_context(binary: &[u8]) -> Result<Vec<u8>, ImageError> {
    let mut tar = tar::Builder::new(Vec::new());
    for (name, data, mode) in [
        ("Dockerfile", DOCKERFILE.as_bytes(), 0o644),
        ("passwd", PASSWD.as_bytes(), 0o644),
        ("group", GROUP.as_bytes(), 0o644),
        ("busybox", binary, 0o755),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_cksum();
        tar.append_data(&mut header, name, data)
            .map_err(ImageError::io(format!(
                "adding {name} to the build context"
            )))?;
    }
    tar.into_inner()
        .map_err(ImageError::io("finishing the build context"))
}

/// Fetches Debian's busybox-static with `apt-get download` (no root needed,
/// nothing installed) and extracts its binary with `dpkg-deb -x`.
async fn fetch_debian_busybox() -> Result<Vec<u8>, ImageError> {
    let dir = tempfile::tempdir().map_err(ImageError::io("creating a temporary directory"))?;
    let bar = spinner(format!(
        "fetching Debian's {BUSYBOX_PACKAGE} for the sandbox image (apt-get download)"
    ));
    let result = download_and_extract(dir.path()).await;
    bar.finish_and_clear();
    let binary = result?;
    read_static_busybox(&binary)
}

async fn download_and_extract(dir: &Path) -> Result<PathBuf, ImageError> {
    let output = tokio::process::Command::new("apt-get")
        .args(["download", BUSYBOX_PACKAGE])
        .current_dir(dir)
        .output()
        .await
        .map_err(ImageError::NoApt)?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let empty_lists = stderr.contains("Unable to locate package")
            || stderr.contains("no installation candidate")
            || stderr.contains("Can't select");
        if empty_lists {
            return Err(ImageError::NoPackage);
        }
        return Err(ImageError::AptFailed {
            stderr: stderr.trim().to_owned(),
        });
    }
    let deb = std::fs::read_dir(dir)
        .map_err(ImageError::io(format!("listing {}", dir.display())))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or(ImageError::NoDeb)?;
    let root = dir.join("root");
    let status = tokio::process::Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&root)
        .status()
        .await
        .map_err(ImageError::Dpkg)?;
    if !status.success() {
        return Err(ImageError::DpkgFailed { deb, status });
    }
    Ok(root.join("bin/busybox"))
}

fn read_static_busybox(path: &Path) -> Result<Vec<u8>, ImageError> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|source| ImageError::ReadBusybox {
            path: path.to_owned(),
            source,
        })?;
    match elf_has_interpreter(&bytes) {
        Some(false) => Ok(bytes),
        Some(true) => Err(ImageError::DynamicBusybox {
            path: path.to_owned(),
        }),
        None => Err(ImageError::NotElf {
            path: path.to_owned(),
        }),
    }
}

/// Whether a 64-bit little-endian ELF has a PT_INTERP program header
/// (dynamically linked). `None` when it is not such an ELF.
fn elf_has_interpreter(elf: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return None;
    }
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let phoff = usize::try_from(u64::from_le_bytes(elf.get(0x20..0x28)?.try_into().ok()?)).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let at = phoff.checked_add(i.checked_mul(phentsize)?)?;
        let p_type = u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?);
        if p_type == PT_INTERP {
            return Some(true);
        }
    }
    Some(false)
}

/// `repo:tag` split for the engine; `latest` when there is no tag. A `:`
/// followed by a `/` is a registry's port, not a tag.
fn split_tag(image: &str) -> (&str, &str) {
    match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (image, "latest"),
    }
}

fn spinner(message: String) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed}] {msg}").expect("static template"),
    );
    bar.set_message(message);
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_split_at_the_last_colon_unless_it_is_a_port() {
        assert_eq!(
            split_tag("sandbox-python:latest"),
            ("sandbox-python", "latest")
        );
        assert_eq!(split_tag("sandbox-python"), ("sandbox-python", "latest"));
        assert_eq!(split_tag("localhost:5000/py:3"), ("localhost:5000/py", "3"));
        assert_eq!(
            split_tag("localhost:5000/py"),
            ("localhost:5000/py", "latest")
        );
    }

    #[test]
    fn a_dynamic_binary_is_told_apart_from_a_static_one() {
        // The test binary itself is dynamically linked.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(elf_has_interpreter(&me), Some(true));
        assert_eq!(elf_has_interpreter(b"#!/bin/sh\n"), None);
    }

    #[test]
    fn an_unusable_busybox_says_why_and_what_to_do() {
        let missing = read_static_busybox(Path::new("/nonexistent/busybox")).unwrap_err();
        assert!(
            matches!(&missing, ImageError::ReadBusybox { source, .. }
                if source.kind() == std::io::ErrorKind::NotFound),
            "{missing:?}"
        );
        assert_eq!(
            missing.to_string(),
            format!("reading /nonexistent/busybox: {BUSYBOX_HINT}")
        );
        let me = std::env::current_exe().unwrap();
        let dynamic = read_static_busybox(&me).unwrap_err();
        assert!(
            matches!(dynamic, ImageError::DynamicBusybox { .. }),
            "{dynamic:?}"
        );
        let script = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(script.path(), "#!/bin/sh\n").unwrap();
        let not_elf = read_static_busybox(script.path()).unwrap_err();
        assert_eq!(
            not_elf.to_string(),
            format!(
                "{} is not a 64-bit ELF executable: {BUSYBOX_HINT}",
                script.path().display()
            )
        );
    }
}
