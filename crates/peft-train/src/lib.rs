//! Training for peft-burn: everything a run needs besides the model and the adapter.
//!
//! - [`data`]: JSONL fine-tuning data (prompt/completion, instruction, text), tokenized with the
//!   loss on the target only, truncated, shuffled by seed, padded per batch.
//! - [`trainer`]: the training loop ([`train`]: AdamW, warmup + decay, accumulation, global-norm
//!   clipping, evaluation, NaN guard, `metrics.jsonl`).
//! - [`optim`]: PyTorch's AdamW, its state by Hugging Face parameter name.
//! - [`checkpoint`]: atomic, resumable checkpoints of the adapter and optimizer only.
//!
//! It depends on `peft-core` only (the model contract and [`peft_core::PeftModel`]); no method
//! and no model family. Library code never prints: progress goes to a [`TrainingObserver`].
//! Errors name the configuration fields ([`TrainingConfig`], [`data::TokenizeOptions`]), not the
//! flags of any command line.
#![warn(missing_docs)]

pub mod checkpoint;
pub mod data;
pub mod optim;
pub mod trainer;

pub use optim::{AdamW, AdamWConfig};
pub use trainer::{
    EvalMetrics, GradientSync, METRICS_FILE, MetricsLine, Prediction, StepMetrics, TrainError,
    TrainOutcome, TrainingConfig, TrainingObserver, TrainingPlan, TrainingRun, predict, train,
};
