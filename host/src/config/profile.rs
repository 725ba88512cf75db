//! Profiles: named sets of the settings that make a sandbox more or less
//! open (network, egress allow-list, runtime), defined by the operator.
//! The policy picks one per backend by name (WIT `placement.profile`); the
//! top-level settings are the profile `default`.

use serde::{Deserialize, Serialize};

use super::Config;

/// The profile of the top-level settings, and of every backend whose
/// policy names none (policies of the 0.3 world).
pub const DEFAULT_PROFILE: &str = "default";

/// The longest profile name.
pub const MAX_PROFILE_NAME_LEN: usize = 32;

/// `[profiles.NAME]`: what differs from the top-level settings. A setting
/// left out is the top-level one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProfileConfig {
    /// `none`, `egress`, or a Docker network the operator created.
    pub network: Option<String>,
    /// OCI runtime (for example `runsc`).
    pub runtime: Option<String>,
    /// `[profiles.NAME.egress]`: this profile's egress allow-list.
    pub egress: Option<ProfileEgress>,
}

/// A profile's own egress allow-list (`[egress] hosts` stays shared: it is
/// a fact about names, not a permission).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProfileEgress {
    /// As `[egress] allow`.
    #[serde(deserialize_with = "super::list")]
    pub allow: Vec<String>,
}

/// A profile name, checked: 1..=32 of `[a-z0-9_-]`, starting with a letter
/// or digit. Whether the operator defined it is [`Config::profile`]'s
/// question.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProfileName(String);

impl ProfileName {
    /// The name, or why it is not one.
    pub fn parse(name: &str) -> Result<Self, String> {
        let ok_chars = name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        let ok_first = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
        if name.is_empty() || name.len() > MAX_PROFILE_NAME_LEN || !ok_chars || !ok_first {
            return Err(format!(
                "profile name {} must be 1..={MAX_PROFILE_NAME_LEN} of [a-z0-9_-], starting \
                 with a letter or digit",
                sandbox_contract::shown(name)
            ));
        }
        Ok(ProfileName(name.to_owned()))
    }

    /// `default`: the top-level settings.
    pub fn default_profile() -> Self {
        ProfileName(DEFAULT_PROFILE.to_owned())
    }

    /// The name as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ProfileName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A profile with every setting resolved (its own, else the top level's).
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// `default`, or the key of its `[profiles.NAME]`.
    pub name: ProfileName,
    /// `none`, `egress`, or a Docker network.
    pub network: String,
    /// OCI runtime; the engine's default when `None`.
    pub runtime: Option<String>,
    /// The egress allow-list (used when `network` is `egress`).
    pub allow: Vec<String>,
}

impl Profile {
    /// Whether its sandboxes reach the network through the host's proxy.
    pub fn has_egress(&self) -> bool {
        self.network == super::NETWORK_EGRESS
    }
}

impl Config {
    /// The profile named `name`, resolved; `None` when the operator did not
    /// define it.
    pub fn profile(&self, name: &ProfileName) -> Option<Profile> {
        if name.as_str() == DEFAULT_PROFILE {
            return Some(Profile {
                name: name.clone(),
                network: self.network.clone(),
                runtime: self.runtime.clone(),
                allow: self.egress.allow.clone(),
            });
        }
        let own = self.profiles.get(name.as_str())?;
        Some(Profile {
            name: name.clone(),
            network: own.network.clone().unwrap_or_else(|| self.network.clone()),
            runtime: own.runtime.clone().or_else(|| self.runtime.clone()),
            allow: own
                .egress
                .as_ref()
                .map(|e| e.allow.clone())
                .unwrap_or_else(|| self.egress.allow.clone()),
        })
    }

    /// The default profile (the top-level settings).
    pub fn default_profile(&self) -> Profile {
        self.profile(&ProfileName::default_profile())
            .expect("the default profile always exists")
    }

    /// Every profile: `default` first, then the operator's, by name.
    pub fn profiles(&self) -> Vec<Profile> {
        std::iter::once(self.default_profile())
            .chain(self.profiles.keys().filter_map(|name| {
                ProfileName::parse(name)
                    .ok()
                    .and_then(|name| self.profile(&name))
            }))
            .collect()
    }

    /// The profile a policy named, checked against the operator's list:
    /// a name the operator did not define is refused (never a wider one).
    pub fn chosen_profile(&self, answer: &str) -> Result<Profile, String> {
        let name = ProfileName::parse(answer)?;
        self.profile(&name).ok_or_else(|| {
            let known: Vec<_> = self.profiles().into_iter().map(|p| p.name.0).collect();
            format!(
                "the policy chose profile {name}, which this host does not define (defined: \
                 {}); add [profiles.{name}] to the configuration or fix the policy",
                known.join(", ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let mut config = Config {
            network: "none".into(),
            ..Config::default()
        };
        config.egress.allow = vec!["example.org".into()];
        config.profiles.insert(
            "trusted".into(),
            ProfileConfig {
                network: Some("egress".into()),
                egress: Some(ProfileEgress {
                    allow: vec!["pypi.org".into(), "*.pythonhosted.org".into()],
                }),
                ..ProfileConfig::default()
            },
        );
        config.profiles.insert(
            "inherits".into(),
            ProfileConfig {
                runtime: Some("runc".into()),
                ..ProfileConfig::default()
            },
        );
        config
    }

    #[test]
    fn a_profile_overrides_what_it_sets_and_inherits_the_rest() {
        let config = config();
        let trusted = config.chosen_profile("trusted").unwrap();
        assert!(trusted.has_egress());
        assert_eq!(trusted.allow, ["pypi.org", "*.pythonhosted.org"]);
        assert_eq!(trusted.runtime, None);
        let inherits = config.chosen_profile("inherits").unwrap();
        assert_eq!(inherits.network, "none");
        assert_eq!(inherits.allow, ["example.org"]);
        assert_eq!(inherits.runtime.as_deref(), Some("runc"));
        let default = config.chosen_profile("default").unwrap();
        assert_eq!(default, config.default_profile());
        assert!(!default.has_egress());
        let names: Vec<_> = config.profiles().into_iter().map(|p| p.name).collect();
        assert_eq!(
            names.iter().map(ProfileName::as_str).collect::<Vec<_>>(),
            ["default", "inherits", "trusted"]
        );
    }

    #[test]
    fn an_unknown_or_malformed_name_is_refused_with_what_is_defined() {
        let config = config();
        let err = config.chosen_profile("admin").unwrap_err();
        assert!(err.contains("profile admin"), "{err}");
        assert!(err.contains("default, inherits, trusted"), "{err}");
        assert!(err.contains("[profiles.admin]"), "{err}");
        for bad in [
            "",
            "Trusted",
            "-x",
            "a/b",
            "../x",
            &"x".repeat(33),
            "trusted\n",
        ] {
            let err = config.chosen_profile(bad).unwrap_err();
            assert!(err.contains("must be 1..=32"), "{bad:?}: {err}");
        }
    }
}
