//! Models from llama.cpp GGUF files: the configuration, tokenizer, special tokens and chat
//! template read from the file's own metadata, and the weights dequantized under Hugging Face
//! names, so that a GGUF file gives the same [`AutoCausalLm`] as the Hugging Face folder it was
//! converted from (`llama`, `qwen2` and `qwen3` architectures; Mistral's GGUF files are `llama`).
//!
//! What the loader undoes is what llama.cpp's `convert_hf_to_gguf.py` does:
//! - tensor names (`blk.N.attn_q.weight` is `model.layers.N.self_attn.q_proj.weight`, ...);
//! - for `llama`, the permutation of q and k rows (weights and biases) into llama.cpp's
//!   interleaved RoPE layout;
//! - the shapes, which GGUF stores innermost first.
//!
//! The tokenizer is rebuilt for `tokenizer.ggml.model = "gpt2"` (byte-level BPE: Llama 3, Qwen2
//! and 3, SmolLM) as the model's `tokenizer.json` states it, for the pre-tokenizer types
//! `tokenizer.ggml.pre` names that the `tokenizers` crate can express (see [`PRE_TOKENIZERS`]).
//! SentencePiece GGUF tokenizers (`"llama"`: Llama 2, Mistral v0.1-v0.3) are refused by name.

use std::io::Read;
use std::path::Path;

use burn::prelude::*;
use burn::tensor::DType;
use serde_json::{Map, Value, json};
use tokenizers::Tokenizer;

use crate::auto::{AutoCausalLm, AutoConfig, SpecialTokens};
use crate::chat::ChatTemplate;
use crate::checkpoint::Checkpoint;
use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, GgufValue};
use crate::hf_config::HfConfig;

/// The `tokenizer.ggml.pre` values read, with the pre-tokenizer each stands for.
pub const PRE_TOKENIZERS: &[&str] = &[
    "default",
    "gpt-2",
    "llama-bpe",
    "llama3",
    "llama-v3",
    "qwen2",
    "smollm",
];

/// Llama 3's split (its `tokenizer.json`, and tiktoken's `cl100k` pattern).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split (transformers' `Qwen2Converter`): digits one by one.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Whether `path` is a file that starts with GGUF's magic number (a model folder, a
/// `config.json` or a missing path is not).
pub fn is_gguf_file(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && &magic == b"GGUF"
}

/// The architectures read, by `general.architecture`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Architecture {
    Llama,
    Qwen2,
    Qwen3,
}

impl Architecture {
    fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }
}

/// A GGUF model file, opened: its metadata read as the `config.json` it amounts to.
pub struct GgufModel {
    file: GgufFile,
    architecture: Architecture,
    config: HfConfig,
}

impl std::fmt::Debug for GgufModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufModel")
            .field("path", &self.file.path())
            .field("architecture", &self.architecture)
            .finish()
    }
}

