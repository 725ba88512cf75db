//! Where each value comes from: the layers (defaults, a TOML file, the
//! environment, flags) merged with figment, each value's [`Origin`], the
//! unknown-variable check with its likely intended key, and loading.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};

use serde::Serialize;

use super::{
    Config, ConfigError, UserIds, ENV_ALIASES, ENV_NESTING, ENV_NOT_CONFIG, ENV_PREFIX, FREE_MAPS,
};

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
    /// This process's environment, and `file`, else `SANDBOX_CONFIG`, else
    /// the first of [`default_files`] that exists. `SANDBOX_CONFIG` set to
    /// the empty string (or `--no-config`, which passes no file and sets
    /// `no_default`) reads no file at all.
    pub fn from_process(file: Option<&Path>) -> Result<Layers, ConfigError> {
        Layers::from_process_with(file, &default_files())
    }

    /// [`Layers::from_process`] with the default files to look for (none:
    /// `--no-config`).
    pub fn from_process_with(
        file: Option<&Path>,
        defaults: &[PathBuf],
    ) -> Result<Layers, ConfigError> {
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
        let file = choose_file(
            file,
            env.get("SANDBOX_CONFIG").map(String::as_str),
            defaults,
        );
        Ok(Layers {
            file,
            env,
            flags: Vec::new(),
        })
    }
}

/// The configuration files read when none is named, first found wins:
/// the user's (`$XDG_CONFIG_HOME/sandbox/config.toml`, else
/// `~/.config/sandbox/config.toml`), then the machine's
/// (`/etc/sandbox/config.toml`).
pub fn default_files() -> Vec<PathBuf> {
    let user = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")));
    user.map(|dir| dir.join("sandbox/config.toml"))
        .into_iter()
        .chain([PathBuf::from("/etc/sandbox/config.toml")])
        .collect()
}

/// The file to read: the one named (`--config`), else `SANDBOX_CONFIG`'s
/// (none when it is empty), else the first of `defaults` that exists.
pub fn choose_file(
    named: Option<&Path>,
    env: Option<&str>,
    defaults: &[PathBuf],
) -> Option<PathBuf> {
    match (named, env) {
        (Some(file), _) => Some(file.to_path_buf()),
        (None, Some("")) => None,
        (None, Some(file)) => Some(PathBuf::from(file)),
        (None, None) => defaults.iter().find(|p| p.is_file()).cloned(),
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
    pub(super) fn prefix(&self) -> String {
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
pub(super) struct Keys(BTreeMap<String, Vec<String>>);

/// What an environment variable is to the configuration.
#[derive(Debug, PartialEq)]
pub(super) enum EnvVar {
    Key(Vec<String>),
    NotConfig,
    /// With the likely intended variable.
    Unknown(Option<String>),
}

impl Keys {
    pub(super) fn new() -> Keys {
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

    pub(super) fn classify(&self, name: &str) -> Option<EnvVar> {
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
    /// The configuration file read, if any.
    pub file: Option<PathBuf>,
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

/// The longest configuration file read: a setting file, never a device.
const MAX_CONFIG_FILE_BYTES: u64 = 1 << 20;

/// The text of the configuration file at `path`: a regular file of at most
/// [`MAX_CONFIG_FILE_BYTES`] (`/dev/zero` was read for 1.7 GB).
fn read_config_file(path: &Path) -> Result<String, ConfigError> {
    let refuse = |why: &str| ConfigError::Read {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, why.to_owned()),
    };
    let read = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let meta = file.metadata().map_err(read)?;
    if !meta.is_file() {
        return Err(refuse("not a regular file"));
    }
    if meta.len() > MAX_CONFIG_FILE_BYTES {
        return Err(refuse("larger than 1 MiB: not a configuration file"));
    }
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(file, MAX_CONFIG_FILE_BYTES + 1),
        &mut text,
    )
    .map_err(read)?;
    Ok(text)
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
            let text = read_config_file(path)?;
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
        let mut config: Config = figment
            .extract_lossy()
            .map_err(|e| describe(e, layers.file.as_deref()))?;
        // A relative `policy` in the file is the file's neighbour, wherever
        // the command runs from.
        if let (Some(policy), Some(Source::File(file))) = (
            config.policy.as_ref().filter(|p| p.is_relative()),
            figment
                .find_metadata("policy")
                .and_then(|m| m.source.clone()),
        ) {
            if let Some(dir) = file.parent() {
                config.policy = Some(dir.join(policy));
            }
        }
        let loaded = Loaded {
            config,
            warnings,
            file: layers.file.clone(),
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
}
