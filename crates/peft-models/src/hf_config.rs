//! Hugging Face `config.json` files, read with peft-core's JSON reader so that every error names
//! the file and the key (errors are [`ConfigError`], wrapped in `ModelError::Config`).

pub use peft_core::json_config::{ConfigError, JsonConfig as HfConfig};
