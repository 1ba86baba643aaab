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
            serde_json::json!({"rope_type": "longrope", "factor": 4.0}),
        );
    });
    // yarn, linear, dynamic and llama3 are computed (issue 20); longrope is not, and is refused
    // rather than approximated.
    let msg = message(load(dir.path()).unwrap_err());
    assert!(
        msg.contains("key `rope_parameters`")
            && msg.contains("\"longrope\", which is not supported"),
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

#[test]
fn epsilons_and_rope_bases_must_be_positive() {
    for (model, key, value) in [
        ("qwen2-gqa-tied", "rms_norm_eps", 0.0),
        ("qwen2-gqa-tied", "rms_norm_eps", -1e-6),
        ("qwen2-gqa-tied", "rope_theta", 0.0),
        ("llama-biases", "rope_theta", -10000.0),
        ("bloom-6-heads", "layer_norm_epsilon", 0.0),
    ] {
        let dir = copy_of(model);
        edit_config(dir.path(), |cfg| {
            cfg.insert(key.into(), serde_json::json!(value));
        });
        let msg = message(load(dir.path()).unwrap_err());
        assert!(
            msg.contains("config.json: key `")
                && msg.contains(&format!("{key}` must be a number above zero")),
            "{model} {key}: {msg}"
        );
    }
}

#[test]
fn an_index_must_name_shards_inside_the_model_directory() {
    let index_path = |dir: &Path| dir.join("model.safetensors.index.json");
    let edit_index = |dir: &Path, edit: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut index: Value =
            serde_json::from_str(&std::fs::read_to_string(index_path(dir)).unwrap()).unwrap();
        edit(index["weight_map"].as_object_mut().unwrap());
        std::fs::write(index_path(dir), index.to_string()).unwrap();
    };
    let dir = copy_of("llama-mqa-sharded");
    edit_index(dir.path(), &|map| map.clear());
    let msg = message(load(dir.path()).unwrap_err());
    assert!(
        msg.contains("model.safetensors.index.json: key `weight_map` is empty"),
        "{msg}"
    );
    for outside in ["../model-00001-of-00010.safetensors", "/etc/passwd", ""] {
        let dir = copy_of("llama-mqa-sharded");
        edit_index(dir.path(), &|map| {
            map.insert("lm_head.weight".into(), Value::String(outside.into()));
        });
        let msg = message(load(dir.path()).unwrap_err());
        assert!(
            msg.contains("key `weight_map.lm_head.weight`")
                && msg.contains("must be a file name inside the model directory"),
            "{outside:?}: {msg}"
        );
    }
}

#[test]
fn non_finite_weights_are_named() {
    for (value, dtype) in [(f32::NAN, "f32"), (f32::INFINITY, "f32")] {
        let dir = copy_of("qwen2-gqa-tied");
        edit_weights(dir.path(), |tensors| {
            let (_, _, bytes) = tensors.get_mut("model.norm.weight").unwrap();
            bytes[12..16].copy_from_slice(&value.to_le_bytes());
        });
        let msg = message(load(dir.path()).unwrap_err());
        assert!(
            msg.contains(
                "model.safetensors: tensor `model.norm.weight` holds NaN or infinity (element 3)"
            ),
            "{dtype} {value}: {msg}"
        );
    }
    // Half precision: an all-ones exponent in a BF16 checkpoint.
    let dir = copy_of("qwen2-bf16");
    edit_weights(dir.path(), |tensors| {
        let (_, _, bytes) = tensors.get_mut("model.norm.weight").unwrap();
        bytes[0..2].copy_from_slice(&0x7f80u16.to_le_bytes());
    });
    let msg = message(load(dir.path()).unwrap_err());
    assert!(
        msg.contains("`model.norm.weight` holds NaN or infinity (element 0)"),
        "{msg}"
    );
}

#[test]
fn truncated_files_and_inconsistent_tensors_say_what_is_wrong() {
    let dir = copy_of("qwen2-gqa-tied");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    // Cut inside the header, then inside the data.
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    std::fs::write(&path, &bytes[..8 + header / 2]).unwrap();
    let msg = message(load(dir.path()).unwrap_err());
    assert!(
        msg.contains("model.safetensors: invalid safetensors file"),
        "{msg}"
    );
    assert!(msg.contains("a truncated or partly written file?"), "{msg}");
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let msg = message(load(dir.path()).unwrap_err());
    assert!(msg.contains("of the data, which has only"), "{msg}");

    // A shape that disagrees with the tensor's bytes names the tensor.
    let mut header_json: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + header]).unwrap();
    let norm = header_json["model.norm.weight"].as_object_mut().unwrap();
    norm["shape"] = serde_json::json!([3]);
    let text = serde_json::to_string(&header_json).unwrap();
    let padded = format!("{text:<width$}", width = header);
    assert_eq!(
        padded.len(),
        header,
        "the edited header must keep its length"
    );
    let mut edited = bytes.clone();
    edited[8..8 + header].copy_from_slice(padded.as_bytes());
    std::fs::write(&path, edited).unwrap();
    let msg = message(load(dir.path()).unwrap_err());
    assert!(
        msg.contains("tensor `model.norm.weight` of shape [3] needs 12 bytes"),
        "{msg}"
    );
}

#[test]
fn a_directory_or_a_link_loop_where_the_weights_belong_is_named() {
    let dir = copy_of("qwen2-gqa-tied");
    let path = dir.path().join("model.safetensors");
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    let msg = message(load(dir.path()).unwrap_err());
    assert!(
        msg.contains("model.safetensors: is a directory, expected a safetensors file"),
        "{msg}"
    );
    std::fs::remove_dir(&path).unwrap();
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink("model.safetensors", &path).unwrap();
        let msg = message(load(dir.path()).unwrap_err());
        assert!(msg.contains("model.safetensors:"), "{msg}");
        assert!(!msg.contains("not found"), "{msg}");
    }
}

#[test]
fn special_token_ids_past_the_vocabulary_are_refused() {
    let dir = copy_of("qwen2-gqa-tied");
    let path = dir.path().join("generation_config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["eos_token_id"] = serde_json::json!([1, 100000]);
    std::fs::write(&path, cfg.to_string()).unwrap();
    let err = peft_models::SpecialTokens::from_dir(dir.path()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: key `eos_token_id` holds id 100000, beyond the model's vocabulary (vocab_size 512)",
            path.display()
        )
    );
}
