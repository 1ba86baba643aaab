//! `cargo xtask pretrain`: builds the embedded default model, `assets/tiny-qwen2`, from nothing.
//!
//! A character-level tokenizer (printable ASCII + newline, `<|endoftext|>` = 0 as EOS and pad),
//! a Qwen2-architecture config, and weights trained with this workspace's own code (full
//! fine-tuning with peft-core's AdamW) on every task of `peft_cli::tasks`, each introduced by its
//! name ("reverse: abcd -> dcba"). The loss is on the answer (and EOS) only.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::Distribution;
use peft::core::params::{read_params, write_params};
use peft::core::{
    CausalLm, GenerationConfig, IGNORE_INDEX, Injection, cross_entropy_ignoring, generate,
};
use peft::models::AutoConfig;
use peft::train::data::{Batch, TokenizedExample};
use peft::train::optim::{AdamWConfig, clip_coefficient, global_grad_norm};
use peft::train::trainer::linear_schedule;
use peft_cli::tasks::{TASKS, instructed_prompt, random_word};
use rand::{SeedableRng, rngs::StdRng};
use serde_json::json;

/// Arguments of `cargo xtask pretrain`.
#[derive(clap::Args)]
pub struct PretrainArgs {
    /// Model directory to write.
    #[arg(long, default_value = "assets/tiny-qwen2")]
    pub output: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 6000)]
    pub steps: usize,
    /// Rows per step.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Peak learning rate (linear warmup over 200 steps, then linear decay).
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// Seed of the weights and the data.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Report accuracy every this many steps.
    #[arg(long, default_value_t = 500)]
    pub eval_every: usize,
}

const EOS: u32 = 0;
const EOS_TEXT: &str = "<|endoftext|>";

/// Token id of a character: printable ASCII from 1, newline last.
fn vocabulary() -> Vec<String> {
    let mut vocab = vec![EOS_TEXT.to_string()];
    vocab.extend((b' '..=b'~').map(|b| char::from(b).to_string()));
    vocab.push("\n".into());
    vocab
}

fn encode(text: &str) -> Vec<u32> {
    text.chars()
        .map(|c| match c {
            ' '..='~' => u32::from(c) - u32::from(b' ') + 1,
            '\n' => 96,
            other => panic!("no token for {other:?}"),
        })
        .collect()
}

/// A Hugging Face `tokenizer.json`: one token per character (WordLevel over a split of every
/// character), joined back without spaces.
fn tokenizer_json() -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> = vocabulary()
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, json!(i)))
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{
            "id": EOS, "content": EOS_TEXT, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }],
        "normalizer": null,
        "pre_tokenizer": {
            "type": "Split",
            "pattern": {"Regex": "(?s)."},
            "behavior": "Isolated",
            "invert": false
        },
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": EOS_TEXT}
    })
}

fn config_json() -> serde_json::Value {
    json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocabulary().len(),
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": true,
        "use_sliding_window": false,
        "attention_dropout": 0.0,
        "bos_token_id": EOS,
        "eos_token_id": EOS,
        "pad_token_id": EOS,
        "torch_dtype": "float32"
    })
}

