//! The Python-ready image (`sandbox image build --python`): a Debian
//! `--variant=minbase` root file system with python3 (and ripgrep), made by
//! `mmdebstrap` from this machine's own apt sources, then imported into the
//! engine. No registry is involved: only the Debian mirrors apt already uses.
//!
//! deepagents' `BaseSandbox` runs its file tools as `python3 -c ...` and GNU
//! `grep`/`find`-style shell commands; minbase brings coreutils, grep,
//! findutils, sed, bash and dash (they are `Essential: yes`), and the
//! `--include` list adds the rest.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use bollard::query_parameters::CreateImageOptionsBuilder;
use futures_util::StreamExt;
use tokio::io::AsyncBufReadExt;

use super::{spinner, split_tag, ImageError};
use crate::DockerProvider;

/// The upstream image tagged as the Python image where a registry answers
/// (`ensure` only; `sandbox image build --python` always builds).
pub const UPSTREAM_PYTHON: &str = "python:3-slim";

/// The system tool that makes the root file system.
pub const MMDEBSTRAP: &str = "mmdebstrap";

/// Packages on top of minbase: the interpreter; `python` as a name for it
/// (`python-is-python3`, a symlink: commands written for `python:3-slim`
/// and langchain's sandbox tests call `python`); ripgrep because agents
/// reach for `rg` and it costs about 2 MB; and what agents reach for next
/// (`ps`, git, pip and venv, make, unzip, less, curl: an agent's scripted
/// run hit `ps: not found`). No recommends (mmdebstrap's default).
pub const PYTHON_PACKAGES: [&str; 11] = [
    "python3",
    "python-is-python3",
    "ripgrep",
    "procps",
    "git",
    "python3-pip",
    "python3-venv",
    "make",
    "unzip",
    "less",
    "curl",
];

/// Where the machine's release is read (the first that exists).
const OS_RELEASE: [&str; 2] = ["/etc/os-release", "/usr/lib/os-release"];

/// Shipped with mmdebstrap: merges /usr the way debootstrap does and
/// installs `usr-is-merged`, else apt satisfies that need with `usrmerge`,
/// which drags in perl (45 MB) for a one-time conversion.
const MERGED_USR_HOOKS: &str = "/usr/share/mmdebstrap/hooks/maybe-merged-usr";

/// The machine's apt sources: the classic file and the directory.
const SOURCES_LIST: &str = "/etc/apt/sources.list";
const SOURCES_DIR: &str = "/etc/apt/sources.list.d";

