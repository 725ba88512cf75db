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

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// The image `sandbox image build` produces; used when none is configured.
pub const DEFAULT_IMAGE: &str = "sandbox-busybox:latest";

/// The Python-ready image `sandbox image build --python` produces (python3
/// and GNU tools, for deepagents' `BaseSandbox` file tools).
pub const PYTHON_IMAGE: &str = "sandbox-python:latest";

/// The `network` value that gives sandboxes no network at all.
pub const NETWORK_NONE: &str = "none";

/// Prefix of the environment variables that set configuration keys.
pub const ENV_PREFIX: &str = "SANDBOX_";

/// Joins nested keys in environment variable names (`SANDBOX_LIMITS__PIDS`).
pub const ENV_NESTING: &str = "__";

/// The longest timeout or interval accepted (a day): anything longer is a
/// typo, and keeps `Duration` arithmetic far from overflowing.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// Older spellings of keys, kept working. Applied before the `SANDBOX_<KEY>`
/// variables, so the canonical spelling wins when both are set.
pub const ENV_ALIASES: &[(&str, &str)] = &[
    ("DOCKER_HOST", "docker_host"),
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
    crate::dataplane::exec::EXEC_MARKER_VAR,
    // The Python client's tests: the binary to start.
    "SANDBOX_BIN",
    // The integration tests: the image to run.
    "SANDBOX_TEST_IMAGE",
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
    pub output_limit_bytes: usize,
    /// Docker endpoint (`unix:///path`, `tcp://host:port`); default: the
    /// docker CLI's (`DOCKER_HOST`, else the local socket).
    pub docker_host: Option<String>,
    /// Default wall-clock limit of one `execute`, in seconds.
    pub exec_timeout_secs: f64,
    /// Bound on every single Docker API call, in seconds.
    pub docker_timeout_secs: f64,
    /// Guest CPU time one policy call may use (host calls excluded), in ms.
    pub policy_deadline_ms: u64,
    /// Linear memory one policy instance may grow to, in bytes.
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
    pub policy_memory_total_bytes: usize,
    /// Memory the instance pool of the running policy may hold (linear
    /// memories and tables of its live instances, in bytes): the pool keeps
    /// as many instances as fit, measured per component at its self-check.
    pub policy_pool_bytes: usize,
    /// Containers one backend may have created within a minute.
    pub max_creates_per_backend_per_minute: u32,
    /// How long a destroy waits for commands in flight on the backend's
    /// container before it removes the container (and so kills them), in
    /// seconds; `--force` does not wait.
    pub destroy_grace_secs: f64,
    /// Largest apparent size of one transferred file, either direction
    /// (a sparse file counts by its apparent size).
    pub max_file_bytes: u64,
    /// Largest file content one in-memory download batch holds (the HTTP
    /// API's JSON batches); streamed transfers are bound by `max_file_bytes` only.
    pub max_batch_bytes: u64,
    /// Mount the container's root filesystem read-only (with a writable
    /// tmpfs `/tmp`); `/workspace` stays writable.
    pub read_only_rootfs: bool,
    /// Network of every sandbox container: `none` (no network at all), or
    /// the name of a Docker network the operator created. The host decides
    /// it; a policy cannot.
    pub network: String,
    /// OCI runtime for sandbox containers (for example `runsc`); the
    /// engine's default when unset.
    pub runtime: Option<String>,
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
    pub maintenance_interval_secs: f64,
    /// Container creations, starts and removals in flight at once; the
    /// rest queue (executes never do). Default: the number of CPUs (min 2).
    pub max_concurrent_lifecycle_ops: usize,
    /// Most policy instances alive at once, whatever `policy_pool_bytes`
    /// would allow (calls borrow one each; a call that finds all busy waits).
    pub max_policy_instances: usize,
}

/// Resource limits of every sandbox container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Memory cap in bytes, swap included (so no swap); default 512 MiB.
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
            max_file_bytes: crate::dataplane::files::MAX_FILE_BYTES,
            max_batch_bytes: crate::dataplane::files::MAX_BATCH_BYTES,
            // Idle instances hold ~1 MiB of the host-wide pool each: this
            // many stay well inside the default 1 GiB.
            max_policy_instances: 512,
            component_cache_dir: default_component_cache_dir(),
            policy_config: Default::default(),
            maintenance_interval_secs: 30.0,
            max_concurrent_lifecycle_ops: std::thread::available_parallelism()
                .map(|n| n.get().max(2))
                .unwrap_or(2),
            read_only_rootfs: false,
            network: NETWORK_NONE.to_owned(),
            runtime: None,
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

/// A value given on the command line, for the key `key` (dotted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flag {
    /// How it was spelled, for messages (`--image`).
    pub flag: String,
    /// The configuration key it sets, dotted (`limits.pids`).
    pub key: String,
    /// The value as given, parsed like an environment variable's.
    pub value: String,
}

impl Flag {
    /// The flag spelled `flag`, setting `key` (dotted) to `value`.
    pub fn new(flag: &str, key: &str, value: impl Into<String>) -> Self {
        Flag {
            flag: flag.to_owned(),
            key: key.to_owned(),
            value: value.into(),
        }
    }
}

/// Everything the configuration is read from, besides the defaults.
#[derive(Debug, Clone, Default)]
pub struct Layers {
    /// A TOML file (it must exist).
    pub file: Option<PathBuf>,
    /// Environment variables; only `SANDBOX_*` and [`ENV_ALIASES`] are read.
    pub env: BTreeMap<String, String>,
    /// Applied last, in order.
    pub flags: Vec<Flag>,
}

