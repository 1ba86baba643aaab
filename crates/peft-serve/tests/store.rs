//! Adapters by name from a folder: read on first use for the served base, kept in a bounded LRU,
//! and refused with their reason when they cannot be served.

use burn::prelude::*;
use burn::tensor::DType;
use peft::core::{Adapter, BaseShape};
use peft::models::AutoCausalLm;
use peft_serve::{AdapterStore, StoreError};

mod common;
use common::{copy_dir, fixtures};

#[test]
fn adapters_load_by_name_once_within_the_bound_and_bad_ones_are_named() {
    let dir = std::env::temp_dir().join(format!("peft-serve-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let root = dir.join("adapters");
    let adapters = fixtures().join("adapters");
    for (name, from) in [
        ("prompt", "qwen2-gqa-tied/prompt-tuning"),
        ("ptv2", "qwen2-gqa-tied/p-tuning-v2"),
        ("mlp", "qwen2-gqa-tied/p-tuning-mlp"),
        ("biases", "qwen2-gqa-tied/bitfit"),
        ("for-bloom", "bloom-6-heads/prompt-tuning"),
    ] {
        copy_dir(&adapters.join(from), &root.join(name));
    }
    // A link out of the folder, to an adapter that would otherwise load.
    copy_dir(
        &adapters.join("qwen2-gqa-tied/prefix-tuning"),
        &dir.join("outside"),
    );
    #[cfg(unix)]
    std::os::unix::fs::symlink(dir.join("outside"), root.join("linked")).unwrap();

    let device = Device::default();
    let base = AutoCausalLm::from_pretrained(
        fixtures().join("models/qwen2-gqa-tied"),
        &device,
        DType::F32,
    )
    .unwrap();
    let mut store = AdapterStore::new(&root, BaseShape::of(&base), &device, 2);
    let mut names = vec!["biases", "for-bloom", "mlp", "prompt", "ptv2"];
    if cfg!(unix) {
        names.insert(2, "linked");
    }
    assert_eq!(store.names(), names);

    // Loaded once, the least recently used leaving past 2; the same Arc while held.
    let a = store.get("prompt").unwrap();
    assert!(std::sync::Arc::ptr_eq(&a, &store.get("prompt").unwrap()));
    store.get("ptv2").unwrap();
    store.get("mlp").unwrap();
    assert_eq!(store.loaded(), 2);
    assert!(!std::sync::Arc::ptr_eq(&a, &store.get("prompt").unwrap()));
    assert_eq!(a.num_virtual_tokens(), 4);
    // A BitFit adapter loads too: its rows are served through bias deltas.
    assert!(store.get("biases").unwrap().changes_base_weights());

    for (name, expected) in [
        ("../adapters/prompt", "not an adapter name"),
        ("/etc", "not an adapter name"),
        (".hidden", "not an adapter name"),
        ("", "not an adapter name"),
        ("nothing", "no adapter_config.json in"),
        ("for-bloom", "token_dim"),
    ] {
        let err = store.get(name).unwrap_err();
        assert!(err.to_string().contains(expected), "{name}: {err}");
    }
    #[cfg(unix)]
    assert!(matches!(
        store.get("linked"),
        Err(StoreError::Outside { .. })
    ));
    std::fs::remove_dir_all(dir).unwrap();
}
