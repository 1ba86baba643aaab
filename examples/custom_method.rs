//! A new method defined outside the workspace's method crates: prompt tuning with a learned
//! scale (the virtual tokens are `exp(log_scale) * prompt`, one trainable scalar beside the
//! prompt). It implements `peft_core::Adapter` and nothing else; `PeftModel`, the training loop,
//! checkpoints, evaluation and loading work on it unchanged, and no crate of the workspace knows it.
//!
//! ```sh
//! cargo run --release --example custom_method            # trains on the fixture Qwen2, prints
//! cargo test --example custom_method                     # the same, with assertions
//! ```

use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::DType;
use peft::core::adapter_config::{
    AdapterError, PromptLearningConfig, PromptLearningFile, check_num_virtual_tokens,
    write_adapter_dir,
};
use peft::core::adapter_file::{ADAPTER_WEIGHTS, PROMPT_EMBEDDINGS, TensorFile};
use peft::core::params::initialize_now;
use peft::core::{Adapter, CausalLm, Injection, ModelGeometry, PeftModel};
use peft::models::{AutoCausalLm, SpecialTokens, load_tokenizer};
use peft::train::data::{
    DataOptions, Dataset, TokenizeOptions, TokenizedDataset, TokenizedExample, TokenizerEncoder,
};
use peft::train::trainer::{EvalMetrics, EvalOptions, evaluate};
use peft::train::{TrainingConfig, TrainingRun, train};
use serde::{Deserialize, Serialize};

/// The method's `peft_type` (PEFT has no such method; our name, in PEFT's style).
const PEFT_TYPE: &str = "SCALED_PROMPT_TUNING";
/// The scale's tensor in `adapter_model.safetensors`.
const LOG_SCALE: &str = "log_scale";

/// Configuration: PEFT-style fields, as every config of the workspace.
#[derive(Config, Debug)]
pub struct ScaledPromptConfig {
    /// Virtual tokens prepended to every row.
    pub num_virtual_tokens: usize,
    /// The starting scale of the prompt.
    #[config(default = 1.0)]
    pub init_scale: f64,
}

/// The method's own keys of `adapter_config.json`, beside PEFT's shared prompt-learning ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ScaledPromptKeys {
    init_scale: f64,
}

/// The adapter: a soft prompt and the log of its scale.
#[derive(Module, Debug)]
pub struct ScaledPrompt {
    /// `[num_virtual_tokens, hidden_size]`.
    pub prompt: Param<Tensor<2>>,
    /// `[1]`.
    pub log_scale: Param<Tensor<1>>,
    /// Recorded in the saved config.
    pub init_scale: f64,
}

impl ScaledPromptConfig {
    /// A prompt of N(0, 1) values for a base model of `geometry`, on `device`.
    pub fn init(
        &self,
        geometry: &ModelGeometry,
        device: &Device,
    ) -> Result<ScaledPrompt, AdapterError> {
        check_num_virtual_tokens(self.num_virtual_tokens, geometry)?;
        let shape = [self.num_virtual_tokens, geometry.hidden_size];
        let prompt = Tensor::random(shape, burn::tensor::Distribution::Normal(0.0, 1.0), device);
        Ok(initialize_now(ScaledPrompt {
            prompt: Param::from_tensor(prompt),
            log_scale: Param::from_tensor(Tensor::from_floats(
                [self.init_scale.ln() as f32],
                device,
            )),
            init_scale: self.init_scale,
        }))
    }
}

impl ScaledPrompt {
    fn scaled(&self) -> Tensor<2> {
        self.prompt.val() * self.log_scale.val().exp().unsqueeze::<2>()
    }
}

impl Adapter for ScaledPrompt {
    fn num_virtual_tokens(&self) -> usize {
        self.prompt.dims()[0]
    }

    fn inject(&self, batch: usize) -> Injection {
        Injection::virtual_tokens(self.scaled(), batch)
    }

    fn save<M: CausalLm>(
        &self,
        dir: &Path,
        base: &M,
        base_model_name_or_path: Option<&str>,
    ) -> Result<(), AdapterError> {
        let geometry = base.geometry();
        let file = PromptLearningFile {
            shared: PromptLearningConfig::new(
                PEFT_TYPE,
                self.num_virtual_tokens(),
                geometry.hidden_size,
                geometry.num_attention_heads,
                geometry.num_layers,
                base_model_name_or_path,
            ),
            method: ScaledPromptKeys {
                init_scale: self.init_scale,
            },
        };
        let weights = vec![
            (PROMPT_EMBEDDINGS, self.prompt.val().into_data()),
            (LOG_SCALE, self.log_scale.val().into_data()),
        ];
        Ok(write_adapter_dir(dir, &file.to_json(), weights, None)?)
    }