impl Layers {
    /// This process's environment, and `file`, else `SANDBOX_CONFIG`.
    pub fn from_process(file: Option<&Path>) -> Result<Layers, ConfigError> {
        let mut env = BTreeMap::new();
        for (name, value) in std::env::vars_os() {
            let Ok(name) = name.into_string() else {
                continue;
            };
            if !name.starts_with(ENV_PREFIX) && !ENV_ALIASES.iter().any(|(n, _)| *n == name) {
                continue;
            }
            let Ok(value) = value.into_string() else {
                return Err(ConfigError::NotUtf8 { name });
            };
            env.insert(name, value);
        }
        let file = file.map(Path::to_path_buf).or_else(|| {
            env.get("SANDBOX_CONFIG")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        });
        Ok(Layers {
            file,
            env,
            flags: Vec::new(),
        })
    }
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Origin {
    /// The built-in default (or a configuration not loaded from layers).
    Default,
    /// The TOML configuration file.
    File {
        /// The file's path.
        path: PathBuf,
    },
    /// An environment variable.
    Env {
        /// The variable's name (`SANDBOX_LIMITS__PIDS`, or an alias).
        name: String,
    },
    /// A command-line flag.
    Flag {
        /// The flag as spelled (`--image`).
        name: String,
    },
}

impl Origin {
    fn metadata(&self) -> Metadata {
        match self {
            Origin::Default => Metadata::named("default"),
            Origin::File { path } => Metadata::from("config file", Source::File(path.clone())),
            Origin::Env { name } => Metadata::from(name.clone(), Source::Custom("env".into())),
            Origin::Flag { name } => Metadata::from(name.clone(), Source::Custom("flag".into())),
        }
    }

    fn of(metadata: &Metadata) -> Origin {
        match &metadata.source {
            Some(Source::File(path)) => Origin::File { path: path.clone() },
            Some(Source::Custom(kind)) if kind == "env" => Origin::Env {
                name: metadata.name.to_string(),
            },
            Some(Source::Custom(kind)) if kind == "flag" => Origin::Flag {
                name: metadata.name.to_string(),
            },
            _ => Origin::Default,
        }
    }

    /// `NAME: ` to put before a message about a value from here.
    fn prefix(&self) -> String {
        match self {
            Origin::Default => String::new(),
            Origin::File { path } => format!("config file {}: ", path.display()),
            Origin::Env { name } | Origin::Flag { name } => format!("{name}: "),
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File { path } => write!(f, "file {}", path.display()),
            Origin::Env { name } => write!(f, "env {name}"),
            Origin::Flag { name } => write!(f, "flag {name}"),
        }
    }
}

/// One layer: a dictionary of keys from one origin.
struct Layer {
    metadata: Metadata,
    data: Dict,
}

impl Layer {
    /// One value at a (non-empty) key path.
    fn value(origin: &Origin, path: &[String], value: Value) -> Layer {
        let (last, parents) = path.split_last().expect("a key path is never empty");
        let mut data = Dict::from([(last.clone(), value)]);
        for parent in parents.iter().rev() {
            data = Dict::from([(parent.clone(), Value::from(data))]);
        }
        Layer {
            metadata: origin.metadata(),
            data,
        }
    }
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        self.metadata.clone()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.data.clone()))
    }
}

/// The keys of [`Config`], from its serialization: top-level keys and the
/// fields of nested tables.
struct Keys(BTreeMap<String, Vec<String>>);

/// What an environment variable is to the configuration.
#[derive(Debug, PartialEq)]
enum EnvVar {
    Key(Vec<String>),
    NotConfig,
    /// With the likely intended variable.
    Unknown(Option<String>),
}

impl Keys {
    fn new() -> Keys {
        let reference = Config {
            sandbox_user: Some(UserIds { uid: 0, gid: 0 }),
            ..Config::default()
        };
        let Ok(serde_json::Value::Object(top)) = serde_json::to_value(reference) else {
            unreachable!("the configuration serializes to a map")
        };
        Keys(
            top.into_iter()
                .map(|(key, value)| {
                    let fields = match value {
                        serde_json::Value::Object(fields) => {
                            fields.into_iter().map(|f| f.0).collect()
                        }
                        _ => Vec::new(),
                    };
                    (key, fields)
                })
                .collect(),
        )
    }

    fn is_key(&self, path: &[String]) -> bool {
        match path {
            [key] => self.0.contains_key(key),
            [key, field] => {
                FREE_MAPS.contains(&key.as_str()) && !field.is_empty()
                    || self.0.get(key).is_some_and(|fields| fields.contains(field))
            }
            _ => false,
        }
    }

    /// Every variable that means something here, for suggestions.
    fn env_names(&self) -> Vec<String> {
        let mut names: Vec<String> = ENV_ALIASES
            .iter()
            .map(|(name, _)| name.to_string())
            .chain(ENV_NOT_CONFIG.iter().map(|name| name.to_string()))
            .collect();
        for (key, fields) in &self.0 {
            let var = format!("{ENV_PREFIX}{}", key.to_ascii_uppercase());
            for field in fields {
                names.push(format!("{var}{ENV_NESTING}{}", field.to_ascii_uppercase()));
            }
            names.push(var);
        }
        names
    }

