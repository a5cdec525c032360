//! Server configuration: a TOML file with sections, every key overridable
//! by an environment variable `MEDIASTORE__SECTION__KEY`, the main ones by
//! flags. `crates/mediastore-server/mediastore.example.toml` (also printed by `mediastore serve
//! --help`) documents every key with its default.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use crate::units::{ByteSize, HumanDuration};

/// The commented example configuration: every key, with its default.
pub const EXAMPLE: &str = include_str!("../mediastore.example.toml");

/// Prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "MEDIASTORE__";

/// Everything `mediastore serve` reads.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[server]`: listeners and auth.
    pub server: ServerConfig,
    /// `[store]`: the data dir, roots and quotas.
    pub store: StoreConfig,
    /// `[cleaner]`: hold expiry and the background sweep.
    pub cleaner: CleanerSection,
    /// `[scopes]`: max age per scope-name prefix (longest prefix wins).
    pub scopes: BTreeMap<String, ScopeAge>,
    /// `[log]`: logging.
    pub log: LogConfig,
}

/// `[server]`.
#[derive(Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the API. Loopback by default; any other address needs a
    /// token.
    pub listen: String,
    /// A separate address for `/metrics` (then not served on `listen`).
    /// Empty: `/metrics` is served on `listen`, behind the token.
    pub metrics_listen: String,
    /// Bearer tokens accepted on every route but `/healthz` and `/readyz`.
    /// Empty: no auth (only allowed on loopback).
    #[serde(deserialize_with = "string_or_list")]
    pub tokens: Vec<String>,
    /// How long shutdown waits for requests in flight.
    pub shutdown_timeout: HumanDuration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8765".into(),
            metrics_listen: String::new(),
            tokens: Vec::new(),
            shutdown_timeout: HumanDuration(std::time::Duration::from_secs(30)),
        }
    }
}

impl fmt::Debug for ServerConfig {
    // Tokens are secrets: logs show how many there are, never their text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("listen", &self.listen)
            .field("metrics_listen", &self.metrics_listen)
            .field("tokens", &format_args!("[{} redacted]", self.tokens.len()))
            .field("shutdown_timeout", &self.shutdown_timeout)
            .finish()
    }
}

/// `[store]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The data dir (index and managed files).
    pub data_dir: PathBuf,
    /// Dirs whose files may be registered and which the store owns: their
    /// files are deleted when their last ref goes (unless registered
    /// `forget_only`).
    #[serde(deserialize_with = "paths_or_list")]
    pub owned_roots: Vec<PathBuf>,
    /// Dirs whose files may be registered but are never deleted.
    #[serde(deserialize_with = "paths_or_list")]
    pub shared_roots: Vec<PathBuf>,
    /// Largest upload.
    pub max_object_size: ByteSize,
    /// Most bytes one scope's uploads may add up to; unset: no limit.
    pub max_scope_bytes: Option<ByteSize>,
    /// Most bytes the managed dir may hold; unset: no limit.
    pub max_total_bytes: Option<ByteSize>,
    /// Managed files no ref names are removed once this old.
    pub orphan_grace: HumanDuration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(mediastore::DEFAULT_DATA_DIR),
            owned_roots: Vec::new(),
            shared_roots: Vec::new(),
            max_object_size: ByteSize(1 << 30),
            max_scope_bytes: None,
            max_total_bytes: None,
            orphan_grace: HumanDuration(std::time::Duration::from_secs(3600)),
        }
    }
}

/// `[cleaner]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CleanerSection {
    /// Sweep expired holds in the background.
    pub enabled: bool,
    /// Default max age of a hold (since made or renewed); `"0s"`: never.
    pub max_age: HumanDuration,
    /// Time between sweeps.
    pub interval: HumanDuration,
}

impl Default for CleanerSection {
    fn default() -> Self {
        Self {
            enabled: true,
            max_age: HumanDuration(std::time::Duration::from_secs(30 * 60)),
            interval: HumanDuration(std::time::Duration::from_secs(5 * 60)),
        }
    }
}

/// A scope rule's max age: a duration, or `"never"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ScopeAge {
    /// Holds live this long since made or renewed.
    After(HumanDuration),
    /// Holds never expire.
    Never,
}

