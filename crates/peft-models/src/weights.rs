//! Where a model's layers get their weights: a Hugging Face checkpoint or random initialization.
//!
//! Each model has one `build` function written against [`WeightSource`], so loading and random
//! initialization share the code that lays out the layers (candle's `VarBuilder` idea): names are
//! the Hugging Face tensor names, shapes the PyTorch ones.

use std::convert::Infallible;

use burn::module::Param;
use burn::nn::{
    Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig, RmsNorm,
    RmsNormConfig,
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
}

/// burn's default initializers (weights are created lazily, on first use).
#[derive(Debug, Clone)]
pub struct RandomWeights {
    device: Device,
}

impl RandomWeights {
    /// Random layers on `device`.
    pub fn new(device: &Device) -> Self {
        Self {
            device: device.clone(),
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
        Ok(LinearConfig::new(input, out)
            .with_bias(bias)
            .init(&self.device))
    }

    fn embedding(&mut self, _: &str, vocab: usize, dim: usize) -> Result<Embedding, Infallible> {
        Ok(EmbeddingConfig::new(vocab, dim).init(&self.device))
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

/// Unwraps the result of a build from [`RandomWeights`], which cannot fail.
pub fn infallible<T>(result: Result<T, Infallible>) -> T {
    match result {
        Ok(value) => value,
        Err(never) => match never {},
    }
}