/// `blk.N.<name>` of llama.cpp and the Hugging Face module it is, per layer.
const LAYER_TENSORS: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Tensors outside the layers.
const TOP_TENSORS: &[(&str, &str)] = &[
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// The Hugging Face name of llama.cpp tensor `name`, if it is one the loader knows.
pub fn hf_tensor_name(name: &str) -> Option<String> {
    if let Some((_, hf)) = TOP_TENSORS.iter().find(|(g, _)| *g == name) {
        return Some((*hf).to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let (_, hf) = LAYER_TENSORS.iter().find(|(g, _)| *g == module)?;
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// The llama.cpp name of Hugging Face tensor `name` (the inverse of [`hf_tensor_name`]).
pub fn gguf_tensor_name(name: &str) -> Option<String> {
    if let Some((g, _)) = TOP_TENSORS.iter().find(|(_, hf)| *hf == name) {
        return Some((*g).to_string());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let (g, _) = LAYER_TENSORS.iter().find(|(_, hf)| *hf == module)?;
    Some(format!("blk.{layer}.{g}.{kind}"))
}

impl GgufModel {
    /// Opens `path` and reads its metadata as a configuration.
    ///
    /// # Errors
    ///
    /// A file that is not a readable GGUF file; an architecture other than `llama`, `qwen2` and
    /// `qwen3`; a metadata key missing or of the wrong type; a tensor the loader does not know.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let meta = Metadata(&file);
        let architecture = match meta.str("general.architecture")? {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            "qwen3" => Architecture::Qwen3,
            other => {
                return Err(meta.error(format!(
                    "key \"general.architecture\" is {other:?}; the architectures read are \
                     llama, qwen2 and qwen3"
                )));
            }
        };
        for tensor in &file.tensors {
            if tensor.name == "rope_freqs.weight" {
                return Err(meta.error(
                    "tensor \"rope_freqs.weight\" (Llama 3.1+ RoPE frequency factors) is not \
                     read yet: load the model's Hugging Face folder instead"
                        .into(),
                ));
            }
            if hf_tensor_name(&tensor.name).is_none() {
                return Err(meta.error(format!(
                    "tensor {:?} is not one of the {} architecture as this loader reads it",
                    tensor.name,
                    architecture.model_type()
                )));
            }
        }
        let config = HfConfig::from_map(config_map(&file, architecture)?, file.path());
        Ok(Self {
            file,
            architecture,
            config,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The underlying file (metadata and tensor table).
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The metadata as the `config.json` keys it amounts to.
    pub fn hf_config(&self) -> &HfConfig {
        &self.config
    }

    /// The model's configuration.
    ///
    /// # Errors
    ///
    /// Sizes the model family refuses (named by their `config.json` key).
    pub fn config(&self) -> Result<AutoConfig> {
        AutoConfig::from_hf(&self.config)
    }

    /// The special ids generation needs: `tokenizer.ggml.eos_token_id` (with `eot_token_id` and
    /// `eom_token_id` when set, as Llama 3's `generation_config.json` lists them),
    /// `padding_token_id` (else the EOS) and `bos_token_id`.
    ///
    /// # Errors
    ///
    /// An id of the wrong type or beyond the vocabulary, named.
    pub fn special_tokens(&self) -> Result<SpecialTokens> {
        let meta = Metadata(&self.file);
        let vocab = self.config.usize(&["vocab_size"])?;
        let id = |key: &str| -> Result<Option<u32>> {
            match meta.opt_u64(key)? {
                None => Ok(None),
                Some(id) if (id as usize) < vocab => Ok(Some(id as u32)),
                Some(id) => Err(meta.error(format!(
                    "key {key:?} is {id}, beyond the vocabulary of {vocab} tokens"
                ))),
            }
        };
        let mut eos_token_ids = Vec::new();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(id) = id(key)?
                && !eos_token_ids.contains(&id)
            {
                eos_token_ids.push(id);
            }
        }
        let pad = id("tokenizer.ggml.padding_token_id")?;
        Ok(SpecialTokens {
            pad_token_id: pad.or(eos_token_ids.first().copied()).unwrap_or(0),
            bos_token_id: id("tokenizer.ggml.bos_token_id")?,
            eos_token_ids,
        })
    }

    /// `tokenizer.chat_template`, with the BOS and EOS tokens as its variables; `None` when the
    /// file has none.
    ///
    /// # Errors
    ///
    /// A template or token list of the wrong type.
    pub fn chat_template(&self) -> Result<Option<ChatTemplate>> {
        let meta = Metadata(&self.file);
        let Some(source) = meta.opt_str("tokenizer.chat_template")? else {
            return Ok(None);
        };
        let tokens = meta.str_list("tokenizer.ggml.tokens")?;
        let mut special_tokens = Vec::new();
        for (variable, key) in [
            ("bos_token", "tokenizer.ggml.bos_token_id"),
            ("eos_token", "tokenizer.ggml.eos_token_id"),
            ("pad_token", "tokenizer.ggml.padding_token_id"),
            ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ] {
            if let Some(id) = meta.opt_u64(key)?
                && let Some(token) = tokens.get(id as usize)
            {
                special_tokens.push((variable.to_string(), token.to_string()));
            }
        }
        Ok(Some(ChatTemplate {
            path: self.file.path().to_path_buf(),
            source: source.to_string(),
            special_tokens,
        }))
    }

    /// The tokenizer the metadata describes, as the model's `tokenizer.json` would state it.
    ///
    /// # Errors
    ///
    /// A tokenizer model other than `gpt2`, a `tokenizer.ggml.pre` not in [`PRE_TOKENIZERS`],
    /// token lists of the wrong type or longer than the vocabulary.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let meta = Metadata(&self.file);
        match meta.str("tokenizer.ggml.model")? {
            "gpt2" => {}
            "llama" => {
                return Err(meta.error(
                    "key \"tokenizer.ggml.model\" is \"llama\" (a SentencePiece tokenizer, as \
                     Llama 2 and Mistral ship): only \"gpt2\" (byte-level BPE) tokenizers are \
                     rebuilt from GGUF; load the model's Hugging Face folder instead"
                        .into(),
                ));
            }
            other => {
                return Err(meta.error(format!(
                    "key \"tokenizer.ggml.model\" is {other:?}; only \"gpt2\" (byte-level BPE) \
                     tokenizers are rebuilt from GGUF"
                )));
            }
        }
        let tokens = meta.str_list("tokenizer.ggml.tokens")?;
        let vocab_size = self.config.usize(&["vocab_size"])?;
        if tokens.len() > vocab_size {
            return Err(meta.error(format!(
                "key \"tokenizer.ggml.tokens\" lists {} tokens, more than the {vocab_size} \
                 rows of token_embd.weight",
                tokens.len()
            )));
        }
        let types = match meta.opt_list("tokenizer.ggml.token_type")? {
            Some(types) => {
                if types.len() != tokens.len() {
                    return Err(meta.error(format!(
                        "key \"tokenizer.ggml.token_type\" has {} entries for {} tokens",
                        types.len(),
                        tokens.len()
                    )));
                }
                types
                    .iter()
                    .map(|t| match t {
                        GgufValue::Int(v) => *v,
                        GgufValue::UInt(v) => *v as i64,
                        _ => 1,
                    })
                    .collect()
            }
            None => vec![1; tokens.len()],
        };
        let merges = meta.str_list("tokenizer.ggml.merges")?;
        let pre = meta.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");

        let mut vocab = Map::new();
        let mut added = Vec::new();
        for (id, token) in tokens.iter().enumerate() {
            // llama.cpp's token types: 3 control (special), 4 user-defined (added, not special),
            // 5 unused.
            match types[id] {
                3 | 4 => added.push(json!({
                    "id": id, "content": token, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": types[id] == 3,
                })),
                _ => {}
            }
            // A token listed twice keeps its first id, as a `tokenizer.json` vocabulary can
            // hold only one.
            if !vocab.contains_key(*token) {
                vocab.insert((*token).to_string(), json!(id));
            }
        }
        let byte_level = |trim_offsets: bool, use_regex: bool| {
            json!({"type": "ByteLevel", "add_prefix_space": false,
                   "trim_offsets": trim_offsets, "use_regex": use_regex})
        };
        let split = |pattern: &str| {
            json!({"type": "Split", "pattern": {"Regex": pattern},
                   "behavior": "Isolated", "invert": false})
        };
        let (normalizer, pre_tokenizer, ignore_merges) = match pre {
            "default" | "gpt-2" => (Value::Null, byte_level(true, true), false),
            "llama-bpe" | "llama3" | "llama-v3" => (
                Value::Null,
                json!({"type": "Sequence", "pretokenizers":
                    [split(LLAMA3_SPLIT), byte_level(true, false)]}),
                true,
            ),
            "qwen2" => (
                json!({"type": "NFC"}),
                json!({"type": "Sequence", "pretokenizers":
                    [split(QWEN2_SPLIT), byte_level(false, false)]}),
                false,
            ),
            "smollm" => (
                Value::Null,
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true}, byte_level(true, true)]}),
                false,
            ),
            other => {
                return Err(meta.error(format!(
                    "key \"tokenizer.ggml.pre\" is {other:?}; the pre-tokenizers rebuilt are {}",
                    PRE_TOKENIZERS.join(", ")
                )));
            }
        };
        // BOS/EOS added as transformers' `LlamaTokenizerFast.update_post_processor` adds them:
        // `[bos] $A [eos]`, and for pairs `[bos] $A [eos] [bos] $B [eos]`.
        let mut ends: [Option<Value>; 2] = [None, None];
        let mut template_tokens = Map::new();
        for (end, flag, key) in [
            (
                0,
                "tokenizer.ggml.add_bos_token",
                "tokenizer.ggml.bos_token_id",
            ),
            (
                1,
                "tokenizer.ggml.add_eos_token",
                "tokenizer.ggml.eos_token_id",
            ),
        ] {
            if !meta.opt_bool(flag)?.unwrap_or(false) {
                continue;
            }
            let Some(id) = meta.opt_u64(key)? else {
                return Err(meta.error(format!("key {flag:?} is true but {key:?} is missing")));
            };
            let Some(token) = tokens.get(id as usize) else {
                return Err(meta.error(format!(
                    "key {key:?} is {id}, beyond the {} tokens",
                    tokens.len()
                )));
            };
            template_tokens.insert(
                (*token).to_string(),
                json!({"id": token, "ids": [id], "tokens": [token]}),
            );
            ends[end] = Some(Value::String((*token).to_string()));
        }
        let post_processor = if template_tokens.is_empty() {
            byte_level(false, false)
        } else {
            let sequence = |seq: &str, type_id: u32| {
                let mut pieces = Vec::new();
                let special = |t: &Value| json!({"SpecialToken": {"id": t, "type_id": type_id}});
                pieces.extend(ends[0].as_ref().map(special));
                pieces.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
                pieces.extend(ends[1].as_ref().map(special));
                pieces
            };
            let single = sequence("A", 0);
            let pair = [single.clone(), sequence("B", 1)].concat();
            json!({"type": "TemplateProcessing", "single": single, "pair": pair,
                   "special_tokens": template_tokens})
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                        "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
                      "vocab": vocab, "merges": merges},
        });
        spec.to_string()
            .parse::<Tokenizer>()
            .map_err(|e| meta.error(format!("the tokenizer its metadata describes: {e}")))
    }

    /// The weights, dequantized into `dtype` on `device`, as a checkpoint under Hugging Face
    /// names (consumed by a model's `build`).
    pub fn into_checkpoint(self, device: &Device, dtype: DType) -> Checkpoint {
        let permuted = match self.architecture {
            Architecture::Llama => {
                let heads = self.config.usize(&["num_attention_heads"]).ok();
                let kv = self.config.usize(&["num_key_value_heads"]).ok().or(heads);
                Some((heads.unwrap_or(1), kv.unwrap_or(1)))
            }
            _ => None,
        };
        let names = self
            .file
            .tensors
            .iter()
            .map(|t| {
                let hf = hf_tensor_name(&t.name).expect("checked by open");
                // llama.cpp interleaves each head's RoPE halves in q and k (weights and biases).
                let heads = permuted.and_then(|(heads, kv)| {
                    if t.name.contains(".attn_q.") {
                        Some(heads)
                    } else if t.name.contains(".attn_k.") {
                        Some(kv)
                    } else {
                        None
                    }
                });
                (hf, t.name.clone(), heads)
            })
            .collect();
        Checkpoint::from_gguf(self.file, names, device, dtype)
    }

    /// Loads the model onto `device` in `dtype` (F32, F16 or BF16). Every tensor of the file
    /// must be used and have the shape the metadata implies.
    ///
    /// # Errors
    ///
    /// A configuration the family refuses, a tensor missing or of another shape than the
    /// metadata implies (named by its llama.cpp and Hugging Face names), non-finite values.
    pub fn load(self, device: &Device, dtype: DType) -> Result<AutoCausalLm> {
        let config = self.config()?;
        let mut ckpt = self.into_checkpoint(device, dtype);
        let model = config.build(&mut ckpt)?;
        ckpt.finish()?;
        Ok(model)
    }
}

