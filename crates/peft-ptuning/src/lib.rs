//! P-Tuning (v1) for peft-burn (PEFT `P_TUNING`).
//!
//! Like prompt tuning, `num_virtual_tokens` embeddings are prepended to every row, but they are
//! the output of a trainable encoder (reparameterization) applied to a trainable embedding table:
//! an MLP (`Linear(d,h)-ReLU-Linear(h,h)-ReLU-Linear(h,d)`) or a 2-layer bidirectional LSTM
//! followed by `Linear(2h,2h)-ReLU-Linear(2h,d)`, architectures and initialization as PEFT's
//! `PromptEncoder`. The encoder runs once per call on `arange(n)` and its output is broadcast over
//! the batch (PEFT 0.21 also encodes one row and repeats it).
//!
//! Files: PEFT saves only the encoder's output (`prompt_embeddings`), so its adapters load here in
//! inference form (no encoder). [`PromptEncoder::save`] writes that file too, plus our trainable
//! checkpoint `adapter_encoder.safetensors` (the encoder under PEFT's state-dict names) so training
//! can resume; [`PromptEncoder::into_inference`] folds the encoder away.
#![warn(missing_docs)]

pub mod lstm;

use std::path::Path;

use burn::module::Param;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::relu;
use peft_core::adapter_config::{
    PromptLearningConfig, PromptLearningFile, check_dropout, check_hidden_size,
    check_num_virtual_tokens, write_adapter_dir,
};
use peft_core::adapter_file::{
    ADAPTER_ENCODER, PROMPT_EMBEDDINGS, TensorFile, linear_tensors, read_linear,
    read_prompt_embeddings,
};
use peft_core::json_config::fields;
use peft_core::method::parse_options;
use peft_core::params::initialize_now;
use peft_core::{
    Adapter, BaseShape, CausalLm, Injection, Method, MethodConfig, ModelGeometry, Preset,
    TrainableParameters,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use lstm::{BiLstm, BiLstmConfig};
pub use peft_core::adapter_config::AdapterError;

/// The method's `peft_type`, as PEFT spells it in `adapter_config.json`.
pub const PEFT_TYPE: &str = "P_TUNING";

/// The encoder's architecture (PEFT's `encoder_reparameterization_type`).
#[derive(Config, Debug, PartialEq, Eq, Copy)]
pub enum EncoderType {
    /// `MLP`: three Linears with ReLUs.
    Mlp,
    /// `LSTM`: a bidirectional LSTM then two Linears.
    Lstm,
}

impl EncoderType {
    /// PEFT's spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Mlp => "MLP",
            Self::Lstm => "LSTM",
        }
    }
}

/// Configuration of a P-tuning prompt encoder.
#[derive(Config, Debug)]
pub struct PTuningConfig {
    /// Number of virtual tokens prepended to every row.
    pub num_virtual_tokens: usize,
    /// Width of one virtual token: the base model's `hidden_size`.
    pub token_dim: usize,
    /// The encoder's architecture.
    #[config(default = "EncoderType::Mlp")]
    pub encoder_reparameterization_type: EncoderType,
    /// Hidden width of the encoder; PEFT's default is `token_dim`.
    pub encoder_hidden_size: Option<usize>,
    /// LSTM layers (PEFT ignores it for the MLP, and so do we).
    #[config(default = 2)]
    pub encoder_num_layers: usize,
    /// Dropout between the LSTM's layers (the MLP has none, as in PEFT).
    #[config(default = 0.0)]
    pub encoder_dropout: f64,
}

impl PTuningConfig {
    /// A config shaped for a base model of `geometry`.
    pub fn for_model(num_virtual_tokens: usize, geometry: &ModelGeometry) -> Self {
        Self::new(num_virtual_tokens, geometry.hidden_size)
    }

    /// Checks the configuration fits a base model of `geometry` before anything is allocated.
    ///
    /// # Errors
    ///
    /// `num_virtual_tokens` of 0 or beyond the base's positions, `encoder_hidden_size` of 0, an
    /// LSTM of 0 layers, or dropout outside [0, 1); each names the field.
    pub fn validate(&self, geometry: &ModelGeometry) -> Result<(), AdapterError> {
        check_num_virtual_tokens(self.num_virtual_tokens, geometry)?;
        check_hidden_size("encoder_hidden_size", self.encoder_hidden_size)?;
        if self.encoder_reparameterization_type == EncoderType::Lstm && self.encoder_num_layers == 0
        {
            return Err(AdapterError::Init {
                field: "encoder_num_layers",
                message: "must be at least 1".into(),
            });
        }
        check_dropout("encoder_dropout", self.encoder_dropout)
    }