/// One instructed row of a random task.
fn row(rng: &mut StdRng, task: usize) -> TokenizedExample {
    let word = random_word(rng);
    let task = &TASKS[task];
    let prompt = encode(&instructed_prompt(task, &word));
    let mut target = encode(&(task.apply)(&word));
    target.push(EOS);
    let labels = prompt
        .iter()
        .map(|_| IGNORE_INDEX)
        .chain(target.iter().map(|&t| i64::from(t)))
        .collect();
    TokenizedExample {
        line: 0,
        prompt_len: prompt.len(),
        input_ids: prompt.into_iter().chain(target).collect(),
        labels,
        is_text: false,
        truncated: false,
    }
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Greedy exact-match accuracy per task on `rows_per_task` fresh instructed rows.
fn accuracy<M: CausalLm>(model: &M, rng: &mut StdRng, rows_per_task: usize) -> Vec<f64> {
    (0..TASKS.len())
        .map(|t| {
            let rows: Vec<TokenizedExample> = (0..rows_per_task).map(|_| row(rng, t)).collect();
            let prompts: Vec<Vec<u32>> = rows.iter().map(|r| r.prompt_ids().to_vec()).collect();
            let longest = rows.iter().map(|r| r.target_ids().len()).max().unwrap_or(1);
            let config = GenerationConfig::new()
                .with_max_new_tokens(longest)
                .with_eos_token_ids(vec![EOS])
                .with_pad_token_id(EOS);
            let out = generate(model, &prompts, Injection::default(), &config, |_| {
                ControlFlow::Continue(())
            })
            .expect("generation runs");
            let hits = rows
                .iter()
                .zip(&out.new_tokens)
                .filter(|(r, g)| g.starts_with(r.target_ids()))
                .count();
            hits as f64 / rows_per_task as f64
        })
        .collect()
}

/// Runs the pretraining and writes the model directory.
pub fn pretrain(args: &PretrainArgs) -> Result<(), String> {
    std::fs::create_dir_all(&args.output).map_err(|e| format!("{}: {e}", args.output.display()))?;
    let config_path = args.output.join("config.json");
    write(
        &config_path,
        &serde_json::to_string_pretty(&config_json()).unwrap(),
    )?;
    write(
        &args.output.join("generation_config.json"),
        &serde_json::to_string_pretty(&json!({"eos_token_id": EOS, "pad_token_id": EOS})).unwrap(),
    )?;
    write(
        &args.output.join("tokenizer.json"),
        &serde_json::to_string(&tokenizer_json()).unwrap(),
    )?;
    // The tokenizer file must agree with the encoder used here.
    let tokenizer = peft::models::load_tokenizer(&args.output).map_err(|e| e.to_string())?;
    let sample = "reverse: abc -> cba\nXYZ~";
    let ids = tokenizer.encode(sample, true).map_err(|e| e.to_string())?;
    if ids.get_ids() != encode(sample).as_slice() {
        return Err(format!("tokenizer.json disagrees: {:?}", ids.get_ids()));
    }

    let device = peft::default_device().autodiff();
    device.seed(args.seed);
    let config = AutoConfig::from_file(&config_path).map_err(|e| e.to_string())?;
    // Hugging Face's init (`initializer_range` 0.02 for every matrix, zero biases, unit norms):
    // burn's default N(0, 1) embeddings, tied to the head, start with a loss near 30.
    let model = config.init(&device);
    let mut values: HashMap<String, TensorData> = read_params(&model, |_| true)
        .into_iter()
        .map(|(name, data)| {
            let shape = data.shape().to_vec();
            let value = if shape.len() == 2 {
                Tensor::<2>::random(
                    [shape[0], shape[1]],
                    Distribution::Normal(0.0, 0.02),
                    &device,
                )
                .into_data()
            } else if name.ends_with(".bias") {
                TensorData::zeros::<f32, _>(shape)
            } else {
                TensorData::ones::<f32, _>(shape)
            };
            (name, value)
        })
        .collect();
    let mut model = write_params(model, &mut values);
    println!(
        "pretraining a {}-parameter Qwen2 on {} tasks: {} steps of {} rows, backend {}",
        model.num_params(),
        TASKS.len(),
        args.steps,
        args.batch_size,
        peft::backend_name()
    );
    let mut optimizer = AdamWConfig::new().init();
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut eval_rng = StdRng::seed_from_u64(args.seed ^ 0xE7A1);
    let started = Instant::now();
    let mut recent = Vec::new();
    for step in 0..args.steps {
        let rows: Vec<TokenizedExample> = (0..args.batch_size)
            .map(|i| row(&mut rng, i % TASKS.len()))
            .collect();
        let refs: Vec<&TokenizedExample> = rows.iter().collect();
        let batch = Batch::collate(&refs, EOS, 0, &device);
        let logits = model.forward_ids(batch.input_ids, Some(batch.attention_mask));
        let [b, s, v] = logits.dims();
        let loss = cross_entropy_ignoring(
            logits.slice([0..b, 0..s - 1, 0..v]),
            batch.labels.slice([0..b, 1..s]),
        );
        recent.push(f64::from(loss.clone().into_scalar::<f32>()));
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let norm = global_grad_norm(&model, &grads);
        let lr = linear_schedule(args.lr, step, 200, args.steps);
        model = optimizer.step(model, grads, lr, clip_coefficient(norm, Some(1.0)));
        let done = step + 1;
        if done % 100 == 0 {
            let mean = recent.iter().sum::<f64>() / recent.len() as f64;
            recent.clear();
            println!(
                "step {done:>5}  loss {mean:.4}  lr {lr:.2e}  {:.0}s",
                started.elapsed().as_secs_f64()
            );
        }
        if done % args.eval_every == 0 || done == args.steps {
            let acc = accuracy(&model.valid(), &mut eval_rng, 32);
            let line: Vec<String> = TASKS
                .iter()
                .zip(&acc)
                .map(|(t, a)| format!("{} {:.0}%", t.name, a * 100.0))
                .collect();
            println!("  accuracy: {}", line.join(", "));
        }
    }

    // Hugging Face layout: Linear weights [out, in]; the head is tied to the embeddings.
    let params = read_params(&model.valid(), |_| true);
    let tensors: Vec<(String, TensorData)> = params
        .into_iter()
        .map(|(name, data)| {
            let is_linear = data.shape().len() == 2 && !name.ends_with("embed_tokens.weight");
            let data = if is_linear {
                Tensor::<2>::from_data(data, &Device::default())
                    .transpose()
                    .into_data()
            } else {
                data
            };
            (name, data)
        })
        .collect();
    let weights = args.output.join("model.safetensors");
    peft::core::adapter_file::write_tensors(
        &weights,
        tensors
            .iter()
            .map(|(n, d)| (n.as_str(), d.clone()))
            .collect(),
    )
    .map_err(|e| e.to_string())?;
    println!(
        "wrote {} ({:.1} min)",
        args.output.display(),
        started.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}
