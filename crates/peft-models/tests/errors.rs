//! Every way a model directory can be wrong gives a typed error naming the file and the key or
//! tensor, never a panic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::DType;
use peft_models::hf_config::ConfigError;
use peft_models::{AutoCausalLm, ModelError, load_tokenizer};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/models")
        .join(name)
}

/// A writable copy of a fixture model directory.
fn copy_of(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn load(dir: &Path) -> Result<AutoCausalLm, ModelError> {
    AutoCausalLm::from_pretrained(dir, &Device::default(), DType::F32)
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(cfg.as_object_mut().unwrap());
    std::fs::write(path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
}

/// Rewrites `model.safetensors` after `edit` on (name -> (dtype, shape, bytes)).
fn edit_weights(
    dir: &Path,
    edit: impl FnOnce(&mut BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: BTreeMap<_, _> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                (view.dtype(), view.shape().to_vec(), view.data().to_vec()),
            )
        })
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, (dtype, shape, data))| {
            (
                name.clone(),
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn message(err: ModelError) -> String {
    err.to_string()
}

#[test]
fn missing_config_json() {
    let dir = copy_of("qwen2-gqa-tied");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(err, ModelError::Config(ConfigError::MissingFile { .. })),
        "{err:?}"
    );
    assert!(message(err).contains("config.json: not found"));
}

#[test]
fn malformed_config_json() {
    let dir = copy_of("qwen2-gqa-tied");
    std::fs::write(
        dir.path().join("config.json"),
        "{\"model_type\": \"qwen2\",\n \"hidden_size\": 64,,}",
    )
    .unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(err, ModelError::Config(ConfigError::Json { .. })),
        "{err:?}"
    );
    let msg = message(err);
    assert!(
        msg.contains("config.json: malformed JSON") && msg.contains("line 2"),
        "{msg}"
    );
}

#[test]
fn unsupported_model_type() {
    let dir = copy_of("qwen2-gqa-tied");
    edit_config(dir.path(), |c| {
        c.insert("model_type".into(), "gpt2".into());
    });
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, ModelError::UnsupportedModelType { model_type, .. } if model_type == "gpt2")
    );
    assert!(message(err).contains("unsupported model_type `gpt2`"));
}

#[test]
fn missing_and_mistyped_config_keys() {
    let dir = copy_of("qwen2-gqa-tied");
    edit_config(dir.path(), |c| {
        c.remove("intermediate_size");
    });
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, ModelError::Config(ConfigError::MissingKey { key, .. }) if key == "intermediate_size"),
        "{err:?}"
    );

    let dir = copy_of("bloom-6-heads");
    edit_config(dir.path(), |c| {
        c.insert("n_head".into(), "six".into());
    });
    let msg = message(load(dir.path()).unwrap_err());
    assert!(
        msg.contains("config.json: key `n_head` must be a positive integer, found string \"six\""),
        "{msg}"
    );

    let dir = copy_of("qwen2-gqa-tied");
    edit_config(dir.path(), |c| {
        c.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
        );
    });
    let msg = message(load(dir.path()).unwrap_err());
    assert!(
        msg.contains("key `rope_parameters`") && msg.contains("yarn"),
        "{msg}"
    );
}

#[test]
fn missing_weights_file_and_missing_shard() {
    let dir = copy_of("qwen2-gqa-tied");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let msg = message(load(dir.path()).unwrap_err());
    assert!(msg.contains("model.safetensors: not found"), "{msg}");

    let dir = copy_of("llama-mqa-sharded");
    std::fs::remove_file(dir.path().join("model-00003-of-00010.safetensors")).unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::MissingFile { .. }), "{err:?}");
    assert!(message(err).contains("model-00003-of-00010.safetensors: not found"));
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_of("qwen2-gqa-tied");
    edit_weights(dir.path(), |t| {
        t.remove("model.layers.1.self_attn.k_proj.bias");
    });
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, ModelError::MissingTensor { name, .. } if name == "model.layers.1.self_attn.k_proj.bias"),
        "{err:?}"
    );
    assert!(
        message(err)
            .contains("model.safetensors: missing tensor `model.layers.1.self_attn.k_proj.bias`")
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let dir = copy_of("bloom-6-heads");
    edit_weights(dir.path(), |t| {
        t.insert(
            "transformer.h.2.input_layernorm.weight".into(),
            (safetensors::Dtype::F32, vec![1], vec![0; 4]),
        );
    });
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, ModelError::UnexpectedTensor { name, .. } if name == "transformer.h.2.input_layernorm.weight"),
        "{err:?}"
    );
}

#[test]
fn shape_mismatch_names_tensor_and_shapes() {
    // A config that disagrees with the weights (another model's intermediate size).
    let dir = copy_of("qwen2-gqa-tied");
    edit_config(dir.path(), |c| {
        c.insert("intermediate_size".into(), 96.into());
    });
    let err = load(dir.path()).unwrap_err();
    let ModelError::ShapeMismatch {
        name,
        expected,
        found,
        ..
    } = &err
    else {
        panic!("{err:?}");
    };
    assert_eq!(name, "model.layers.0.mlp.gate_proj.weight");
    assert_eq!(
        (expected.clone(), found.clone()),
        (vec![96, 64], vec![128, 64])
    );
    assert!(message(err).contains("has shape [128, 64], expected [96, 64]"));
}

#[test]
fn unsupported_dtype_and_corrupt_file() {
    let dir = copy_of("qwen2-gqa-tied");
    edit_weights(dir.path(), |t| {
        let entry = t.get_mut("model.norm.weight").unwrap();
        entry.0 = safetensors::Dtype::I32;
    });
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, ModelError::UnsupportedDtype { name, .. } if name == "model.norm.weight"),
        "{err:?}"
    );

    let dir = copy_of("qwen2-gqa-tied");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::Safetensors { .. }), "{err:?}");
    assert!(message(err).contains("model.safetensors: invalid safetensors file"));
}

#[test]
fn bad_tokenizer_file() {
    let dir = copy_of("qwen2-gqa-tied");
    std::fs::write(dir.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let err = load_tokenizer(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::Tokenizer { .. }), "{err:?}");
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    assert!(message(load_tokenizer(dir.path()).unwrap_err()).contains("tokenizer.json: not found"));
}