    /// The encoder's hidden width.
    pub fn hidden_size(&self) -> usize {
        self.encoder_hidden_size.unwrap_or(self.token_dim)
    }

    fn lstm_config(&self) -> BiLstmConfig {
        BiLstmConfig::new(self.token_dim, self.hidden_size())
            .with_num_layers(self.encoder_num_layers)
            .with_dropout(self.encoder_dropout)
    }

    /// `(d_in, d_out)` of the MLP head's Linears.
    fn mlp_shapes(&self) -> Vec<[usize; 2]> {
        let (d, h) = (self.token_dim, self.hidden_size());
        match self.encoder_reparameterization_type {
            EncoderType::Mlp => vec![[d, h], [h, h], [h, d]],
            EncoderType::Lstm => vec![[2 * h, 2 * h], [2 * h, d]],
        }
    }

    /// A trainable encoder with PyTorch's initialization (embedding N(0, 1), Linears and LSTM
    /// uniform), on `device`, drawn now from the device's generator.
    pub fn init(&self, device: &Device) -> PromptEncoder {
        initialize_now(PromptEncoder {
            embedding: EmbeddingConfig::new(self.num_virtual_tokens, self.token_dim).init(device),
            lstm_head: (self.encoder_reparameterization_type == EncoderType::Lstm)
                .then(|| self.lstm_config().init(device)),
            mlp_head: Some(
                self.mlp_shapes()
                    .into_iter()
                    .map(|[i, o]| LinearConfig::new(i, o).init(device))
                    .collect(),
            ),
            config: self.clone(),
        })
    }

    /// Parameters of the trainable encoder, counted from the configuration alone (what PEFT's
    /// `print_trainable_parameters` counts for P-tuning).
    pub fn num_params(&self) -> usize {
        let lstm = match self.encoder_reparameterization_type {
            EncoderType::Mlp => 0,
            EncoderType::Lstm => self.lstm_config().num_params(),
        };
        // Saturating: absurd sizes are refused by their callers' memory checks, not by a panic.
        let mlp = self.mlp_shapes().iter().fold(0usize, |sum, [i, o]| {
            sum.saturating_add(i.saturating_mul(*o).saturating_add(*o))
        });
        self.num_virtual_tokens
            .saturating_mul(self.token_dim)
            .saturating_add(lstm)
            .saturating_add(mlp)
    }

    /// The configuration an `adapter_config.json` describes.
    fn from_file(file: &PTuningFile) -> Self {
        let keys = &file.method;
        Self::new(file.shared.num_virtual_tokens, file.shared.token_dim)
            .with_encoder_reparameterization_type(keys.encoder_reparameterization_type)
            .with_encoder_hidden_size(keys.encoder_hidden_size)
            .with_encoder_num_layers(keys.encoder_num_layers.unwrap_or(2))
            .with_encoder_dropout(keys.encoder_dropout)
    }
}

/// The keys of a P-tuning `adapter_config.json` beyond the shared ones, as PEFT writes them
/// (PEFT's defaults where absent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PTuningKeys {
    /// `encoder_reparameterization_type`: `MLP` or `LSTM`.
    #[serde(default = "mlp", with = "encoder_spelling")]
    pub encoder_reparameterization_type: EncoderType,
    /// `encoder_hidden_size` (PEFT's default: `token_dim`).
    #[serde(default, deserialize_with = "fields::opt_positive")]
    pub encoder_hidden_size: Option<usize>,
    /// `encoder_num_layers` (the LSTM's; default 2).
    #[serde(default, deserialize_with = "fields::opt_positive")]
    pub encoder_num_layers: Option<usize>,
    /// `encoder_dropout`, in [0, 1).
    #[serde(default, deserialize_with = "fields::dropout")]
    pub encoder_dropout: f64,
}

/// A P-tuning `adapter_config.json`.
pub type PTuningFile = PromptLearningFile<PTuningKeys>;

fn mlp() -> EncoderType {
    EncoderType::Mlp
}

/// PEFT's spelling of [`EncoderType`] (burn's `Config` derive spells it `Mlp`).
mod encoder_spelling {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    use super::EncoderType;

