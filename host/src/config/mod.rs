//! Host configuration, layered with figment: the defaults, then a TOML file
//! (`--config FILE` or `SANDBOX_CONFIG`), then environment variables, then
//! CLI flags (given by the binary as [`Flag`]s).
//!
//! Every key is also the environment variable `SANDBOX_<KEY>` (upper case),
//! nested keys joined by `__`: `SANDBOX_EXEC_TIMEOUT_SECS=60`,
//! `SANDBOX_LIMITS__PIDS=10`, `SANDBOX_POLICY_CONFIG__IDLE_TTL_SECS=900`,
//! `SANDBOX_ALLOWED_IMAGES=a:1,b:2`. Older spellings stay ([`ENV_ALIASES`]);
//! an unknown `SANDBOX_*` variable is reported, with the likely intended
//! one. [`Loaded::sources`] tells where each value came from (`sandbox
//! config`).

//!
//! Layout: this file holds the keys, their types and defaults; `layers`
//! where each value comes from and loading; `validate` what is refused.

mod layers;
mod profile;
#[cfg(test)]
mod tests;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Visitor};

pub use layers::{default_files, Flag, Layers, Loaded, Origin};
pub use profile::{
    Profile, ProfileConfig, ProfileEgress, ProfileName, DEFAULT_PROFILE, MAX_PROFILE_NAME_LEN,
};
use serde::{Deserialize, Deserializer, Serialize};
pub use validate::{validate_namespace, MAX_NAMESPACE_LEN};

/// The image `sandbox image build` produces; used when none is configured.
pub const DEFAULT_IMAGE: &str = "sandbox-busybox:latest";

/// The Python-ready image `sandbox image build --python` produces (python3
/// and GNU tools, for deepagents' `BaseSandbox` file tools).
pub const PYTHON_IMAGE: &str = "sandbox-python:latest";

/// The `network` value that gives sandboxes no network at all.
pub const NETWORK_NONE: &str = "none";

/// The `network` value that gives sandboxes no network of their own but an
/// HTTP(S) proxy, served by the host, that reaches only `[egress] allow`
/// (see `crate::egress`).
pub const NETWORK_EGRESS: &str = "egress";

/// Prefix of the environment variables that set configuration keys.
pub const ENV_PREFIX: &str = "SANDBOX_";

/// Joins nested keys in environment variable names (`SANDBOX_LIMITS__PIDS`).
pub const ENV_NESTING: &str = "__";

/// The longest timeout or interval accepted (a day): anything longer is a
/// typo, and keeps `Duration` arithmetic far from overflowing.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// The smallest `workspace_quota`: ext4's own structures take a few MiB.
pub const MIN_WORKSPACE_QUOTA: u64 = 16 << 20;

/// Default cap on one file's apparent size, either direction: 256 MiB.
pub const MAX_FILE_BYTES: u64 = 256 << 20;

/// Default cap on the file content one in-memory batch
/// ([`crate::Backend::download_files`], the HTTP API) holds: 64 MiB. The
/// streaming calls are not bound by it.
pub const MAX_BATCH_BYTES: u64 = 64 << 20;

/// Older spellings of keys, kept working. Applied before the `SANDBOX_<KEY>`
/// variables, so the canonical spelling wins when both are set.
pub const ENV_ALIASES: &[(&str, &str)] = &[
    ("DOCKER_HOST", "docker_host"),
    // The manager this replaces read these two.
    ("WORKSPACE_ROOT", "workspace_root"),
    ("DOCKER_IMAGE", "image"),
    ("SANDBOX_USER", "sandbox_user"),
    ("SANDBOX_COMPONENT_CACHE", "component_cache_dir"),
];

