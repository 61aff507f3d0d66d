//! One config loader for every binary: defaults < TOML file < environment < flags.
//!
//! * the file is read exactly at the given path (figment's `Toml::file` would also search
//!   parent directories);
//! * environment variables carry a per-binary prefix (`UPDRAFT_AGENT_`, `UPDRAFT_DISPATCHER_`)
//!   and use `__` for nesting (`UPDRAFT_AGENT_NATS__URL` sets `nats.url`);
//! * flags are `--set key=value` pairs (the value is read as TOML, else as a string), so
//!   every setting has exactly one spelling: its key.
//!
//! Config structs refuse unknown keys, so a typo is an error that names the key and where it
//! came from, never a silently ignored setting.

use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Config that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file given does not exist.
    #[error("config file {0} not found")]
    FileMissing(String),
    /// A `--set` flag is not `key=value`.
    #[error("--set {0}: expected key=value")]
    BadFlag(String),
    /// A value is wrong: figment's message names the key and its source.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// The values parse but do not make sense together.
    #[error("invalid configuration: {0}")]
    Semantic(String),
}

/// Where settings come from, besides the defaults.
#[derive(Debug, Clone, Default)]
pub struct Sources<'a> {
    /// A TOML file.
    pub file: Option<&'a Path>,
    /// Environment prefix (`UPDRAFT_AGENT_`).
    pub env_prefix: &'a str,
    /// `--set key=value` flags, in order.
    pub sets: &'a [String],
}

/// Parses `key=value` flags into a nested dictionary (`a.b=1` → `{a: {b: 1}}`).
pub fn parse_sets(sets: &[String]) -> Result<Dict, ConfigError> {
    let mut root = Dict::new();
    for s in sets {
        let (key, raw) = s
            .split_once('=')
            .ok_or_else(|| ConfigError::BadFlag(s.clone()))?;
        let key = key.trim();
        if key.is_empty() {
            return Err(ConfigError::BadFlag(s.clone()));
        }
        let value = parse_value(raw.trim());
        let parts: Vec<&str> = key.split('.').collect();
        insert(&mut root, &parts, value);
    }
    Ok(root)
}

fn parse_value(raw: &str) -> Value {
    // a TOML scalar or array (`3`, `true`, `"x"`, `[1, 2]`); anything else is a string
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(t) => t
            .get("v")
            .and_then(|v| Value::serialize(v).ok())
            .unwrap_or_else(|| Value::from(raw.to_string())),
        Err(_) => Value::from(raw.to_string()),
    }
}

fn insert(dict: &mut Dict, parts: &[&str], value: Value) {
    match parts {
        [] => {}
        [last] => {
            dict.insert((*last).to_string(), value);
        }
        [first, rest @ ..] => {
            let entry = dict
                .entry((*first).to_string())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, inner) = entry {
                insert(inner, rest, value);
            } else {
                let mut inner = Dict::new();
                insert(&mut inner, rest, value);
                *entry = Value::from(inner);
            }
        }
    }
}

/// The `--set` flags as a figment provider, named so errors say where a value came from.
struct Flags(Dict);

impl figment::Provider for Flags {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("--set flags")
    }

    fn data(&self) -> Result<figment::value::Map<figment::Profile, Dict>, figment::Error> {
        Ok(figment::Profile::Default.collect(self.0.clone()))
    }
}

/// The layered figment (exposed so binaries can print where a value came from).
pub fn figment<T: Serialize + Default>(src: &Sources<'_>) -> Result<Figment, ConfigError> {
    let mut fig = Figment::from(Serialized::defaults(T::default()));
    if let Some(p) = src.file {
        if !p.exists() {
            return Err(ConfigError::FileMissing(p.display().to_string()));
        }
        fig = fig.merge(Toml::file_exact(p));
    }
    if !src.env_prefix.is_empty() {
        fig = fig.merge(Env::prefixed(src.env_prefix).split("__"));
    }
    let sets = parse_sets(src.sets)?;
    if !sets.is_empty() {
        fig = fig.merge(Flags(sets));
    }
    Ok(fig)
}

/// Loads `T` from the layers.
pub fn load<T: Serialize + DeserializeOwned + Default>(
    src: &Sources<'_>,
) -> Result<T, ConfigError> {
    figment::<T>(src)?
        .extract()
        .map_err(|e| ConfigError::Invalid(describe(&e)))
}

/// Keys whose values are secrets: shown as `<redacted>` by [`render`].
pub const SECRET_KEYS: &[&str] = &["password", "token", "api_token"];

/// The configuration as TOML (what `--print-config` shows), secrets redacted. Unset optional
/// keys are absent (TOML has no null).
pub fn render<T: Serialize>(cfg: &T) -> Result<String, ConfigError> {
    let mut v = toml::Value::try_from(cfg).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    redact(&mut v);
    toml::to_string_pretty(&v).map_err(|e| ConfigError::Invalid(e.to_string()))
}

fn redact(v: &mut toml::Value) {
    if let toml::Value::Table(t) = v {
        for (k, val) in t.iter_mut() {
            if SECRET_KEYS.contains(&k.as_str()) && val.is_str() {
                *val = toml::Value::String("<redacted>".into());
            } else {
                redact(val);
            }
        }
    }
}

/// Every leaf key of a config as a dotted path (`nats.url`); arrays of tables contribute the
/// keys of their first element (`flavors.name`). For tests that check a documented example
/// names every key.
pub fn leaf_keys<T: Serialize>(cfg: &T) -> Vec<String> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
        match v {
            toml::Value::Table(t) if !t.is_empty() || prefix.is_empty() => {
                for (k, val) in t {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&p, val, out);
                }
            }
            toml::Value::Array(a) if a.first().is_some_and(toml::Value::is_table) => {
                walk(prefix, &a[0], out);
            }
            _ => out.push(prefix.to_string()),
        }
    }
    let mut out = Vec::new();
    if let Ok(v) = toml::Value::try_from(cfg) {
        walk("", &v, &mut out);
    }
    out
}