    fn classify(&self, name: &str) -> Option<EnvVar> {
        if let Some((_, key)) = ENV_ALIASES.iter().find(|(alias, _)| *alias == name) {
            return Some(EnvVar::Key(vec![key.to_string()]));
        }
        if ENV_NOT_CONFIG.contains(&name) {
            return Some(EnvVar::NotConfig);
        }
        let rest = name.strip_prefix(ENV_PREFIX)?;
        let path: Vec<String> = rest
            .to_ascii_lowercase()
            .split(ENV_NESTING)
            .map(str::to_owned)
            .collect();
        Some(if self.is_key(&path) {
            EnvVar::Key(path)
        } else {
            EnvVar::Unknown(self.suggest(name))
        })
    }

    /// The known variable `name` most likely meant, when close enough.
    fn suggest(&self, name: &str) -> Option<String> {
        // `SANDBOX_POLICY_CONFIG_X`: a free map's key with a single `_`.
        for map in FREE_MAPS {
            let var = format!("{ENV_PREFIX}{}", map.to_ascii_uppercase());
            if let Some(rest) = name.strip_prefix(&format!("{var}_")) {
                let rest = rest.trim_start_matches('_');
                if !rest.is_empty() {
                    return Some(format!("{var}{ENV_NESTING}{rest}"));
                }
            }
        }
        let short = |n: &str| n.strip_prefix(ENV_PREFIX).unwrap_or(n).to_owned();
        let wanted = short(name);
        self.env_names()
            .into_iter()
            .map(|candidate| (strsim::jaro_winkler(&wanted, &short(&candidate)), candidate))
            .filter(|(score, _)| *score >= 0.85)
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, candidate)| candidate)
    }
}

/// A loaded configuration, with where each value came from.
pub struct Loaded {
    /// The effective, validated configuration.
    pub config: Config,
    /// Unknown environment variables, one sentence each (also logged by
    /// [`Config::load`]).
    pub warnings: Vec<String>,
    figment: Figment,
}

impl Loaded {
    /// Where the value of `key` (dotted: `limits.pids`) came from.
    pub fn source(&self, key: &str) -> Origin {
        let parts: Vec<&str> = key.split('.').collect();
        for n in (1..=parts.len()).rev() {
            let Ok(value) = self.figment.find_value(&parts[..n].join(".")) else {
                continue;
            };
            // A table that does not hold the key: the key is a default.
            if n < parts.len() && matches!(value, Value::Dict(..)) {
                break;
            }
            return self
                .figment
                .get_metadata(value.tag())
                .map(Origin::of)
                .unwrap_or(Origin::Default);
        }
        Origin::Default
    }

    /// Every key of the effective configuration (dotted), its value and its
    /// origin.
    pub fn sources(&self) -> Vec<(String, serde_json::Value, Origin)> {
        fn leaves(
            prefix: &str,
            value: serde_json::Value,
            out: &mut Vec<(String, serde_json::Value)>,
        ) {
            match value {
                serde_json::Value::Object(map) if !map.is_empty() => {
                    for (key, value) in map {
                        let path = if prefix.is_empty() {
                            key
                        } else {
                            format!("{prefix}.{key}")
                        };
                        leaves(&path, value, out);
                    }
                }
                value => out.push((prefix.to_owned(), value)),
            }
        }
        let mut out = Vec::new();
        leaves(
            "",
            serde_json::to_value(&self.config).unwrap_or_default(),
            &mut out,
        );
        out.into_iter()
            .map(|(key, value)| {
                let origin = self.source(&key);
                (key, value, origin)
            })
            .collect()
    }
}

/// A figment error as lines naming where the bad value came from:
/// `SANDBOX_EXEC_TIMEOUT_SECS: invalid type: ...`.
fn describe(error: figment::Error, file: Option<&Path>) -> ConfigError {
    use figment::error::Kind;
    let problems: Vec<String> = error
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let origin = e
                .metadata
                .as_ref()
                .map(Origin::of)
                .unwrap_or(Origin::Default);
            let kind = match &e.kind {
                Kind::InvalidType(actual, expected) => {
                    format!("invalid type: found {actual}, expected {}", plain(expected))
                }
                Kind::InvalidValue(actual, expected) => {
                    format!("invalid value {actual}, expected {}", plain(expected))
                }
                kind => kind.to_string(),
            };
            match (&origin, &e.kind, file) {
                (Origin::Env { .. } | Origin::Flag { .. }, _, _) => {
                    format!("{}{kind}", origin.prefix())
                }
                // Only a file can hold unknown keys (environment variables
                // and flags are matched against the keys first).
                (_, Kind::UnknownField(field, expected), Some(path)) => {
                    let hint = expected
                        .iter()
                        .map(|known| (strsim::jaro_winkler(field, known), known))
                        .filter(|(score, _)| *score >= 0.8)
                        .max_by(|a, b| a.0.total_cmp(&b.0))
                        .map(|(_, known)| format!(" (did you mean `{known}`?)"))
                        .unwrap_or_default();
                    format!("config file {}: unknown key `{key}`{hint}", path.display())
                }
                _ if key.is_empty() => format!("{}{kind}", origin.prefix()),
                _ => format!("{}{key}: {kind}", origin.prefix()),
            }
        })
        .collect();
    ConfigError::Values { problems }
}

/// serde's names of primitive types, in words.
fn plain(expected: &str) -> &str {
    match expected {
        "f32" | "f64" => "a number",
        "i8" | "i16" | "i32" | "i64" | "u8" | "u16" | "u32" | "u64" | "usize" | "isize" => {
            "an integer"
        }
        "a boolean" | "bool" => "true or false",
        other => other,
    }
}