/// The `config.json` the metadata of a `llama`, `qwen2` or `qwen3` file amounts to.
fn config_map(file: &GgufFile, architecture: Architecture) -> Result<Map<String, Value>> {
    let meta = Metadata(file);
    let arch = architecture.model_type();
    let key = |name: &str| format!("{arch}.{name}");
    let has = |name: &str| file.tensor(name).is_some();
    let heads = meta.u64(&key("attention.head_count"))?;
    let hidden = meta.u64(&key("embedding_length"))?;
    let embedding = file.tensor("token_embd.weight").ok_or_else(|| {
        meta.error("tensor \"token_embd.weight\" (the token embeddings) is missing".into())
    })?;
    let vocab_size = match meta.opt_u64(&key("vocab_size"))? {
        Some(v) => v,
        // Older files do not say: the embedding's rows are the vocabulary.
        None => embedding.shape[0] as u64,
    };
    let mut map = Map::new();
    map.insert("model_type".into(), json!(arch));
    map.insert("vocab_size".into(), json!(vocab_size));
    map.insert("hidden_size".into(), json!(hidden));
    map.insert(
        "intermediate_size".into(),
        json!(meta.u64(&key("feed_forward_length"))?),
    );
    map.insert(
        "num_hidden_layers".into(),
        json!(meta.u64(&key("block_count"))?),
    );
    map.insert("num_attention_heads".into(), json!(heads));
    map.insert(
        "num_key_value_heads".into(),
        json!(
            meta.opt_u64(&key("attention.head_count_kv"))?
                .unwrap_or(heads)
        ),
    );
    if let Some(head_dim) = meta.opt_u64(&key("attention.key_length"))? {
        map.insert("head_dim".into(), json!(head_dim));
    }
    map.insert("hidden_act".into(), json!("silu"));
    if let Some(eps) = meta.opt_f64(&key("attention.layer_norm_rms_epsilon"))? {
        map.insert("rms_norm_eps".into(), json!(eps));
    }
    if let Some(context) = meta.opt_u64(&key("context_length"))? {
        map.insert("max_position_embeddings".into(), json!(context));
    }
    let mut rope = Map::new();
    rope.insert(
        "rope_theta".into(),
        json!(meta.opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0)),
    );
    match meta.opt_str(&key("rope.scaling.type"))? {
        None | Some("none") => {
            rope.insert("rope_type".into(), json!("default"));
        }
        Some(kind @ ("linear" | "yarn")) => {
            rope.insert("rope_type".into(), json!(kind));
            let factor = meta.opt_f64(&key("rope.scaling.factor"))?.ok_or_else(|| {
                meta.error(format!("key {:?} is missing", key("rope.scaling.factor")))
            })?;
            rope.insert("factor".into(), json!(factor));
            if kind == "yarn" {
                let original = meta
                    .opt_u64(&key("rope.scaling.original_context_length"))?
                    .ok_or_else(|| {
                        meta.error(format!(
                            "key {:?} is missing",
                            key("rope.scaling.original_context_length")
                        ))
                    })?;
                rope.insert("original_max_position_embeddings".into(), json!(original));
            }
        }
        Some(other) => {
            return Err(meta.error(format!(
                "key {:?} is {other:?}; none, linear and yarn are read",
                key("rope.scaling.type")
            )));
        }
    }
    map.insert("rope_parameters".into(), Value::Object(rope));
    map.insert("tie_word_embeddings".into(), json!(!has("output.weight")));
    if architecture != Architecture::Qwen2 {
        map.insert("attention_bias".into(), json!(has("blk.0.attn_q.bias")));
    }
    if architecture == Architecture::Llama {
        map.insert("mlp_bias".into(), json!(has("blk.0.ffn_up.bias")));
    }
    for (hf, gguf) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(id) = meta.opt_u64(gguf)? {
            map.insert(hf.into(), json!(id));
        }
    }
    Ok(map)
}

