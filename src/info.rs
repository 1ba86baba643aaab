//! `peft info`: PEFT's trainable-parameter line for a method on a model, from `config.json` alone
//! (no weights are read or allocated).

use peft_bitfit::{BitFitConfig, PatternError};
use peft_core::TrainableParameters;
use peft_models::AutoConfig;
use peft_prefix::PrefixTuningConfig;
use peft_prompt::PromptTuningConfig;
use peft_ptuning::{EncoderType, PTuningConfig};

/// A method and its size-determining options.
#[derive(Debug, Clone, PartialEq)]
pub enum MethodSpec {
    /// Prompt tuning with `num_virtual_tokens`.
    PromptTuning {
        /// Virtual tokens.
        num_virtual_tokens: usize,
    },
    /// P-tuning.
    PTuning {
        /// Virtual tokens.
        num_virtual_tokens: usize,
        /// MLP or LSTM.
        encoder: EncoderType,
        /// Encoder width (default: hidden size).
        encoder_hidden_size: Option<usize>,
        /// LSTM layers.
        encoder_num_layers: usize,
    },
    /// Prefix tuning (`projection`) or P-tuning v2 (no projection).
    Prefix {
        /// Prefix positions per layer.
        num_virtual_tokens: usize,
        /// Prefix Tuning's projection.
        projection: bool,
        /// Projection width (default: the GQA-reduced token_dim).
        encoder_hidden_size: Option<usize>,
    },
    /// BitFit with an optional bias pattern.
    BitFit {
        /// Regular expression narrowing the biases.
        bias_pattern: Option<String>,
    },
}

/// What `peft info` prints for `method` on a model of `config`: trainable parameters and all
/// parameters (the adapter's included, a tied head counted once), as PEFT counts them.
///
/// # Errors
///
/// If a BitFit `bias_pattern` is not a valid regular expression.
pub fn trainable_parameters(
    config: &AutoConfig,
    method: &MethodSpec,
) -> Result<TrainableParameters, PatternError> {
    let sizes = config.parameter_sizes();
    let base: usize = sizes.iter().map(|(_, n)| n).sum();
    let geometry = config.geometry();
    let adapter = match method {
        MethodSpec::PromptTuning { num_virtual_tokens } => {
            PromptTuningConfig::new(*num_virtual_tokens, geometry.hidden_size).num_params()
        }
        MethodSpec::PTuning {
            num_virtual_tokens,
            encoder,
            encoder_hidden_size,
            encoder_num_layers,
        } => PTuningConfig::for_model(*num_virtual_tokens, &geometry)
            .with_encoder_reparameterization_type(*encoder)
            .with_encoder_hidden_size(*encoder_hidden_size)
            .with_encoder_num_layers(*encoder_num_layers)
            .num_params(),
        MethodSpec::Prefix {
            num_virtual_tokens,
            projection,
            encoder_hidden_size,
        } => PrefixTuningConfig::for_model(*num_virtual_tokens, &geometry)
            .with_prefix_projection(*projection)
            .with_encoder_hidden_size(*encoder_hidden_size)
            .num_params(),
        MethodSpec::BitFit { bias_pattern } => {
            let bitfit = BitFitConfig::new()
                .with_bias_pattern(bias_pattern.clone())
                .init()?;
            let trainable = bitfit.count(sizes.iter().map(|(name, n)| (name.as_str(), *n)));
            return Ok(TrainableParameters {
                trainable,
                all: base,
            });
        }
    };
    Ok(TrainableParameters {
        trainable: adapter,
        all: base + adapter,
    })
}