    pub fn serialize<S: Serializer>(kind: &EncoderType, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(kind.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<EncoderType, D::Error> {
        match Option::<String>::deserialize(d)?.as_deref() {
            None | Some("MLP") => Ok(EncoderType::Mlp),
            Some("LSTM") => Ok(EncoderType::Lstm),
            Some(other) => Err(D::Error::custom(format!(
                "must be \"MLP\" or \"LSTM\", found {other:?}"
            ))),
        }
    }
}

/// P-tuning's prompt encoder. In trainable form it holds PEFT's `embedding`, `lstm_head` (LSTM
/// only) and `mlp_head`; in inference form (what PEFT's files hold) only `embedding`, whose rows
/// are the encoder's output.
#[derive(Module, Debug)]
pub struct PromptEncoder {
    /// `[num_virtual_tokens, token_dim]`: the encoder's input, or in inference form its output.
    pub embedding: Embedding,
    /// The LSTM of the `Lstm` encoder.
    pub lstm_head: Option<BiLstm>,
    /// The Linears of the head (ReLU between them); `None` in inference form.
    pub mlp_head: Option<Vec<Linear>>,
    /// The configuration it was built from.
    #[module(skip)]
    pub config: PTuningConfig,
}

impl PromptEncoder {
    /// An inference-form encoder whose output is `prompt_embeddings` `[n, token_dim]`.
    pub fn from_prompt_embeddings(prompt_embeddings: Tensor<2>, config: PTuningConfig) -> Self {
        Self {
            embedding: Embedding {
                weight: Param::from_tensor(prompt_embeddings),
            },
            lstm_head: None,
            mlp_head: None,
            config,
        }
    }

    /// Whether the encoder is present (trainable form) rather than folded into its output.
    pub fn is_trainable_form(&self) -> bool {
        self.mlp_head.is_some()
    }

    /// The virtual token embeddings, `[num_virtual_tokens, token_dim]`: the encoder applied to
    /// `arange(n)`, computed once. This is what PEFT saves as `prompt_embeddings`.
    pub fn prompt_embeddings(&self) -> Tensor<2> {
        let input = self.embedding.weight.val();
        let Some(mlp) = &self.mlp_head else {
            return input;
        };
        let mut x = match &self.lstm_head {
            Some(lstm) => lstm.forward(input),
            None => input,
        };
        let last = mlp.len() - 1;
        for (index, linear) in mlp.iter().enumerate() {
            x = linear.forward(x);
            if index < last {
                x = relu(x);
            }
        }
        x
    }

    /// The inference form: the encoder folded into its output (what PEFT's files hold).
    pub fn into_inference(self) -> Self {
        let output = self.prompt_embeddings().detach();
        Self::from_prompt_embeddings(output, self.config)
    }

    /// The trainable encoder's tensors under PEFT's `prompt_encoder` state-dict names and layout;
    /// `None` in inference form.
    pub fn encoder_tensors(&self) -> Option<Vec<(String, TensorData)>> {
        let mlp = self.mlp_head.as_ref()?;
        let mut out = vec![(
            "embedding.weight".to_string(),
            self.embedding.weight.val().into_data(),
        )];
        if let Some(lstm) = &self.lstm_head {
            for (k, layer) in lstm.layers.iter().enumerate() {
                for (direction, suffix) in [(&layer.forward, ""), (&layer.reverse, "_reverse")] {
                    for (name, value) in [
                        ("weight_ih", direction.weight_ih.val().into_data()),
                        ("weight_hh", direction.weight_hh.val().into_data()),
                        ("bias_ih", direction.bias_ih.val().into_data()),
                        ("bias_hh", direction.bias_hh.val().into_data()),
                    ] {
                        out.push((format!("lstm_head.{name}_l{k}{suffix}"), value));
                    }
                }
            }
        }
        for (index, linear) in mlp.iter().enumerate() {
            out.extend(linear_tensors(&format!("mlp_head.{}", 2 * index), linear));
        }
        Some(out)
    }

    fn load_encoder(
        file: &TensorFile,
        config: PTuningConfig,
        device: &Device,
    ) -> Result<Self, AdapterError> {
        let (n, d, h) = (
            config.num_virtual_tokens,
            config.token_dim,
            config.hidden_size(),
        );
        let why = format!(
            "{} encoder, num_virtual_tokens {n}, token_dim {d}, encoder_hidden_size {h}",
            config.encoder_reparameterization_type.as_str()
        );
        let mut encoder = config.init(device);
        encoder.embedding.weight =
            Param::from_tensor(file.tensor("embedding.weight", [n, d], &why, device)?);
        if let Some(lstm) = encoder.lstm_head.as_mut() {
            for (k, layer) in lstm.layers.iter_mut().enumerate() {
                let input = if k == 0 { d } else { 2 * h };
                for (direction, suffix) in
                    [(&mut layer.forward, ""), (&mut layer.reverse, "_reverse")]
                {
                    let name = |what: &str| format!("lstm_head.{what}_l{k}{suffix}");
                    direction.weight_ih = Param::from_tensor(file.tensor(
                        &name("weight_ih"),
                        [4 * h, input],
                        &why,
                        device,
                    )?);
                    direction.weight_hh = Param::from_tensor(file.tensor(
                        &name("weight_hh"),
                        [4 * h, h],
                        &why,
                        device,
                    )?);
                    direction.bias_ih =
                        Param::from_tensor(file.tensor(&name("bias_ih"), [4 * h], &why, device)?);
                    direction.bias_hh =
                        Param::from_tensor(file.tensor(&name("bias_hh"), [4 * h], &why, device)?);
                }
            }
        }
        let shapes = encoder.config.mlp_shapes();
        encoder.mlp_head = Some(
            shapes
                .into_iter()
                .enumerate()
                .map(|(index, shape)| {
                    read_linear(
                        file,
                        &format!("mlp_head.{}", 2 * index),
                        shape,
                        &why,
                        device,
                    )
                })
                .collect::<Result<_, _>>()?,
        );
        Ok(encoder)
    }
}

impl Adapter for PromptEncoder {
    fn num_virtual_tokens(&self) -> usize {
        self.embedding.weight.dims()[0]
    }

    fn save<M: CausalLm>(
        &self,
        dir: &Path,
        base: &M,
        base_model_name_or_path: Option<&str>,
    ) -> Result<(), AdapterError> {
        peft_core::method::save_for(self, dir, base, base_model_name_or_path)
    }

    fn load<M: CausalLm>(dir: &Path, base: M) -> Result<(M, Self), AdapterError> {
        peft_core::method::load_for(dir, base)
    }

    fn into_inference(self) -> Self {
        PromptEncoder::into_inference(self)
    }

    fn inject(&self, batch: usize) -> Injection {
        Injection::virtual_tokens(self.prompt_embeddings(), batch)
    }
}

/// The options `PTuningConfig::from_options` reads: PEFT's keys, sizes taken as given so that
/// [`PTuningConfig::validate`] names what is wrong with them.
#[derive(Debug, Deserialize)]
struct PTuningOptions {
    num_virtual_tokens: usize,
    #[serde(default = "mlp", with = "encoder_spelling")]
    encoder_reparameterization_type: EncoderType,
    #[serde(default)]
    encoder_hidden_size: Option<usize>,
    #[serde(default)]
    encoder_num_layers: Option<usize>,
    #[serde(default)]
    encoder_dropout: f64,
}

impl MethodConfig for PTuningConfig {
    type Method = PromptEncoder;

    /// Keys: `num_virtual_tokens`, `encoder_reparameterization_type`, `encoder_hidden_size`,
    /// `encoder_num_layers`, `encoder_dropout`.
    fn from_options(
        options: &Map<String, Value>,
        geometry: &ModelGeometry,
    ) -> Result<Self, AdapterError> {
        let options: PTuningOptions = parse_options(options)?;
        Ok(Self::new(options.num_virtual_tokens, geometry.hidden_size)
            .with_encoder_reparameterization_type(options.encoder_reparameterization_type)
            .with_encoder_hidden_size(options.encoder_hidden_size)
            .with_encoder_num_layers(options.encoder_num_layers.unwrap_or(2))
            .with_encoder_dropout(options.encoder_dropout))
    }

    fn validate(&self, geometry: &ModelGeometry) -> Result<(), AdapterError> {
        PTuningConfig::validate(self, geometry)
    }

    fn init<M: CausalLm>(&self, base: &M, _: &[u32]) -> Result<PromptEncoder, AdapterError> {
        PTuningConfig::validate(self, &base.geometry())?;
        Ok(PTuningConfig::init(self, &base.device()))
    }

    fn trainable_parameters(&self, base: &BaseShape) -> Result<TrainableParameters, AdapterError> {
        Ok(base.with_adapter_params(self.num_params()))
    }
}

impl Method for PromptEncoder {
    const PEFT_TYPE: &'static str = PEFT_TYPE;
    type Config = PTuningConfig;
    const PRESETS: &'static [Preset] = &[Preset {
        name: "p-tuning",
        summary: "P-Tuning v1 (PEFT P_TUNING), an MLP or LSTM encoder",
        options: "{}",
        learning_rate: 1e-3,
        tiny_model_learning_rate: 1e-2,
    }];