/// dpkg filters: nothing an agent's commands read, so never unpacked
/// (copyright files stay, as Debian's licences ask).
const DPKG_EXCLUDES: [&str; 8] = [
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/share/bug/*",
];

/// Runs in the finished chroot (`$1`): the same sandbox user and
/// `/workspace` as the busybox image, no logs left by the install
/// (mmdebstrap itself already drops apt's lists and package cache), and no
/// copy of this machine's apt sources (internal mirror names, credentials
/// in URIs): the workload has no business with them.
const CUSTOMIZE_HOOK: &str = "set -e; \
echo 'sandbox:x:1000:1000:sandbox:/workspace:/bin/sh' >> \"$1/etc/passwd\"; \
echo 'sandbox:x:1000:' >> \"$1/etc/group\"; \
mkdir -p \"$1/workspace\"; \
rm -f \"$1/etc/apt/sources.list\"; rm -rf \"$1\"/etc/apt/sources.list.d/*; \
rm -rf \"$1\"/var/log/apt/* \"$1\"/var/log/dpkg.log \"$1\"/var/log/alternatives.log \
\"$1\"/var/cache/debconf/*-old \"$1\"/var/lib/dpkg/*-old \"$1\"/var/cache/ldconfig/aux-cache";

/// The image configuration a root file system import lacks (Docker's
/// `changes`). The host runs its own idle command; `CMD` is for `docker run`.
pub const IMAGE_CHANGES: [&str; 4] = [
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    // UTF-8 file names and contents in `python3 -c`, whatever the caller's locale.
    "ENV LANG=C.UTF-8",
    // Bumped with every change to what the image holds: the test command
    // rebuilds an image whose label differs.
    "LABEL sandbox.recipe=mmdebstrap-python-2",
    r#"CMD ["sleep", "infinity"]"#,
];

/// What `mmdebstrap` is given: the release and the apt entries for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    /// The release code name (`bookworm`), from os-release.
    pub codename: String,
    /// One-line apt entries (`deb [signed-by=..] URI SUITE COMPONENTS`).
    pub entries: Vec<String>,
}

impl Recipe {
    /// The machine's release and its apt entries for that release.
    pub fn detect() -> Result<Recipe, ImageError> {
        let (path, text) = OS_RELEASE
            .iter()
            .find_map(|p| std::fs::read_to_string(p).ok().map(|t| (*p, t)))
            .ok_or(ImageError::NoCodename {
                path: OS_RELEASE[0].into(),
            })?;
        let codename = codename(&text).ok_or(ImageError::NoCodename { path: path.into() })?;
        let entries = apt_entries(&host_sources(), &codename);
        if entries.is_empty() {
            return Err(ImageError::NoSources { codename });
        }
        Ok(Recipe { codename, entries })
    }

    /// `mmdebstrap`'s arguments, writing a tar to `output`.
    pub fn mmdebstrap_args(&self, output: &Path) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--variant=minbase".into(),
            "--format=tar".into(),
            format!("--include={}", PYTHON_PACKAGES.join(",")).into(),
            // Only the English descriptions: smaller lists, faster update.
            "--aptopt=Acquire::Languages \"none\"".into(),
            format!("--hook-dir={MERGED_USR_HOOKS}").into(),
        ];
        args.extend(
            DPKG_EXCLUDES
                .iter()
                .map(|o| format!("--dpkgopt={o}").into()),
        );
        args.push(format!("--customize-hook={CUSTOMIZE_HOOK}").into());
        args.push(self.codename.clone().into());
        args.push(output.into());
        // Entries starting with "deb " are taken as sources.list lines.
        args.extend(self.entries.iter().map(OsString::from));
        args
    }
}

/// `VERSION_CODENAME` from an os-release file's text.
pub fn codename(os_release: &str) -> Option<String> {
    os_release.lines().find_map(|line| {
        let value = line.trim().strip_prefix("VERSION_CODENAME=")?;
        let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
        (!value.is_empty()).then(|| value.to_owned())
    })
}

/// The apt source files of this machine, with their text, in apt's order.
fn host_sources() -> Vec<(PathBuf, String)> {
    let mut paths = vec![PathBuf::from(SOURCES_LIST)];
    if let Ok(dir) = std::fs::read_dir(SOURCES_DIR) {
        let mut more: Vec<PathBuf> = dir
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "list" || x == "sources"))
            .collect();
        more.sort();
        paths.extend(more);
    }
    paths
        .into_iter()
        .filter_map(|p| std::fs::read_to_string(&p).ok().map(|t| (p, t)))
        .collect()
}

/// The release's own suites: a third-party repository that names its suite
/// `bookworm-pgdg` is not one of them.
const RELEASE_SUITES: [&str; 4] = ["", "-updates", "-security", "-backports"];

/// The binary-package entries of `files` (one-line `.list` or deb822
/// `.sources`) that serve `codename` or its `-updates`, `-security`,
/// `-backports` with the `main` component, as one-line entries.
/// Third-party repositories (their own suite names, or no `main`) are left
/// out: the image is Debian's.
pub fn apt_entries(files: &[(PathBuf, String)], codename: &str) -> Vec<String> {
    let serves = |suite: &str| {
        suite
            .strip_prefix(codename)
            .is_some_and(|rest| RELEASE_SUITES.contains(&rest))
    };
    let mut entries = Vec::new();
    for (path, text) in files {
        let deb822 = path.extension().is_some_and(|x| x == "sources");
        let found = if deb822 {
            deb822_entries(text)
        } else {
            one_line_entries(text)
        };
        for entry in found {
            if serves(&entry.suite) && entry.components.iter().any(|c| c == "main") {
                let line = entry.line();
                if !entries.contains(&line) {
                    entries.push(line);
                }
            }
        }
    }
    entries
}

struct Entry {
    options: Option<String>,
    uri: String,
    suite: String,
    components: Vec<String>,
}

impl Entry {
    fn line(&self) -> String {
        let options = self
            .options
            .as_deref()
            .map_or(String::new(), |o| format!("[{o}] "));
        format!(
            "deb {options}{} {} {}",
            self.uri,
            self.suite,
            self.components.join(" ")
        )
    }
}

/// `deb [options] URI SUITE COMPONENT...` lines.
fn one_line_entries(text: &str) -> Vec<Entry> {
    let mut entries = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let rest = rest.trim_start();
        let (options, rest) = match rest.strip_prefix('[') {
            Some(inner) => match inner.split_once(']') {
                Some((options, rest)) => (Some(options.trim().to_owned()), rest),
                None => continue,
            },
            None => (None, rest),
        };
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        entries.push(Entry {
            options,
            uri: uri.to_owned(),
            suite: suite.to_owned(),
            components: words.map(str::to_owned).collect(),
        });
    }
    entries
}

/// deb822 stanzas (`Types: deb`, `URIs`, `Suites`, `Components`,
/// `Signed-By` when it is a path; an inline key cannot go on one line, and
/// mmdebstrap then finds the keyring itself).
fn deb822_entries(text: &str) -> Vec<Entry> {
    let mut entries = Vec::new();
    let mut stanza: Vec<(String, String)> = Vec::new();
    let mut flush = |stanza: &mut Vec<(String, String)>| {
        let field = |name: &str| {
            stanza
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let words = |name: &str| -> Vec<String> {
            field(name)
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        };
        let enabled = field("Enabled").is_none_or(|v| !v.trim().eq_ignore_ascii_case("no"));
        if enabled && words("Types").iter().any(|t| t == "deb") {
            let signed_by = field("Signed-By")
                .map(str::trim)
                .filter(|v| !v.is_empty() && !v.contains('\n'))
                .map(|v| format!("signed-by={v}"));
            for uri in words("URIs") {
                for suite in words("Suites") {
                    entries.push(Entry {
                        options: signed_by.clone(),
                        uri: uri.clone(),
                        suite,
                        components: words("Components"),
                    });
                }
            }
        }
        stanza.clear();
    };
    for line in text.lines() {
        if line.trim().is_empty() {
            flush(&mut stanza);
        } else if line.starts_with('#') {
            continue;
        } else if line.starts_with([' ', '\t']) {
            // A continuation line (an inline key's body).
            if let Some((_, value)) = stanza.last_mut() {
                value.push('\n');
                value.push_str(line.trim());
            }
        } else if let Some((key, value)) = line.split_once(':') {
            stanza.push((key.trim().to_owned(), value.trim().to_owned()));
        }
    }
    flush(&mut stanza);
    entries
}

/// What a Python image build produced.
#[derive(Debug, Clone)]
pub struct Built {
    /// The image id (`sha256:...`).
    pub id: String,
    /// The image's size in bytes, as the engine reports it.
    pub size: u64,
}

/// Builds the Python image with `mmdebstrap` and imports it as `tag`.
pub async fn build_python(provider: &DockerProvider, tag: &str) -> Result<Built, ImageError> {
    // The likeliest failure first, before any file is read or written.
    require_mmdebstrap(MMDEBSTRAP).await?;
    let recipe = Recipe::detect()?;
    let dir = tempfile::tempdir().map_err(ImageError::io("creating a temporary directory"))?;
    let rootfs = dir.path().join("rootfs.tar");
    tracing::info!(
        codename = recipe.codename,
        sources = ?recipe.entries,
        "building {tag} with mmdebstrap"
    );
    run_mmdebstrap(&recipe, &rootfs, tag).await?;
    import(provider, &rootfs, tag).await
}

/// Fails with [`ImageError::NoMmdebstrap`] unless `program --version` runs.
async fn require_mmdebstrap(program: &str) -> Result<(), ImageError> {
    let status = tokio::process::Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await;
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(ImageError::NoMmdebstrap(std::io::Error::other(format!(
            "`{program} --version` failed ({s})"
        )))),
        Err(e) => Err(ImageError::NoMmdebstrap(e)),
    }
}

/// How many of mmdebstrap's last stderr lines a failure quotes.
const TAIL_LINES: usize = 20;

async fn run_mmdebstrap(recipe: &Recipe, rootfs: &Path, tag: &str) -> Result<(), ImageError> {
    let mut child = tokio::process::Command::new(MMDEBSTRAP)
        .args(recipe.mmdebstrap_args(rootfs))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(ImageError::NoMmdebstrap)?;
    let bar = spinner(format!("building {tag} (mmdebstrap {})", recipe.codename));
    let mut tail = std::collections::VecDeque::with_capacity(TAIL_LINES);
    if let Some(stderr) = child.stderr.take() {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let line = line.trim().to_owned();
            if line.is_empty() {
                continue;
            }
            bar.set_message(format!("building {tag}: {line}"));
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
    let status = child
        .wait()
        .await
        .map_err(ImageError::io("waiting for mmdebstrap"))?;
    bar.finish_and_clear();
    if !status.success() {
        return Err(ImageError::MmdebstrapFailed {
            status,
            stderr: Vec::from(tail).join("\n"),
        });
    }
    Ok(())
}

/// Streams the root file system tar to the engine (`POST /images/create`
/// with `fromSrc=-`, what `docker import` does; bollard's `import_image`
/// is `docker load`, for saved images, not root file systems).
async fn import(provider: &DockerProvider, rootfs: &Path, tag: &str) -> Result<Built, ImageError> {
    let file = tokio::fs::File::open(rootfs)
        .await
        .map_err(ImageError::io(format!("opening {}", rootfs.display())))?;
    let total = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let (repo, version) = split_tag(tag);
    let options = CreateImageOptionsBuilder::default()
        .from_src("-")
        .repo(repo)
        .tag(version)
        .message("sandbox image build --python (mmdebstrap)")
        .changes(IMAGE_CHANGES.iter().map(|c| c.to_string()).collect())
        .build();
    let bar = spinner(format!("importing {tag}"));
    let shown = bar.clone();
    let label = tag.to_owned();
    let mut sent = 0u64;
    let body = tokio_util::io::ReaderStream::new(file).inspect(move |chunk| {
        if let Ok(bytes) = chunk {
            sent += bytes.len() as u64;
            shown.set_message(format!(
                "importing {label}: {} of {} MB",
                sent >> 20,
                total >> 20
            ));
        }
    });
    let docker = provider.client().await?;
    let mut stream = docker.create_image(Some(options), Some(bollard::body_try_stream(body)), None);
    let mut outcome = Ok(());
    while let Some(item) = stream.next().await {
        if let Err(e) = item {
            outcome = Err(ImageError::docker(format!(
                "importing {} as {tag}",
                rootfs.display()
            ))(e));
            break;
        }
    }
    bar.finish_and_clear();
    outcome?;
    let inspect = docker
        .inspect_image(tag)
        .await
        .map_err(ImageError::docker(format!(
            "inspecting {tag} after the import"
        )))?;
    let built = Built {
        id: inspect.id.unwrap_or_default(),
        size: inspect
            .size
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(0),
    };
    tracing::info!(
        image = tag,
        id = built.id,
        size = built.size,
        "built the Python image"
    );
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, text: &str) -> (PathBuf, String) {
        (PathBuf::from(name), text.to_owned())
    }

    #[test]
    fn the_codename_comes_from_os_release() {
        let debian = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nVERSION_ID=\"12\"\n\
                      VERSION_CODENAME=bookworm\nID=debian\n";
        assert_eq!(codename(debian).as_deref(), Some("bookworm"));
        assert_eq!(
            codename("VERSION_CODENAME=\"noble\"\n").as_deref(),
            Some("noble")
        );
        // Debian sid's os-release has no code name: nothing to guess from.
        assert_eq!(codename("ID=debian\nVERSION_CODENAME=\n"), None);
        assert_eq!(codename("ID=debian\n"), None);
    }

    #[test]
    fn deb822_sources_give_the_releases_debian_entries() {
        // Debian 12's container images, with a third-party repository and a
        // disabled stanza next to it.
        let debian = file(
            "/etc/apt/sources.list.d/debian.sources",
            "Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\n\
             URIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n\
             Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
             Types: deb\nURIs: http://deb.debian.org/debian-security\n\
             Suites: bookworm-security\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
             Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n\
             Components: main\n\n\
             Enabled: no\nTypes: deb\nURIs: http://old.example/debian\nSuites: bookworm\n\
             Components: main\n",
        );
        let nodesource = file(
            "/etc/apt/sources.list.d/nodesource.sources",
            "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\n\
             Components: main\nSigned-By: /usr/share/keyrings/nodesource.gpg\n",
        );
        let key = "[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]";
        assert_eq!(
            apt_entries(&[debian, nodesource], "bookworm"),
            [
                format!("deb {key} http://deb.debian.org/debian bookworm main"),
                format!("deb {key} http://deb.debian.org/debian bookworm-updates main"),
                format!("deb {key} http://deb.debian.org/debian-security bookworm-security main"),
            ]
        );
    }

    #[test]
    fn one_line_sources_and_inline_keys_are_understood() {
        let list = file(
            "/etc/apt/sources.list",
            "# comment\ndeb http://mirror.local/debian bookworm main contrib # trailing\n\
             deb-src http://mirror.local/debian bookworm main\n\
             deb [arch=amd64 signed-by=/k.gpg] http://mirror.local/debian bookworm-updates main\n\
             deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n\
             deb http://apt.postgresql.org/pub/repos/apt bookworm-pgdg main\n\
             deb [arch=amd64] https://download.docker.com/linux/debian bookworm stable\n\
             deb http://mirror.local/debian bookworm main contrib\n",
        );
        let inline = file(
            "/etc/apt/sources.list.d/inline.sources",
            "Types: deb\nURIs: http://inline.local/debian\nSuites: bookworm\n\
             Components: main\nSigned-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n \
             abc\n -----END PGP PUBLIC KEY BLOCK-----\n",
        );
        assert_eq!(
            apt_entries(&[list, inline], "bookworm"),
            [
                "deb http://mirror.local/debian bookworm main contrib",
                "deb [arch=amd64 signed-by=/k.gpg] http://mirror.local/debian bookworm-updates main",
                "deb http://inline.local/debian bookworm main",
            ]
        );
        // Another release's machine finds nothing here.
        assert!(apt_entries(
            &[file(
                "/etc/apt/sources.list",
                "deb http://m/debian bookworm main\n"
            )],
            "trixie"
        )
        .is_empty());
        // `bookwormish` is not `bookworm`.
        assert!(apt_entries(
            &[file(
                "/etc/apt/sources.list",
                "deb http://m/debian bookwormish main\n"
            )],
            "bookworm"
        )
        .is_empty());
    }

    #[test]
    fn the_mmdebstrap_plan_is_a_small_minbase_tar_from_the_machines_sources() {
        let recipe = Recipe {
            codename: "bookworm".into(),
            entries: vec!["deb http://deb.debian.org/debian bookworm main".into()],
        };
        let args: Vec<String> = recipe
            .mmdebstrap_args(Path::new("/tmp/x/rootfs.tar"))
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args[..4],
            [
                "--variant=minbase",
                "--format=tar",
                "--include=python3,python-is-python3,ripgrep,procps,git,python3-pip,python3-venv,\
                 make,unzip,less,curl",
                "--aptopt=Acquire::Languages \"none\"",
            ]
        );
        for excluded in [
            "/usr/share/man/*",
            "/usr/share/doc/*",
            "/usr/share/locale/*",
        ] {
            assert!(
                args.contains(&format!("--dpkgopt=path-exclude={excluded}")),
                "{args:?}"
            );
        }
        let hook = args
            .iter()
            .find_map(|a| a.strip_prefix("--customize-hook="))
            .expect("a customize hook");
        assert!(
            hook.contains("sandbox:x:1000:1000:sandbox:/workspace:/bin/sh"),
            "{hook}"
        );
        assert!(hook.contains("mkdir -p \"$1/workspace\""), "{hook}");
        // Positional: suite, target, then the mirrors (after every option).
        assert_eq!(
            args[args.len() - 3..],
            [
                "bookworm",
                "/tmp/x/rootfs.tar",
                "deb http://deb.debian.org/debian bookworm main"
            ]
        );
        assert!(args[..args.len() - 3].iter().all(|a| a.starts_with("--")));
    }

    #[test]
    fn the_hook_is_valid_shell() {
        let status = std::process::Command::new("sh")
            .args(["-n", "-c", CUSTOMIZE_HOOK])
            .status()
            .unwrap();
        assert!(status.success());
    }

    #[tokio::test]
    async fn a_missing_mmdebstrap_says_it_is_a_system_package_and_how_to_install_it() {
        let e = require_mmdebstrap("/nonexistent/mmdebstrap")
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ImageError::NoMmdebstrap(source)
                if source.kind() == std::io::ErrorKind::NotFound),
            "{e:?}"
        );
        let message = e.to_string();
        assert!(message.contains("system package"), "{message}");
        assert!(message.contains("apt-get install mmdebstrap"), "{message}");
        assert!(message.contains("--python"), "{message}");
    }
}
