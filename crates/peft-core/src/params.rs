//! Parameters by their Hugging Face names, and PEFT's trainable-parameter report.
//!
//! Models of this workspace name their fields as Hugging Face does, so a parameter's path in the
//! module tree is its checkpoint name, with two burn-isms undone: enum variants add no path
//! segment, and norm layers call their weight `gamma` and their bias `beta`.

use std::collections::HashMap;
use std::fmt;

use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::{DType, GradientCheckpointingStrategy};

/// Tracks the Hugging Face name of the parameter being visited (for a [`ModuleVisitor`] or
/// [`ModuleMapper`] that works by name, as the optimizer state does).
#[derive(Default)]
pub struct HfPath {
    segments: Vec<Option<String>>,
}

impl HfPath {
    /// Enters the field `name` of a container of `container_type` (burn's visitor arguments).
    pub fn enter(&mut self, name: &str, container_type: &str) {
        let segment = if container_type.starts_with("Enum:") {
            None
        } else if container_type.ends_with("Norm") {
            Some(match name {
                "gamma" => "weight".to_string(),
                "beta" => "bias".to_string(),
                other => other.to_string(),
            })
        } else {
            Some(name.to_string())
        };
        self.segments.push(segment);
    }

    /// Leaves the field last entered.
    pub fn exit(&mut self) {
        self.segments.pop();
    }

    /// The Hugging Face name of the current parameter.
    pub fn name(&self) -> String {
        self.segments
            .iter()
            .flatten()
            .cloned()
            .collect::<Vec<_>>()
            .join(".")
    }
}

/// One float parameter of a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    /// Its Hugging Face name (e.g. `transformer.h.0.input_layernorm.bias`).
    pub name: String,
    /// Its shape as burn holds it (Linear weights are `[d_in, d_out]`).
    pub shape: Vec<usize>,
    /// Whether it receives gradients: true only for unfrozen parameters on an autodiff device.
    pub trainable: bool,
    /// Its element type (a bf16 base keeps f32 adapter parameters).
    pub dtype: DType,
}

/// Draws `module`'s lazily initialized parameters now, in visiting order, on the device each was
/// built for.
///
/// burn's `Initializer` defers a parameter's draw to its first use. Left lazy, an adapter's
/// initial values would come from whatever the device's generator holds at the first forward, so
/// a seed set before `init` would not decide them, and a `to_device` before that first use would
/// draw them from the other backend's generator. Adapter configs call this at the end of `init`.
pub fn initialize_now<M: Module>(module: M) -> M {
    struct Initialize;
    impl ModuleVisitor for Initialize {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            // `val` runs the pending initializer; clones of a parameter share its state.
            let _ = param.val();
        }
    }
    module.visit(&mut Initialize);
    module
}

/// Every float parameter of `module`, in visiting order (lazy parameters get initialized).
pub fn param_infos<M: Module>(module: &M) -> Vec<ParamInfo> {
    struct Infos {
        path: HfPath,
        out: Vec<ParamInfo>,
    }
    impl ModuleVisitor for Infos {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let value = param.val();
            self.out.push(ParamInfo {
                name: self.path.name(),
                shape: param.lazy_shape().to_vec(),
                trainable: value.is_require_grad(),
                dtype: value.dtype(),
            });
        }
    }
    let mut infos = Infos {
        path: HfPath::default(),
        out: Vec::new(),
    };
    module.visit(&mut infos);
    infos.out
}

/// The values of the parameters whose Hugging Face name `select` accepts, by name.
pub fn read_params<M: Module>(
    module: &M,
    select: impl Fn(&str) -> bool,
) -> Vec<(String, TensorData)> {
    struct Reader<F> {
        path: HfPath,
        select: F,
        out: Vec<(String, TensorData)>,
    }
    impl<F: Fn(&str) -> bool> ModuleVisitor for Reader<F> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let name = self.path.name();
            if (self.select)(&name) {
                self.out.push((name, param.val().into_data()));
            }
        }
    }
    let mut reader = Reader {
        path: HfPath::default(),
        select,
        out: Vec::new(),
    };
    module.visit(&mut reader);
    reader.out
}

