//! AdamW exactly as PyTorch's `torch.optim.AdamW` computes it, with its state kept by parameter
//! name, and global-norm gradient clipping.
//!
//! burn's own optimizers key their state by `ParamId`, which a reload of the adapter files does
//! not preserve, and its `GradientClippingConfig::Norm` clips each tensor on its own; a resumable
//! run needs state by name and clipping over the global norm (`torch.nn.utils.clip_grad_norm_`).

use std::collections::HashMap;
use std::path::Path;

use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::DType;

use peft_core::adapter_file::{AdapterFileError, TensorFile, write_tensors};
use peft_core::params::{HfPath, LeafKind, param_infos};

/// AdamW's settings. The defaults are PyTorch's (`torch.optim.AdamW`), not burn's (whose epsilon
/// is 1e-5 and weight decay 1e-4).
#[derive(Config, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Decay of the first-moment average.
    #[config(default = 0.9)]
    pub beta_1: f64,
    /// Decay of the second-moment average.
    #[config(default = 0.999)]
    pub beta_2: f64,
    /// Added to the denominator for stability.
    #[config(default = 1e-8)]
    pub epsilon: f64,
    /// Decoupled weight decay (the parameter shrinks by `lr * weight_decay` each step).
    #[config(default = 0.01)]
    pub weight_decay: f64,
}

/// One parameter's moments (`exp_avg`, `exp_avg_sq` in PyTorch's state dict), flattened.
struct Moments {
    shape: Vec<usize>,
    exp_avg: Tensor<1>,
    exp_avg_sq: Tensor<1>,
}

/// AdamW over the parameters that receive gradients, state by Hugging Face parameter name.
pub struct AdamW {
    config: AdamWConfig,
    steps: usize,
    moments: HashMap<String, Moments>,
}

impl AdamWConfig {
    /// An optimizer with no state yet.
    pub fn init(&self) -> AdamW {
        AdamW {
            config: self.clone(),
            steps: 0,
            moments: HashMap::new(),
        }
    }
}

impl AdamW {
    /// Steps taken so far.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Updates every parameter of `module` that has a gradient in `grads`, scaling the gradients
    /// by `grad_scale` first (the clipping coefficient, see [`clip_coefficient`]).
    pub fn step<M: Module>(
        &mut self,
        module: M,
        mut grads: GradientsParams,
        lr: f64,
        grad_scale: f64,
    ) -> M {
        self.steps += 1;
        let t = self.steps as i32;
        let mut mapper = Stepper {
            path: HfPath::default(),
            grads: &mut grads,
            moments: &mut self.moments,
            config: &self.config,
            lr,
            grad_scale,
            bias_correction_1: 1.0 - self.config.beta_1.powi(t),
            bias_correction_2_sqrt: (1.0 - self.config.beta_2.powi(t)).sqrt(),
        };
        module.map(&mut mapper)
    }

    /// The state as tensors named `{param}.exp_avg` and `{param}.exp_avg_sq`, in the parameters'
    /// shapes.
    pub fn state_tensors(&self) -> Vec<(String, TensorData)> {
        let mut names: Vec<&String> = self.moments.keys().collect();
        names.sort();
        names
            .into_iter()
            .flat_map(|name| {
                let m = &self.moments[name];
                [
                    (format!("{name}.exp_avg"), &m.exp_avg),
                    (format!("{name}.exp_avg_sq"), &m.exp_avg_sq),
                ]
                .map(|(key, t)| (key, with_shape(t.clone().into_data(), m.shape.clone())))
            })
            .collect()
    }

    /// Writes the state to a safetensors file (atomically).
    pub fn save(&self, path: &Path) -> Result<(), AdapterFileError> {
        let tensors = self.state_tensors();
        write_tensors(
            path,
            tensors
                .iter()
                .map(|(n, d)| (n.as_str(), d.clone()))
                .collect(),
        )
    }