/// `SANDBOX_*` variables that are not configuration keys but are read
/// elsewhere: never reported as unknown.
pub const ENV_NOT_CONFIG: &[&str] = &[
    // The configuration file itself (the CLI's `--config`).
    "SANDBOX_CONFIG",
    // `sandbox serve --token`.
    "SANDBOX_TOKEN",
    // Set inside containers for every exec (a host started from a sandbox).
    sandbox_agent::protocol::EXEC_MARKER_VAR,
    // The Python client's tests: the binary to start.
    "SANDBOX_BIN",
    // The integration tests: the image to run, and the runtime (gVisor pass).
    "SANDBOX_TEST_IMAGE",
    "SANDBOX_TEST_RUNTIME",
    // deploy/build-image.sh: the cargo profile of the server binary.
    "SANDBOX_BUILD_PROFILE",
    // The Python client's tests: the Python-ready image to run.
    "SANDBOX_PYTHON_IMAGE",
    // The test suites and the bench: the Python policy components xtask builds.
    "SANDBOX_PYTHON_POLICY",
    "SANDBOX_PYTHON_FAILING_POLICY",
    "SANDBOX_PYTHON_MINIMAL_POLICY",
    // The Python client (`sandbox_client.deepagents`): the server to call.
    "SANDBOX_URL",
];

/// Keys holding free-form maps: any sub-key is valid (and lower-cased when
/// it comes from the environment).
const FREE_MAPS: &[&str] = &["policy_config"];

/// Why the configuration could not be loaded or is not usable. Every
/// message names the file, variable or flag the bad value came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A `SANDBOX_*` variable (or an alias) whose value is not UTF-8.
    #[error("{name}: not valid UTF-8")]
    NotUtf8 {
        /// The variable's name.
        name: String,
    },
    /// The configuration file could not be read (it must exist when named).
    #[error("reading config file {}", path.display())]
    Read {
        /// The file named by `--config` or `SANDBOX_CONFIG`.
        path: PathBuf,
        /// Why reading it failed.
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not TOML.
    #[error("parsing config file {}", path.display())]
    Parse {
        /// The file named by `--config` or `SANDBOX_CONFIG`.
        path: PathBuf,
        /// The TOML syntax error.
        #[source]
        source: Box<figment::Error>,
    },
    /// Values of the wrong type or shape, or unknown keys in the file: one
    /// line each, prefixed with where the value came from
    /// (`SANDBOX_EXEC_TIMEOUT_SECS: invalid type: ...`).
    #[error("{}", problems.join("\n"))]
    Values {
        /// One message per bad value, each naming its origin.
        problems: Vec<String>,
    },
    /// A well-formed value the host cannot run with (see
    /// [`Config::validate`]): its key (dotted), where it came from, and why.
    #[error("{}{message}", origin.prefix())]
    Invalid {
        /// The rejected key, dotted (`limits.pids`).
        key: &'static str,
        /// Where the rejected value came from.
        origin: Origin,
        /// Why it was rejected, in a sentence.
        message: String,
    },
}

/// A `uid:gid` (or bare uid) that is not numeric.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad {which} in {text:?}")]
pub struct ParseUserIdsError {
    /// `uid` or `gid`.
    pub which: &'static str,
    /// The whole text given.
    pub text: String,
    /// The integer parse failure of that part.
    #[source]
    pub source: std::num::ParseIntError,
}

