//! Reading JSON configuration files (Hugging Face `config.json`, PEFT `adapter_config.json`) with
//! errors that name the file and the key.
//!
//! Configs are read key by key from a JSON object rather than through a serde struct, because
//! Hugging Face configs spell the same field several ways (BLOOM's `n_embed`/`hidden_size`), unknown
//! keys must be tolerated, and a serde type error does not say which key was wrong.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// Why a configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The system error.
        source: std::io::Error,
    },
    /// The file is absent.
    #[error("{path}: not found ({what})")]
    MissingFile {
        /// The file looked for.
        path: PathBuf,
        /// What it should have held.
        what: &'static str,
    },
    /// The file does not parse.
    #[error("{path}: malformed JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        source: serde_json::Error,
    },
    /// A required key is absent.
    #[error("{path}: missing key `{key}`")]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The key (or the accepted spellings, separated by " or ").
        key: String,
    },
    /// A key has a value of the wrong type or out of range.
    #[error("{path}: key `{key}` {message}")]
    InvalidValue {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What was expected and what was found.
        message: String,
    },
}

type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// A parsed JSON object, remembering its path for error messages.
#[derive(Debug, Clone)]
pub struct JsonConfig {
    path: PathBuf,
    map: Map<String, Value>,
}

impl JsonConfig {
    /// Reads and parses `path`; `what` says what the file holds, for a missing-file error.
    pub fn from_file(path: impl AsRef<Path>, what: &'static str) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let text = std::fs::read_to_string(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ConfigError::MissingFile {
                    path: path.clone(),
                    what,
                }
            } else {
                ConfigError::Io {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        Self::from_str(&text, path)
    }

    /// An already parsed object, reporting errors against `path`.
    pub fn from_map(map: Map<String, Value>, path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            map,
        }
    }

    /// Parses `text`, reporting errors against `path`.
    pub fn from_str(text: &str, path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let value: Value = serde_json::from_str(text).map_err(|source| ConfigError::Json {
            path: path.clone(),
            source,
        })?;
        match value {
            Value::Object(map) => Ok(Self { path, map }),
            other => Err(ConfigError::InvalidValue {
                path,
                key: "(root)".into(),
                message: format!("must be a JSON object, found {}", kind(&other)),
            }),
        }
    }

    /// The file this config came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn invalid(&self, key: &str, expected: &str, found: &Value) -> ConfigError {
        ConfigError::InvalidValue {
            path: self.path.clone(),
            key: key.to_string(),
            message: format!("must be {expected}, found {}", kind(found)),
        }
    }

    /// The first of `keys` that is present and not null, with the key it was found under.
    fn lookup(&self, keys: &[&str]) -> Option<(&str, &Value)> {
        keys.iter().find_map(|k| {
            self.map
                .get_key_value(*k)
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.as_str(), v))
        })
    }

    fn missing(&self, keys: &[&str]) -> ConfigError {
        ConfigError::MissingKey {
            path: self.path.clone(),
            key: keys.join("` or `"),
        }
    }

    /// A positive integer under any of `keys` (aliases), required.
    pub fn usize(&self, keys: &[&str]) -> Result<usize> {
        self.opt_usize(keys)?.ok_or_else(|| self.missing(keys))
    }

    /// A positive integer under any of `keys`, if present.
    pub fn opt_usize(&self, keys: &[&str]) -> Result<Option<usize>> {
        match self.lookup(keys) {
            None => Ok(None),
            Some((key, value)) => match value.as_u64() {
                Some(v) if v > 0 => Ok(Some(v as usize)),
                _ => Err(self.invalid(key, "a positive integer", value)),
            },
        }
    }

    /// A finite number under any of `keys`, if present.
    pub fn opt_f64(&self, keys: &[&str]) -> Result<Option<f64>> {
        match self.lookup(keys) {
            None => Ok(None),
            Some((key, value)) => match value.as_f64() {
                Some(v) if v.is_finite() => Ok(Some(v)),
                _ => Err(self.invalid(key, "a number", value)),
            },
        }
    }

    /// A finite number above zero under any of `keys`, if present (an epsilon, a RoPE base).
    pub fn opt_positive_f64(&self, keys: &[&str]) -> Result<Option<f64>> {
        match self.lookup(keys) {
            None => Ok(None),
            Some((key, value)) => match value.as_f64() {
                Some(v) if v.is_finite() && v > 0.0 => Ok(Some(v)),
                _ => Err(self.invalid(key, "a number above zero", value)),
            },
        }
    }

    /// A boolean under `key`, or `default`.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.lookup(&[key]) {
            None => Ok(default),
            Some((key, value)) => value
                .as_bool()
                .ok_or_else(|| self.invalid(key, "true or false", value)),
        }
    }

    /// A string under `key`, if present.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.lookup(&[key]) {
            None => Ok(None),
            Some((key, value)) => value
                .as_str()
                .map(Some)
                .ok_or_else(|| self.invalid(key, "a string", value)),
        }
    }

    /// A list of strings under `key` (absent or null: `None`).
    pub fn opt_str_list(&self, key: &str) -> Result<Option<Vec<String>>> {
        match self.lookup(&[key]) {
            None => Ok(None),
            Some((key, value)) => value
                .as_array()
                .and_then(|items| {
                    items
                        .iter()
                        .map(|v| v.as_str().map(str::to_string))
                        .collect::<Option<Vec<_>>>()
                })
                .map(Some)
                .ok_or_else(|| self.invalid(key, "a list of strings", value)),
        }
    }

    /// Token ids under `key`: one integer or a list of them (as `eos_token_id` may be).
    pub fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        let as_id = |v: &Value| v.as_u64().and_then(|v| u32::try_from(v).ok());
        match self.lookup(&[key]) {
            None => Ok(Vec::new()),
            Some((key, Value::Array(items))) => items
                .iter()
                .map(|v| as_id(v).ok_or_else(|| self.invalid(key, "a list of token ids", v)))
                .collect(),
            Some((key, value)) => as_id(value)
                .map(|id| vec![id])
                .ok_or_else(|| self.invalid(key, "a token id or a list of them", value)),
        }
    }

    /// A nested object under `key`, as its own config (same path), if present.
    pub fn opt_object(&self, key: &str) -> Result<Option<JsonConfig>> {
        match self.lookup(&[key]) {
            None => Ok(None),
            Some((_, Value::Object(map))) => Ok(Some(JsonConfig {
                path: self.path.clone(),
                map: map.clone(),
            })),
            Some((key, value)) => Err(self.invalid(key, "an object", value)),
        }
    }

    /// The whole object as a `T` (serde), each key checked by `T`'s own deserializers: keys `T`
    /// does not know are tolerated, a value that does not deserialize names its key, and a
    /// required key that is absent is a [`ConfigError::MissingKey`].
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_path_to_error::deserialize(Value::Object(self.map.clone())).map_err(|error| {
            let key = error.path().to_string();
            let message = error.into_inner().to_string();
            // serde's wording for an absent field of the object itself.
            if let Some(missing) = message
                .strip_prefix("missing field `")
                .and_then(|m| m.strip_suffix('`'))
                && key == "."
            {
                return self.missing(&[missing]);
            }
            ConfigError::InvalidValue {
                path: self.path.clone(),
                key,
                message,
            }
        })
    }

    /// Error for a key whose value is well-typed but not supported.
    pub fn unsupported(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::InvalidValue {
            path: self.path.clone(),
            key: key.to_string(),
            message: message.into(),
        }
    }
}