    /// Reads the state written by [`AdamW::save`] after `steps` steps, for the trainable
    /// parameters of `module` (each must be present with its shape).
    pub fn load<M: Module>(
        &mut self,
        path: &Path,
        module: &M,
        steps: usize,
        device: &Device,
    ) -> Result<(), AdapterFileError> {
        let file = TensorFile::open(path)?;
        let mut moments = HashMap::new();
        let expected: Vec<String> = param_infos(module)
            .into_iter()
            .filter(|p| p.trainable)
            .map(|info| {
                let n = info.shape.iter().product();
                let read = |suffix: &str| -> Result<Tensor<1>, AdapterFileError> {
                    let data = file.data(
                        &format!("{}.{suffix}", info.name),
                        &info.shape,
                        "the parameter's shape",
                    )?;
                    Ok(Tensor::<1>::from_data(with_shape(data, vec![n]), device))
                };
                let (exp_avg, exp_avg_sq) = (read("exp_avg")?, read("exp_avg_sq")?);
                moments.insert(
                    info.name.clone(),
                    Moments {
                        shape: info.shape,
                        exp_avg,
                        exp_avg_sq,
                    },
                );
                Ok(info.name)
            })
            .collect::<Result<_, AdapterFileError>>()?;
        if let Some(extra) = file.names().into_iter().find(|name| {
            let param = name
                .strip_suffix(".exp_avg_sq")
                .or_else(|| name.strip_suffix(".exp_avg"));
            !param.is_some_and(|p| expected.iter().any(|e| e == p))
        }) {
            return Err(AdapterFileError::UnexpectedTensor {
                path: path.to_path_buf(),
                name: extra,
                why: "belongs to no trainable parameter of this model".into(),
            });
        }
        self.moments = moments;
        self.steps = steps;
        Ok(())
    }
}

/// `data` viewed with another shape of as many elements.
fn with_shape(data: TensorData, shape: Vec<usize>) -> TensorData {
    let (bytes, _, dtype) = data.into_parts();
    TensorData::from_bytes(bytes, shape, dtype)
}

struct Stepper<'a> {
    path: HfPath,
    grads: &'a mut GradientsParams,
    moments: &'a mut HashMap<String, Moments>,
    config: &'a AdamWConfig,
    lr: f64,
    grad_scale: f64,
    bias_correction_1: f64,
    bias_correction_2_sqrt: f64,
}

impl ModuleMapper for Stepper<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let name = self.path.name();
        let config = self.config;
        let dims = tensor.dims();
        let n: usize = dims.iter().product();
        let kind = LeafKind::of(&tensor);
        let dtype = tensor.dtype();
        let value = tensor.inner().cast(DType::F32).reshape([n]);
        let mut grad = grad.cast(DType::F32).reshape([n]);
        if self.grad_scale != 1.0 {
            grad = grad.mul_scalar(self.grad_scale);
        }
        let moments = self.moments.remove(&name).unwrap_or_else(|| Moments {
            shape: dims.to_vec(),
            exp_avg: Tensor::zeros([n], &grad.device()),
            exp_avg_sq: Tensor::zeros([n], &grad.device()),
        });
        // torch.optim.AdamW (single-tensor path): decay, moments, then
        // p -= lr / bc1 * exp_avg / (sqrt(exp_avg_sq) / sqrt(bc2) + eps).
        let exp_avg = moments.exp_avg.mul_scalar(config.beta_1)
            + grad.clone().mul_scalar(1.0 - config.beta_1);
        let exp_avg_sq = moments.exp_avg_sq.mul_scalar(config.beta_2)
            + grad.square().mul_scalar(1.0 - config.beta_2);
        let value = if config.weight_decay != 0.0 {
            value.mul_scalar(1.0 - self.lr * config.weight_decay)
        } else {
            value
        };
        let denom = exp_avg_sq
            .clone()
            .sqrt()
            .div_scalar(self.bias_correction_2_sqrt)
            .add_scalar(config.epsilon);
        let value = value - (exp_avg.clone() / denom).mul_scalar(self.lr / self.bias_correction_1);
        self.moments.insert(
            name,
            Moments {
                shape: dims.to_vec(),
                exp_avg,
                exp_avg_sq,
            },
        );
        let updated = kind.leaf(value.reshape(dims).cast(dtype));
        Param::from_mapped_value(id, updated, mapper)
    }
}