/// Typed reads of a file's metadata, errors naming the file and the key.
struct Metadata<'a>(&'a GgufFile);

impl<'a> Metadata<'a> {
    fn error(&self, message: String) -> ModelError {
        ModelError::Gguf {
            path: self.0.path().to_path_buf(),
            message,
        }
    }

    fn get(&self, key: &str) -> Option<&'a GgufValue> {
        self.0.metadata.get(key)
    }

    fn wrong(&self, key: &str, expected: &str, found: &GgufValue) -> ModelError {
        let found = match found {
            GgufValue::Array(items) => format!("an array of {} values", items.len()),
            other => format!("{other:?}"),
        };
        self.error(format!("key {key:?} must be {expected}, found {found}"))
    }

    fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::UInt(v)) => Ok(Some(*v)),
            Some(GgufValue::Int(v)) if *v >= 0 => Ok(Some(*v as u64)),
            Some(other) => Err(self.wrong(key, "a non-negative integer", other)),
        }
    }

    fn u64(&self, key: &str) -> Result<u64> {
        match self.opt_u64(key)? {
            Some(0) => Err(self.error(format!("key {key:?} is 0"))),
            Some(v) => Ok(v),
            None => Err(self.error(format!("key {key:?} is missing"))),
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Float(v)) if v.is_finite() && *v > 0.0 => Ok(Some(*v)),
            Some(other) => Err(self.wrong(key, "a positive number", other)),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Bool(v)) => Ok(Some(*v)),
            Some(other) => Err(self.wrong(key, "a boolean", other)),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.wrong(key, "a string", other)),
        }
    }

    fn str(&self, key: &str) -> Result<&'a str> {
        self.opt_str(key)?
            .ok_or_else(|| self.error(format!("key {key:?} is missing")))
    }

    fn opt_list(&self, key: &str) -> Result<Option<&'a [GgufValue]>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Array(items)) => Ok(Some(items)),
            Some(other) => Err(self.wrong(key, "an array", other)),
        }
    }

    fn str_list(&self, key: &str) -> Result<Vec<&'a str>> {
        let items = self
            .opt_list(key)?
            .ok_or_else(|| self.error(format!("key {key:?} is missing")))?;
        items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                GgufValue::String(s) => Ok(s.as_str()),
                other => Err(self.wrong(&format!("{key}[{i}]"), "a string", other)),
            })
            .collect()
    }
}