/// `deserialize_with` helpers for config fields, with the messages [`JsonConfig`]'s own
/// accessors give (`must be a positive integer, found string "64"`).
pub mod fields {
    use serde::de::{Deserialize, Deserializer, Error};
    use serde_json::Value;

    use super::kind;

    /// A positive integer.
    pub fn positive<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        let value = Value::deserialize(d)?;
        match value.as_u64() {
            Some(v) if v > 0 => usize::try_from(v).map_err(D::Error::custom),
            _ => Err(D::Error::custom(format!(
                "must be a positive integer, found {}",
                kind(&value)
            ))),
        }
    }

    /// A positive integer, or null / absent (with `#[serde(default)]`).
    pub fn opt_positive<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
        match Option::<Value>::deserialize(d)? {
            None | Some(Value::Null) => Ok(None),
            Some(value) => positive(value).map(Some).map_err(D::Error::custom),
        }
    }

    /// A probability of dropping, in [0, 1); null reads as 0.
    pub fn dropout<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        let value = Option::<Value>::deserialize(d)?.unwrap_or(Value::Null);
        match value.as_f64() {
            Some(p) if (0.0..1.0).contains(&p) => Ok(p),
            None if value.is_null() => Ok(0.0),
            _ => Err(D::Error::custom(format!(
                "must be a number in [0, 1), found {}",
                kind(&value)
            ))),
        }
    }
}

fn kind(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_and_errors_name_the_key() {
        let cfg = JsonConfig::from_str(
            r#"{"n_embed": 64, "n_head": "four", "eos_token_id": [1, 2], "x": null}"#,
            "config.json",
        )
        .unwrap();
        assert_eq!(cfg.usize(&["hidden_size", "n_embed"]).unwrap(), 64);
        let err = cfg.usize(&["num_attention_heads", "n_head"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "config.json: key `n_head` must be a positive integer, found string \"four\""
        );
        let err = cfg.usize(&["n_layer", "num_hidden_layers"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "config.json: missing key `n_layer` or `num_hidden_layers`"
        );
        assert_eq!(cfg.token_ids("eos_token_id").unwrap(), vec![1, 2]);
        assert_eq!(cfg.opt_usize(&["x"]).unwrap(), None);
    }

    #[test]
    fn malformed_json_reports_the_file() {
        let err = JsonConfig::from_str("{\"hidden_size\": 64,", "dir/config.json").unwrap_err();
        assert!(matches!(err, ConfigError::Json { .. }));
        assert!(
            err.to_string()
                .starts_with("dir/config.json: malformed JSON"),
            "{err}"
        );
    }
}