/// Replaces the parameters named in `values` (Hugging Face names) by those values, keeping each
/// parameter's id, dtype and gradient setting; the entries used are removed from `values`, so
/// what is left had no parameter of that name. The caller checks shapes (see [`param_infos`]).
pub fn write_params<M: Module>(module: M, values: &mut HashMap<String, TensorData>) -> M {
    struct Writer<'a> {
        path: HfPath,
        values: &'a mut HashMap<String, TensorData>,
    }
    impl ModuleMapper for Writer<'_> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let Some(data) = self.values.remove(&self.path.name()) else {
                return param;
            };
            param.map(|old| {
                let require_grad = old.is_require_grad();
                let value = Tensor::<D>::from_data(
                    data,
                    burn::tensor::TensorCreationOptions::new(old.device()).with_dtype(old.dtype()),
                );
                if require_grad {
                    value.require_grad()
                } else {
                    value
                }
            })
        }
    }
    let mut writer = Writer {
        path: HfPath::default(),
        values,
    };
    module.map(&mut writer)
}

/// How a parameter tensor takes part in autodiff (on an autodiff device or not, its
/// checkpointing strategy, whether it requires grad), so that a value computed outside the graph
/// can take its place as the same kind of leaf.
#[derive(Debug, Clone, Copy)]
pub struct LeafKind {
    autodiff: bool,
    strategy: Option<GradientCheckpointingStrategy>,
    require_grad: bool,
}

impl LeafKind {
    /// The kind of `tensor`.
    pub fn of<const D: usize>(tensor: &Tensor<D>) -> Self {
        Self {
            autodiff: tensor.is_autodiff(),
            strategy: tensor.gradient_checkpointing_strategy(),
            require_grad: tensor.is_require_grad(),
        }
    }

    /// `value` as a fresh leaf of this kind (a value recorded in a graph could not require grad).
    pub fn leaf<const D: usize>(&self, value: Tensor<D>) -> Tensor<D> {
        let mut leaf = value.without_autodiff();
        if self.autodiff {
            leaf = leaf.autodiff();
            if let Some(strategy) = self.strategy {
                leaf = leaf.with_gradient_checkpointing_strategy(strategy);
            }
        }
        if self.require_grad {
            leaf = leaf.require_grad();
        }
        leaf
    }
}

/// `module` with every float parameter converted to `dtype`, keeping ids, gradient settings and
/// checkpointing strategy: e.g. a randomly initialized (f32) base in bf16 before an adapter with
/// f32 parameters is attached.
pub fn cast_params<M: Module>(module: M, dtype: DType) -> M {
    struct Cast(DType);
    impl ModuleMapper for Cast {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let dtype = self.0;
            param.map(|tensor| {
                if tensor.dtype() == dtype {
                    return tensor;
                }
                let kind = LeafKind::of(&tensor);
                kind.leaf(tensor.without_autodiff().cast(dtype))
            })
        }
    }
    module.map(&mut Cast(dtype))
}

/// Makes the parameters whose Hugging Face name `select` accepts trainable (on an autodiff
/// device), leaving the others as they are.
pub fn unfreeze_params<M: Module>(module: M, select: impl Fn(&str) -> bool) -> M {
    struct Unfreezer<F> {
        path: HfPath,
        select: F,
    }
    impl<F: Fn(&str) -> bool> ModuleMapper for Unfreezer<F> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if (self.select)(&self.path.name()) {
                param.set_require_grad(true)
            } else {
                param
            }
        }
    }
    module.map(&mut Unfreezer {
        path: HfPath::default(),
        select,
    })
}

/// PEFT's `print_trainable_parameters` numbers: parameters that receive gradients, and all
/// parameters (a tied weight counted once, the adapter's included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainableParameters {
    /// Parameters that receive gradients.
    pub trainable: usize,
    /// All parameters.
    pub all: usize,
}

