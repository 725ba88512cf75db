use std::path::Path;

use super::layers::{EnvVar, Keys};
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
            serde_json::Value::Number(n) if n.is_f64() => (n.as_f64().unwrap() / 2.0).to_string(),
            serde_json::Value::Number(n) => (n.as_u64().unwrap() + 1).to_string(),
            // Strings, lists and unset options: one every one takes (a
            // number, so numeric-looking text must stay text).
            _ => "7".to_owned(),
        }
    }
    let defaults = serde_json::to_value(Config::default()).unwrap();
    let mut vars = Vec::new();
    // Profiles are tables of tables: the configuration file only.
    let file_only = ["profiles"];
    for (key, value) in defaults.as_object().unwrap() {
        if file_only.contains(&key.as_str()) {
            continue;
        }
        let var = format!("SANDBOX_{}", key.to_uppercase());
        match value {
            serde_json::Value::Object(fields) if fields.is_empty() => {
                vars.push((format!("{var}__SOME_KEY"), "v".to_owned()))
            }
            serde_json::Value::Object(fields) => {
                for (field, value) in fields {
                    let value = match (key.as_str(), field.as_str()) {
                        ("egress", "hosts") => "a.test=10.0.0.1".to_owned(),
                        _ => other(value),
                    };
                    vars.push((format!("{var}__{}", field.to_uppercase()), value));
                }
            }
            // An absolute path: a relative one is refused.
            _ if key == "workspace_root" => vars.push((var, "/srv/7".to_owned())),
            // 0 (unbounded) or at least 16 MiB.
            _ if key == "workspace_quota" => vars.push((var, "32MiB".to_owned())),
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
        if file_only.contains(&key.as_str()) {
            continue;
        }
        assert_ne!(&got[key], default, "{key} was not set from the environment");
    }
    for (key, value, origin) in loaded.sources() {
        if file_only.contains(&key.as_str()) {
            continue;
        }
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
        // These name unknown variables on purpose (tests, and the
        // classifier's examples of near misses).
        if path.ends_with("host/src/config/tests.rs") || path.ends_with("host/src/config/layers.rs")
        {
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
    for bad in [
        "",
        "-x",
        "a b",
        "container:abc",
        "host",
        "bridge",
        "default",
        &"n".repeat(129),
    ] {
        let config = Config {
            network: bad.into(),
            ..Config::default()
        };
        assert!(config.validate().is_err(), "{bad:?}");
    }
    let err = error(&[("SANDBOX_NETWORK", "a/b")]);
    assert!(err.starts_with("SANDBOX_NETWORK: network"), "{err}");
}

#[test]
fn unsafe_settings_are_refused_with_the_reason() {
    // A root sandbox user would plant root-owned (setuid) files in the
    // host's workspace.
    let err = error(&[("SANDBOX_USER", "0:0")]);
    assert!(err.contains("must not be root"), "{err}");
    let err = error(&[("SANDBOX_SANDBOX_USER", "1000:0")]);
    assert!(err.contains("must not be root"), "{err}");
    // Docker's default bridge is shared with every container.
    let err = error(&[("SANDBOX_NETWORK", "bridge")]);
    assert!(err.contains("default bridge"), "{err}");
    // A relative root made stray directories, then Docker's raw error.
    for relative in ["ws", "~/ws", "./ws"] {
        let err = error(&[("SANDBOX_WORKSPACE_ROOT", relative)]);
        assert!(
            err.contains("must be an absolute path"),
            "{relative}: {err}"
        );
    }
    // A device or a huge file is no configuration file (/dev/zero was
    // read for 1.7 GB).
    for path in ["/dev/zero", "/proc/self"] {
        let layers = Layers {
            file: Some(path.into()),
            ..Layers::default()
        };
        let err = error_of(&layers);
        assert!(err.contains("not a regular file"), "{path}: {err}");
    }
    let big = tempfile::NamedTempFile::new().unwrap();
    big.as_file().set_len(2 << 20).unwrap();
    let layers = Layers {
        file: Some(big.path().to_owned()),
        ..Layers::default()
    };
    let err = error_of(&layers);
    assert!(err.contains("larger than 1 MiB"), "{err}");
}

/// The error of loading `layers`, with its causes.
fn error_of(layers: &Layers) -> String {
    match Config::load_layers(layers) {
        Ok(_) => panic!("{layers:?} was accepted"),
        Err(e) => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            text
        }
    }
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

#[test]
fn a_default_file_is_read_unless_one_is_named_or_none_is_wanted() {
    let dir = tempfile::tempdir().unwrap();
    let user = dir.path().join("user.toml");
    let machine = dir.path().join("machine.toml");
    let defaults = [user.clone(), machine.clone()];
    use super::layers::choose_file;
    assert_eq!(choose_file(None, None, &defaults), None, "none exists");
    std::fs::write(&machine, "").unwrap();
    assert_eq!(choose_file(None, None, &defaults), Some(machine.clone()));
    std::fs::write(&user, "").unwrap();
    assert_eq!(
        choose_file(None, None, &defaults),
        Some(user.clone()),
        "the user's first"
    );
    assert_eq!(
        choose_file(None, Some(""), &defaults),
        None,
        "SANDBOX_CONFIG= reads none"
    );
    assert_eq!(
        choose_file(None, Some("/x.toml"), &defaults),
        Some("/x.toml".into())
    );
    assert_eq!(
        choose_file(Some(Path::new("/y.toml")), Some("/x.toml"), &defaults),
        Some("/y.toml".into())
    );
}

#[test]
fn a_relative_policy_in_the_file_is_the_files_neighbour() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "policy = \"policies/mine.wasm\"\n").unwrap();
    let loaded = Config::load_layers(&Layers {
        file: Some(path),
        ..Layers::default()
    })
    .unwrap();
    assert_eq!(
        loaded.config.policy,
        Some(dir.path().join("policies/mine.wasm"))
    );
    // From the environment it stays as given (the working directory's).
    let loaded = load(&[("SANDBOX_POLICY", "mine.wasm")]).unwrap();
    assert_eq!(loaded.config.policy, Some("mine.wasm".into()));
}

