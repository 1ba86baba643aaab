//! Bad prompt-tuning adapter directories give typed errors naming the file and key or tensor.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::DType;
use peft_core::{BaseShape, CausalLm, Method, ModelGeometry};
use peft_models::AutoCausalLm;
use peft_prompt::{AdapterError, PromptEmbedding};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn geometry(model: &str) -> ModelGeometry {
    AutoCausalLm::from_pretrained(
        fixtures().join("models").join(model),
        &Device::default(),
        DType::F32,
    )
    .unwrap()
    .geometry()
}

/// A writable copy of the PEFT prompt-tuning adapter of the qwen2-gqa-tied fixture.
fn copy_of_adapter() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("adapters/qwen2-gqa-tied/prompt-tuning");
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("adapter_config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(cfg.as_object_mut().unwrap());
    std::fs::write(path, cfg.to_string()).unwrap();
}

fn load(dir: &Path, geometry: &ModelGeometry) -> Result<PromptEmbedding, AdapterError> {
    PromptEmbedding::read(
        dir,
        &BaseShape::new(*geometry, Vec::new()),
        &Device::default(),
    )
}

#[test]
fn an_adapter_for_another_base_model_is_refused_by_key() {
    let dir = fixtures().join("adapters/qwen2-gqa-tied/prompt-tuning");
    // Made for hidden 64; bloom-6-heads has hidden 48.
    let msg = load(&dir, &geometry("bloom-6-heads"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("adapter_config.json: key `token_dim` is 64 but the base model needs 48"),
        "{msg}"
    );
    // Same width, other layer count.
    let mut other = geometry("qwen2-gqa-tied");
    other.num_layers = 3;
    let msg = load(&dir, &other).unwrap_err().to_string();
    assert!(
        msg.contains("key `num_layers` is 2 but the base model needs 3"),
        "{msg}"
    );
    let mut other = geometry("qwen2-gqa-tied");
    other.num_attention_heads = 8;
    let msg = load(&dir, &other).unwrap_err().to_string();
    assert!(
        msg.contains("key `num_attention_heads` is 4 but the base model needs 8"),
        "{msg}"
    );
}

#[test]
fn bad_configs_name_the_key() {
    let geometry = geometry("qwen2-gqa-tied");
    let dir = copy_of_adapter();
    edit_config(dir.path(), |c| {
        c.remove("num_virtual_tokens");
    });
    let msg = load(dir.path(), &geometry).unwrap_err().to_string();
    assert!(msg.contains("missing key `num_virtual_tokens`"), "{msg}");

    let dir = copy_of_adapter();
    edit_config(dir.path(), |c| {
        c.insert("token_dim".into(), "64".into());
    });
    let msg = load(dir.path(), &geometry).unwrap_err().to_string();
    assert!(
        msg.contains("key `token_dim` must be a positive integer, found string \"64\""),
        "{msg}"
    );

    let dir = copy_of_adapter();
    edit_config(dir.path(), |c| {
        c.insert("peft_type".into(), "PREFIX_TUNING".into());
    });
    let err = load(dir.path(), &geometry).unwrap_err();
    assert!(matches!(err, AdapterError::WrongMethod { .. }), "{err:?}");

    let dir = copy_of_adapter();
    edit_config(dir.path(), |c| {
        c.insert("task_type".into(), "SEQ_2_SEQ_LM".into());
    });
    let msg = load(dir.path(), &geometry).unwrap_err().to_string();
    assert!(
        msg.contains("key `task_type` must be \"CAUSAL_LM\""),
        "{msg}"
    );

    // Unknown keys are tolerated.
    let dir = copy_of_adapter();
    edit_config(dir.path(), |c| {
        c.insert("a_key_from_a_future_peft".into(), 1.into());
    });
    load(dir.path(), &geometry).unwrap();
}

#[test]
fn bad_weights_name_the_tensor() {
    let geometry = geometry("qwen2-gqa-tied");
    // The config says 5 virtual tokens; the file holds 4.
    let dir = copy_of_adapter();
    edit_config(dir.path(), |c| {
        c.insert("num_virtual_tokens".into(), 5.into());
    });
    let msg = load(dir.path(), &geometry).unwrap_err().to_string();
    assert!(
        msg.contains("adapter_model.safetensors: tensor `prompt_embeddings` has shape [4, 64], expected [5, 64]"),
        "{msg}"
    );

    // A file without `prompt_embeddings`.
    let dir = copy_of_adapter();
    let path = dir.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("prompt_embeddings").unwrap();
    let renamed = safetensors::serialize(
        [(
            "prompt_embedding",
            safetensors::tensor::TensorView::new(t.dtype(), t.shape().to_vec(), t.data()).unwrap(),
        )],
        None,
    )
    .unwrap();
    std::fs::write(&path, renamed).unwrap();
    let msg = load(dir.path(), &geometry).unwrap_err().to_string();
    assert!(msg.contains("missing tensor `prompt_embeddings`"), "{msg}");

    // No files at all.
    let empty = tempfile::tempdir().unwrap();
    let msg = load(empty.path(), &geometry).unwrap_err().to_string();
    assert!(msg.contains("adapter_config.json: not found"), "{msg}");
}
