//! A stacked bidirectional LSTM laid out as PyTorch's `nn.LSTM(bidirectional=True)`.
//!
//! burn's `BiLstm` keeps one Linear per gate and has no layer stacking; PEFT's checkpoints hold
//! PyTorch's packed gates (`weight_ih_l{k}[_reverse]` of `[4h, in]`, gate order i, f, g, o), so
//! this module stores exactly those tensors and runs them directly.

use burn::module::Param;
use burn::nn::{Dropout, DropoutConfig, Initializer};
use burn::prelude::*;
use burn::tensor::activation::{sigmoid, tanh};

/// Configuration of a [`BiLstm`].
#[derive(Config, Debug)]
pub struct BiLstmConfig {
    /// Width of the input.
    pub input_size: usize,
    /// Width of each direction's hidden state (the output is twice as wide).
    pub hidden_size: usize,
    /// Stacked layers.
    #[config(default = 2)]
    pub num_layers: usize,
    /// Dropout on every layer's output but the last (PyTorch's `dropout`).
    #[config(default = 0.0)]
    pub dropout: f64,
}

/// One direction of one layer, PyTorch's tensors as they are.
#[derive(Module, Debug)]
pub struct LstmDirection {
    /// `[4 * hidden, input]`, gates i, f, g, o.
    pub weight_ih: Param<Tensor<2>>,
    /// `[4 * hidden, hidden]`.
    pub weight_hh: Param<Tensor<2>>,
    /// `[4 * hidden]`.
    pub bias_ih: Param<Tensor<1>>,
    /// `[4 * hidden]`.
    pub bias_hh: Param<Tensor<1>>,
}

/// One layer: a forward and a reverse direction, outputs concatenated.
#[derive(Module, Debug)]
pub struct BiLstmLayer {
    /// Reads the sequence left to right (PyTorch `*_l{k}`).
    pub forward: LstmDirection,
    /// Reads it right to left (PyTorch `*_l{k}_reverse`).
    pub reverse: LstmDirection,
}

/// A stacked bidirectional LSTM over one sequence.
#[derive(Module, Debug)]
pub struct BiLstm {
    /// The layers, first to last.
    pub layers: Vec<BiLstmLayer>,
    /// Between layers.
    pub dropout: Dropout,
}

impl BiLstmConfig {
    /// PyTorch's initialization: every tensor U(-1/sqrt(hidden), 1/sqrt(hidden)).
    pub fn init(&self, device: &Device) -> BiLstm {
        let h = self.hidden_size;
        let k = 1.0 / (h as f64).sqrt();
        let init = Initializer::Uniform { min: -k, max: k };
        let direction = |input: usize| LstmDirection {
            weight_ih: init.init([4 * h, input], device),
            weight_hh: init.init([4 * h, h], device),
            bias_ih: init.init([4 * h], device),
            bias_hh: init.init([4 * h], device),
        };
        BiLstm {
            layers: (0..self.num_layers)
                .map(|layer| {
                    let input = if layer == 0 { self.input_size } else { 2 * h };
                    BiLstmLayer {
                        forward: direction(input),
                        reverse: direction(input),
                    }
                })
                .collect(),
            dropout: DropoutConfig::new(self.dropout).init(),
        }
    }

    /// Parameters of the LSTM, counted from the configuration alone.
    pub fn num_params(&self) -> usize {
        // Closed form, saturating: a layer count or width from user input must not loop or panic.
        let h = self.hidden_size;
        let layer = |input: usize| {
            let gates = h.saturating_mul(4);
            gates
                .saturating_mul(input.saturating_add(h))
                .saturating_add(h.saturating_mul(8))
                .saturating_mul(2)
        };
        match self.num_layers {
            0 => 0,
            n => layer(self.input_size)
                .saturating_add((n - 1).saturating_mul(layer(h.saturating_mul(2)))),
        }
    }
}

impl LstmDirection {
    fn hidden_size(&self) -> usize {
        self.weight_hh.dims()[1]
    }