impl TrainableParameters {
    /// Counts the parameters of `module`. Trainable means "receives gradients", so count a model
    /// built on an autodiff device (`device.autodiff()`); elsewhere nothing is trainable, as in
    /// PEFT's inference mode.
    pub fn of<M: Module>(module: &M) -> Self {
        let infos = param_infos(module);
        let count = |p: &ParamInfo| p.shape.iter().product::<usize>();
        Self {
            trainable: infos.iter().filter(|p| p.trainable).map(count).sum(),
            all: infos.iter().map(count).sum(),
        }
    }

    /// Trainable share in percent.
    pub fn percent(&self) -> f64 {
        if self.all == 0 {
            0.0
        } else {
            100.0 * self.trainable as f64 / self.all as f64
        }
    }
}

/// `1234567` -> `"1,234,567"`, as Python's `{:,}`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl fmt::Display for TrainableParameters {
    /// PEFT's line: `trainable params: 8,960 || all params: 494,041,728 || trainable%: 0.0018`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            thousands(self.trainable),
            thousands(self.all),
            self.percent()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};

    #[derive(Module, Debug)]
    struct Block {
        dense: Linear,
        ln: LayerNorm,
    }

    #[derive(Module, Debug)]
    enum Wrapper {
        Blocks(Vec<Block>),
    }

    fn wrapper(device: &Device) -> Wrapper {
        Wrapper::Blocks(
            (0..2)
                .map(|_| Block {
                    dense: LinearConfig::new(3, 2).init(device),
                    ln: LayerNormConfig::new(2).init(device),
                })
                .collect(),
        )
    }

    #[test]
    fn names_are_hugging_face_names() {
        let names: Vec<String> = param_infos(&wrapper(&Device::default()))
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(
            names,
            [
                "0.dense.weight",
                "0.dense.bias",
                "0.ln.weight",
                "0.ln.bias",
                "1.dense.weight",
                "1.dense.bias",
                "1.ln.weight",
                "1.ln.bias"
            ]
        );
    }

    #[test]
    fn report_counts_what_gets_gradients_and_formats_as_peft() {
        let device = Device::default().autodiff();
        let model = wrapper(&device).freeze();
        let none = TrainableParameters::of(&model);
        assert_eq!(
            none,
            TrainableParameters {
                trainable: 0,
                all: 2 * (6 + 2 + 2 + 2)
            }
        );
        let model = unfreeze_params(model, |name| name.ends_with(".bias"));
        let biases = TrainableParameters::of(&model);
        assert_eq!(biases.trainable, 2 * (2 + 2));
        assert_eq!(
            biases.to_string(),
            "trainable params: 8 || all params: 24 || trainable%: 33.3333"
        );
        let big = TrainableParameters {
            trainable: 15_360,
            all: 1_543_729_664,
        };
        assert_eq!(
            big.to_string(),
            "trainable params: 15,360 || all params: 1,543,729,664 || trainable%: 0.0010"
        );
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
    }

    #[test]
    fn params_are_read_and_written_by_name() {
        let device = Device::default();
        let model = wrapper(&device);
        let biases = read_params(&model, |n| n.ends_with("ln.bias"));
        assert_eq!(biases.len(), 2);
        let mut values: HashMap<String, TensorData> = [
            (
                "1.ln.bias".to_string(),
                TensorData::new(vec![5.0f32, 6.0], [2]),
            ),
            (
                "nowhere.bias".to_string(),
                TensorData::new(vec![1.0f32], [1]),
            ),
        ]
        .into_iter()
        .collect();
        let model = write_params(model, &mut values);
        assert_eq!(values.keys().collect::<Vec<_>>(), ["nowhere.bias"]);
        let Wrapper::Blocks(blocks) = &model;
        let b: Vec<f32> = blocks[1]
            .ln
            .beta
            .as_ref()
            .unwrap()
            .val()
            .into_data()
            .try_into_vec_as()
            .unwrap();
        assert_eq!(b, [5.0, 6.0]);
    }
}
