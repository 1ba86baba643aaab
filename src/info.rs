//! `peft info`: PEFT's trainable-parameter line for a method on a model, from `config.json` alone
//! (no weights are read or allocated).

use peft_core::TrainableParameters;
use peft_core::adapter_config::AdapterError;
use peft_models::AutoConfig;

use crate::AutoAdapterConfig;

/// What `peft info` prints for `adapter` on a model of `config`: trainable parameters and all
/// parameters (the adapter's included, a tied head counted once), as PEFT counts them.
///
/// # Errors
///
/// A configuration that cannot be applied to the model (a BitFit `bias_pattern` that is not a
/// valid regular expression), naming the field.
pub fn trainable_parameters(
    config: &AutoConfig,
    adapter: &AutoAdapterConfig,
) -> Result<TrainableParameters, AdapterError> {
    adapter.trainable_parameters(&config.base_shape())
}
