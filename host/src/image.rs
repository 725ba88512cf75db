//! The sandbox image: present locally, pulled when a registry answers, or
//! built from the recipe in `host/image/` with a static busybox (no
//! registry needed).

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use bollard::query_parameters::{BuildImageOptionsBuilder, CreateImageOptionsBuilder};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

use crate::provider::docker::DockerProvider;

const DOCKERFILE: &str = include_str!("../image/Dockerfile");
const PASSWD: &str = include_str!("../image/passwd");
const GROUP: &str = include_str!("../image/group");

/// Where Debian's busybox-static installs its binary.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// Whether the image exists locally.
pub async fn exists(provider: &DockerProvider, image: &str) -> anyhow::Result<bool> {
    let docker = provider.client().await?;
    match docker.inspect_image(image).await {
        Ok(_) => Ok(true),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(false),
        Err(e) => Err(e).context("inspecting the image"),
    }
}

/// Makes sure `image` is available: present, else pulled (with a progress
/// bar), else, for the default image only, built from the recipe.
pub async fn ensure(provider: &DockerProvider, image: &str) -> anyhow::Result<()> {
    if exists(provider, image).await? {
        return Ok(());
    }
    tracing::info!(image, "image not present locally; trying to pull it");
    let pull_error = match pull(provider, image).await {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    if image == crate::config::DEFAULT_IMAGE {
        tracing::info!(
            image,
            "pull failed ({pull_error:#}); building it from the local recipe"
        );
        return build(provider, image, Path::new(DEFAULT_BUSYBOX))
            .await
            .with_context(|| {
                format!("building the default image {image} (pulling failed: {pull_error:#})")
            });
    }
    bail!(
        "image {image:?} is not available: pulling failed ({pull_error:#}). Build a local image with \
         `sandbox image build --tag {image}` (needs busybox-static: apt-get install busybox-static), \
         or point SANDBOX_IMAGE at an image you have (`docker images`)"
    )
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

/// Builds the recipe image with the busybox binary at `busybox`.
pub async fn build(provider: &DockerProvider, tag: &str, busybox: &Path) -> anyhow::Result<()> {
    let context = build_context(busybox)?;
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
pub fn build_context(busybox: &Path) -> anyhow::Result<Vec<u8>> {
    let binary = read_static_busybox(busybox)?;
    let mut tar = tar::Builder::new(Vec::new());
    for (name, data, mode) in [
        ("Dockerfile", DOCKERFILE.as_bytes(), 0o644),
        ("passwd", PASSWD.as_bytes(), 0o644),
        ("group", GROUP.as_bytes(), 0o644),
        ("busybox", binary.as_slice(), 0o755),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_cksum();
        tar.append_data(&mut header, name, data)?;
    }
    Ok(tar.into_inner()?)
}

fn read_static_busybox(path: &Path) -> anyhow::Result<Vec<u8>> {
    let hint =
        "install Debian's busybox-static (apt-get install busybox-static) or pass --busybox PATH";
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

/// The busybox to use: the flag, else Debian's path.
pub fn busybox_path(flag: Option<PathBuf>) -> PathBuf {
    flag.unwrap_or_else(|| PathBuf::from(DEFAULT_BUSYBOX))
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