    /// Hidden states of `input` `[len, in]` read in order (or in reverse), returned in the input's
    /// order: `[len, hidden]`.
    fn forward(&self, input: Tensor<2>, reverse: bool) -> Tensor<2> {
        let [len, _] = input.dims();
        let h = self.hidden_size();
        let device = input.device();
        // The input projection of every step at once; only the recurrence is sequential.
        let gates_x = input.matmul(self.weight_ih.val().transpose())
            + (self.bias_ih.val() + self.bias_hh.val()).unsqueeze::<2>();
        let weight_hh_t = self.weight_hh.val().transpose();
        let mut hidden = Tensor::<2>::zeros([1, h], &device);
        let mut cell = Tensor::<2>::zeros([1, h], &device);
        let mut outputs = vec![None; len];
        let steps: Vec<usize> = if reverse {
            (0..len).rev().collect()
        } else {
            (0..len).collect()
        };
        for t in steps {
            let gates = gates_x.clone().slice([t..t + 1, 0..4 * h])
                + hidden.clone().matmul(weight_hh_t.clone());
            let i = sigmoid(gates.clone().slice([0..1, 0..h]));
            let f = sigmoid(gates.clone().slice([0..1, h..2 * h]));
            let g = tanh(gates.clone().slice([0..1, 2 * h..3 * h]));
            let o = sigmoid(gates.slice([0..1, 3 * h..4 * h]));
            cell = f * cell + i * g;
            hidden = o * tanh(cell.clone());
            outputs[t] = Some(hidden.clone());
        }
        Tensor::cat(outputs.into_iter().flatten().collect(), 0)
    }
}

impl BiLstm {
    /// Outputs of the last layer for one sequence `[len, input]`: `[len, 2 * hidden]` (forward
    /// then reverse direction, as PyTorch concatenates them).
    pub fn forward(&self, input: Tensor<2>) -> Tensor<2> {
        let last = self.layers.len() - 1;
        let mut x = input;
        for (index, layer) in self.layers.iter().enumerate() {
            x = Tensor::cat(
                vec![
                    layer.forward.forward(x.clone(), false),
                    layer.reverse.forward(x, true),
                ],
                1,
            );
            if index < last {
                x = self.dropout.forward(x);
            }
        }
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_count_follow_pytorch() {
        let device = Device::default();
        let config = BiLstmConfig::new(6, 4);
        let lstm = config.init(&device);
        assert_eq!(lstm.num_params(), config.num_params());
        // PyTorch: layer 0 has 2 x (4h(in + h) + 8h), layer 1 reads 2h.
        assert_eq!(config.num_params(), 2 * (16 * 10 + 32) + 2 * (16 * 12 + 32));
        let out = lstm.forward(Tensor::ones([5, 6], &device));
        assert_eq!(out.dims(), [5, 8]);
    }

    #[test]
    fn reverse_direction_reads_right_to_left() {
        // With a constant-free input, the forward direction's first output depends on x[0] only
        // and the reverse direction's last output depends on x[last] only.
        let device = Device::default();
        let lstm = BiLstmConfig::new(2, 3).with_num_layers(1).init(&device);
        let a = Tensor::<2>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [3, 2]),
            &device,
        );
        let b = Tensor::<2>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 0.0, 0.0, 5.0, 6.0], [3, 2]),
            &device,
        );
        let (ya, yb) = (lstm.forward(a), lstm.forward(b));
        let row = |y: &Tensor<2>, t: usize| -> Vec<f32> {
            y.clone()
                .slice([t..t + 1, 0..6])
                .into_data()
                .try_into_vec_as()
                .unwrap()
        };
        assert_eq!(row(&ya, 0)[..3], row(&yb, 0)[..3]);
        assert_eq!(row(&ya, 2)[3..], row(&yb, 2)[3..]);
        assert_ne!(row(&ya, 2)[..3], row(&yb, 2)[..3]);
    }
}