/// Everything the host decides on behalf of policies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Workspaces live at `{workspace_root}/{name}` (`WORKSPACE_ROOT` of the manager this replaces).
    pub workspace_root: PathBuf,
    /// The image every sandbox container runs (`DOCKER_IMAGE` there).
    pub image: String,
    /// A policy component to load instead of the embedded per-user policy.
    pub policy: Option<PathBuf>,
    /// Label namespace: containers of other namespaces are never touched.
    pub namespace: String,
    /// uid:gid the containers run as and the workspaces belong to. Default:
    /// the host's own ids, or 1000:1000 when the host runs as root.
    pub sandbox_user: Option<UserIds>,
    /// Memory, CPU and process limits of every sandbox container.
    pub limits: Limits,
    /// Byte cap on the combined output of one `execute`.
    #[serde(deserialize_with = "bytes")]
    pub output_limit_bytes: usize,
    /// Docker endpoint (`unix:///path`, `tcp://host:port`); default: the
    /// docker CLI's (`DOCKER_HOST`, else the local socket).
    pub docker_host: Option<String>,
    /// Default wall-clock limit of one `execute`, in seconds.
    #[serde(deserialize_with = "secs")]
    pub exec_timeout_secs: f64,
    /// Bound on every single Docker API call, in seconds.
    #[serde(deserialize_with = "secs")]
    pub docker_timeout_secs: f64,
    /// Guest CPU time one policy call may use (host calls excluded), in ms.
    pub policy_deadline_ms: u64,
    /// Linear memory one policy instance may grow to, in bytes.
    #[serde(deserialize_with = "bytes")]
    pub policy_memory_bytes: usize,
    /// Wall-clock budget of one policy call, host imports (Docker calls,
    /// WASI sleeps) included, waits for a lifecycle slot excluded, in ms.
    pub policy_call_timeout_ms: u64,
    /// Host imports one policy call may make.
    pub policy_host_calls: u32,
    /// Ceilings for one policy instance: table elements, core instances,
    /// tables, memories, and host resources (WASI pollables and streams).
    /// This one: elements any one table may grow to (default 200000).
    pub policy_table_elements: usize,
    /// Core wasm instances one policy instance may create (default 16).
    pub policy_core_instances: usize,
    /// Tables one policy instance may create (default 8).
    pub policy_tables: usize,
    /// Linear memories one policy instance may create (default 1).
    pub policy_memories: usize,
    /// Entries in one policy instance's host resource table (WASI
    /// pollables, streams; default 256).
    pub policy_resources: usize,
    /// The sum of every policy instance's memories and tables, in bytes.
    #[serde(deserialize_with = "bytes")]
    pub policy_memory_total_bytes: usize,
    /// Memory the instance pool of the running policy may hold (linear
    /// memories and tables of its live instances, in bytes): the pool keeps
    /// as many instances as fit, measured per component at its self-check.
    #[serde(deserialize_with = "bytes")]
    pub policy_pool_bytes: usize,
    /// Containers one backend may have created within a minute.
    pub max_creates_per_backend_per_minute: u32,
    /// How long a destroy waits for commands in flight on the backend's
    /// container before it removes the container (and so kills them), in
    /// seconds; `--force` does not wait.
    #[serde(deserialize_with = "secs")]
    pub destroy_grace_secs: f64,
    /// Running background processes and terminals count as use: their
    /// container is not removed for being idle until this long after its
    /// last request, in seconds (0: they do not count). They hold off the
    /// replacement of a container whose plan changed for 10 minutes at
    /// most.
    #[serde(deserialize_with = "secs")]
    pub process_keep_alive_secs: f64,
    /// Bytes each workspace may hold, enforced by the kernel (a filesystem
    /// image per workspace, loop-mounted; needs root or CAP_SYS_ADMIN); 0:
    /// unbounded. With it the container's root is read-only too.
    #[serde(deserialize_with = "bytes")]
    pub workspace_quota: u64,
    /// Size of the writable `/tmp` (a tmpfs, counted in the container's
    /// memory) when the root is read-only.
    #[serde(deserialize_with = "bytes")]
    pub tmp_quota: u64,
    /// Largest apparent size of one transferred file, either direction
    /// (a sparse file counts by its apparent size).
    #[serde(deserialize_with = "bytes")]
    pub max_file_bytes: u64,
    /// Largest file content one in-memory download batch holds (the HTTP
    /// API's JSON batches); streamed transfers are bound by `max_file_bytes` only.
    #[serde(deserialize_with = "bytes")]
    pub max_batch_bytes: u64,
    /// Mount the container's root filesystem read-only (with a writable
    /// tmpfs `/tmp`); `/workspace` stays writable.
    pub read_only_rootfs: bool,
    /// Talk to each sandbox's agent on a socket of the host's mounted into
    /// its container (the plane: no engine in between), falling back to
    /// the engine's attach stream; false: the attach stream only (an
    /// engine with user namespaces remapped, where the agent is not uid 0
    /// to this host). Not under gVisor, which refuses host sockets.
    pub agent_plane: bool,
    /// Network of every sandbox container: `none` (no network at all),
    /// `egress` (no network of its own; an HTTP proxy on `127.0.0.1` inside
    /// that reaches only `[egress] allow`), or the name of a Docker network
    /// the operator created. The host decides it; a policy cannot.
    pub network: String,
    /// What `network = "egress"` lets sandboxes reach.
    pub egress: EgressConfig,
    /// OCI runtime for sandbox containers (for example `runsc`); the
    /// engine's default when unset.
    pub runtime: Option<String>,
    /// Named profiles the policy may choose per backend (WIT
    /// `placement.profile`), each overriding some of `network`, `runtime`
    /// and `[egress] allow`; the top-level settings are the profile
    /// `default`. Configuration file only.
    pub profiles: BTreeMap<String, ProfileConfig>,
    /// When not empty, the only images this deployment may run (a list, or
    /// one string of comma-separated images).
    #[serde(deserialize_with = "list")]
    pub allowed_images: Vec<String>,
    /// Where compiled policy components are cached (`off` disables it).
    /// Default: the user's cache dir.
    #[serde(deserialize_with = "cache_dir")]
    pub component_cache_dir: Option<PathBuf>,
    /// Settings handed to the policy (WIT `context.policy-config`); the
    /// shipped policies read `idle_ttl_secs` and `max_containers`. Numbers
    /// and booleans are taken as their text.
    #[serde(deserialize_with = "string_map")]
    pub policy_config: BTreeMap<String, String>,
    /// How often the host calls the policy's `maintain`, in seconds (0: never).
    #[serde(deserialize_with = "secs")]
    pub maintenance_interval_secs: f64,
    /// Container creations, starts and removals in flight at once; the
    /// rest queue (executes never do). Default: the number of CPUs (min 2).
    pub max_concurrent_lifecycle_ops: usize,
    /// CPU weight of every sandbox container together against the engine's
    /// own processes (cgroup v1 `cpu.shares`; 1024 is one busy process's):
    /// containers go under the cgroup parent `/sandbox` with this weight,
    /// so that warm commands keep their CPU while the engine works through
    /// cold starts. 0 (the default): the engine's default parent. Applied
    /// where the engine uses cgroupfs on cgroup v1 and this process may
    /// write it. A trade: under heavy warm load the engine's own work
    /// (creates, starts) gets less CPU in turn.
    pub sandbox_cpu_shares: u64,
    /// Most policy instances alive at once, whatever `policy_pool_bytes`
    /// would allow (calls borrow one each; a call that finds all busy waits).
    pub max_policy_instances: usize,
}

