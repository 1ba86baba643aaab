//! Fine-tuning data: JSONL rows in three shapes, tokenized with the loss on the target only,
//! truncated to a budget that keeps the target, shuffled by seed and padded per batch.
//!
//! | row | prompt | target (scored) |
//! |---|---|---|
//! | `{"prompt", "completion"}` | `prompt` | `completion` + EOS |
//! | `{"instruction", "input", "output"}` | the template filled in (see [`ALPACA_TEMPLATE`]) | `output` + EOS |
//! | `{"text"}` | none | `text` + EOS, every token |
//! | `{"messages": [{"role", "content"}, ...]}` | the conversation through the model's chat template | the assistant turns (each up to its EOS), or the last only ([`TrainOn`]) |
//!
//! The prompt is tokenized with the tokenizer's special tokens (a BOS where the tokenizer adds
//! one), the target without, and the two are joined, as the seeds' PEFT scripts do. Prompt tokens
//! are labelled [`IGNORE_INDEX`], so they never contribute to the loss.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use rand::seq::SliceRandom;
use rand::{SeedableRng, rngs::StdRng};
use serde_json::Value;

use peft_core::loss::IGNORE_INDEX;

/// The seeds' instruction template ("Human: ...\n\nAssistant: "); `{instruction}` and `{input}`
/// are replaced by the row's fields. A missing or empty `input` also drops the line break before
/// `{input}`, as the seeds' `"\n".join([instruction, input]).strip()` does.
pub const ALPACA_TEMPLATE: &str = "Human: {instruction}\n{input}\n\nAssistant: ";

/// Why a data file cannot be used. Row errors name the file and the 1-based line.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The data file.
        path: PathBuf,
        /// The system error.
        source: std::io::Error,
    },
    /// A row is malformed or does not fit.
    #[error("{path}:{line}: {message} (skip_bad_rows skips such rows)")]
    Row {
        /// The data file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong, naming the field.
        message: String,
    },
    /// The file is not UTF-8 text.
    #[error("{path}:{line}: not valid UTF-8 (byte {column} of the line); JSONL files are UTF-8")]
    NotUtf8 {
        /// The data file.
        path: PathBuf,
        /// 1-based line of the first invalid byte.
        line: usize,
        /// 1-based byte of the line.
        column: usize,
    },
    /// No usable row.
    #[error("{path}: no examples ({skipped} bad rows skipped)")]
    Empty {
        /// The data file.
        path: PathBuf,
        /// Rows skipped as bad.
        skipped: usize,
    },
    /// The instruction template cannot be used.
    #[error("template: {0}")]
    Template(String),
}

/// One row of a data file, before tokenization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// 1-based line of the row in its file.
    pub line: usize,
    /// Text the model conditions on (not scored); `None` for `{"text"}` and chat rows.
    pub prompt: Option<String>,
    /// Text the model learns to produce (scored); empty for chat rows.
    pub target: String,
    /// A chat row's messages, rendered by the model's chat template at tokenization.
    pub messages: Option<Vec<Message>>,
}

/// One message of a chat row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// Renders a conversation as the model's chat template does (implemented over peft-models'
/// `ChatTemplate` by its users; tests use stand-ins).
pub trait ChatRenderer {
    /// The text of `messages`; with `add_generation_prompt`, followed by what opens the
    /// assistant's turn.
    ///
    /// # Errors
    ///
    /// What the template raises, as text.
    fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, String>;
}

/// Which assistant turns of a chat row the loss scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrainOn {
    /// Every assistant turn.
    #[default]
    AllAssistantTurns,
    /// The last assistant turn only.
    LastAssistantTurn,
}

/// How chat rows are tokenized.
pub struct ChatOptions<'a> {
    /// The model's chat template.
    pub renderer: &'a dyn ChatRenderer,
    /// The turns scored.
    pub train_on: TrainOn,
}

/// A row that was skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedRow {
    /// 1-based line.
    pub line: usize,
    /// Why it was skipped.
    pub reason: String,
}

/// How rows become examples.
#[derive(Debug, Clone)]
pub struct DataOptions {
    /// Template for `{"instruction", "input", "output"}` rows.
    pub template: String,
    /// Skip (and count) bad rows instead of failing on the first.
    pub skip_bad_rows: bool,
}

impl Default for DataOptions {
    fn default() -> Self {
        Self {
            template: ALPACA_TEMPLATE.to_string(),
            skip_bad_rows: false,
        }
    }
}

