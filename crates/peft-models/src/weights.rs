//! Where a model's layers get their weights: a Hugging Face checkpoint or random initialization.
//!
//! Each model has one `build` function written against [`WeightSource`], so loading and random
//! initialization share the code that lays out the layers (candle's `VarBuilder` idea): names are
//! the Hugging Face tensor names, shapes the PyTorch ones.

use std::convert::Infallible;

use burn::module::Param;
use burn::nn::{
    Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig,
    RmsNorm, RmsNormConfig,
};
use burn::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::error::ModelError;

/// Supplies the layers of a model by Hugging Face name.
pub trait WeightSource {
    /// Why a layer cannot be supplied.
    type Error;

    /// `nn.Linear(input, out)` under `{prefix}.weight` (and `{prefix}.bias` if `bias`).
    fn linear(
        &mut self,
        prefix: &str,
        input: usize,
        out: usize,
        bias: bool,
    ) -> Result<Linear, Self::Error>;

    /// `nn.Embedding(vocab, dim)` under `{prefix}.weight`.
    fn embedding(
        &mut self,
        prefix: &str,
        vocab: usize,
        dim: usize,
    ) -> Result<Embedding, Self::Error>;

    /// RMSNorm(dim) under `{prefix}.weight`.
    fn rms_norm(&mut self, prefix: &str, dim: usize, epsilon: f64) -> Result<RmsNorm, Self::Error>;

    /// LayerNorm(dim) with bias under `{prefix}.weight` and `{prefix}.bias`.
    fn layer_norm(
        &mut self,
        prefix: &str,
        dim: usize,
        epsilon: f64,
    ) -> Result<LayerNorm, Self::Error>;

    /// Declares a tensor the model knowingly does without (a tied `lm_head.weight` copy).
    fn skip(&mut self, _name: &str) {}

    /// Whether the source holds a tensor of that name, for layouts that depend on the checkpoint
    /// (BLOOM's optional `transformer.` prefix). Sources that make their tensors have them all.
    fn contains(&self, _name: &str) -> bool {
        true
    }
}

impl WeightSource for Checkpoint {
    type Error = ModelError;

    fn linear(
        &mut self,
        prefix: &str,
        input: usize,
        out: usize,
        bias: bool,
    ) -> Result<Linear, ModelError> {
        let mut linear = LinearConfig::new(input, out)
            .with_bias(bias)
            .init(self.device());
        linear.weight =
            Param::from_tensor(self.linear_weight(&format!("{prefix}.weight"), out, input)?);
        if bias {
            linear.bias = Some(Param::from_tensor(
                self.tensor(&format!("{prefix}.bias"), [out])?,
            ));
        }
        Ok(linear)
    }

    fn embedding(
        &mut self,
        prefix: &str,
        vocab: usize,
        dim: usize,
    ) -> Result<Embedding, ModelError> {
        let mut embedding = EmbeddingConfig::new(vocab, dim).init(self.device());
        embedding.weight =
            Param::from_tensor(self.tensor(&format!("{prefix}.weight"), [vocab, dim])?);
        Ok(embedding)
    }

    fn rms_norm(&mut self, prefix: &str, dim: usize, epsilon: f64) -> Result<RmsNorm, ModelError> {
        let mut norm = RmsNormConfig::new(dim)
            .with_epsilon(epsilon)
            .init(self.device());
        norm.gamma = Param::from_tensor(self.tensor(&format!("{prefix}.weight"), [dim])?);
        Ok(norm)
    }

    fn layer_norm(
        &mut self,
        prefix: &str,
        dim: usize,
        epsilon: f64,
    ) -> Result<LayerNorm, ModelError> {
        let mut norm = LayerNormConfig::new(dim)
            .with_epsilon(epsilon)
            .init(self.device());
        norm.gamma = Param::from_tensor(self.tensor(&format!("{prefix}.weight"), [dim])?);
        norm.beta = Some(Param::from_tensor(
            self.tensor(&format!("{prefix}.bias"), [dim])?,
        ));
        Ok(norm)
    }

    fn skip(&mut self, name: &str) {
        Checkpoint::skip(self, name);
    }

    fn contains(&self, name: &str) -> bool {
        Checkpoint::contains(self, name)
    }
}

/// Random weights drawn as transformers' `_init_weights` draws them: linear and embedding
/// weights from `N(0, initializer_range²)`, biases zero, norms at their identity (created
/// lazily, on first use).
///
/// The scale matters beyond fidelity: burn's defaults (a `N(0, 1)` embedding) make a tied
/// `lm_head` produce logits of standard deviation ~`√hidden_size`, whose softmax mostly
/// underflows, a slow path of `expf` that a model initialized like Hugging Face's never takes.
#[derive(Debug, Clone)]
pub struct RandomWeights {
    device: Device,
    initializer: Initializer,
}

impl RandomWeights {
    /// Random layers on `device`, weights of standard deviation `initializer_range` (the
    /// config.json field; transformers' default is 0.02).
    pub fn new(device: &Device, initializer_range: f64) -> Self {
        Self {
            device: device.clone(),
            initializer: Initializer::Normal {
                mean: 0.0,
                std: initializer_range,
            },
        }
    }
}

impl WeightSource for RandomWeights {
    type Error = Infallible;

    fn linear(
        &mut self,
        _: &str,
        input: usize,
        out: usize,
        bias: bool,
    ) -> Result<Linear, Infallible> {
        let mut linear = LinearConfig::new(input, out)
            .with_bias(false)
            .with_initializer(self.initializer.clone())
            .init(&self.device);
        linear.bias = bias.then(|| Param::from_tensor(Tensor::zeros([out], &self.device)));
        Ok(linear)
    }