impl<'de> Deserialize<'de> for ScopeAge {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.trim().eq_ignore_ascii_case("never") {
            return Ok(Self::Never);
        }
        HumanDuration::parse(&text)
            .map(Self::After)
            .map_err(serde::de::Error::custom)
    }
}

/// `[log]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug` or `trace`, optionally per target
    /// (`"info,mediastore=debug"`).
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
        }
    }
}

/// A list given as a list, or (from an environment variable) as one
/// comma-separated string.
fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        Raw::Many(v) => v,
    })
}

fn paths_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    Ok(string_or_list(d)?.into_iter().map(PathBuf::from).collect())
}

/// Values given on the command line; they win over the file and the
/// environment.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--metrics-listen`.
    pub metrics_listen: Option<String>,
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file, or an environment variable, is not valid.
    #[error("invalid config{}: {message}", .origin.as_ref().map(|o| format!(" in {o}")).unwrap_or_default())]
    Invalid {
        /// The file or variable at fault, when known.
        origin: Option<String>,
        /// What is wrong.
        message: String,
    },
}

fn invalid(origin: Option<&str>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        origin: origin.map(String::from),
        message: message.into(),
    }
}

impl Config {
    /// Loads the configuration: defaults, then the file (if any), then
    /// `MEDIASTORE__SECTION__KEY` variables from `env`, then `overrides`;
    /// and checks it.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                let origin = path.display().to_string();
                text.parse::<toml::Table>()
                    .map_err(|e| invalid(Some(&origin), e.to_string()))?
            }
            None => toml::Table::new(),
        };
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let parts: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
            let [section, key] = parts.as_slice() else {
                return Err(invalid(
                    Some(&name),
                    "expected MEDIASTORE__SECTION__KEY, e.g. MEDIASTORE__SERVER__LISTEN",
                ));
            };
            let section = table
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let Some(section) = section.as_table_mut() else {
                return Err(invalid(
                    Some(&name),
                    format!("[{}] is not a section", parts[0]),
                ));
            };
            section.insert(key.clone(), env_value(&value));
        }
        let mut config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| invalid(None, e.to_string()))?;
        if let Some(listen) = &overrides.listen {
            config.server.listen = listen.clone();
        }
        if let Some(dir) = &overrides.data_dir {
            config.store.data_dir = dir.clone();
        }
        if let Some(m) = &overrides.metrics_listen {
            config.server.metrics_listen = m.clone();
        }
        config.check()?;
        Ok(config)
    }

    /// The API address, parsed.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        parse_addr("server.listen", &self.server.listen)
    }

    /// The metrics address, if `/metrics` has its own listener.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.server.metrics_listen.trim().is_empty() {
            return Ok(None);
        }
        parse_addr("server.metrics_listen", &self.server.metrics_listen).map(Some)
    }

    /// Refuses what would be unsafe or cannot work.
    fn check(&self) -> Result<(), ConfigError> {
        let addr = self.listen_addr()?;
        self.metrics_addr()?;
        if !addr.ip().is_loopback() && self.server.tokens.is_empty() {
            return Err(invalid(
                None,
                format!(
                    "refusing to listen on {addr} without a token: anyone who can reach it could read and delete media. \
                     Set server.tokens (or MEDIASTORE__SERVER__TOKENS), or listen on 127.0.0.1"
                ),
            ));
        }
        if let Some(short) = self.server.tokens.iter().find(|t| t.len() < 16) {
            return Err(invalid(
                None,
                format!(
                    "a token of {} characters is too short to be a secret; use at least 16",
                    short.len()
                ),
            ));
        }
        if self.cleaner.enabled && self.cleaner.interval.0.is_zero() {
            return Err(invalid(None, "cleaner.interval must be above zero"));
        }
        Ok(())
    }
}

fn parse_addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.trim().parse().map_err(|_| {
        invalid(
            None,
            format!("{key} = {text:?} is not an address like \"127.0.0.1:8765\" or \"[::1]:8765\""),
        )
    })
}