/// The rows of a JSONL file.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The file read.
    pub path: PathBuf,
    /// The usable rows, in file order.
    pub examples: Vec<Example>,
    /// Rows skipped (only with [`DataOptions::skip_bad_rows`]).
    pub skipped: Vec<SkippedRow>,
}

impl Dataset {
    /// Reads a JSONL file: one JSON object per line, blank lines ignored.
    ///
    /// # Errors
    ///
    /// An unreadable file, a bad row (unless skipped; the error names the line and field), or no
    /// usable row at all.
    pub fn from_jsonl(path: impl AsRef<Path>, options: &DataOptions) -> Result<Self, DataError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            DataError::NotUtf8 {
                path: path.to_path_buf(),
                line: valid.iter().filter(|&&b| b == b'\n').count() + 1,
                column: valid.len() - line_start + 1,
            }
        })?;
        Self::from_jsonl_str(path, &text, options)
    }

    /// Parses JSONL `text` as if read from `path` (the path only names the file in errors).
    pub fn from_jsonl_str(
        path: &Path,
        text: &str,
        options: &DataOptions,
    ) -> Result<Self, DataError> {
        if !options.template.contains("{instruction}") {
            return Err(DataError::Template(format!(
                "{:?} has no {{instruction}} placeholder",
                options.template
            )));
        }
        // A byte-order mark (editors on Windows write one) is not part of the first row.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut examples = Vec::new();
        let mut skipped = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            if raw.trim().is_empty() {
                continue;
            }
            match parse_row(raw, &options.template) {
                Ok(Row::Pair(prompt, target)) => examples.push(Example {
                    line,
                    prompt,
                    target,
                    messages: None,
                }),
                Ok(Row::Chat(messages)) => examples.push(Example {
                    line,
                    prompt: None,
                    target: String::new(),
                    messages: Some(messages),
                }),
                Err(reason) if options.skip_bad_rows => skipped.push(SkippedRow { line, reason }),
                Err(message) => {
                    return Err(DataError::Row {
                        path: path.to_path_buf(),
                        line,
                        message,
                    });
                }
            }
        }
        if examples.is_empty() {
            return Err(DataError::Empty {
                path: path.to_path_buf(),
                skipped: skipped.len(),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            examples,
            skipped,
        })
    }
}

/// A parsed row: `(prompt, target)` (no prompt for text rows), or a chat row's messages.
enum Row {
    Pair(Option<String>, String),
    Chat(Vec<Message>),
}

/// The messages of a chat row: each a `role` among system, user and assistant and a string
/// `content`, at least one assistant turn with text.
fn parse_messages(value: &Value) -> Result<Vec<Message>, String> {
    let items = value
        .as_array()
        .ok_or_else(|| format!("field \"messages\" must be a list, found {value}"))?;
    let messages = items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let field = |key: &str| match m.get(key) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(format!(
                    "field \"messages[{i}].{key}\" must be a string, found {other}"
                )),
                None => Err(format!("missing field \"messages[{i}].{key}\"")),
            };
            let role = field("role")?;
            if !matches!(role.as_str(), "system" | "user" | "assistant") {
                return Err(format!(
                    "field \"messages[{i}].role\" is {role:?}; expected \"system\", \"user\" or \
                     \"assistant\""
                ));
            }
            Ok(Message {
                role,
                content: field("content")?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    if !messages
        .iter()
        .any(|m| m.role == "assistant" && !m.content.trim().is_empty())
    {
        return Err("field \"messages\" has no assistant turn with text to learn".into());
    }
    Ok(messages)
}

/// One JSONL row, or why the row is bad.
fn parse_row(raw: &str, template: &str) -> Result<Row, String> {
    let value: Value = serde_json::from_str(raw).map_err(|e| format!("not valid JSON: {e}"))?;
    let Value::Object(row) = value else {
        return Err("expected a JSON object".into());
    };
    if let Some(messages) = row.get("messages") {
        return parse_messages(messages).map(Row::Chat);
    }
    pair_row(&row, template).map(|(prompt, target)| Row::Pair(prompt, target))
}

/// `(prompt, target)` of a prompt/completion, instruction or text row.
fn pair_row(
    row: &serde_json::Map<String, Value>,
    template: &str,
) -> Result<(Option<String>, String), String> {
    let field = |key: &str| -> Result<Option<&str>, String> {
        match row.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(format!("field \"{key}\" must be a string, found {other}")),
        }
    };
    let non_empty = |key: &str, value: Option<&str>| -> Result<String, String> {
        match value {
            Some(s) if !s.is_empty() => Ok(s.to_string()),
            Some(_) => Err(format!("field \"{key}\" is empty")),
            None => Err(format!("missing field \"{key}\"")),
        }
    };
    if row.contains_key("prompt") || row.contains_key("completion") {
        let prompt = field("prompt")?.ok_or("missing field \"prompt\"")?;
        let completion = non_empty("completion", field("completion")?)?;
        Ok((Some(prompt.to_string()), completion))
    } else if row.contains_key("instruction") || row.contains_key("output") {
        let instruction = field("instruction")?.ok_or("missing field \"instruction\"")?;
        let input = field("input")?.unwrap_or_default();
        let output = non_empty("output", field("output")?)?;
        let template = if input.is_empty() {
            std::borrow::Cow::Owned(template.replace("\n{input}", ""))
        } else {
            std::borrow::Cow::Borrowed(template)
        };
        let prompt = template
            .replace("{instruction}", instruction)
            .replace("{input}", input);
        Ok((Some(prompt), output))
    } else if row.contains_key("text") {
        Ok((None, non_empty("text", field("text")?)?))
    } else {
        let keys: Vec<&str> = row.keys().map(String::as_str).collect();
        Err(format!(
            "found keys {keys:?}; expected {{\"prompt\", \"completion\"}}, \
             {{\"instruction\", \"input\", \"output\"}}, {{\"text\"}} or {{\"messages\"}}"
        ))
    }
}

