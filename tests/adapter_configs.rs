//! Every `adapter_config.json` PEFT wrote into fixtures/ reads into its method's serde types and
//! writes back with every key PEFT wrote, and what is written reads back equal; keys we write are
//! keys we read (prefix tuning's `init_weights` among them).

use std::path::{Path, PathBuf};

use burn::prelude::*;
use peft::bitfit::BitFitFile;
use peft::core::adapter_config::{
    ADAPTER_CONFIG, PromptLearningFile, read_adapter_config, write_config,
};
use peft::core::{BaseShape, Method};
use peft::prefix::{PrefixEncoder, PrefixTuningConfig, PrefixTuningFile};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

fn fixture_configs() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/adapters");
    let mut dirs = Vec::new();
    for model in std::fs::read_dir(root).unwrap() {
        for method in std::fs::read_dir(model.unwrap().path()).unwrap() {
            let dir = method.unwrap().path();
            if dir.join(ADAPTER_CONFIG).is_file() {
                dirs.push(dir);
            }
        }
    }
    dirs.sort();
    dirs
}

fn read_json(path: &Path) -> Map<String, Value> {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Reads `dir` as `K`'s file, writes it into a fresh directory, reads that back: both reads equal,
/// and every key of the original is in the written file.
fn round_trip<K>(dir: &Path, peft_type: &'static str) -> usize
where
    K: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let (file, _) = PromptLearningFile::<K>::read(dir, peft_type).unwrap();
    let written = file.to_json();
    let out = tempfile::tempdir().unwrap();
    write_config(out.path(), &written).unwrap();
    let (again, _) = PromptLearningFile::<K>::read(out.path(), peft_type).unwrap();
    assert_eq!(file, again, "{}", dir.display());
    let original = read_json(&dir.join(ADAPTER_CONFIG));
    for key in original.keys() {
        assert!(
            written.contains_key(key),
            "{}: `{key}` not written back",
            dir.display()
        );
    }
    original.len()
}

#[test]
fn every_fixture_config_round_trips_with_the_keys_peft_wrote() {
    let dirs = fixture_configs();
    assert!(dirs.len() >= 18, "{dirs:?}");
    let mut checked = 0;
    for dir in &dirs {
        let (_, peft_type) = peft::read_peft_type(dir).unwrap();
        let keys = match peft_type {
            peft::prompt::PEFT_TYPE => round_trip::<peft::prompt::PromptTuningKeys>(dir, peft_type),
            peft::ptuning::PEFT_TYPE => round_trip::<peft::ptuning::PTuningKeys>(dir, peft_type),
            peft::prefix::PEFT_TYPE => round_trip::<peft::prefix::PrefixTuningKeys>(dir, peft_type),
            _ => {
                let cfg = read_adapter_config(dir, peft::bitfit::PEFT_TYPE).unwrap();
                let file: BitFitFile = cfg.parse().unwrap();
                let written = serde_json::to_value(&file).unwrap();
                let again: BitFitFile = serde_json::from_value(written.clone()).unwrap();
                assert_eq!(file, again);
                for key in read_json(&dir.join(ADAPTER_CONFIG)).keys() {
                    assert!(written.get(key).is_some(), "{}: `{key}`", dir.display());
                }
                1
            }
        };
        assert!(keys > 0);
        checked += 1;
    }
    assert_eq!(checked, dirs.len());
}

#[test]
fn a_zero_initialized_prefix_says_so_and_reads_it_back() {
    let device = Device::default();
    let geometry = peft::core::ModelGeometry {
        num_layers: 2,
        hidden_size: 16,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        vocab_size: 32,
        max_positions: Some(64),
    };
    for (zero, written) in [(true, Value::from("zero")), (false, Value::Null)] {
        let prefix = PrefixTuningConfig::for_model(3, &geometry)
            .with_zero_init(zero)
            .with_prefix_dropout(0.25)
            .init(&device);
        let dir = tempfile::tempdir().unwrap();
        let shape = BaseShape::new(geometry, Vec::new());
        prefix.write(dir.path(), &shape, Some("base")).unwrap();
        let json = read_json(&dir.path().join(ADAPTER_CONFIG));
        assert_eq!(json["init_weights"], written);
        assert_eq!(json["prefix_dropout"], Value::from(0.25));
        let loaded = PrefixEncoder::read(dir.path(), &shape, &device).unwrap();
        assert_eq!(loaded.config.zero_init, zero);
        assert_eq!(loaded.config.prefix_dropout, 0.25);
    }
}

#[test]
fn wrong_types_and_unknown_values_name_their_key() {
    let source = fixture_configs()
        .into_iter()
        .find(|d| d.ends_with("qwen2-gqa-tied/prefix-tuning"))
        .unwrap();
    for (key, value, message) in [
        (
            "init_weights",
            Value::from("gaussian"),
            "unknown variant `gaussian`",
        ),
        (
            "encoder_hidden_size",
            Value::from(0),
            "must be a positive integer, found number 0",
        ),
        (
            "num_layers",
            Value::from(-2),
            "must be a positive integer, found number -2",
        ),
        (
            "prefix_dropout",
            Value::from(1.5),
            "must be a number in [0, 1), found number 1.5",
        ),
        ("inference_mode", Value::from("yes"), "expected a boolean"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut json = read_json(&source.join(ADAPTER_CONFIG));
        json.insert(key.into(), value);
        json.insert("a_key_from_a_newer_peft".into(), Value::from(1));
        std::fs::write(
            dir.path().join(ADAPTER_CONFIG),
            Value::Object(json).to_string(),
        )
        .unwrap();
        let err = PrefixTuningFile::read(dir.path(), peft::prefix::PEFT_TYPE)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("adapter_config.json: key `{key}` ")) && err.contains(message),
            "{key}: {err}"
        );
    }
}
