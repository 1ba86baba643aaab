//! Errors of peft-models: every one names the file and, where it applies, the key or tensor.

use std::path::PathBuf;

/// Why a model directory, config or checkpoint could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `config.json`, `generation_config.json` or a shard index is missing, malformed or has a
    /// wrong value (names the file and key).
    #[error(transparent)]
    Config(#[from] peft_core::json_config::ConfigError),
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The system error.
        source: std::io::Error,
    },
    /// A required file is absent.
    #[error("{path}: not found ({what})")]
    MissingFile {
        /// The file looked for.
        path: PathBuf,
        /// What it should have held.
        what: &'static str,
    },
    /// A model argument that is no directory, read as a Hub id, is not in the local Hub cache.
    #[error(
        "`{id}` (revision {revision}) is neither a directory nor a model in the Hugging Face \
         cache: {searched}: {why}"
    )]
    NotInCache {
        /// The Hub id, `ORG/NAME`.
        id: String,
        /// The revision asked for.
        revision: String,
        /// The cache path searched.
        searched: PathBuf,
        /// What is missing there.
        why: String,
    },
    /// `model_type` names an architecture this crate does not implement.
    #[error("{path}: unsupported model_type `{model_type}` (supported: {supported})")]
    UnsupportedModelType {
        /// The config file.
        path: PathBuf,
        /// The value found.
        model_type: String,
        /// The values that would be read, comma-separated.
        supported: String,
    },
    /// A safetensors file's header or data is not valid.
    #[error("{path}: invalid safetensors file: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The model needs a tensor the checkpoint lacks.
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor {
        /// The checkpoint (file or directory).
        path: PathBuf,
        /// The Hugging Face tensor name.
        name: String,
    },
    /// The checkpoint holds a tensor the model has no place for.
    #[error("{path}: unexpected tensor `{name}` (not part of this model; is config.json right?)")]
    UnexpectedTensor {
        /// The checkpoint file.
        path: PathBuf,
        /// The tensor name.
        name: String,
    },
    /// A tensor's shape differs from what the config implies.
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?} from config.json")]
    ShapeMismatch {
        /// The checkpoint file.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// Shape implied by the config (PyTorch layout).
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// A tensor holds NaN or infinity.
    #[error("{path}: tensor `{name}` holds NaN or infinity (element {index})")]
    NonFinite {
        /// The checkpoint file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// Flat index of the first such element.
        index: usize,
    },
    /// A tensor is stored in a dtype other than F32, F16 or BF16.
    #[error("{path}: tensor `{name}` has dtype {dtype}; only F32, F16 and BF16 are supported")]
    UnsupportedDtype {
        /// The checkpoint file.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The dtype found.
        dtype: String,
    },
    /// `tokenizer.json` could not be loaded or used.
    #[error("{path}: tokenizer error: {message}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// The tokenizers crate's message.
        message: String,
    },
    /// A chat template that cannot be read, parsed or rendered (a `raise_exception` included).
    #[error("{path}: chat template: {message}")]
    ChatTemplate {
        /// The template's file (`chat_template.jinja` or `tokenizer_config.json`).
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A GGUF file that is malformed, truncated, or holds what the loader does not read.
    #[error("{path}: {message}")]
    Gguf {
        /// The GGUF file.
        path: PathBuf,
        /// What is wrong, naming the key or tensor.
        message: String,
    },
    /// The input does not fit the model (ids, mask, length).
    #[error(transparent)]
    Input(#[from] peft_core::CoreError),
}

/// Result with [`ModelError`].
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