/// Undoes llama.cpp's q/k row permutation of a `[rows, cols]` row-major matrix (or a vector,
/// `cols` 1) of `heads` heads: row `(h, i, k)` of the file (`i` < half the head, `k` < 2) is row
/// `(h, k, i)` of Hugging Face's layout, as transformers' `reverse_permute_weights` computes.
pub(crate) fn unpermute_rows(values: &[f32], heads: usize, cols: usize) -> Option<Vec<f32>> {
    let rows = values.len() / cols.max(1);
    if heads == 0 || !rows.is_multiple_of(heads * 2) || rows * cols != values.len() {
        return None;
    }
    let half = rows / heads / 2;
    let mut out = vec![0.0; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for k in 0..2 {
                let file_row = h * half * 2 + i * 2 + k;
                let hf_row = h * half * 2 + k * half + i;
                out[hf_row * cols..(hf_row + 1) * cols]
                    .copy_from_slice(&values[file_row * cols..(file_row + 1) * cols]);
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for g in [
            "token_embd.weight",
            "output.weight",
            "output_norm.weight",
            "blk.0.attn_q.weight",
            "blk.11.attn_k.bias",
            "blk.3.attn_q_norm.weight",
            "blk.29.ffn_down.weight",
        ] {
            let hf = hf_tensor_name(g).unwrap();
            assert_eq!(gguf_tensor_name(&hf).as_deref(), Some(g), "{g} -> {hf}");
        }
        assert_eq!(
            hf_tensor_name("blk.2.ffn_gate.weight").as_deref(),
            Some("model.layers.2.mlp.gate_proj.weight")
        );
        assert_eq!(hf_tensor_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_tensor_name("blk.0.attn_q.scale"), None);
        assert_eq!(hf_tensor_name("rope_freqs.weight"), None);
    }

    #[test]
    fn unpermuting_inverts_llama_cpp_permutation() {
        // llama.cpp's permute: reshape(heads, 2, half, cols).swapaxes(1, 2).
        let (heads, half, cols) = (3, 4, 2);
        let rows = heads * 2 * half;
        let hf: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let mut file = vec![0.0; hf.len()];
        for h in 0..heads {
            for k in 0..2 {
                for i in 0..half {
                    let src = (h * 2 + k) * half + i;
                    let dst = (h * half + i) * 2 + k;
                    file[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_ne!(file, hf);
        assert_eq!(unpermute_rows(&file, heads, cols).unwrap(), hf);
        assert_eq!(unpermute_rows(&file, 5, cols), None);
    }
}