    /// Reads a P-tuning adapter directory for a base model of shape `base`: trainable form when our
    /// `adapter_encoder.safetensors` is there, else inference form from PEFT's
    /// `adapter_model.safetensors`.
    ///
    /// # Errors
    ///
    /// A missing or malformed file, another method, an adapter made for another base model
    /// (`token_dim`, `num_layers`, `num_attention_heads`), a wrong encoder key, or a tensor absent
    /// or of the wrong shape; each names the file and the key or tensor.
    fn read(dir: &Path, base: &BaseShape, device: &Device) -> Result<Self, AdapterError> {
        let geometry = &base.geometry;
        let (file, raw) = PTuningFile::read(dir, PEFT_TYPE)?;
        file.shared.check_base(
            &raw,
            geometry,
            geometry.hidden_size,
            geometry.num_attention_heads,
        )?;
        let config = PTuningConfig::from_file(&file);
        let encoder_path = dir.join(ADAPTER_ENCODER);
        if encoder_path.exists() {
            return Self::load_encoder(&TensorFile::open(&encoder_path)?, config, device);
        }
        let (n, d) = (config.num_virtual_tokens, config.token_dim);
        let why = format!("num_virtual_tokens {n} x the base model's hidden_size {d}");
        let weights = read_prompt_embeddings(dir, [n, d], &why, device)?;
        Ok(Self::from_prompt_embeddings(weights, config))
    }

