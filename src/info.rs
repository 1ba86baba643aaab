//! `peft info`: PEFT's trainable-parameter line for a method on a model, from `config.json` alone
//! (no weights are read or allocated).

use peft_bitfit::PatternError;
use peft_core::TrainableParameters;
use peft_models::AutoConfig;

use crate::AutoAdapterConfig;

/// What `peft info` prints for `adapter` on a model of `config`: trainable parameters and all
/// parameters (the adapter's included, a tied head counted once), as PEFT counts them.
///
/// # Errors
///
/// If a BitFit `bias_pattern` is not a valid regular expression.
pub fn trainable_parameters(
    config: &AutoConfig,
    adapter: &AutoAdapterConfig,
) -> Result<TrainableParameters, PatternError> {
    let sizes = config.parameter_sizes();
    let base: usize = sizes.iter().map(|(_, n)| n).sum();
    let adapter = match adapter {
        AutoAdapterConfig::PromptTuning(c) => c.num_params(),
        AutoAdapterConfig::PTuning(c) => c.num_params(),
        AutoAdapterConfig::PrefixTuning(c) => c.num_params(),
        AutoAdapterConfig::BitFit(c) => {
            let trainable = c
                .init()?
                .count(sizes.iter().map(|(name, n)| (name.as_str(), *n)));
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