/// `[egress]`: the allow-list of the host's egress proxy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EgressConfig {
    /// What sandboxes may reach through the proxy: names (`pypi.org`),
    /// subdomain wildcards (`*.pythonhosted.org`), addresses (`10.1.2.3`,
    /// `2001:db8::1`) and networks (`192.0.2.0/24`), each optionally with
    /// `:PORT` (`[2001:db8::1]:443` for IPv6); without a port, any port.
    /// A name whose address is private, loopback or link-local is refused
    /// unless that address is listed too.
    #[serde(deserialize_with = "list")]
    pub allow: Vec<String>,
    /// Names the proxy resolves to the given address instead of asking DNS
    /// (hosts without DNS, tests). Resolution only: the name must still be
    /// allowed, and a private address listed. In the environment:
    /// `SANDBOX_EGRESS__HOSTS=name=address,name=address`.
    #[serde(deserialize_with = "pairs")]
    pub hosts: BTreeMap<String, String>,
    /// Label the egress metrics by user (one series per user: only when
    /// the number of users is bounded).
    pub metrics_per_user: bool,
}

/// Resource limits of every sandbox container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Memory cap in bytes, swap included (so no swap); default 512 MiB.
    #[serde(deserialize_with = "bytes")]
    pub memory_bytes: i64,
    /// CPUs, possibly fractional (`1.5`).
    pub cpus: f64,
    /// Most processes and threads alive in the container at once; default 256.
    pub pids: i64,
}

