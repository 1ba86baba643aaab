//! Errors of peft-core.

/// What can go wrong in peft-core when a caller's input does not fit the model.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A token id is not a row of the embedding matrix.
    #[error(
        "token id {id} at row {row}, position {position} is out of range for a vocabulary of {vocab_size}"
    )]
    TokenOutOfRange {
        /// The offending id.
        id: i64,
        /// Batch row.
        row: usize,
        /// Position in the row.
        position: usize,
        /// The model's vocabulary size.
        vocab_size: usize,
    },
    /// A sequence (virtual tokens, prompt and new tokens together) is longer than the model allows.
    #[error("sequence of {length} tokens exceeds the model's max_position_embeddings ({max})")]
    SequenceTooLong {
        /// Tokens the request needs.
        length: usize,
        /// The model's limit.
        max: usize,
    },
    /// Rows of a batch, or a mask and its ids, disagree in shape.
    #[error("{what}: {message}")]
    Shape {
        /// Which input.
        what: &'static str,
        /// What does not fit.
        message: String,
    },
    /// An attention mask holds something other than 0 and 1.
    #[error(
        "attention_mask must hold only 0 and 1; found {value} at row {row}, position {position}"
    )]
    BadMask {
        /// The value found.
        value: i64,
        /// Batch row.
        row: usize,
        /// Position in the row.
        position: usize,
    },
    /// A generation setting is out of its domain.
    #[error("generation setting `{key}` {message}")]
    BadGenerationConfig {
        /// The setting.
        key: &'static str,
        /// Why it is rejected.
        message: String,
    },
}
