//! GGUF files as llama.cpp's gguf-py writes them (`scripts/make_gguf_fixtures.py`): metadata of
//! every value type, and tensors of every supported type dequantized exactly as gguf-py's
//! reference (ggml's `dequantize_row_*`) does; malformed files are errors naming what is wrong.

use std::path::PathBuf;

use peft_models::gguf::{GgmlType, GgufFile, GgufValue};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gguf/tensors.gguf")
}

#[test]
fn metadata_and_every_tensor_type_read_as_gguf_py_writes_and_dequantizes_them() {
    let file = GgufFile::open(fixture()).unwrap();
    let m = &file.metadata;
    assert_eq!(m["general.architecture"], GgufValue::String("llama".into()));
    assert_eq!(m["test.u32"], GgufValue::UInt(7));
    assert_eq!(m["test.i32"], GgufValue::Int(-3));
    assert_eq!(m["test.f32"], GgufValue::Float(0.5));
    assert_eq!(m["test.bool"], GgufValue::Bool(true));
    assert_eq!(m["test.string"], GgufValue::String("héllo".into()));
    assert_eq!(m["test.u64"], GgufValue::UInt(1 << 40));
    assert_eq!(m["test.f64"], GgufValue::Float(-2.25));
    assert_eq!(
        m["test.strings"],
        GgufValue::Array(vec![
            GgufValue::String("a".into()),
            GgufValue::String("bc".into()),
            GgufValue::String(String::new()),
        ])
    );

    let expected_bytes =
        std::fs::read(fixture().with_file_name("tensors.expected.safetensors")).unwrap();
    let expected = safetensors::SafeTensors::deserialize(&expected_bytes).unwrap();
    let types = [
        ("f32", GgmlType::F32),
        ("f16", GgmlType::F16),
        ("bf16", GgmlType::BF16),
        ("q8_0", GgmlType::Q8_0),
        ("q4_0", GgmlType::Q4_0),
        ("q4_1", GgmlType::Q4_1),
        ("q4_k", GgmlType::Q4K),
        ("q5_k", GgmlType::Q5K),
        ("q6_k", GgmlType::Q6K),
    ];
    assert_eq!(file.tensors.len(), types.len());
    for (name, ggml_type) in types {
        let info = file.tensor(name).unwrap();
        assert_eq!(info.ggml_type, ggml_type, "{name}");
        assert_eq!(info.shape, vec![3, 512], "{name}");
        let want = expected.tensor(name).unwrap();
        let want: Vec<f32> = want
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let got = file.dequantize(name).unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // The same f32 operations in the same order as the reference: equal up to rounding.
        assert!(
            worst <= 1e-6 * scale.max(1.0),
            "{name}: {worst} (values up to {scale})"
        );
        assert!(scale > 0.0, "{name}: all zeros");
    }
}

#[test]
fn malformed_files_are_errors_naming_what_is_wrong() {
    let good = std::fs::read(fixture()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    let open = |bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        match GgufFile::open(&path) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    };
    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    assert!(open(&bad_magic).contains("not a GGUF file"));
    let mut v1 = good.clone();
    v1[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(open(&v1).contains("GGUF version 1"));
    // Counts the file cannot hold are refused before anything is allocated.
    let mut huge_tensors = good.clone();
    huge_tensors[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(
        open(&huge_tensors).contains("tensor count"),
        "{}",
        open(&huge_tensors)
    );
    let mut huge_kv = good.clone();
    huge_kv[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(open(&huge_kv).contains("metadata count"));
    // Cut anywhere in the header or the data: an error, never a panic.
    // (The last tensor, q6_k, takes the file's bytes 18432..19692 after 20 bytes of alignment.)
    for cut in [3, 10, 30, 200, 700, 19_000] {
        let message = open(&good[..cut]);
        assert!(message.contains("bad.gguf"), "{cut}: {message}");
    }
    assert!(open(&good[..19_000]).contains("outside the file"));
}