/// Text to token ids, as a tokenizer does it (implemented for `tokenizers::Tokenizer` by the
/// model crate's users; tests use small stand-ins).
pub trait TextEncoder {
    /// The ids of `text`, with the tokenizer's special tokens (BOS) when `add_special_tokens`.
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String>;

    /// The ids of `text` (no special tokens added) and the byte where each token starts in it,
    /// for chat rows, whose scored turns are found by position.
    ///
    /// # Errors
    ///
    /// An encoder that cannot say where its tokens start.
    fn encode_with_starts(&self, text: &str) -> Result<(Vec<u32>, Vec<usize>), String> {
        let _ = text;
        Err("this tokenizer does not report token offsets, which chat rows need".into())
    }
}

/// A `tokenizer.json` tokenizer seen as the [`TextEncoder`] the data pipeline needs.
pub struct TokenizerEncoder<'a>(pub &'a tokenizers::Tokenizer);

impl TextEncoder for TokenizerEncoder<'_> {
    fn encode(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> std::result::Result<Vec<u32>, String> {
        self.0
            .encode(text, add_special_tokens)
            .map(|encoding| encoding.get_ids().to_vec())
            .map_err(|e| e.to_string())
    }

    fn encode_with_starts(&self, text: &str) -> Result<(Vec<u32>, Vec<usize>), String> {
        // `encode` reports byte offsets.
        let encoding = self.0.encode(text, false).map_err(|e| e.to_string())?;
        let starts = encoding
            .get_offsets()
            .iter()
            .map(|&(start, _)| start)
            .collect();
        Ok((encoding.get_ids().to_vec(), starts))
    }
}

/// How examples become token ids.
#[derive(Debug, Clone)]
pub struct TokenizeOptions {
    /// Most real tokens per row (prompt + target + EOS); virtual tokens are not counted. Prompts
    /// longer than what is left after the target lose their *first* tokens; text rows lose their
    /// last. A target (with EOS) longer than this is a bad row.
    pub max_length: usize,
    /// Appended to every target so the model learns to stop; `None` appends nothing.
    pub eos_token_id: Option<u32>,
    /// Skip (and count) rows that do not fit instead of failing.
    pub skip_bad_rows: bool,
}

/// One tokenized row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedExample {
    /// 1-based line of the row in its file.
    pub line: usize,
    /// Prompt ids then target ids (EOS included).
    pub input_ids: Vec<u32>,
    /// `IGNORE_INDEX` on prompt tokens, the token id on target tokens.
    pub labels: Vec<i64>,
    /// How many leading ids are prompt; 0 for text rows.
    pub prompt_len: usize,
    /// Whether the row was not scored as a whole prompt/completion pair (text rows), so exact
    /// match does not apply to it.
    pub is_text: bool,
    /// Whether tokens were cut to fit `max_length`.
    pub truncated: bool,
}

impl TokenizedExample {
    /// The prompt ids.
    pub fn prompt_ids(&self) -> &[u32] {
        &self.input_ids[..self.prompt_len]
    }