/// The global L2 norm of the gradients of `module`'s parameters held in `grads`, as
/// `torch.nn.utils.clip_grad_norm_` computes it (over all tensors at once), in f32.
pub fn global_grad_norm<M: Module>(module: &M, grads: &GradientsParams) -> f64 {
    struct SquaredSums<'a> {
        grads: &'a GradientsParams,
        sums: Vec<Tensor<1>>,
    }
    impl ModuleVisitor for SquaredSums<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(grad) = self.grads.get::<D>(param.id) {
                self.sums.push(grad.cast(DType::F32).square().sum());
            }
        }
    }
    let mut visitor = SquaredSums {
        grads,
        sums: Vec::new(),
    };
    module.visit(&mut visitor);
    if visitor.sums.is_empty() {
        return 0.0;
    }
    let total: f32 = Tensor::cat(visitor.sums, 0).sum().sqrt().into_scalar();
    f64::from(total)
}

/// The factor `clip_grad_norm_` multiplies gradients by: `max_norm / (norm + 1e-6)`, at most 1.
pub fn clip_coefficient(norm: f64, max_norm: Option<f64>) -> f64 {
    max_norm.map_or(1.0, |max| (max / (norm + 1e-6)).min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;

    #[derive(Module, Debug)]
    struct Two {
        a: Param<Tensor<2>>,
        b: Param<Tensor<1>>,
    }

    fn model(device: &Device) -> Two {
        Two {
            a: Param::from_tensor(Tensor::from_floats([[0.5, -1.0], [2.0, 0.25]], device)),
            b: Param::from_tensor(Tensor::from_floats([1.0, -3.0], device)),
        }
    }

    fn grads(model: &Two, x: f32) -> GradientsParams {
        let loss = (model.a.val() * x).square().sum() + (model.b.val() * x).sum();
        GradientsParams::from_grads(loss.backward(), model)
    }

    /// Three steps of `torch.optim.AdamW(lr=0.1)` (defaults otherwise) with gradients clipped
    /// by `clip_grad_norm_(max_norm=1.0)` on the loss `sum((a*x)^2) + sum(b*x)`, x = 1, 2, 3,
    /// computed with torch 2.15.0.
    #[test]
    fn matches_torch_adamw_with_global_norm_clipping() {
        let device = Device::default().autodiff();
        let mut model = model(&device);
        let mut optim = AdamWConfig::new().init();
        let mut norms = Vec::new();
        for x in [1.0, 2.0, 3.0] {
            let g = grads(&model, x);
            let norm = global_grad_norm(&model, &g);
            norms.push(norm);
            model = optim.step(model, g, 0.1, clip_coefficient(norm, Some(1.0)));
        }
        let a: Vec<f32> = model.a.val().into_data().try_to_vec::<f32>().unwrap();
        let b: Vec<f32> = model.b.val().into_data().try_to_vec::<f32>().unwrap();
        // PyTorch's values, printed in double precision.
        let expected_a: [f64; 4] = [0.20125481, -0.69746530, 1.69398844, -0.03401872];
        let expected_b: [f64; 2] = [0.71235412, -3.27565765];
        let expected_norms = [4.8218255, 17.3760853, 36.0479736];
        for (got, want) in a.iter().zip(expected_a).chain(b.iter().zip(expected_b)) {
            assert!((f64::from(*got) - want).abs() < 2e-6, "{a:?} {b:?}");
        }
        for (got, want) in norms.iter().zip(expected_norms) {
            assert!((got - want).abs() < 1e-4, "{norms:?}");
        }
        assert!(model.a.val().is_require_grad() && model.b.val().is_require_grad());
    }

    #[test]
    fn state_round_trips_by_name() {
        let device = Device::default().autodiff();
        let mut model = model(&device);
        let mut optim = AdamWConfig::new().init();
        let g = grads(&model, 1.0);
        model = optim.step(model, g, 0.1, 1.0);
        let dir = std::env::temp_dir().join(format!("peft-core-optim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("optimizer.safetensors");
        optim.save(&path).unwrap();

        // A reloaded model has new parameter ids; the state follows the names.
        let mut fresh = model.clone();
        fresh.a = Param::from_tensor(model.a.val().inner().autodiff());
        let mut reloaded = AdamWConfig::new().init();
        reloaded.load(&path, &fresh, 1, &device).unwrap();
        let g1 = grads(&model, 2.0);
        let g2 = grads(&fresh, 2.0);
        let a = optim.step(model, g1, 0.1, 1.0).a.val().into_data();
        let b = reloaded.step(fresh, g2, 0.1, 1.0).a.val().into_data();
        assert_eq!(a, b);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