    /// Saves into `dir`: `adapter_config.json` with PEFT's keys, `adapter_model.safetensors` with
    /// `prompt_embeddings` (PEFT loads both), and in trainable form `adapter_encoder.safetensors`.
    /// Each file is written atomically.
    fn write(
        &self,
        dir: &Path,
        base: &BaseShape,
        base_model_name_or_path: Option<&str>,
    ) -> Result<(), AdapterError> {
        let geometry = &base.geometry;
        let config = &self.config;
        let file = PTuningFile {
            shared: PromptLearningConfig::new(
                PEFT_TYPE,
                config.num_virtual_tokens,
                config.token_dim,
                geometry.num_attention_heads,
                geometry.num_layers,
                base_model_name_or_path,
            ),
            method: PTuningKeys {
                encoder_reparameterization_type: config.encoder_reparameterization_type,
                encoder_hidden_size: Some(config.hidden_size()),
                encoder_num_layers: Some(config.encoder_num_layers),
                encoder_dropout: config.encoder_dropout,
            },
        };
        let json = file.to_json();
        write_adapter_dir(
            dir,
            &json,
            vec![(PROMPT_EMBEDDINGS, self.prompt_embeddings().into_data())],
            self.encoder_tensors(),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_match_the_built_encoders() {
        let device = Device::default();
        for encoder in [EncoderType::Mlp, EncoderType::Lstm] {
            let config = PTuningConfig::new(3, 8)
                .with_encoder_reparameterization_type(encoder)
                .with_encoder_hidden_size(Some(5));
            let built = config.init(&device);
            assert_eq!(built.num_params(), config.num_params(), "{encoder:?}");
            assert_eq!(built.prompt_embeddings().dims(), [3, 8]);
            let tensors: usize = built
                .encoder_tensors()
                .unwrap()
                .iter()
                .map(|(_, d)| d.num_elements())
                .sum();
            assert_eq!(tensors, config.num_params());
        }
    }

    #[test]
    fn inference_form_gives_the_same_prompts() {
        let device = Device::default();
        let encoder = PTuningConfig::new(4, 6)
            .with_encoder_reparameterization_type(EncoderType::Lstm)
            .init(&device);
        let before = encoder.prompt_embeddings().into_data();
        let folded = encoder.into_inference();
        assert!(!folded.is_trainable_form());
        assert_eq!(folded.prompt_embeddings().into_data(), before);
        assert!(folded.encoder_tensors().is_none());
    }
}