impl Config {
    /// Defaults, then `file` (TOML; else `SANDBOX_CONFIG`'s), then this
    /// process's environment. Unknown `SANDBOX_*` variables are logged.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let loaded = Config::load_layers(&Layers::from_process(file)?)?;
        for warning in &loaded.warnings {
            tracing::warn!("{warning}");
        }
        Ok(loaded.config)
    }

    /// Defaults, then each layer in turn; validated, and every error names
    /// the file, variable or flag the bad value came from.
    pub fn load_layers(layers: &Layers) -> Result<Loaded, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = &layers.file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            let data = Toml::string(&text)
                .data()
                .map_err(|source| ConfigError::Parse {
                    path: path.clone(),
                    source: Box::new(source),
                })?;
            figment = figment.merge(Layer {
                metadata: Origin::File { path: path.clone() }.metadata(),
                data: data.into_values().next().unwrap_or_default(),
            });
        }
        let keys = Keys::new();
        let mut warnings = Vec::new();
        // Aliases first: the canonical spelling wins.
        let aliases = ENV_ALIASES
            .iter()
            .filter_map(|(name, _)| layers.env.get_key_value(*name));
        let rest = layers
            .env
            .iter()
            .filter(|(name, _)| !ENV_ALIASES.iter().any(|(alias, _)| alias == name));
        for (name, value) in aliases.chain(rest) {
            match keys.classify(name) {
                Some(EnvVar::Key(path)) => {
                    let origin = Origin::Env { name: name.clone() };
                    figment = figment.merge(Layer::value(&origin, &path, value.clone().into()));
                }
                Some(EnvVar::Unknown(hint)) => warnings.push(match hint {
                    Some(hint) => format!(
                        "ignoring {name}: not a configuration variable (did you mean {hint}?)"
                    ),
                    None => format!("ignoring {name}: not a configuration variable"),
                }),
                Some(EnvVar::NotConfig) | None => {}
            }
        }
        for flag in &layers.flags {
            let path: Vec<String> = flag.key.split('.').map(str::to_owned).collect();
            let origin = Origin::Flag {
                name: flag.flag.clone(),
            };
            figment = figment.merge(Layer::value(&origin, &path, flag.value.clone().into()));
        }
        let config: Config = figment
            .extract_lossy()
            .map_err(|e| describe(e, layers.file.as_deref()))?;
        let loaded = Loaded {
            config,
            warnings,
            figment,
        };
        if let Err((key, message)) = loaded.config.check() {
            return Err(ConfigError::Invalid {
                key,
                origin: loaded.source(key),
                message,
            });
        }
        Ok(loaded)
    }

    /// Rejects values the host cannot run with
    /// ([`ConfigError::Invalid`], its origin [`Origin::Default`]: this
    /// configuration does not know where its values came from).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check().map_err(|(key, message)| ConfigError::Invalid {
            key,
            origin: Origin::Default,
            message,
        })
    }

    /// The first value the host cannot run with: its key and why.
    fn check(&self) -> Result<(), (&'static str, String)> {
        fn seconds(
            key: &'static str,
            value: f64,
            zero_ok: bool,
        ) -> Result<(), (&'static str, String)> {
            let max = MAX_DURATION.as_secs_f64();
            if value.is_finite() && (value > 0.0 || zero_ok && value == 0.0) && value <= max {
                Ok(())
            } else {
                let low = if zero_ok { "at least 0" } else { "more than 0" };
                Err((
                    key,
                    format!("{key} must be {low} and at most {max} seconds, not {value}"),
                ))
            }
        }
        let fail = |key: &'static str, message: String| Err((key, message));
        if let Err(e) = crate::engine::ownership::validate_namespace(&self.namespace) {
            return fail("namespace", e.to_string());
        }
        if self.image.trim().is_empty() {
            return fail("image", "image must not be empty".into());
        }
        seconds("docker_timeout_secs", self.docker_timeout_secs, false)?;
        seconds("exec_timeout_secs", self.exec_timeout_secs, false)?;
        seconds("destroy_grace_secs", self.destroy_grace_secs, true)?;
        seconds(
            "maintenance_interval_secs",
            self.maintenance_interval_secs,
            true,
        )?;
        if self.policy_deadline_ms == 0 {
            return fail(
                "policy_deadline_ms",
                "policy_deadline_ms must be positive".into(),
            );
        }
        if !(self.limits.cpus > 0.0 && self.limits.cpus.is_finite()) {
            return fail(
                "limits.cpus",
                "limits.cpus must be a positive number".into(),
            );
        }
        if self.limits.memory_bytes <= 0 {
            return fail(
                "limits.memory_bytes",
                "limits.memory_bytes must be positive".into(),
            );
        }
        if self.limits.pids <= 0 {
            return fail("limits.pids", "limits.pids must be positive".into());
        }
        if !self.allowed_images.is_empty() && !self.allowed_images.contains(&self.image) {
            return fail(
                "image",
                format!(
                    "image {:?} is not in this deployment's allowed_images {:?}",
                    self.image, self.allowed_images
                ),
            );
        }
        if self.max_policy_instances == 0 {
            return fail(
                "max_policy_instances",
                "max_policy_instances must be positive".into(),
            );
        }
        for (key, value) in [
            ("policy_call_timeout_ms", self.policy_call_timeout_ms),
            ("policy_host_calls", u64::from(self.policy_host_calls)),
            ("policy_memory_bytes", self.policy_memory_bytes as u64),
            ("policy_table_elements", self.policy_table_elements as u64),
            ("policy_core_instances", self.policy_core_instances as u64),
            ("policy_memories", self.policy_memories as u64),
            ("policy_resources", self.policy_resources as u64),
            (
                "max_creates_per_backend_per_minute",
                u64::from(self.max_creates_per_backend_per_minute),
            ),
        ] {
            if value == 0 {
                return fail(key, format!("{key} must be positive"));
            }
        }
        if self.policy_pool_bytes == 0 || self.policy_pool_bytes > self.policy_memory_total_bytes {
            return fail(
                "policy_pool_bytes",
                "policy_pool_bytes must be positive and at most policy_memory_total_bytes".into(),
            );
        }
        if self.policy_memory_total_bytes < self.policy_memory_bytes {
            return fail(
                "policy_memory_total_bytes",
                "policy_memory_total_bytes must be at least policy_memory_bytes".into(),
            );
        }
        if self.max_concurrent_lifecycle_ops > 1024 {
            return fail(
                "max_concurrent_lifecycle_ops",
                "max_concurrent_lifecycle_ops must be at most 1024".into(),
            );
        }
        if self.max_concurrent_lifecycle_ops == 0 {
            return fail(
                "max_concurrent_lifecycle_ops",
                "max_concurrent_lifecycle_ops must be positive".into(),
            );
        }
        check_network(&self.network).or_else(|message| fail("network", message))
    }

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