/// An environment variable's value as a TOML value: booleans and arrays
/// are read as such; anything else is a string (numbers included: every
/// numeric key also takes a string with units).
fn env_value(text: &str) -> toml::Value {
    let t = text.trim();
    match t {
        "true" => return toml::Value::Boolean(true),
        "false" => return toml::Value::Boolean(false),
        _ => {}
    }
    if t.starts_with('[') {
        if let Some(v) = format!("v = {t}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut table| table.remove("v"))
        {
            return v;
        }
    }
    toml::Value::String(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str, env: &[(&str, &str)], o: &Overrides) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).unwrap();
        Config::load(
            Some(&path),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
            o,
        )
    }

    #[test]
    fn the_example_file_states_the_defaults() {
        let from_example = load(EXAMPLE, &[], &Overrides::default()).unwrap();
        assert_eq!(from_example, Config::default());
    }

    #[test]
    fn env_overrides_the_file_and_flags_override_env() {
        let c = load(
            "[server]\nlisten = \"127.0.0.1:1\"\n[store]\nmax_object_size = \"1MiB\"\n",
            &[
                ("MEDIASTORE__SERVER__LISTEN", "127.0.0.1:2"),
                ("MEDIASTORE__STORE__MAX_OBJECT_SIZE", "50MiB"),
                ("MEDIASTORE__CLEANER__ENABLED", "false"),
                ("MEDIASTORE__CLEANER__MAX_AGE", "7d"),
                (
                    "MEDIASTORE__SERVER__TOKENS",
                    "0123456789abcdef0,fedcba98765432100",
                ),
                ("UNRELATED", "x"),
            ],
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:2");
        assert_eq!(c.store.max_object_size, ByteSize(50 << 20));
        assert!(!c.cleaner.enabled);
        assert_eq!(c.cleaner.max_age.0.as_secs(), 7 * 86400);
        assert_eq!(c.server.tokens.len(), 2);
        let c = load(
            "",
            &[("MEDIASTORE__SERVER__LISTEN", "127.0.0.1:2")],
            &Overrides {
                listen: Some("127.0.0.1:3".into()),
                data_dir: Some("/srv/media".into()),
                metrics_listen: None,
            },
        )
        .unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:3");
        assert_eq!(c.store.data_dir, PathBuf::from("/srv/media"));
    }

    #[test]
    fn typos_and_bad_values_are_refused_with_their_origin() {
        let o = Overrides::default();
        let e = load("[server]\nlisten_on = \"x\"\n", &[], &o).unwrap_err();
        assert!(e.to_string().contains("listen_on"), "{e}");
        let e = load("", &[("MEDIASTORE__STORE__MAX_OBJECT_SIZE", "lots")], &o).unwrap_err();
        assert!(e.to_string().contains("lots"), "{e}");
        let e = load("", &[("MEDIASTORE__LISTEN", "x")], &o).unwrap_err();
        assert!(e.to_string().contains("MEDIASTORE__LISTEN"), "{e}");
        let e = load("[server\n", &[], &o).unwrap_err();
        assert!(e.to_string().contains("c.toml"), "{e}");
        let e = load("[scopes]\n\"session:\" = \"someday\"\n", &[], &o).unwrap_err();
        assert!(e.to_string().contains("someday"), "{e}");
    }

    #[test]
    fn a_public_address_needs_a_long_token() {
        let o = Overrides::default();
        let e = load("[server]\nlisten = \"0.0.0.0:8765\"\n", &[], &o).unwrap_err();
        assert!(e.to_string().contains("without a token"), "{e}");
        let e = load(
            "[server]\nlisten = \"0.0.0.0:8765\"\ntokens = [\"short\"]\n",
            &[],
            &o,
        )
        .unwrap_err();
        assert!(e.to_string().contains("too short"), "{e}");
        let ok = load(
            "[server]\nlisten = \"0.0.0.0:8765\"\ntokens = [\"a-long-enough-secret\"]\n",
            &[],
            &o,
        )
        .unwrap();
        // Secrets never reach logs.
        let shown = format!("{ok:?}");
        assert!(!shown.contains("a-long-enough-secret"), "{shown}");
        assert!(shown.contains("1 redacted"), "{shown}");
    }

    #[test]
    fn scope_rules_take_durations_or_never() {
        let c = load(
            "[scopes]\n\"session:\" = \"7d\"\n\"pinned:\" = \"never\"\n",
            &[],
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(
            c.scopes["session:"],
            ScopeAge::After(HumanDuration(std::time::Duration::from_secs(7 * 86400)))
        );
        assert_eq!(c.scopes["pinned:"], ScopeAge::Never);
    }
}