    /// Whether the row is a prompt followed by a target, so that exact match applies to it.
    pub fn is_completion(&self) -> bool {
        !self.is_text && self.prompt_len > 0
    }

    /// The target ids (EOS included when one was appended).
    pub fn target_ids(&self) -> &[u32] {
        &self.input_ids[self.prompt_len..]
    }
}

/// Tokenized rows of one file.
#[derive(Debug, Clone)]
pub struct TokenizedDataset {
    /// The file they came from.
    pub path: PathBuf,
    /// The rows.
    pub examples: Vec<TokenizedExample>,
    /// Rows skipped while reading or tokenizing.
    pub skipped: Vec<SkippedRow>,
}

impl TokenizedDataset {
    /// Tokenizes `dataset` (see the module docs for what is scored).
    ///
    /// # Errors
    ///
    /// A row the tokenizer rejects, a target longer than `max_length` (unless skipped), or no row
    /// left.
    pub fn new(
        dataset: Dataset,
        encoder: &dyn TextEncoder,
        options: &TokenizeOptions,
    ) -> Result<Self, DataError> {
        Self::with_chat(dataset, encoder, options, None)
    }

    /// [`TokenizedDataset::new`] for data that may hold chat rows, rendered by `chat`'s template
    /// (a chat row without one is a bad row).
    ///
    /// # Errors
    ///
    /// As [`TokenizedDataset::new`], and a chat row the template refuses, renders in a way whose
    /// assistant turns cannot be located, or that does not fit `max_length`.
    pub fn with_chat(
        dataset: Dataset,
        encoder: &dyn TextEncoder,
        options: &TokenizeOptions,
        chat: Option<&ChatOptions<'_>>,
    ) -> Result<Self, DataError> {
        let Dataset {
            path,
            examples,
            mut skipped,
        } = dataset;
        let mut rows = Vec::with_capacity(examples.len());
        for example in examples {
            let row = match &example.messages {
                Some(messages) => match chat {
                    Some(chat) => tokenize_chat(example.line, messages, encoder, options, chat),
                    None => Err(
                        "a chat row, but the model has no chat template (chat_template in \
                         tokenizer_config.json, or chat_template.jinja)"
                            .into(),
                    ),
                },
                None => tokenize_example(&example, encoder, options),
            };
            match row {
                Ok(row) => rows.push(row),
                Err(reason) if options.skip_bad_rows => skipped.push(SkippedRow {
                    line: example.line,
                    reason,
                }),
                Err(message) => {
                    return Err(DataError::Row {
                        path,
                        line: example.line,
                        message,
                    });
                }
            }
        }
        if rows.is_empty() {
            return Err(DataError::Empty {
                path,
                skipped: skipped.len(),
            });
        }
        skipped.sort_by_key(|s| s.line);
        Ok(Self {
            path,
            examples: rows,
            skipped,
        })
    }

    /// Rows that have a prompt and a target (exact match applies to them).
    pub fn completions(&self) -> impl Iterator<Item = &TokenizedExample> {
        self.examples.iter().filter(|e| e.is_completion())
    }
}