/// `none`, or a plausible Docker network name; never `host` (it would give
/// every sandbox the host's own network stack).
fn check_network(network: &str) -> Result<(), String> {
    let plausible = network.len() <= 128
        && network.starts_with(|c: char| c.is_ascii_alphanumeric())
        && network
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !plausible {
        return Err(format!(
            "network {network:?} must be \"none\" or a Docker network name: 1-128 of \
             [A-Za-z0-9_.-], starting with a letter or digit"
        ));
    }
    if network == "host" {
        return Err(
            "network \"host\" would share the host's network stack with every sandbox: \
             create a Docker network for them instead"
                .into(),
        );
    }
    Ok(())
}

/// Where compiled components are kept by default:
/// `$XDG_CACHE_HOME/sandbox/components`, else `~/.cache/sandbox/components`.
fn default_component_cache_dir() -> Option<PathBuf> {
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(xdg).join("sandbox/components"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/sandbox/components"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Layers {
        Layers {
            env: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Layers::default()
        }
    }

    fn load(vars: &[(&str, &str)]) -> Result<Loaded, ConfigError> {
        Config::load_layers(&env(vars))
    }

    fn error(vars: &[(&str, &str)]) -> String {
        match load(vars) {
            Ok(_) => panic!("{vars:?} was accepted"),
            Err(e) => format!("{e:#}"),
        }
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    fn env_origin(name: &str) -> Origin {
        Origin::Env { name: name.into() }
    }

    #[test]
    fn exec_timeout_from_the_environment_is_honoured() {
        // Bug: SANDBOX_EXEC_TIMEOUT_SECS=1 used to be silently ignored.
        let loaded = load(&[("SANDBOX_EXEC_TIMEOUT_SECS", "1")]).unwrap();
        assert_eq!(loaded.config.exec_timeout(), Duration::from_secs(1));
        assert_eq!(
            loaded.source("exec_timeout_secs"),
            env_origin("SANDBOX_EXEC_TIMEOUT_SECS")
        );
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    }

    #[test]
    fn nested_keys_lists_and_maps_come_from_the_environment() {
        let loaded = load(&[
            ("SANDBOX_LIMITS__PIDS", "10"),
            ("SANDBOX_LIMITS__CPUS", "0.5"),
            ("SANDBOX_POLICY_CONFIG__IDLE_TTL_SECS", "900"),
            ("SANDBOX_POLICY_CONFIG__MAX_CONTAINERS", "50"),
            ("SANDBOX_ALLOWED_IMAGES", "other:1, sandbox-busybox:latest"),
            ("SANDBOX_READ_ONLY_ROOTFS", "true"),
            ("SANDBOX_NETWORK", "sandnet"),
        ])
        .unwrap();
        let c = &loaded.config;
        assert_eq!((c.limits.pids, c.limits.cpus), (10, 0.5));
        assert_eq!(c.limits.memory_bytes, Limits::default().memory_bytes);
        assert_eq!(c.policy_config["idle_ttl_secs"], "900");
        assert_eq!(c.policy_config["max_containers"], "50");
        assert_eq!(c.allowed_images, ["other:1", DEFAULT_IMAGE]);
        assert!(c.read_only_rootfs);
        assert_eq!(c.network, "sandnet");
        assert_eq!(
            loaded.source("limits.pids"),
            env_origin("SANDBOX_LIMITS__PIDS")
        );
        assert_eq!(loaded.source("limits.memory_bytes"), Origin::Default);
        assert_eq!(
            loaded.source("policy_config.idle_ttl_secs"),
            env_origin("SANDBOX_POLICY_CONFIG__IDLE_TTL_SECS")
        );
        let bracketed = load(&[("SANDBOX_ALLOWED_IMAGES", r#"["a:1","b:2"]"#)]);
        let err = format!("{:#}", bracketed.err().unwrap());
        assert!(err.contains(r#"allowed_images ["a:1", "b:2"]"#), "{err}");
    }

    /// Sets every key of the configuration (found by serializing it) to a
    /// value other than its default through its `SANDBOX_*` variable, and
    /// checks each one took: a key added without a way in from the
    /// environment fails here.
    #[test]
    fn every_key_is_settable_from_the_environment() {
        fn other(value: &serde_json::Value) -> String {
            match value {
                serde_json::Value::Bool(b) => (!b).to_string(),
                serde_json::Value::Number(n) if n.is_f64() => {
                    (n.as_f64().unwrap() / 2.0).to_string()
                }
                serde_json::Value::Number(n) => (n.as_u64().unwrap() + 1).to_string(),
                // Strings, lists and unset options: one every one takes (a
                // number, so numeric-looking text must stay text).
                _ => "7".to_owned(),
            }
        }
        let defaults = serde_json::to_value(Config::default()).unwrap();
        let mut vars = Vec::new();
        for (key, value) in defaults.as_object().unwrap() {
            let var = format!("SANDBOX_{}", key.to_uppercase());
            match value {
                serde_json::Value::Object(fields) if fields.is_empty() => {
                    vars.push((format!("{var}__SOME_KEY"), "v".to_owned()))
                }
                serde_json::Value::Object(fields) => {
                    for (field, value) in fields {
                        vars.push((format!("{var}__{}", field.to_uppercase()), other(value)));
                    }
                }
                value => vars.push((var, other(value))),
            }
        }
        let layers = Layers {
            env: vars.iter().cloned().collect(),
            ..Layers::default()
        };
        let loaded = Config::load_layers(&layers).unwrap();
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let got = serde_json::to_value(&loaded.config).unwrap();
        for (key, default) in defaults.as_object().unwrap() {
            assert_ne!(&got[key], default, "{key} was not set from the environment");
        }
        for (key, value, origin) in loaded.sources() {
            assert!(
                matches!(origin, Origin::Env { .. }),
                "{key} = {value} comes from {origin}"
            );
        }
    }

    #[test]
    fn compatible_spellings_still_work() {
        let loaded = load(&[
            ("SANDBOX_WORKSPACE_ROOT", "/srv/ws"),
            ("SANDBOX_IMAGE", "img:1"),
            ("SANDBOX_POLICY", "/p.wasm"),
            ("SANDBOX_NAMESPACE", "ns1"),
            ("SANDBOX_USER", "1234:55"),
            ("SANDBOX_COMPONENT_CACHE", "off"),
            ("DOCKER_HOST", "tcp://127.0.0.1:2375"),
        ])
        .unwrap();
        let c = &loaded.config;
        assert_eq!(c.workspace_root, PathBuf::from("/srv/ws"));
        assert_eq!(c.image, "img:1");
        assert_eq!(c.policy, Some(PathBuf::from("/p.wasm")));
        assert_eq!(c.namespace, "ns1");
        assert_eq!(c.sandbox_user, Some(UserIds { uid: 1234, gid: 55 }));
        assert_eq!(c.component_cache_dir, None);
        assert_eq!(c.docker_host.as_deref(), Some("tcp://127.0.0.1:2375"));
        assert_eq!(
            loaded.source("sandbox_user.uid"),
            env_origin("SANDBOX_USER")
        );
        assert_eq!(loaded.source("docker_host"), env_origin("DOCKER_HOST"));
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);

        let cache = load(&[("SANDBOX_COMPONENT_CACHE", "/tmp/cc")]).unwrap();
        assert_eq!(cache.config.component_cache_dir, Some("/tmp/cc".into()));
        // The canonical spelling wins over the docker CLI's variable.
        let both = load(&[
            ("DOCKER_HOST", "tcp://a:1"),
            ("SANDBOX_DOCKER_HOST", "unix:///b.sock"),
        ])
        .unwrap();
        assert_eq!(both.config.docker_host.as_deref(), Some("unix:///b.sock"));
        assert_eq!(
            both.source("docker_host"),
            env_origin("SANDBOX_DOCKER_HOST")
        );
    }

    #[test]
    fn the_sandbox_user_has_three_spellings() {
        let bare = load(&[("SANDBOX_USER", "1000")]).unwrap();
        assert_eq!(
            bare.config.sandbox_user,
            Some(UserIds {
                uid: 1000,
                gid: 1000
            })
        );
        let nested = load(&[
            ("SANDBOX_SANDBOX_USER__UID", "7"),
            ("SANDBOX_SANDBOX_USER__GID", "8"),
        ])
        .unwrap();
        assert_eq!(nested.config.sandbox_user, Some(UserIds { uid: 7, gid: 8 }));
        let toml = file("sandbox_user = { uid = 5, gid = 6 }\n");
        let table = Config::load(Some(toml.path())).unwrap();
        assert_eq!(table.sandbox_user, Some(UserIds { uid: 5, gid: 6 }));
    }

    #[test]
    fn a_bad_value_names_the_variable() {
        let err = error(&[("SANDBOX_EXEC_TIMEOUT_SECS", "soon")]);
        assert!(
            err.starts_with("SANDBOX_EXEC_TIMEOUT_SECS: invalid"),
            "{err}"
        );
        let err = error(&[("SANDBOX_EXEC_TIMEOUT_SECS", "-1")]);
        assert!(
            err.starts_with("SANDBOX_EXEC_TIMEOUT_SECS: exec_timeout_secs must be"),
            "{err}"
        );
        let err = error(&[("SANDBOX_LIMITS__PIDS", "many")]);
        assert!(err.starts_with("SANDBOX_LIMITS__PIDS: invalid"), "{err}");
        let err = error(&[("SANDBOX_USER", "bob")]);
        assert!(err.starts_with("SANDBOX_USER: bad uid"), "{err}");
        let err = error(&[("SANDBOX_NAMESPACE", "a.b")]);
        assert!(err.starts_with("SANDBOX_NAMESPACE: namespace"), "{err}");
    }

    #[test]
    fn unknown_variables_are_reported_with_the_likely_key() {
        let loaded = load(&[
            ("SANDBOX_EXEC_TIMEOUT", "5"),
            ("SANDBOX_LIMITS_PIDS", "5"),
            ("SANDBOX_POLICY_CONFIG_IDLE_TTL_SECS", "5"),
            ("SANDBOX_WIBBLE", "5"),
            ("SANDBOX_TOKEN", "t"),
            ("SANDBOX_CONFIG", "/nonexistent.toml"),
            ("HOME", "/home/x"),
        ])
        .unwrap();
        assert_eq!(loaded.config.exec_timeout_secs, 300.0, "unknown is ignored");
        let warnings = loaded.warnings.join("\n");
        for (var, hint) in [
            ("SANDBOX_EXEC_TIMEOUT:", Some("SANDBOX_EXEC_TIMEOUT_SECS?")),
            ("SANDBOX_LIMITS_PIDS:", Some("SANDBOX_LIMITS__PIDS?")),
            (
                "SANDBOX_POLICY_CONFIG_IDLE_TTL_SECS:",
                Some("SANDBOX_POLICY_CONFIG__IDLE_TTL_SECS?"),
            ),
            ("SANDBOX_WIBBLE: not a configuration variable", None),
        ] {
            let line = loaded
                .warnings
                .iter()
                .find(|w| w.contains(var))
                .unwrap_or_else(|| panic!("no warning for {var}: {warnings}"));
            match hint {
                Some(hint) => assert!(line.contains(&format!("did you mean {hint}")), "{line}"),
                None => assert!(!line.contains("did you mean"), "{line}"),
            }
        }
        assert_eq!(loaded.warnings.len(), 4, "{warnings}");
    }

    /// Every `SANDBOX_*` variable the code base reads (the CLI, the tests,
    /// the Python client, CI, xtask) is known here, so none is warned about.
    #[test]
    fn no_variable_the_project_reads_is_reported_as_unknown() {
        fn scan(path: &Path, found: &mut BTreeMap<String, PathBuf>) {
            if path.is_dir() {
                for entry in std::fs::read_dir(path).unwrap() {
                    let entry = entry.unwrap().path();
                    let name = entry.file_name().unwrap().to_string_lossy().into_owned();
                    let skipped = name.starts_with('.') && name != ".ci"
                        || matches!(name.as_str(), "target" | "__pycache__" | "fixtures");
                    if !skipped {
                        scan(&entry, found);
                    }
                }
                return;
            }
            // This file names unknown variables on purpose.
            if path.ends_with("host/src/config.rs") {
                return;
            }
            let Ok(text) = std::fs::read_to_string(path) else {
                return;
            };
            for (at, _) in text.match_indices(ENV_PREFIX) {
                let before = text[..at].chars().next_back();
                if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                    continue;
                }
                let name: String = text[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                if name.len() > ENV_PREFIX.len() {
                    found.insert(name, path.to_owned());
                }
            }
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let mut found = BTreeMap::new();
        for dir in ["host", "tests", "clients", ".ci", "xtask", "deploy"] {
            scan(&root.join(dir), &mut found);
        }
        assert!(found.contains_key("SANDBOX_TOKEN"), "{found:?}");
        let keys = Keys::new();
        for (name, path) in found {
            assert!(
                !matches!(keys.classify(&name), Some(EnvVar::Unknown(_))),
                "{name} (read in {}) would be reported as unknown",
                path.display()
            );
        }
    }

    #[test]
    fn precedence_is_defaults_file_environment_flags() {
        let toml = file(
            "image = \"from-file\"\nnamespace = \"file\"\nexec_timeout_secs = 10\n\
             [limits]\npids = 10\n[policy_config]\nidle_ttl_secs = 900\n",
        );
        let layers = Layers {
            file: Some(toml.path().to_owned()),
            flags: vec![Flag::new("--image", "image", "from-flag")],
            ..env(&[("SANDBOX_IMAGE", "from-env"), ("SANDBOX_NAMESPACE", "env")])
        };
        let loaded = Config::load_layers(&layers).unwrap();
        let c = &loaded.config;
        assert_eq!(c.image, "from-flag");
        assert_eq!(c.namespace, "env");
        assert_eq!((c.exec_timeout_secs, c.limits.pids), (10.0, 10));
        assert_eq!(c.policy_config["idle_ttl_secs"], "900");
        let in_file = Origin::File {
            path: toml.path().to_owned(),
        };
        let sources: BTreeMap<String, Origin> = loaded
            .sources()
            .into_iter()
            .map(|(key, _, origin)| (key, origin))
            .collect();
        assert_eq!(
            sources["image"],
            Origin::Flag {
                name: "--image".into()
            }
        );
        assert_eq!(sources["namespace"], env_origin("SANDBOX_NAMESPACE"));
        assert_eq!(sources["exec_timeout_secs"], in_file);
        assert_eq!(sources["limits.pids"], in_file);
        assert_eq!(sources["policy_config.idle_ttl_secs"], in_file);
        assert_eq!(sources["limits.cpus"], Origin::Default);
        assert_eq!(sources["docker_timeout_secs"], Origin::Default);
    }

    #[test]
    fn toml_file_is_partial_and_strict() {
        let toml = file("image = \"x\"\n[limits]\npids = 10\n");
        let config = Config::load_layers(&Layers {
            file: Some(toml.path().to_owned()),
            ..Layers::default()
        })
        .unwrap()
        .config;
        assert_eq!(config.image, "x");
        assert_eq!(config.limits.pids, 10);
        assert_eq!(config.limits.cpus, 1.0);
        for (typo, shown) in [
            (
                "imag = \"x\"\n",
                "unknown key `imag` (did you mean `image`?)",
            ),
            (
                "[limits]\npid = 3\n",
                "unknown key `limits.pid` (did you mean `pids`?)",
            ),
        ] {
            let toml = file(typo);
            let err = Config::load_layers(&Layers {
                file: Some(toml.path().to_owned()),
                ..Layers::default()
            })
            .err()
            .map(|e| e.to_string())
            .unwrap_or_else(|| panic!("{typo:?} was accepted"));
            assert!(err.contains(shown), "{err}");
            assert!(err.contains(&toml.path().display().to_string()), "{err}");
        }
        let missing = Config::load_layers(&Layers {
            file: Some("/nonexistent/sandbox.toml".into()),
            ..Layers::default()
        });
        assert!(missing.is_err(), "a named config file must exist");
    }

    #[test]
    fn an_image_outside_the_allow_list_is_refused() {
        let config = Config {
            image: "evil:latest".into(),
            allowed_images: vec![DEFAULT_IMAGE.into()],
            ..Config::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("evil:latest"), "{err}");
        assert!(Config {
            image: DEFAULT_IMAGE.into(),
            ..config
        }
        .validate()
        .is_ok());
    }

    /// The file's errors keep their cause as `source()`; shown as a chain
    /// (as the CLI does) they read as before the typed errors.
    #[test]
    fn file_errors_keep_their_cause() {
        fn chain(e: &dyn std::error::Error) -> String {
            let mut text = e.to_string();
            let mut cause = e.source();
            while let Some(e) = cause {
                text = format!("{text}: {e}");
                cause = e.source();
            }
            text
        }
        let missing = Config::load_layers(&Layers {
            file: Some("/nonexistent/sandbox.toml".into()),
            ..Layers::default()
        })
        .err()
        .unwrap();
        assert!(
            matches!(&missing, ConfigError::Read { source, .. }
                if source.kind() == std::io::ErrorKind::NotFound),
            "{missing:?}"
        );
        assert!(
            chain(&missing).starts_with("reading config file /nonexistent/sandbox.toml: "),
            "{}",
            chain(&missing)
        );
        let toml = file("image = \n");
        let broken = Config::load_layers(&Layers {
            file: Some(toml.path().to_owned()),
            ..Layers::default()
        })
        .err()
        .unwrap();
        assert!(matches!(broken, ConfigError::Parse { .. }), "{broken:?}");
        let shown = chain(&broken);
        let expected = format!(
            "parsing config file {}: TOML parse error",
            toml.path().display()
        );
        assert!(shown.starts_with(&expected), "{shown}");

        let err = load(&[("SANDBOX_USER", "1:x")]).err().unwrap().to_string();
        assert_eq!(
            err,
            "SANDBOX_USER: bad gid in \"1:x\": invalid digit found in string"
        );
    }

    #[test]
    fn an_invalid_value_names_its_key_and_origin() {
        let err = load(&[("SANDBOX_LIMITS__PIDS", "0")]).err().unwrap();
        let ConfigError::Invalid { key, origin, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(
            (*key, origin),
            ("limits.pids", &env_origin("SANDBOX_LIMITS__PIDS"))
        );
        assert_eq!(
            err.to_string(),
            "SANDBOX_LIMITS__PIDS: limits.pids must be positive"
        );
        let config = Config {
            max_policy_instances: 0,
            ..Config::default()
        };
        let err = config.validate().unwrap_err();
        assert!(
            matches!(
                &err,
                ConfigError::Invalid {
                    key: "max_policy_instances",
                    origin: Origin::Default,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "max_policy_instances must be positive");
    }

    #[test]
    fn bad_namespace_is_refused() {
        let config = Config {
            namespace: "a.b".into(),
            ..Config::default()
        };
        assert!(config.validate().is_err());
    }

    #[test]
    fn network_is_none_or_a_docker_network_name() {
        for good in ["none", "sandnet", "my_net.1-a"] {
            let config = Config {
                network: good.into(),
                ..Config::default()
            };
            assert!(config.validate().is_ok(), "{good}");
        }
        for bad in ["", "-x", "a b", "container:abc", "host", &"n".repeat(129)] {
            let config = Config {
                network: bad.into(),
                ..Config::default()
            };
            assert!(config.validate().is_err(), "{bad:?}");
        }
        let err = error(&[("SANDBOX_NETWORK", "a/b")]);
        assert!(err.starts_with("SANDBOX_NETWORK: network"), "{err}");
    }

    /// `Duration::from_secs_f64` panics on these: they must be refused first.
    #[test]
    fn durations_that_are_not_finite_or_beyond_a_day_are_refused() {
        for (var, value) in [
            ("SANDBOX_EXEC_TIMEOUT_SECS", "1e30"),
            ("SANDBOX_EXEC_TIMEOUT_SECS", "NaN"),
            ("SANDBOX_DOCKER_TIMEOUT_SECS", "inf"),
            ("SANDBOX_DOCKER_TIMEOUT_SECS", "0"),
            ("SANDBOX_MAINTENANCE_INTERVAL_SECS", "-1"),
            ("SANDBOX_MAINTENANCE_INTERVAL_SECS", "90000"),
        ] {
            let err = error(&[(var, value)]);
            assert!(err.starts_with(&format!("{var}: ")), "{err}");
        }
        let off = load(&[("SANDBOX_MAINTENANCE_INTERVAL_SECS", "0")]).unwrap();
        assert_eq!(off.config.maintenance_interval_secs, 0.0);
    }
}
