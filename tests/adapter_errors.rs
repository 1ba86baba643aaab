//! Adapters that do not fit are refused with the file and the key or tensor named, for every
//! method (prompt tuning's own cases are in crates/peft-prompt/tests/adapter_files.rs).

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::DType;
use peft::AutoAdapter;
use peft::core::PeftModel;
use peft::core::adapter_file::write_tensors;
use peft::models::AutoCausalLm;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The error of loading `adapter` onto `model`.
fn error(model: &str, adapter: &Path) -> String {
    let device = Device::default();
    let base =
        AutoCausalLm::from_pretrained(fixtures().join("models").join(model), &device, DType::F32)
            .unwrap();
    match PeftModel::<AutoCausalLm, AutoAdapter>::from_pretrained(base, adapter) {
        Ok(_) => panic!("{} loaded onto {model}", adapter.display()),
        Err(e) => e.to_string(),
    }
}

/// A copy of a fixture adapter with its config edited by `edit`.
fn edited(
    model: &str,
    method: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let source = fixtures().join("adapters").join(model).join(method);
    for entry in std::fs::read_dir(&source).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let path = dir.path().join("adapter_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, cfg.to_string()).unwrap();
    dir
}

fn assert_names(err: &str, needles: &[&str]) {
    for needle in needles {
        assert!(err.contains(needle), "`{needle}` not in: {err}");
    }
}

#[test]
fn adapters_for_another_base_model_are_refused() {
    let qwen = |m: &str| fixtures().join("adapters/qwen2-gqa-tied").join(m);
    // hidden 64 vs BLOOM's 48.
    assert_names(
        &error("bloom-6-heads", &qwen("p-tuning-lstm")),
        &["adapter_config.json", "key `token_dim`", "64", "48"],
    );
    // Same hidden size and layers, other key/value heads: prefix token_dim 32 vs 16.
    assert_names(
        &error("llama-mqa-sharded", &qwen("p-tuning-v2")),
        &["key `token_dim`", "32", "16"],
    );
    assert_names(
        &error("llama-mqa-sharded", &qwen("prefix-tuning")),
        &["key `token_dim`"],
    );
    let layers = edited("qwen2-gqa-tied", "prefix-tuning", |c| {
        c["num_layers"] = 3.into()
    });
    assert_names(
        &error("qwen2-gqa-tied", layers.path()),
        &["key `num_layers`", "3", "2"],
    );
    let heads = edited("qwen2-gqa-tied", "p-tuning-mlp", |c| {
        c["num_attention_heads"] = 8.into()
    });
    assert_names(
        &error("qwen2-gqa-tied", heads.path()),
        &["key `num_attention_heads`"],
    );
    // BitFit: Qwen2's biases do not exist in BLOOM.
    assert_names(
        &error("bloom-6-heads", &qwen("bitfit")),
        &[
            "adapter_model.safetensors",
            "tensor `model.layers.0.self_attn.k_proj.bias`",
            "another model",
        ],
    );
}

#[test]
fn config_keys_missing_or_of_the_wrong_type_are_named() {
    let missing = edited("bloom-6-heads", "p-tuning-mlp", |c| {
        c.as_object_mut().unwrap().remove("num_virtual_tokens");
    });
    assert_names(
        &error("bloom-6-heads", missing.path()),
        &["adapter_config.json", "num_virtual_tokens"],
    );
    let typed = edited("bloom-6-heads", "p-tuning-mlp", |c| {
        c["encoder_hidden_size"] = "wide".into()
    });
    assert_names(
        &error("bloom-6-heads", typed.path()),
        &["encoder_hidden_size", "wide"],
    );
    let kind = edited("bloom-6-heads", "p-tuning-lstm", |c| {
        c["encoder_reparameterization_type"] = "GRU".into()
    });
    assert_names(
        &error("bloom-6-heads", kind.path()),
        &["encoder_reparameterization_type", "GRU"],
    );
    let projection = edited("bloom-6-heads", "prefix-tuning", |c| {
        c["prefix_projection"] = "yes".into()
    });
    assert_names(
        &error("bloom-6-heads", projection.path()),
        &["prefix_projection"],
    );
    let pattern = edited("bloom-6-heads", "bitfit", |c| {
        c["bias_pattern"] = "(".into()
    });
    assert_names(
        &error("bloom-6-heads", pattern.path()),
        &["bias_pattern", "regular expression"],
    );
}

#[test]
fn tensors_missing_or_of_the_wrong_shape_are_named() {
    // The encoder checkpoint does not match the config's encoder width.
    let width = edited("qwen2-gqa-tied", "p-tuning-mlp", |c| {
        c["encoder_hidden_size"] = 25.into()
    });
    assert_names(
        &error("qwen2-gqa-tied", width.path()),
        &[
            "adapter_encoder.safetensors",
            "tensor `mlp_head.0.weight`",
            "[24, 64]",
            "[25, 64]",
            "encoder_hidden_size 25",
        ],
    );
    // PEFT's file without `prompt_embeddings`, or with the wrong shape.
    let dir = edited("llama-mqa-sharded", "p-tuning-v2", |_| {});
    let weights = dir.path().join("adapter_model.safetensors");
    write_tensors(
        &weights,
        vec![("other", TensorData::new(vec![0.0f32; 4], [2, 2]))],
    )
    .unwrap();
    assert_names(
        &error("llama-mqa-sharded", dir.path()),
        &[
            "adapter_model.safetensors",
            "missing tensor `prompt_embeddings`",
        ],
    );
    write_tensors(
        &weights,
        vec![(
            "prompt_embeddings",
            TensorData::new(vec![0.0f32; 4 * 60], [4, 60]),
        )],
    )
    .unwrap();
    assert_names(
        &error("llama-mqa-sharded", dir.path()),
        &[
            "tensor `prompt_embeddings` has shape [4, 60], expected [4, 64]",
            "num_layers 2 x 2 x token_dim 16",
        ],
    );
    // BitFit: a bias missing, or of the wrong shape.
    let dir = edited("bloom-6-heads", "bitfit", |_| {});
    let weights = dir.path().join("adapter_model.safetensors");
    write_tensors(
        &weights,
        vec![(
            "transformer.ln_f.bias",
            TensorData::new(vec![0.0f32; 48], [48]),
        )],
    )
    .unwrap();
    assert_names(
        &error("bloom-6-heads", dir.path()),
        &["missing tensor `transformer.h.0."],
    );
    write_tensors(
        &weights,
        vec![(
            "transformer.ln_f.bias",
            TensorData::new(vec![0.0f32; 40], [40]),
        )],
    )
    .unwrap();
    assert_names(
        &error("bloom-6-heads", dir.path()),
        &["tensor `transformer.ln_f.bias` has shape [40], expected [48]"],
    );
}

#[test]
fn unknown_init_values_extra_tensors_and_non_finite_values_are_refused() {
    // An unknown prompt_tuning_init was once read as RANDOM.
    let init = edited("qwen2-gqa-tied", "prompt-tuning", |c| {
        c["prompt_tuning_init"] = "GAUSSIAN".into()
    });
    assert_names(
        &error("qwen2-gqa-tied", init.path()),
        &[
            "adapter_config.json",
            "key `prompt_tuning_init` must be \"RANDOM\", \"TEXT\" or \"SAMPLE_VOCAB\", found \"GAUSSIAN\"",
        ],
    );
    // A prompt-learning file with a tensor PEFT never writes there.
    for method in ["prompt-tuning", "p-tuning-v2"] {
        let dir = edited("qwen2-gqa-tied", method, |_| {});
        let weights = dir.path().join("adapter_model.safetensors");
        let file = peft::core::adapter_file::TensorFile::open(&weights).unwrap();
        let shape = {
            let bytes = std::fs::read(&weights).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            st.tensor("prompt_embeddings").unwrap().shape().to_vec()
        };
        let values = file.data("prompt_embeddings", &shape, "").unwrap();
        write_tensors(
            &weights,
            vec![
                ("prompt_embeddings", values.clone()),
                ("lm_head.weight", TensorData::new(vec![0.0f32; 4], [2, 2])),
            ],
        )
        .unwrap();
        assert_names(
            &error("qwen2-gqa-tied", dir.path()),
            &[
                "adapter_model.safetensors",
                "tensor `lm_head.weight` is not part of a prompt-learning adapter",
            ],
        );
        // NaN in the prompt: every logit would be NaN.
        let mut poisoned = values.try_to_vec::<f32>().unwrap();
        poisoned[5] = f32::NAN;
        write_tensors(
            &weights,
            vec![(
                "prompt_embeddings",
                TensorData::new(poisoned, shape.clone()),
            )],
        )
        .unwrap();
        assert_names(
            &error("qwen2-gqa-tied", dir.path()),
            &["tensor `prompt_embeddings` holds NaN or infinity (element 5)"],
        );
    }
}