    fn embedding(&mut self, _: &str, vocab: usize, dim: usize) -> Result<Embedding, Infallible> {
        Ok(EmbeddingConfig::new(vocab, dim)
            .with_initializer(self.initializer.clone())
            .init(&self.device))
    }

    fn rms_norm(&mut self, _: &str, dim: usize, epsilon: f64) -> Result<RmsNorm, Infallible> {
        Ok(RmsNormConfig::new(dim)
            .with_epsilon(epsilon)
            .init(&self.device))
    }

    fn layer_norm(&mut self, _: &str, dim: usize, epsilon: f64) -> Result<LayerNorm, Infallible> {
        Ok(LayerNormConfig::new(dim)
            .with_epsilon(epsilon)
            .init(&self.device))
    }
}

/// Records the name and shape of every tensor a model's `build` asks for, allocating none: the
/// layers it returns hold lazily initialized parameters that are never read. This is how a model
/// lists its parameters from `config.json` alone (`peft info`, `peft export`, the bench), with the
/// same code that lays out its layers, so the list cannot drift from the model.
#[derive(Debug, Clone)]
pub struct ParameterShapes {
    device: Device,
    shapes: Vec<(String, Vec<usize>)>,
}

impl ParameterShapes {
    /// An empty record; `device` only names where the never-initialized layers would live.
    pub fn new(device: &Device) -> Self {
        Self {
            device: device.clone(),
            shapes: Vec::new(),
        }
    }

    /// Every tensor asked for, as (Hugging Face name, shape as the built model holds it: a Linear
    /// weight `[in, out]`, PyTorch's transpose), in build order.
    pub fn into_shapes(self) -> Vec<(String, Vec<usize>)> {
        self.shapes
    }

    fn record(&mut self, name: String, shape: Vec<usize>) {
        self.shapes.push((name, shape));
    }
}

impl WeightSource for ParameterShapes {
    type Error = Infallible;

    fn linear(
        &mut self,
        prefix: &str,
        input: usize,
        out: usize,
        bias: bool,
    ) -> Result<Linear, Infallible> {
        // burn's layout, as the built model holds it (PyTorch stores the transpose).
        self.record(format!("{prefix}.weight"), vec![input, out]);
        if bias {
            self.record(format!("{prefix}.bias"), vec![out]);
        }
        Ok(LinearConfig::new(input, out)
            .with_bias(bias)
            .with_initializer(Initializer::Zeros)
            .init(&self.device))
    }

    fn embedding(
        &mut self,
        prefix: &str,
        vocab: usize,
        dim: usize,
    ) -> Result<Embedding, Infallible> {
        self.record(format!("{prefix}.weight"), vec![vocab, dim]);
        Ok(EmbeddingConfig::new(vocab, dim)
            .with_initializer(Initializer::Zeros)
            .init(&self.device))
    }

    fn rms_norm(&mut self, prefix: &str, dim: usize, epsilon: f64) -> Result<RmsNorm, Infallible> {
        self.record(format!("{prefix}.weight"), vec![dim]);
        Ok(RmsNormConfig::new(dim)
            .with_epsilon(epsilon)
            .init(&self.device))
    }

    fn layer_norm(
        &mut self,
        prefix: &str,
        dim: usize,
        epsilon: f64,
    ) -> Result<LayerNorm, Infallible> {
        self.record(format!("{prefix}.weight"), vec![dim]);
        self.record(format!("{prefix}.bias"), vec![dim]);
        Ok(LayerNormConfig::new(dim)
            .with_epsilon(epsilon)
            .init(&self.device))
    }
}

/// Unwraps the result of a build from [`RandomWeights`], which cannot fail.
pub fn infallible<T>(result: Result<T, Infallible>) -> T {
    match result {
        Ok(value) => value,
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use crate::{BloomConfig, Qwen2Config};
    use burn::prelude::*;

    /// Sample standard deviation of a zero-mean tensor.
    fn std(t: Tensor<2>) -> f64 {
        t.powi_scalar(2).mean().sqrt().into_scalar::<f32>() as f64
    }

    #[test]
    fn random_weights_are_drawn_as_transformers_draws_them() {
        let device = Device::default();
        // 4096 x 64 embedding values: the sample std of 262,144 normal draws is within 0.3% of
        // the true one at 2 sigma (relative spread 1 / sqrt(2n)); 2% leaves a wide margin.
        let qwen = Qwen2Config::new(4096, 64, 128, 1, 4, 2, 16)
            .with_initializer_range(0.05)
            .init(&device);
        let embed = qwen.model.embed_tokens.weight.val();
        assert!((std(embed) / 0.05 - 1.0).abs() < 0.02);
        let attn = &qwen.model.layers[0].self_attn;
        assert!((std(attn.q_proj.weight.val()) / 0.05 - 1.0).abs() < 0.05);
        let bias = attn
            .q_proj
            .bias
            .as_ref()
            .expect("Qwen2 has q/k/v biases")
            .val();
        assert_eq!(bias.abs().max().into_scalar::<f32>() as f64, 0.0);
        let norm = qwen.model.norm.gamma.val();
        assert_eq!(
            norm.sub_scalar(1.0).abs().max().into_scalar::<f32>() as f64,
            0.0
        );

        let bloom = BloomConfig::new(4096, 64, 1, 4).init(&device);
        let embed = bloom.transformer.word_embeddings.weight.val();
        assert!((std(embed) / 0.02 - 1.0).abs() < 0.02);
    }
}
