//! What a method offers beyond [`Adapter`] so that a list of methods (the `peft` facade's table)
//! can read, write, count, configure and name it without knowing it: its PEFT type, its
//! configuration type, and its files read given only what the base offers ([`BaseShape`]).
//!
//! A method outside the workspace needs only [`Adapter`] to train, save and load through
//! [`crate::PeftModel`]; [`Method`] is what joins it to the facade's `AutoAdapter`, `peft info`,
//! `peft export` and `--method`.

use std::fmt::Debug;
use std::path::Path;

use burn::prelude::*;
use serde_json::{Map, Value};

use crate::adapter::Adapter;
use crate::adapter_config::AdapterError;
use crate::json_config::{ConfigError, JsonConfig};
use crate::model::{CausalLm, ModelGeometry};
use crate::params::{TrainableParameters, param_infos};

/// What a base model offers an adapter's files and counts: its geometry and its parameters'
/// Hugging Face names and shapes. Taken from a loaded model ([`BaseShape::of`]) or from
/// `config.json` alone (peft-models' `AutoConfig::parameter_shapes`), so reading, exporting and
/// counting an adapter need no weights.
#[derive(Debug, Clone, PartialEq)]
pub struct BaseShape {
    /// Sizes adapters shape themselves by.
    pub geometry: ModelGeometry,
    /// Every parameter as (Hugging Face name, shape as the model holds it: burn's `[in, out]`
    /// for a Linear weight, PyTorch's transpose); a tied weight listed once.
    pub parameters: Vec<(String, Vec<usize>)>,
}

impl BaseShape {
    /// A base of `geometry` whose parameters are `parameters` (Hugging Face name, shape).
    pub fn new(geometry: ModelGeometry, parameters: Vec<(String, Vec<usize>)>) -> Self {
        Self {
            geometry,
            parameters,
        }
    }

    /// The shape of a loaded model.
    pub fn of<M: CausalLm>(model: &M) -> Self {
        Self::new(
            model.geometry(),
            param_infos(model)
                .into_iter()
                .map(|p| (p.name, p.shape))
                .collect(),
        )
    }

    /// Number of parameters, a tied weight counted once.
    pub fn num_params(&self) -> usize {
        self.parameters
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum()
    }

    /// PEFT's counts for an adapter of `adapter_params` parameters of its own on this base (the
    /// base frozen): they train, and add to the base's total.
    pub fn with_adapter_params(&self, adapter_params: usize) -> TrainableParameters {
        TrainableParameters {
            trainable: adapter_params,
            all: self.num_params().saturating_add(adapter_params),
        }
    }
}

/// [`Adapter::save`] for a method whose files need only the base's shape: [`Method::write`] with
/// [`BaseShape::of`] the model.
///
/// # Errors
///
/// As [`Method::write`].
pub fn save_for<A: Method, M: CausalLm>(
    adapter: &A,
    dir: &Path,
    base: &M,
    base_model_name_or_path: Option<&str>,
) -> Result<(), AdapterError> {
    adapter.write(dir, &BaseShape::of(base), base_model_name_or_path)
}

/// [`Adapter::load`] for a method whose parameters are all its own (the base is returned as it
/// came): [`Method::read`] for the model's shape, on its device.
///
/// # Errors
///
/// As [`Method::read`].
pub fn load_for<A: Method, M: CausalLm>(dir: &Path, base: M) -> Result<(M, A), AdapterError> {
    let adapter = A::read(dir, &BaseShape::of(&base), &base.device())?;
    Ok((base, adapter))
}

/// A method as a list of methods sees it. Implemented by each method crate's adapter type.
pub trait Method: Adapter + Sized {
    /// `peft_type` in `adapter_config.json`, as PEFT spells it (ours, in PEFT's style, where PEFT
    /// has no such method).
    const PEFT_TYPE: &'static str;

    /// The method's configuration.
    type Config: MethodConfig<Method = Self>;

    /// The named configurations `peft train --method` offers for this method (one method can
    /// have several, e.g. a prefix with and without a projection).
    const PRESETS: &'static [Preset];

    /// Reads the adapter directory `dir` made for a base of shape `base`, onto `device`: every
    /// file, key and tensor checked against it. A method whose files hold base parameters
    /// (trained biases) keeps them in the adapter, for [`Method::write`] or
    /// [`Adapter::load`] to put into a model.
    ///
    /// # Errors
    ///
    /// A missing or malformed file, another method, or an adapter that does not fit `base`; each
    /// names the file and the key or tensor.
    fn read(dir: &Path, base: &BaseShape, device: &Device) -> Result<Self, AdapterError>;