/// A numeric `uid:gid` pair: `"uid:gid"`, a bare uid (gid the same), or a
/// table `{ uid, gid }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UserIds {
    /// Numeric user id.
    pub uid: u32,
    /// Numeric group id.
    pub gid: u32,
}

impl std::str::FromStr for UserIds {
    type Err = ParseUserIdsError;
    fn from_str(s: &str) -> Result<Self, ParseUserIdsError> {
        let (uid, gid) = s.split_once(':').unwrap_or((s, s));
        let id = |which, text: &str| {
            text.parse().map_err(|source| ParseUserIdsError {
                which,
                text: s.to_owned(),
                source,
            })
        };
        Ok(UserIds {
            uid: id("uid", uid)?,
            gid: id("gid", gid)?,
        })
    }
}

impl<'de> Deserialize<'de> for UserIds {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Ids;
        impl<'de> Visitor<'de> for Ids {
            type Value = UserIds;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"uid:gid\", a uid, or a table { uid, gid }")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<UserIds, E> {
                s.parse()
                    .map_err(|e: ParseUserIdsError| E::custom(format!("{e}: {}", e.source)))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<UserIds, E> {
                let id =
                    u32::try_from(n).map_err(|_| E::custom(format!("uid {n} is too large")))?;
                Ok(UserIds { uid: id, gid: id })
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<UserIds, E> {
                let n = u64::try_from(n).map_err(|_| E::custom(format!("uid {n} is negative")))?;
                self.visit_u64(n)
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<UserIds, A::Error> {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Pair {
                    uid: u32,
                    gid: u32,
                }
                let p = Pair::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(UserIds {
                    uid: p.uid,
                    gid: p.gid,
                })
            }
        }
        deserializer.deserialize_any(Ids)
    }
}

/// `component_cache_dir`: `off` (or empty) is `None`.
fn cache_dir<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    Ok(Option::<PathBuf>::deserialize(d)?
        .filter(|p| !p.as_os_str().is_empty() && p.as_os_str() != "off"))
}

/// A list of strings, or one string of comma-separated items (optionally in
/// brackets, items optionally quoted): what an environment variable holds.
fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct List;
    impl<'de> Visitor<'de> for List {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list of strings, or one string of comma-separated items")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<Vec<String>, E> {
            let s = s.trim();
            let s = s
                .strip_prefix('[')
                .and_then(|s| s.strip_suffix(']'))
                .unwrap_or(s);
            Ok(s.split(',')
                .map(|item| item.trim().trim_matches(['"', '\'']).to_owned())
                .filter(|item| !item.is_empty())
                .collect())
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element()? {
                items.push(item);
            }
            Ok(items)
        }
    }
    d.deserialize_any(List)
}

/// A map of strings whose values may also be numbers or booleans (TOML's
/// `idle_ttl_secs = 900`), kept as their text.
/// A table of strings, or one string of comma-separated `key=value` pairs.
fn pairs<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    struct Pairs;
    impl<'de> Visitor<'de> for Pairs {
        type Value = BTreeMap<String, String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a table of strings, or one string of comma-separated name=value pairs")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
            s.split(',')
                .map(str::trim)
                .filter(|pair| !pair.is_empty())
                .map(|pair| match pair.split_once('=') {
                    Some((k, v)) => Ok((k.trim().to_owned(), v.trim().to_owned())),
                    None => Err(E::custom(format!("{pair:?} is not name=value"))),
                })
                .collect()
        }
        fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((k, v)) = map.next_entry::<String, String>()? {
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_any(Pairs)
}