/// A chat row: the whole conversation rendered and tokenized at once (the ids transformers'
/// `apply_chat_template` gives), scoring the tokens that start inside an assistant turn: from the
/// end of the conversation before it with the generation prompt, to the end of the conversation
/// through it, cut after the turn's last EOS (the template's end-of-turn text after it is not
/// learned). Tokens after the last scored one are dropped; the prompt, for exact match, is
/// everything before the last assistant turn.
fn tokenize_chat(
    line: usize,
    messages: &[Message],
    encoder: &dyn TextEncoder,
    options: &TokenizeOptions,
    chat: &ChatOptions<'_>,
) -> Result<TokenizedExample, String> {
    let render = |messages: &[Message], generation_prompt: bool| {
        chat.renderer
            .render(messages, generation_prompt)
            .map_err(|e| format!("the chat template refuses the row: {e}"))
    };
    let full = render(messages, false)?;
    let turns: Vec<usize> = messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m.role == "assistant")
        .map(|(i, _)| i)
        .collect();
    let turns = match chat.train_on {
        TrainOn::AllAssistantTurns => &turns[..],
        TrainOn::LastAssistantTurn => &turns[turns.len().saturating_sub(1)..],
    };
    let mut spans = Vec::with_capacity(turns.len());
    for &i in turns {
        let before = render(&messages[..i], true)?;
        let through = render(&messages[..=i], false)?;
        if !full.starts_with(&before) || !full.starts_with(&through) || before.len() > through.len()
        {
            return Err(format!(
                "the chat template does not render the conversation before message {i} as a \
                 beginning of the whole, so the assistant turn cannot be located"
            ));
        }
        spans.push(before.len()..through.len());
    }
    let (ids, starts) = encoder
        .encode_with_starts(&full)
        .map_err(|e| format!("the tokenizer rejects the conversation: {e}"))?;
    let mut labels = vec![IGNORE_INDEX; ids.len()];
    let mut last_start = None;
    for span in &spans {
        let tokens: Vec<usize> = (0..ids.len())
            .filter(|&k| span.contains(&starts[k]))
            .collect();
        // Up to the turn's last EOS, where the template ends a turn with one.
        let end = match options.eos_token_id {
            Some(eos) => tokens
                .iter()
                .rposition(|&k| ids[k] == eos)
                .map_or(tokens.len(), |p| p + 1),
            None => tokens.len(),
        };
        for &k in &tokens[..end] {
            labels[k] = i64::from(ids[k]);
        }
        if let Some(&first) = tokens.first() {
            last_start = Some(first);
        }
    }
    let Some(last_scored) = labels.iter().rposition(|&l| l != IGNORE_INDEX) else {
        return Err("the conversation's assistant turns encode to no tokens".into());
    };
    let len = last_scored + 1;
    if len > options.max_length {
        return Err(format!(
            "the conversation is {len} tokens, more than max_length {}",
            options.max_length
        ));
    }
    let mut input_ids = ids;
    input_ids.truncate(len);
    labels.truncate(len);
    Ok(TokenizedExample {
        line,
        input_ids,
        labels,
        prompt_len: last_start.unwrap_or(0),
        is_text: false,
        truncated: false,
    })
}

fn tokenize_example(
    example: &Example,
    encoder: &dyn TextEncoder,
    options: &TokenizeOptions,
) -> Result<TokenizedExample, String> {
    let max = options.max_length;
    let eos: Vec<u32> = options.eos_token_id.into_iter().collect();
    let encode = |text: &str, special: bool, what: &str| {
        encoder
            .encode(text, special)
            .map_err(|e| format!("the tokenizer rejects the {what}: {e}"))
    };
    let Some(prompt) = &example.prompt else {
        let mut ids = encode(&example.target, true, "text")?;
        ids.extend(&eos);
        let truncated = ids.len() > max;
        ids.truncate(max);
        if ids.is_empty() {
            return Err("field \"text\" encodes to no tokens".into());
        }
        let labels = ids.iter().map(|&t| i64::from(t)).collect();
        return Ok(TokenizedExample {
            line: example.line,
            input_ids: ids,
            labels,
            prompt_len: 0,
            is_text: true,
            truncated,
        });
    };
    let mut target = encode(&example.target, false, "target")?;
    target.extend(&eos);
    if target.len() > max {
        return Err(format!(
            "the target is {} tokens (EOS included), more than max_length {max}",
            target.len()
        ));
    }
    let mut prompt_ids = encode(prompt, true, "prompt")?;
    let budget = max - target.len();
    let truncated = prompt_ids.len() > budget;
    if truncated {
        // Keep the end of the prompt: it is what the target follows.
        prompt_ids.drain(..prompt_ids.len() - budget);
    }
    let prompt_len = prompt_ids.len();
    let labels = std::iter::repeat_n(IGNORE_INDEX, prompt_len)
        .chain(target.iter().map(|&t| i64::from(t)))
        .collect();
    prompt_ids.extend(target);
    Ok(TokenizedExample {
        line: example.line,
        input_ids: prompt_ids,
        labels,
        prompt_len,
        is_text: false,
        truncated,
    })
}

