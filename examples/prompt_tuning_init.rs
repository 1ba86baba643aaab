//! Creates a prompt-tuning adapter for a model, initialized from text (PEFT's TEXT init), and saves
//! it in PEFT's format.
//!
//! ```sh
//! cargo run --example prompt_tuning_init -- --model fixtures/models/qwen2-gqa-tied \
//!     --text "Answer politely:" --num-virtual-tokens 8 --output /tmp/prompt
//! ```
//! The directory loads in PEFT (`PeftModel.from_pretrained(base, "/tmp/prompt")`) and in
//! `peft forward --adapter /tmp/prompt`; `scripts/check_adapter_in_peft.py` compares the two.

use std::path::PathBuf;
use std::process::ExitCode;

use burn::tensor::DType;
use clap::Parser;
use peft::core::{BaseShape, CausalLm, Method};
use peft::models::{AutoCausalLm, load_tokenizer};
use peft::prompt::{PromptTuningConfig, PromptTuningInit};

#[derive(Parser)]
struct Args {
    /// Hugging Face model directory (with tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Init text; its tokens' embeddings start the prompt (repeated then cut).
    #[arg(long)]
    text: String,
    /// Virtual tokens.
    #[arg(long, default_value_t = 8)]
    num_virtual_tokens: usize,
    /// Output adapter directory.
    #[arg(long)]
    output: PathBuf,
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let device = peft::default_device();
    let model = AutoCausalLm::from_pretrained(&args.model, &device, DType::F32)?;
    let tokenizer = load_tokenizer(&args.model)?;
    let ids = tokenizer
        .encode(args.text.as_str(), true)?
        .get_ids()
        .to_vec();
    if ids.is_empty() {
        return Err("--text encodes to no tokens".into());
    }
    let geometry = model.geometry();
    let config = PromptTuningConfig::new(args.num_virtual_tokens, geometry.hidden_size)
        .with_prompt_tuning_init(PromptTuningInit::Text)
        .with_prompt_tuning_init_text(Some(args.text.clone()));
    let prompt = config.init_from_embeddings(model.word_embeddings(), &ids);
    prompt.write(&args.output, &BaseShape::of(&model), args.model.to_str())?;
    println!(
        "saved a {}-token prompt (from {} text tokens) to {}",
        args.num_virtual_tokens,
        ids.len(),
        args.output.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