fn string_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    struct Text(String);
    impl<'de> Deserialize<'de> for Text {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Scalar;
            impl Visitor<'_> for Scalar {
                type Value = Text;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a string, number or boolean")
                }
                fn visit_str<E: de::Error>(self, s: &str) -> Result<Text, E> {
                    Ok(Text(s.to_owned()))
                }
                fn visit_bool<E: de::Error>(self, b: bool) -> Result<Text, E> {
                    Ok(Text(b.to_string()))
                }
                fn visit_i64<E: de::Error>(self, n: i64) -> Result<Text, E> {
                    Ok(Text(n.to_string()))
                }
                fn visit_u64<E: de::Error>(self, n: u64) -> Result<Text, E> {
                    Ok(Text(n.to_string()))
                }
                fn visit_f64<E: de::Error>(self, n: f64) -> Result<Text, E> {
                    Ok(Text(n.to_string()))
                }
            }
            d.deserialize_any(Scalar)
        }
    }
    Ok(BTreeMap::<String, Text>::deserialize(d)?
        .into_iter()
        .map(|(k, Text(v))| (k, v))
        .collect())
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 512 * 1024 * 1024,
            cpus: 1.0,
            pids: 256,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            workspace_root: default_workspace_root(),
            image: DEFAULT_IMAGE.to_owned(),
            policy: None,
            namespace: "default".to_owned(),
            sandbox_user: None,
            limits: Limits::default(),
            output_limit_bytes: 1024 * 1024,
            docker_host: None,
            docker_timeout_secs: 30.0,
            exec_timeout_secs: 300.0,
            policy_deadline_ms: 500,
            policy_memory_bytes: 64 * 1024 * 1024,
            policy_call_timeout_ms: 5_000,
            policy_host_calls: 256,
            policy_table_elements: 200_000,
            policy_core_instances: 16,
            policy_tables: 8,
            policy_memories: 1,
            policy_resources: 256,
            policy_memory_total_bytes: 1024 * 1024 * 1024,
            policy_pool_bytes: 256 * 1024 * 1024,
            max_creates_per_backend_per_minute: 10,
            destroy_grace_secs: 10.0,
            process_keep_alive_secs: 3600.0,
            workspace_quota: 0,
            tmp_quota: 64 << 20,
            max_file_bytes: MAX_FILE_BYTES,
            max_batch_bytes: MAX_BATCH_BYTES,
            // Idle instances hold ~1 MiB of the host-wide pool each: this
            // many stay well inside the default 1 GiB.
            max_policy_instances: 512,
            component_cache_dir: default_component_cache_dir(),
            policy_config: Default::default(),
            maintenance_interval_secs: 30.0,
            sandbox_cpu_shares: 0,
            max_concurrent_lifecycle_ops: std::thread::available_parallelism()
                .map(|n| n.get().max(2))
                .unwrap_or(2),
            read_only_rootfs: false,
            agent_plane: true,
            network: NETWORK_NONE.to_owned(),
            egress: EgressConfig::default(),
            runtime: None,
            profiles: BTreeMap::new(),
            allowed_images: Vec::new(),
        }
    }
}

fn default_workspace_root() -> PathBuf {
    match std::env::var_os("XDG_DATA_HOME").or_else(|| std::env::var_os("HOME")) {
        Some(base) if std::env::var_os("XDG_DATA_HOME").is_some() => {
            PathBuf::from(base).join("sandbox/workspaces")
        }
        Some(home) => PathBuf::from(home).join(".local/share/sandbox/workspaces"),
        None => PathBuf::from("/var/lib/sandbox/workspaces"),
    }
}

