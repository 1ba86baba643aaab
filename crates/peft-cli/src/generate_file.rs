//! `peft generate --input prompts.jsonl --output out.jsonl`: continuations of many prompts, in
//! left-padded batches, with or without an adapter.
//!
//! Input rows: `{"prompt": "..."}`, or `{"messages": [{"role": ..., "content": ...}, ...]}`
//! rendered with the model's chat template and the assistant's turn opened (as transformers'
//! `apply_chat_template(..., add_generation_prompt=True)`, encoded without adding special tokens).
//! Output rows, in input order, streamed into a temporary file that replaces `--output` once all
//! are written: `{"line", "prompt", "generated", "generated_tokens", "finish_reason"}`.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use peft_core::{Adapter, GenerationConfig, Injection, generate};
use peft_models::{AutoCausalLm, ChatMessage, ChatTemplate, ModelError, Tokenizer};
use serde_json::Value;

use peft::AutoAdapter;

use crate::cli::CliError;

/// One input row, tokenized.
pub(crate) struct PromptRow {
    line: usize,
    /// The text the model continues (a chat row's rendering).
    text: String,
    ids: Vec<u32>,
}

/// Reads and tokenizes `path`, checking every row before the model is even read.
pub(crate) fn read_prompts(
    path: &Path,
    model_dir: &Path,
    tokenizer: &Tokenizer,
) -> Result<Vec<PromptRow>, CliError> {
    let text = std::fs::read_to_string(path).map_err(|source| CliError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut template: Option<Option<ChatTemplate>> = None;
    let mut rows = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| CliError::Input {
            path: PathBuf::from(format!("{}:{line_no}", path.display())),
            message,
        };
        let value: Value = serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let (text, add_special_tokens) = match (value.get("prompt"), value.get("messages")) {
            (Some(Value::String(prompt)), None) => (prompt.clone(), true),
            (None, Some(Value::Array(messages))) => {
                let messages = messages
                    .iter()
                    .enumerate()
                    .map(|(i, m)| {
                        let field = |key: &str| {
                            m.get(key)
                                .and_then(Value::as_str)
                                .ok_or_else(|| bad(format!("messages[{i}].{key} must be a string")))
                        };
                        let role = field("role")?;
                        // The roles training rows take; a typo would otherwise reach the template.
                        if !matches!(role, "system" | "user" | "assistant") {
                            return Err(bad(format!(
                                "messages[{i}].role is {role:?}; expected \"system\", \"user\" or \
                                 \"assistant\""
                            )));
                        }
                        Ok(ChatMessage::new(role, field("content")?))
                    })
                    .collect::<Result<Vec<_>, CliError>>()?;
                if messages.is_empty() {
                    return Err(bad(
                        "messages is empty: a chat row needs at least one message".into(),
                    ));
                }
                if template.is_none() {
                    template = Some(ChatTemplate::from_dir(model_dir)?);
                }
                let Some(Some(template)) = &template else {
                    return Err(bad(format!(
                        "a chat row, but the model ({}) has no chat template \
                         (tokenizer_config.json `chat_template` or chat_template.jinja)",
                        model_dir.display()
                    )));
                };
                (template.render(&messages, true)?, false)
            }
            _ => {
                return Err(bad(
                    "must be an object with a string `prompt` or a `messages` list".into(),
                ));
            }
        };
        let ids = tokenizer
            .encode(text.as_str(), add_special_tokens)
            .map_err(|e| ModelError::Tokenizer {
                path: peft_models::model_file(model_dir, "tokenizer.json"),
                message: e.to_string(),
            })?
            .get_ids()
            .to_vec();
        if ids.is_empty() {
            return Err(bad("the prompt encodes to no tokens".into()));
        }
        rows.push(PromptRow {
            line: line_no,
            text,
            ids,
        });
    }
    if rows.is_empty() {
        return Err(CliError::Input {
            path: path.to_path_buf(),
            message: "no prompts".into(),
        });
    }
    Ok(rows)
}

/// Generates for every row of `rows` (read from `input`) in batches of `batch_size`, writing
/// `output`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn generate_file(
    rows: &[PromptRow],
    input: &Path,
    output: &Path,
    batch_size: usize,
    model_dir: &Path,
    tokenizer: &Tokenizer,
    config: &GenerationConfig,
    model: AutoCausalLm,
    adapter: Option<AutoAdapter>,
) -> Result<usize, CliError> {
    let virtual_tokens = adapter.as_ref().map_or(0, Adapter::added_positions);
    for row in rows {
        let ids: Vec<i64> = row.ids.iter().map(|&t| i64::from(t)).collect();
        peft_core::CausalLm::check_input(
            &model,
            &[ids],
            None,
            virtual_tokens + config.max_new_tokens,
        )
        .map_err(|e| CliError::Input {
            path: PathBuf::from(format!("{}:{}", input.display(), row.line)),
            message: e.to_string(),
        })?;
    }
    crate::cli::write_streamed(output, "--output", |file| {
        for chunk in rows.chunks(batch_size) {
            let prompts: Vec<Vec<u32>> = chunk.iter().map(|r| r.ids.clone()).collect();
            // What `PeftModel::generate` does: the adapter's injection for the batch.
            let injection = adapter
                .as_ref()
                .map_or_else(Injection::default, |a| a.inject(prompts.len()));
            let out = generate(&model, &prompts, injection, config, |_| {
                ControlFlow::Continue(())
            })
            .map_err(CliError::Generate)?;
            for (row, new) in chunk.iter().zip(out.new_tokens) {
                let stopped = new.last().is_some_and(|t| config.eos_token_ids.contains(t));
                let text = tokenizer
                    .decode(&new, true)
                    .map_err(|e| ModelError::Tokenizer {
                        path: peft_models::model_file(model_dir, "tokenizer.json"),
                        message: e.to_string(),
                    })?;
                let json = serde_json::json!({
                    "line": row.line,
                    "prompt": row.text,
                    "generated": text,
                    "generated_tokens": new.len(),
                    "finish_reason": if stopped { "stop" } else { "length" },
                });
                writeln!(file, "{json}").map_err(|source| CliError::Io {
                    path: output.to_path_buf(),
                    source,
                })?;
            }
        }
        Ok(())
    })?;
    Ok(rows.len())
}
