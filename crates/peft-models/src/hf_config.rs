//! Hugging Face `config.json` files, read with peft-core's JSON reader so that every error names
//! the file and the key.

pub use peft_core::json_config::{ConfigError, JsonConfig as HfConfig};

use crate::error::ModelError;

impl From<ConfigError> for ModelError {
    fn from(err: ConfigError) -> Self {
        match err {
            ConfigError::Io { path, source } => ModelError::Io { path, source },
            ConfigError::MissingFile { path, what } => ModelError::MissingFile { path, what },
            ConfigError::Json { path, source } => ModelError::Json { path, source },
            ConfigError::MissingKey { path, key } => ModelError::MissingKey { path, key },
            ConfigError::InvalidValue { path, key, message } => {
                ModelError::InvalidValue { path, key, message }
            }
        }
    }
}