/// The dotted keys an annotated TOML example names, set or commented out (`# key = ...`),
/// under the tables its headers open, and those tables themselves (commented headers count
/// too).
pub fn documented_keys(text: &str) -> std::collections::BTreeSet<String> {
    let mut table = String::new();
    let mut out = std::collections::BTreeSet::new();
    for line in text.lines() {
        let l = line.trim_start_matches([' ', '#']).trim();
        if let Some(h) = l.strip_prefix('[') {
            table = h
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
            out.insert(table.clone());
            continue;
        }
        let Some((key, _)) = l.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        out.insert(if table.is_empty() {
            key.to_string()
        } else {
            format!("{table}.{key}")
        });
    }
    out
}

fn describe(e: &figment::Error) -> String {
    // figment's Display already says "for key `x` in <source>"; list every error, not the first
    e.clone()
        .into_iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's own closure signature
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::time::Duration;

    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        url: String,
        retries: u32,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Cfg {
        name: String,
        #[serde(with = "humantime_serde")]
        interval: Duration,
        inner: Inner,
        tags: Vec<String>,
    }

    impl Default for Cfg {
        fn default() -> Self {
            Cfg {
                name: "dflt".into(),
                interval: Duration::from_secs(5),
                inner: Inner {
                    url: "nats://x".into(),
                    retries: 3,
                },
                tags: vec![],
            }
        }
    }

    #[test]
    fn layers_apply_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "name = \"file\"\ninterval = \"10s\"\n[inner]\nurl = \"nats://file\"\n",
            )?;
            jail.set_env("UPDRAFT_T_INNER__URL", "nats://env");
            jail.set_env("UPDRAFT_T_NAME", "env");
            let sets = vec![
                "name=flag".to_string(),
                "inner.retries=7".to_string(),
                "tags=[\"a\",\"b\"]".to_string(),
            ];
            let src = Sources {
                file: Some(Path::new("c.toml")),
                env_prefix: "UPDRAFT_T_",
                sets: &sets,
            };
            let c: Cfg = load(&src).map_err(|e| e.to_string())?;
            assert_eq!(c.name, "flag");
            assert_eq!(c.interval, Duration::from_secs(10));
            assert_eq!(c.inner.url, "nats://env");
            assert_eq!(c.inner.retries, 7);
            assert_eq!(c.tags, vec!["a", "b"]);
            Ok(())
        });
    }

    #[test]
    fn errors_name_key_and_source() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[inner]\nretries = \"many\"\n")?;
            let src = Sources {
                file: Some(Path::new("c.toml")),
                env_prefix: "UPDRAFT_T_",
                sets: &[],
            };
            let e = load::<Cfg>(&src).unwrap_err().to_string();
            assert!(e.contains("inner.retries"), "{e}");
            assert!(e.contains("c.toml"), "{e}");
            jail.create_file("d.toml", "nmae = \"typo\"\n")?;
            let src = Sources {
                file: Some(Path::new("d.toml")),
                env_prefix: "",
                sets: &[],
            };
            let e = load::<Cfg>(&src).unwrap_err().to_string();
            assert!(e.contains("unknown field") && e.contains("nmae"), "{e}");
            jail.set_env("UPDRAFT_T_INTERVAL", "soon");
            let src = Sources {
                file: None,
                env_prefix: "UPDRAFT_T_",
                sets: &[],
            };
            let e = load::<Cfg>(&src).unwrap_err().to_string();
            assert!(e.contains("INTERVAL") && e.contains("UPDRAFT_T_"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn keys_of_configs_and_of_annotated_examples() {
        let keys = leaf_keys(&Cfg::default());
        assert!(keys.contains(&"inner.url".to_string()), "{keys:?}");
        assert!(keys.contains(&"interval".to_string()));
        let doc =
            "name = \"x\"\n# interval = \"5s\"\n[inner]\nurl = \"y\" # c\n# [[more]]\n# a = 1\n";
        let d = documented_keys(doc);
        for k in ["name", "interval", "inner.url", "more.a"] {
            assert!(d.contains(k), "{k} in {d:?}");
        }
    }

    #[test]
    fn render_round_trips_and_redacts_secrets() {
        let c = Cfg::default();
        let text = render(&c).unwrap();
        let back: Cfg = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
        #[derive(Serialize)]
        struct WithSecret {
            nats: Nats,
        }
        #[derive(Serialize)]
        struct Nats {
            url: String,
            password: String,
        }
        let s = render(&WithSecret {
            nats: Nats {
                url: "nats://a".into(),
                password: "hunter2".into(),
            },
        })
        .unwrap();
        assert!(s.contains("<redacted>") && !s.contains("hunter2"), "{s}");
    }

    #[test]
    fn missing_file_and_bad_flags() {
        let src = Sources {
            file: Some(Path::new("/nonexistent/x.toml")),
            env_prefix: "",
            sets: &[],
        };
        assert!(matches!(
            load::<Cfg>(&src),
            Err(ConfigError::FileMissing(_))
        ));
        let sets = vec!["novalue".to_string()];
        let src = Sources {
            file: None,
            env_prefix: "",
            sets: &sets,
        };
        assert!(matches!(load::<Cfg>(&src), Err(ConfigError::BadFlag(_))));
    }
}