    fn load<M: CausalLm>(dir: &Path, base: M) -> Result<(M, Self), AdapterError> {
        let (file, raw) = PromptLearningFile::<ScaledPromptKeys>::read(dir, PEFT_TYPE)?;
        let geometry = base.geometry();
        file.shared.check_base(
            &raw,
            &geometry,
            geometry.hidden_size,
            geometry.num_attention_heads,
        )?;
        let tensors = TensorFile::open(&dir.join(ADAPTER_WEIGHTS))?;
        let n = file.shared.num_virtual_tokens;
        let device = base.device();
        let why = "num_virtual_tokens x hidden_size";
        let prompt = tensors.tensor(PROMPT_EMBEDDINGS, [n, geometry.hidden_size], why, &device)?;
        let log_scale = tensors.tensor(LOG_SCALE, [1], "one scalar", &device)?;
        tensors.expect_only(
            &[PROMPT_EMBEDDINGS, LOG_SCALE],
            "is not part of this adapter",
        )?;
        let adapter = Self {
            prompt: Param::from_tensor(prompt),
            log_scale: Param::from_tensor(log_scale),
            init_scale: file.method.init_scale,
        };
        Ok((base, adapter))
    }
}

/// What a run shows: held-out metrics before and after, and after reloading the saved adapter.
struct Outcome {
    before: EvalMetrics,
    after: EvalMetrics,
    reloaded: EvalMetrics,
    scale: f32,
}

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/models/qwen2-gqa-tied")
}

/// 24 rows: reverse a word.
fn rows() -> Vec<TokenizedExample> {
    let words = ["cat", "dog", "sun", "tree", "red", "blue"];
    let jsonl: String = (0..24)
        .map(|i| {
            let w = words[i % words.len()];
            let reversed: String = w.chars().rev().collect();
            format!("{{\"prompt\": \"Reverse {w} {i}: \", \"completion\": \"{reversed}\"}}\n")
        })
        .collect();
    let dataset = Dataset::from_jsonl_str(Path::new("rows.jsonl"), &jsonl, &DataOptions::default())
        .expect("rows parse");
    let tokenizer = load_tokenizer(model_dir()).expect("fixture tokenizer");
    let options = TokenizeOptions {
        max_length: 64,
        eos_token_id: Some(0),
        skip_bad_rows: false,
    };
    TokenizedDataset::new(dataset, &TokenizerEncoder(&tokenizer), &options)
        .expect("rows tokenize")
        .examples
}

fn run(output: &Path) -> Outcome {
    let device = Device::default().autodiff();
    let base = AutoCausalLm::from_pretrained(model_dir(), &device, DType::F32).expect("fixture");
    device.seed(0);
    let adapter = ScaledPromptConfig::new(4)
        .with_init_scale(0.5)
        .init(&base.geometry(), &device)
        .expect("fits the model");
    let model = PeftModel::new(base, adapter);
    let rows = rows();
    let special = SpecialTokens::from_dir(model_dir()).expect("fixture ids");
    let config = TrainingConfig::new()
        .with_lr(1e-1)
        .with_epochs(10)
        .with_batch_size(8)
        .with_eval_exact_match(false);
    let run = TrainingRun {
        output_dir: output.to_path_buf(),
        pad_token_id: special.pad_token_id,
        eos_token_ids: special.eos_token_ids.clone(),
        base_model_name_or_path: None,
        resume: false,
        devices: Vec::new(),
        gradient_sync: Default::default(),
    };
    let options = EvalOptions::of(&config, &run);
    let before = evaluate(&model.valid(), &rows, &options, 0).expect("evaluates");
    let outcome = train(model, &rows, None, &config, &run, &mut ()).expect("trains");
    let trained = outcome.model;
    let after =
        evaluate(&trained.valid(), &rows, &options, outcome.global_step).expect("evaluates");
    let scale: f32 = trained.adapter.log_scale.val().exp().into_scalar();

    let saved = output.join("adapter");
    trained.save_pretrained(&saved, None).expect("saves");
    let base = AutoCausalLm::from_pretrained(model_dir(), &Device::default(), DType::F32).unwrap();
    let reloaded =
        PeftModel::<AutoCausalLm, ScaledPrompt>::from_pretrained(base, &saved).expect("reloads");
    let reloaded = evaluate(&reloaded, &rows, &options, outcome.global_step).expect("evaluates");
    Outcome {
        before,
        after,
        reloaded,
        scale,
    }
}

fn main() {
    let output = std::env::temp_dir().join("peft-custom-method");
    let _ = std::fs::remove_dir_all(&output);
    let outcome = run(&output);
    println!(
        "{PEFT_TYPE}: loss {:.4} -> {:.4} (reloaded from {}: {:.4}); scale 0.5 -> {:.3}",
        outcome.before.loss,
        outcome.after.loss,
        output.join("adapter").display(),
        outcome.reloaded.loss,
        outcome.scale
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_method_outside_the_workspace_trains_saves_and_reloads() {
        let output = std::env::temp_dir().join(format!("peft-custom-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&output);
        let outcome = run(&output);
        assert!(
            // 7.51 -> 5.39 when written (a random tiny model: the point is that it learns).
            outcome.after.loss < outcome.before.loss - 1.0,
            "loss {} -> {}",
            outcome.before.loss,
            outcome.after.loss
        );
        // The scale is trained too, and the saved adapter is the trained one.
        assert!(
            (outcome.scale - 0.5).abs() > 1e-3,
            "scale {}",
            outcome.scale
        );
        assert!(
            (outcome.reloaded.loss - outcome.after.loss).abs() < 1e-5,
            "{} vs {}",
            outcome.reloaded.loss,
            outcome.after.loss
        );
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(output.join("adapter/adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["peft_type"], PEFT_TYPE);
        assert_eq!(config["init_scale"], 0.5);
        std::fs::remove_dir_all(output).unwrap();
    }
}
