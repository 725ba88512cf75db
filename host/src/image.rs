//! The sandbox image: present locally, else (the default image) an upstream
//! busybox pulled from a registry when one answers, else built from the
//! recipe in `host/image/` around a static busybox: the machine's own, or
//! Debian's busybox-static fetched with `apt-get download` into a temporary
//! directory (nothing is installed system-wide).

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use bollard::query_parameters::{
    BuildImageOptionsBuilder, CreateImageOptionsBuilder, TagImageOptionsBuilder,
};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

use crate::provider::docker::DockerProvider;

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

/// Whether the image exists locally.
pub async fn exists(provider: &DockerProvider, image: &str) -> anyhow::Result<bool> {
    let docker = provider.client().await?;
    match docker.inspect_image(image).await {
        Ok(_) => Ok(true),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(false),
        Err(e) => Err(e).with_context(|| {
            format!(
                "inspecting the image {image} (Docker at {})",
                provider.endpoint()
            )
        }),
    }
}

/// Makes sure `image` is available. The default image, our own tag, can
/// never be pulled as such: an upstream busybox is pulled and tagged when a
/// registry answers, else the recipe is built. Any other image is pulled.
pub async fn ensure(provider: &DockerProvider, image: &str) -> anyhow::Result<()> {
    if exists(provider, image).await? {
        return Ok(());
    }
    if image == crate::config::DEFAULT_IMAGE {
        match pull_and_tag(provider, UPSTREAM_BUSYBOX, image).await {
            Ok(()) => return Ok(()),
            Err(e) => tracing::info!(
                image,
                "no registry for {UPSTREAM_BUSYBOX} ({e:#}); building the image locally"
            ),
        }
        return build(provider, image, None)
            .await
            .with_context(|| format!("building the default image {image}"));
    }
    tracing::info!(image, "image not present locally; trying to pull it");
    pull(provider, image).await.with_context(|| {
        format!(
            "image {image:?} is not available and pulling it failed. Build a local image with \
             `sandbox image build --tag {image}`, or point SANDBOX_IMAGE at an image you have \
             (`docker images`)"
        )
    })
}

async fn pull_and_tag(provider: &DockerProvider, upstream: &str, tag: &str) -> anyhow::Result<()> {
    pull(provider, upstream).await?;
    let (repo, version) = tag.rsplit_once(':').unwrap_or((tag, "latest"));
    let options = TagImageOptionsBuilder::default()
        .repo(repo)
        .tag(version)
        .build();
    let docker = provider.client().await?;
    docker
        .tag_image(upstream, Some(options))
        .await
        .with_context(|| format!("tagging {upstream} as {tag}"))?;
    tracing::info!(image = tag, upstream, "pulled and tagged the sandbox image");
    Ok(())
}

/// Pulls an image, showing progress.
pub async fn pull(provider: &DockerProvider, image: &str) -> anyhow::Result<()> {
    let docker = provider.client().await?;
    let options = CreateImageOptionsBuilder::default()
        .from_image(image)
        .build();
    let bar = spinner(format!("pulling {image}"));
    let mut stream = docker.create_image(Some(options), None, None);
    while let Some(item) = stream.next().await {
        let info = item.with_context(|| format!("pulling {image}"))?;
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
) -> anyhow::Result<()> {
    let binary = match busybox {
        Some(path) => read_static_busybox(path)?,
        None => match read_static_busybox(Path::new(DEFAULT_BUSYBOX)) {
            Ok(bytes) => bytes,
            Err(local) => {
                tracing::debug!("no usable local busybox ({local:#})");
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
        let info = item.with_context(|| format!("building {tag}"))?;
        if let Some(error) = info.error_detail.and_then(|d| d.message) {
            bar.finish_and_clear();
            bail!("building {tag}: {error}");
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
pub fn build_context(binary: &[u8]) -> anyhow::Result<Vec<u8>> {
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
        tar.append_data(&mut header, name, data)?;
    }
    Ok(tar.into_inner()?)
}

/// Fetches Debian's busybox-static with `apt-get download` (no root needed,
/// nothing installed) and extracts its binary with `dpkg-deb -x`.
async fn fetch_debian_busybox() -> anyhow::Result<Vec<u8>> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let bar = spinner(format!(
        "fetching Debian's {BUSYBOX_PACKAGE} for the sandbox image (apt-get download)"
    ));
    let result = download_and_extract(dir.path()).await;
    bar.finish_and_clear();
    let binary = result?;
    read_static_busybox(&binary)
}

async fn download_and_extract(dir: &Path) -> anyhow::Result<PathBuf> {
    let no_apt = || {
        format!(
            "a static busybox is needed to build the sandbox image, and this machine has neither \
             {DEFAULT_BUSYBOX} (static) nor apt-get to fetch Debian's {BUSYBOX_PACKAGE}: pass \
             --busybox PATH to a statically linked busybox, or set SANDBOX_IMAGE to an image you \
             have"
        )
    };
    let output = tokio::process::Command::new("apt-get")
        .args(["download", BUSYBOX_PACKAGE])
        .current_dir(dir)
        .output()
        .await
        .with_context(no_apt)?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let empty_lists = stderr.contains("Unable to locate package")
            || stderr.contains("no installation candidate")
            || stderr.contains("Can't select");
        if empty_lists {
            bail!(
                "apt-get knows no package {BUSYBOX_PACKAGE}: the package lists are empty, as on \
                 many fresh images. Run `apt-get update` (as root) and try again, or pass \
                 --busybox PATH to a statically linked busybox"
            );
        }
        bail!(
            "`apt-get download {BUSYBOX_PACKAGE}` failed: {}",
            stderr.trim()
        );
    }
    let deb = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download reported success but left no .deb")?;
    let root = dir.join("root");
    let status = tokio::process::Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&root)
        .status()
        .await
        .context("running dpkg-deb (Debian's dpkg) to extract busybox-static")?;
    if !status.success() {
        bail!("dpkg-deb -x {} failed ({status})", deb.display());
    }
    Ok(root.join("bin/busybox"))
}

fn read_static_busybox(path: &Path) -> anyhow::Result<Vec<u8>> {
    let hint = "pass --busybox PATH to a statically linked busybox (Debian: busybox-static)";
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .with_context(|| format!("reading {}: {hint}", path.display()))?;
    match elf_has_interpreter(&bytes) {
        Some(false) => Ok(bytes),
        Some(true) => bail!(
            "{} is dynamically linked and cannot run in an image built FROM scratch: {hint}",
            path.display()
        ),
        None => bail!("{} is not a 64-bit ELF executable: {hint}", path.display()),
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

fn spinner(message: String) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("static template"));
    bar.set_message(message);
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_binary_is_told_apart_from_a_static_one() {
        // The test binary itself is dynamically linked.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(elf_has_interpreter(&me), Some(true));
        assert_eq!(elf_has_interpreter(b"#!/bin/sh\n"), None);
    }
}