/// The generator seed of epoch `epoch` of a run seeded with `seed`.
fn epoch_seed(seed: u64, epoch: usize) -> u64 {
    seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The order in which epoch `epoch` visits `len` rows: a permutation drawn from `seed` and
/// `epoch` alone, so a resumed run replays the same order.
pub fn epoch_order(len: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    let mut rng = StdRng::seed_from_u64(epoch_seed(seed, epoch));
    order.shuffle(&mut rng);
    order
}

/// Rows per sorting window of [`length_grouped_order`], in batches (transformers'
/// `LengthGroupedSampler` sorts megabatches of 50 batches).
pub const LENGTH_GROUP_BATCHES: usize = 50;

/// The order in which epoch `epoch` visits rows of `lengths`, grouped by length so that a batch
/// pads little: the epoch's seeded permutation ([`epoch_order`]) is cut into windows of
/// [`LENGTH_GROUP_BATCHES`] batches, each window sorted by length (longest first, ties in
/// permutation order) and cut into batches of `batch_size`, and the full batches are then
/// shuffled (seeded by `seed` and `epoch` alone), so batches are homogeneous in length but not
/// visited from longest to shortest. A last, partial batch stays last, so that the order still
/// splits into whole batches from the start. Like [`epoch_order`] it depends on its arguments
/// alone: a resumed run replays it.
pub fn length_grouped_order(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: usize,
) -> Vec<usize> {
    let batch_size = batch_size.max(1);
    let mut order = epoch_order(lengths.len(), seed, epoch);
    for window in order.chunks_mut(batch_size * LENGTH_GROUP_BATCHES) {
        // Stable: equal lengths keep the permutation's order.
        window.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    }
    let full = order.len() / batch_size * batch_size;
    let mut batches: Vec<&[usize]> = order[..full].chunks(batch_size).collect();
    // Another stream than the permutation's, from the same seed and epoch.
    let mut rng =
        StdRng::seed_from_u64(epoch_seed(seed, epoch).wrapping_add(0x6C62_272E_07BB_0142));
    batches.shuffle(&mut rng);
    let mut grouped: Vec<usize> = batches.concat();
    grouped.extend_from_slice(&order[full..]);
    grouped
}

/// A padded batch (right padding: row `i`'s real tokens first).
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[batch, seq]` token ids, padded with the pad id.
    pub input_ids: Tensor<2, Int>,
    /// `[batch, seq]`, 1 on real tokens.
    pub attention_mask: Tensor<2, Int>,
    /// `[batch, seq]`, [`IGNORE_INDEX`] on prompt and padding.
    pub labels: Tensor<2, Int>,
    /// Real tokens in the batch.
    pub tokens: usize,
    /// Labels the loss scores (see [`Batch::scored_labels`]).
    pub scored: usize,
}

impl Batch {
    /// Pads `rows` to the longest of them, for a model with `virtual_tokens` virtual tokens.
    pub fn collate(
        rows: &[&TokenizedExample],
        pad_token_id: u32,
        virtual_tokens: usize,
        device: &Device,
    ) -> Self {
        let seq = rows.iter().map(|r| r.input_ids.len()).max().unwrap_or(0);
        let batch = rows.len();
        let mut ids = Vec::with_capacity(batch * seq);
        let mut mask = Vec::with_capacity(batch * seq);
        let mut labels = Vec::with_capacity(batch * seq);
        for row in rows {
            let pad = seq - row.input_ids.len();
            ids.extend(row.input_ids.iter().map(|&t| i64::from(t)));
            ids.extend(std::iter::repeat_n(i64::from(pad_token_id), pad));
            mask.extend(std::iter::repeat_n(1i64, row.input_ids.len()));
            mask.extend(std::iter::repeat_n(0i64, pad));
            labels.extend(&row.labels);
            labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
        }
        let tensor =
            |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [batch, seq]), device);
        Self {
            input_ids: tensor(ids),
            attention_mask: tensor(mask),
            labels: tensor(labels),
            tokens: rows.iter().map(|r| r.input_ids.len()).sum(),
            scored: Self::scored_labels(rows, virtual_tokens),
        }
    }

    /// Labels [`peft_core::PeftModel::loss`] scores for these rows: every label other than
    /// [`IGNORE_INDEX`], except a row's first token when there is no virtual token to predict
    /// it from.
    pub fn scored_labels(rows: &[&TokenizedExample], virtual_tokens: usize) -> usize {
        let skip = usize::from(virtual_tokens == 0);
        rows.iter()
            .map(|r| {
                r.labels
                    .iter()
                    .skip(skip)
                    .filter(|&&l| l != IGNORE_INDEX)
                    .count()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One token per byte; BOS 1 when special tokens are asked for.
    struct Bytes;
    impl TextEncoder for Bytes {
        fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
            let bos = add_special_tokens.then_some(1);
            Ok(bos.into_iter().chain(text.bytes().map(u32::from)).collect())
        }
    }

    fn read(text: &str, skip: bool) -> Result<Dataset, DataError> {
        Dataset::from_jsonl_str(
            Path::new("data.jsonl"),
            text,
            &DataOptions {
                skip_bad_rows: skip,
                ..DataOptions::default()
            },
        )
    }

    fn tokenize(
        dataset: Dataset,
        max_length: usize,
        skip: bool,
    ) -> Result<TokenizedDataset, DataError> {
        TokenizedDataset::new(
            dataset,
            &Bytes,
            &TokenizeOptions {
                max_length,
                eos_token_id: Some(2),
                skip_bad_rows: skip,
            },
        )
    }

    #[test]
    fn reads_the_three_row_shapes() {
        let data = read(
            concat!(
                "{\"prompt\": \"Q: \", \"completion\": \"A\"}\n",
                "\n",
                "{\"instruction\": \"Add\", \"input\": \"1 2\", \"output\": \"3\"}\n",
                "{\"instruction\": \"Greet\", \"output\": \"hi\", \"extra\": 1}\n",
                "{\"text\": \"abc\"}\n",
            ),
            false,
        )
        .unwrap();
        let lines: Vec<usize> = data.examples.iter().map(|e| e.line).collect();
        assert_eq!(lines, [1, 3, 4, 5]);
        assert_eq!(data.examples[0].prompt.as_deref(), Some("Q: "));
        assert_eq!(
            data.examples[1].prompt.as_deref(),
            Some("Human: Add\n1 2\n\nAssistant: ")
        );
        // No input: no empty line for it (the seeds' join-and-strip).
        assert_eq!(
            data.examples[2].prompt.as_deref(),
            Some("Human: Greet\n\nAssistant: ")
        );
        assert_eq!(data.examples[3].prompt, None);
        assert_eq!(data.examples[3].target, "abc");
    }

    #[test]
    fn bad_rows_name_file_line_and_field_or_are_skipped_and_counted() {
        let rows = concat!(
            "{\"prompt\": \"a\", \"completion\": \"b\"}\n",
            "{\"prompt\": \"a\", \"completion\": 3}\n",
            "not json\n",
            "[1, 2]\n",
            "{\"prompt\": \"a\"}\n",
            "{\"question\": \"a\"}\n",
            "{\"text\": \"\"}\n",
        );
        let err = read(rows, false).unwrap_err().to_string();
        assert!(
            err.starts_with("data.jsonl:2: field \"completion\" must be a string"),
            "{err}"
        );
        let data = read(rows, true).unwrap();
        assert_eq!(data.examples.len(), 1);
        let skipped: Vec<usize> = data.skipped.iter().map(|s| s.line).collect();
        assert_eq!(skipped, [2, 3, 4, 5, 6, 7]);
        assert!(data.skipped[1].reason.starts_with("not valid JSON"));
        assert_eq!(data.skipped[3].reason, "missing field \"completion\"");
        assert!(data.skipped[4].reason.contains("\"question\""));
        assert_eq!(data.skipped[5].reason, "field \"text\" is empty");
    }

    #[test]
    fn an_empty_file_or_one_of_only_bad_rows_is_an_error() {
        let err = read("", false).unwrap_err().to_string();
        assert_eq!(err, "data.jsonl: no examples (0 bad rows skipped)");
        let err = read("\n  \n", false).unwrap_err().to_string();
        assert_eq!(err, "data.jsonl: no examples (0 bad rows skipped)");
        let err = read("{}\n", true).unwrap_err().to_string();
        assert_eq!(err, "data.jsonl: no examples (1 bad rows skipped)");
        let err = Dataset::from_jsonl("/nonexistent/data.jsonl", &DataOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/nonexistent/data.jsonl: "), "{err}");
    }

    #[test]
    fn labels_mask_the_prompt_and_end_with_eos() {
        let data = read(
            "{\"prompt\": \"ab\", \"completion\": \"c\"}\n{\"text\": \"xy\"}\n",
            false,
        )
        .unwrap();
        let rows = tokenize(data, 16, false).unwrap().examples;
        // BOS a b | c EOS
        assert_eq!(rows[0].input_ids, [1, 97, 98, 99, 2]);
        assert_eq!(
            rows[0].labels,
            [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 99, 2]
        );
        assert_eq!(rows[0].prompt_ids(), [1, 97, 98]);
        assert_eq!(rows[0].target_ids(), [99, 2]);
        assert!(!rows[0].is_text && !rows[0].truncated);
        // Text rows: every token is a label.
        assert_eq!(rows[1].input_ids, [1, 120, 121, 2]);
        assert_eq!(rows[1].labels, [1, 120, 121, 2]);
        assert!(rows[1].is_text);
    }

    #[test]
    fn over_long_rows_keep_the_target_or_are_bad_rows() {
        let data = read(
            concat!(
                "{\"prompt\": \"abcdef\", \"completion\": \"xy\"}\n",
                "{\"prompt\": \"a\", \"completion\": \"wxyz\"}\n",
                "{\"text\": \"abcdefgh\"}\n",
            ),
            false,
        )
        .unwrap();
        let err = tokenize(data.clone(), 4, false).unwrap_err().to_string();
        assert_eq!(
            err,
            "data.jsonl:2: the target is 5 tokens (EOS included), more than max_length 4 \
             (skip_bad_rows skips such rows)"
        );
        let tokenized = tokenize(data, 4, true).unwrap();
        assert_eq!(tokenized.skipped.len(), 1);
        assert_eq!(tokenized.skipped[0].line, 2);
        let rows = tokenized.examples;
        // The prompt loses its first tokens (BOS, a, b, c, d); the target stays whole.
        assert_eq!(rows[0].input_ids, [102, 120, 121, 2]);
        assert_eq!(rows[0].target_ids(), [120, 121, 2]);
        assert!(rows[0].truncated);
        // Text keeps its beginning.
        assert_eq!(rows[1].input_ids, [1, 97, 98, 99]);
        assert!(rows[1].truncated);
    }

    #[test]
    fn length_grouped_order_is_a_seeded_permutation_of_homogeneous_batches() {
        // 203 rows of lengths 1..=40 in a scrambled pattern, batches of 8 (a partial one of 3).
        let lengths: Vec<usize> = (0..203).map(|i| (i * 37) % 40 + 1).collect();
        let order = length_grouped_order(&lengths, 8, 5, 2);
        assert_eq!(order, length_grouped_order(&lengths, 8, 5, 2));
        assert_ne!(order, length_grouped_order(&lengths, 8, 5, 3));
        assert_ne!(order, length_grouped_order(&lengths, 8, 6, 2));
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..203).collect::<Vec<_>>());
        // Padding to the longest row of each batch: far less than with the plain order.
        let padding = |order: &[usize]| -> usize {
            order
                .chunks(8)
                .map(|b| {
                    let max = b.iter().map(|&i| lengths[i]).max().unwrap();
                    b.iter().map(|&i| max - lengths[i]).sum::<usize>()
                })
                .sum()
        };
        let plain = padding(&epoch_order(203, 5, 2));
        assert!(
            padding(&order) * 4 < plain,
            "{} vs {plain}",
            padding(&order)
        );
        // The partial batch is last (here one window holds every row: the shortest three);
        // batches are not visited longest first.
        let shortest_full = order[..200].iter().map(|&i| lengths[i]).min().unwrap();
        assert!(order[200..].iter().all(|&i| lengths[i] <= shortest_full));
        let firsts: Vec<usize> = order[..200].chunks(8).map(|b| lengths[b[0]]).collect();
        assert!(firsts.windows(2).any(|w| w[0] < w[1]), "{firsts:?}");
    }

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(50, 7, 0);
        assert_eq!(a, epoch_order(50, 7, 0));
        assert_ne!(a, epoch_order(50, 7, 1));
        assert_ne!(a, epoch_order(50, 8, 0));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn collate_pads_right_and_ignores_padding() {
        let data = read(
            "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"text\": \"xyz\"}\n",
            false,
        )
        .unwrap();
        let rows = tokenize(data, 16, false).unwrap().examples;
        let refs: Vec<&TokenizedExample> = rows.iter().collect();
        let batch = Batch::collate(&refs, 0, 0, &Device::default());
        let ids: Vec<i64> = batch.input_ids.into_data().try_to_vec_as::<i64>().unwrap();
        let mask: Vec<i64> = batch
            .attention_mask
            .into_data()
            .try_to_vec_as::<i64>()
            .unwrap();
        let labels: Vec<i64> = batch.labels.into_data().try_to_vec_as::<i64>().unwrap();
        assert_eq!(ids, [1, 97, 98, 2, 0, 1, 120, 121, 122, 2]);
        assert_eq!(mask, [1, 1, 1, 1, 0, 1, 1, 1, 1, 1]);
        let ig = IGNORE_INDEX;
        assert_eq!(labels, [ig, ig, 98, 2, ig, 1, 120, 121, 122, 2]);
        assert_eq!(batch.tokens, 9);
        // Row 1: b, EOS; row 2: everything after its first token, which a virtual token scores.
        assert_eq!(batch.scored, 2 + 4);
        assert_eq!(Batch::scored_labels(&refs, 10), 2 + 5);
    }
}