    /// Writes this adapter's files into `dir` for a base of shape `base`, in the form [`Method::read`]
    /// reads back (PEFT's, where PEFT has the method), each file atomically.
    ///
    /// # Errors
    ///
    /// A file that cannot be written, or a method whose files need the base's weights and an
    /// adapter that holds none (one made by `init` rather than read: save it with its model
    /// through [`Adapter::save`]).
    fn write(
        &self,
        dir: &Path,
        base: &BaseShape,
        base_model_name_or_path: Option<&str>,
    ) -> Result<(), AdapterError>;
}

/// A method's configuration, as a list of methods handles it.
pub trait MethodConfig: Clone + Debug + Send + Sync + 'static {
    /// The method it configures.
    type Method: Method<Config = Self>;

    /// The configuration for a base of `geometry` from `options`: PEFT's keys of the method's
    /// `adapter_config.json` (plus the method's own, documented on its config), keys it does not
    /// know tolerated. Keys the base decides (`token_dim`, `num_layers`, ...) come from `geometry`.
    ///
    /// # Errors
    ///
    /// A value of the wrong type, or one the method cannot take, naming its key.
    fn from_options(
        options: &Map<String, Value>,
        geometry: &ModelGeometry,
    ) -> Result<Self, AdapterError>;

    /// Checks the configuration fits a base of `geometry` before anything is allocated.
    ///
    /// # Errors
    ///
    /// [`AdapterError::Init`] naming the configuration field.
    fn validate(&self, geometry: &ModelGeometry) -> Result<(), AdapterError>;

    /// Text the adapter starts from, whose token ids [`MethodConfig::init`] takes, if any.
    fn init_text(&self) -> Option<InitText<'_>> {
        None
    }

    /// A fresh adapter for `base`, on its device, random parameters drawn from the device's
    /// generator. `init_text_ids` are the token ids of [`MethodConfig::init_text`].
    ///
    /// # Errors
    ///
    /// A configuration [`MethodConfig::validate`] refuses, or one that does not fit `base` (a
    /// pattern selecting nothing, an init text of too few tokens), naming the field.
    fn init<M: CausalLm>(
        &self,
        base: &M,
        init_text_ids: &[u32],
    ) -> Result<Self::Method, AdapterError>;

    /// PEFT's trainable-parameter numbers for this adapter on a base of shape `base`, from shapes
    /// alone: the adapter's own parameters are added to the base's, base parameters it unfreezes
    /// are not.
    ///
    /// # Errors
    ///
    /// A configuration that cannot be applied to `base`, naming the field.
    fn trainable_parameters(&self, base: &BaseShape) -> Result<TrainableParameters, AdapterError>;
}

/// Text an adapter starts from, and how the caller should turn it into token ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitText<'a> {
    /// The text.
    pub text: &'a str,
    /// Whether the method reads the text as the model reads a system message (through its chat
    /// template, where it has one) rather than as plain text.
    pub as_system_message: bool,
}

/// A named configuration of a method, as `peft train --method NAME` offers it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preset {
    /// The name users type (`prefix-tuning`).
    pub name: &'static str,
    /// One line of help.
    pub summary: &'static str,
    /// Options (a JSON object of the method's config keys) the preset sets; the user's options
    /// override them.
    pub options: &'static str,
    /// A learning rate that trains this preset well on a small pretrained model.
    pub learning_rate: f64,
    /// A learning rate for a tiny model trained from scratch for a few steps (`peft quickstart`),
    /// which takes larger steps than a pretrained model would survive.
    pub tiny_model_learning_rate: f64,
}

impl Preset {
    /// [`Preset::options`] parsed.
    ///
    /// # Panics
    ///
    /// If a method crate wrote a preset whose options are not a JSON object (a bug the facade's
    /// tests catch for every preset).
    pub fn option_map(&self) -> Map<String, Value> {
        match serde_json::from_str(self.options) {
            Ok(Value::Object(map)) => map,
            _ => panic!("preset {:?}: options must be a JSON object", self.name),
        }
    }
}

/// Where errors about method options point: they come from the caller, not from a file.
pub const OPTIONS: &str = "<method options>";

/// `options` as a `T` (serde), each key checked by `T`'s deserializers and named in errors.
///
/// # Errors
///
/// A value of the wrong type or a required key absent, naming the key.
pub fn parse_options<T: serde::de::DeserializeOwned>(
    options: &Map<String, Value>,
) -> Result<T, ConfigError> {
    JsonConfig::from_map(options.clone(), OPTIONS).parse()
}