#[test]
fn the_replaced_managers_variables_are_honoured() {
    let loaded = load(&[("WORKSPACE_ROOT", "/srv/old"), ("DOCKER_IMAGE", "old:1")]).unwrap();
    assert_eq!(loaded.config.workspace_root, Path::new("/srv/old"));
    assert_eq!(loaded.config.image, "old:1");
    let loaded = load(&[
        ("WORKSPACE_ROOT", "/srv/old"),
        ("SANDBOX_WORKSPACE_ROOT", "/srv/new"),
    ])
    .unwrap();
    assert_eq!(
        loaded.config.workspace_root,
        Path::new("/srv/new"),
        "ours wins"
    );
}

#[test]
fn sizes_and_durations_take_units_in_the_file_and_the_environment() {
    let config = file(
        "exec_timeout_secs = \"1m30s\"\ndestroy_grace_secs = 2.5\nmax_file_bytes = \"64MiB\"\n\
         output_limit_bytes = \"512KB\"\n[limits]\nmemory_bytes = \"512m\"\n",
    );
    let loaded = Config::load_layers(&Layers {
        file: Some(config.path().to_owned()),
        ..env(&[
            ("SANDBOX_DOCKER_TIMEOUT_SECS", "10s"),
            ("SANDBOX_MAX_BATCH_BYTES", "1GiB"),
        ])
    })
    .unwrap();
    let c = &loaded.config;
    assert_eq!(c.exec_timeout_secs, 90.0);
    assert_eq!(c.destroy_grace_secs, 2.5);
    assert_eq!(c.max_file_bytes, 64 << 20);
    assert_eq!(c.output_limit_bytes, 512_000);
    assert_eq!(c.limits.memory_bytes, 512 << 20);
    assert_eq!(c.docker_timeout_secs, 10.0);
    assert_eq!(c.max_batch_bytes, 1 << 30);
    // Plain numbers still work, and a bad unit names the key and the forms.
    assert_eq!(
        load(&[("SANDBOX_EXEC_TIMEOUT_SECS", "60")])
            .unwrap()
            .config
            .exec_timeout_secs,
        60.0
    );
    let err = error(&[("SANDBOX_MAX_FILE_BYTES", "12 parsecs")]);
    assert!(
        err.contains("SANDBOX_MAX_FILE_BYTES") && err.contains("512MiB"),
        "{err}"
    );
    let err = error(&[("SANDBOX_EXEC_TIMEOUT_SECS", "soon")]);
    assert!(
        err.contains("SANDBOX_EXEC_TIMEOUT_SECS") && err.contains("60s"),
        "{err}"
    );
}