impl Config {
    /// [`Config::docker_timeout_secs`] as a `Duration`.
    pub fn docker_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.docker_timeout_secs)
    }

    /// [`Config::exec_timeout_secs`] as a `Duration`.
    pub fn exec_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.exec_timeout_secs)
    }

    /// [`Config::policy_deadline_ms`] as a `Duration`.
    pub fn policy_deadline(&self) -> Duration {
        Duration::from_millis(self.policy_deadline_ms)
    }

    /// The configured sandbox user, or the default described on the field.
    pub fn sandbox_user(&self) -> UserIds {
        self.sandbox_user.unwrap_or_else(|| {
            let uid = nix::unistd::geteuid().as_raw();
            if uid == 0 {
                UserIds {
                    uid: 1000,
                    gid: 1000,
                }
            } else {
                UserIds {
                    uid,
                    gid: nix::unistd::getegid().as_raw(),
                }
            }
        })
    }
}

/// Where compiled components are kept by default:
/// `$XDG_CACHE_HOME/sandbox/components`, else `~/.cache/sandbox/components`.
fn default_component_cache_dir() -> Option<PathBuf> {
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(xdg).join("sandbox/components"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/sandbox/components"))
}

/// A number as TOML or the environment gives it, or a text with a unit.
#[derive(Deserialize)]
#[serde(untagged)]
enum Amount {
    Whole(u64),
    Signed(i64),
    Real(f64),
    Text(String),
}

/// Seconds: a number (`60`, `0.5`) or a duration with units, as on the
/// command line (`60s`, `500ms`, `1m30s`).
fn secs<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    match Amount::deserialize(d)? {
        Amount::Whole(n) => Ok(n as f64),
        Amount::Signed(n) => Ok(n as f64),
        Amount::Real(x) => Ok(x),
        Amount::Text(text) => parse_secs(&text).map_err(serde::de::Error::custom),
    }
}

fn parse_secs(text: &str) -> Result<f64, String> {
    let text = text.trim();
    if let Ok(x) = text.parse::<f64>() {
        return Ok(x);
    }
    humantime::parse_duration(text)
        .map(|d| d.as_secs_f64())
        .map_err(|e| {
            format!("invalid duration {text:?}: expected seconds or a duration like 60s, 500ms, 1m30s ({e})")
        })
}

/// Bytes: a number, or a number with a unit as the CLI and Docker take it:
/// `512MiB`, `1GiB`, `64KiB` (binary), `512MB`, `1GB` (decimal), `512m`,
/// `1g` (binary, as `docker run --memory`).
fn bytes<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    let n = match Amount::deserialize(d)? {
        Amount::Whole(n) => n,
        Amount::Signed(n) => u64::try_from(n)
            .map_err(|_| serde::de::Error::custom(format!("{n}: a size cannot be negative")))?,
        Amount::Real(x) if x >= 0.0 && x.fract() == 0.0 && x < u64::MAX as f64 => x as u64,
        Amount::Real(x) => {
            return Err(serde::de::Error::custom(format!(
                "{x}: expected a whole number of bytes"
            )))
        }
        Amount::Text(text) => parse_bytes(&text).map_err(serde::de::Error::custom)?,
    };
    T::try_from(n).map_err(|_| serde::de::Error::custom(format!("{n} bytes is too large")))
}

fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit_of = |unit: &str| -> Option<u64> {
        Some(match unit.trim() {
            "" | "B" | "b" => 1,
            "KiB" | "K" | "k" => 1 << 10,
            "MiB" | "M" | "m" => 1 << 20,
            "GiB" | "G" | "g" => 1 << 30,
            "TiB" | "T" | "t" => 1 << 40,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            _ => return None,
        })
    };
    let bad = || {
        format!("invalid size {text:?}: expected bytes, or a size like 512MiB, 1GiB, 512MB, 512m")
    };
    let scale = unit_of(unit).ok_or_else(bad)?;
    let value: f64 = number.parse().map_err(|_| bad())?;
    let total = value * scale as f64;
    if !(total.is_finite() && total >= 0.0 && total < u64::MAX as f64) {
        return Err(bad());
    }
    Ok(total.round() as u64)
}
