//! The `peft` binary end to end: `forward` against transformers' logits, `generate` against
//! transformers' greedy tokens, and bad input rejected with the file and field named, leaving no
//! output file behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root (fixtures/, scripts/).
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model(name: &str) -> PathBuf {
    root().join("fixtures/models").join(name)
}

fn peft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(args)
        .output()
        .expect("runs the peft binary")
}

/// `peft forward --model MODEL --input INPUT --output OUTPUT [extra...]`.
fn forward(model: &Path, input: &Path, output: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    peft(&args)
}

/// `peft forward --adapter ADAPTER` on `input` (the JSON input file's content): the logits' shape
/// and values.
fn adapter_logits(name: &str, adapter: &Path, input: serde_json::Value) -> (Vec<usize>, Vec<f32>) {
    let tmp = tempfile::tempdir().unwrap();
    let (input_path, output) = (
        tmp.path().join("in.json"),
        tmp.path().join("out.safetensors"),
    );
    std::fs::write(&input_path, input.to_string()).unwrap();
    let out = forward(
        &model(name),
        &input_path,
        &output,
        &["--adapter", adapter.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{name} with {}: {}",
        adapter.display(),
        stderr(&out)
    );
    read_f32(&output, "logits")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn read_f32(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    let values = t
        .data()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), values)
}

/// What transformers computed on fixture model `name` (`.safetensors` or `.json`).
fn expected(name: &str, extension: &str) -> PathBuf {
    root()
        .join("fixtures/expected")
        .join(format!("{name}.{extension}"))
}

/// A 2-D I64 tensor of a safetensors file, as rows.
fn read_i64_rows(path: &Path, name: &str) -> Vec<Vec<i64>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::I64);
    let flat: Vec<i64> = t
        .data()
        .chunks(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    flat.chunks(t.shape()[1]).map(<[i64]>::to_vec).collect()
}

fn max_abs_diff<'a>(pairs: impl Iterator<Item = (&'a f32, &'a f32)>) -> f32 {
    pairs.map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

#[test]
fn forward_writes_transformers_logits() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["qwen2-gqa-untied", "bloom-legacy-5-heads"] {
        let input = tmp.path().join(format!("{name}.json"));
        let output = tmp.path().join(format!("{name}.safetensors"));
        let ids = read_i64_rows(&expected(name, "safetensors"), "input_ids");
        std::fs::write(&input, serde_json::json!({ "input_ids": ids }).to_string()).unwrap();
        let out = forward(&model(name), &input, &output, &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        let (shape, ours) = read_f32(&output, "logits");
        let (want_shape, want) = read_f32(&expected(name, "safetensors"), "logits");
        assert_eq!(shape, want_shape);
        let diff = max_abs_diff(ours.iter().zip(&want));
        assert!(diff <= 1e-4, "{name}: {diff}");
    }
}

#[test]
fn forward_accepts_a_padding_mask() {
    let tmp = tempfile::tempdir().unwrap();
    let name = "llama-mqa-sharded";
    let ids = read_i64_rows(&expected(name, "safetensors"), "input_ids");
    let seq = ids[0].len();
    // Row 0 left-padded by two tokens (id 5, masked).
    let mut row = vec![5, 5];
    row.extend(&ids[0]);
    let mut mask = vec![0, 0];
    mask.extend(std::iter::repeat_n(1, seq));
    let input = tmp.path().join("in.json");
    let output = tmp.path().join("out.safetensors");
    std::fs::write(
        &input,
        serde_json::json!({"input_ids": [row], "attention_mask": [mask]}).to_string(),
    )
    .unwrap();
    let out = forward(&model(name), &input, &output, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (shape, ours) = read_f32(&output, "logits");
    let vocab = shape[2];
    assert_eq!(
        shape,
        vec![1, seq + 2, vocab],
        "one row of logits per input token, padding included"
    );
    let (_, want) = read_f32(&expected(name, "safetensors"), "logits");
    let diff = max_abs_diff(ours[2 * vocab..].iter().zip(&want[..seq * vocab]));
    assert!(diff <= 1e-4, "padded row vs transformers unpadded: {diff}");
}

#[test]
fn forward_rejects_bad_input_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = model("qwen2-gqa-tied");
    let cases: [(&str, &str); 7] = [
        ("{\"input_ids\": [[1, 2]", "malformed JSON"),
        ("{\"attention_mask\": [[1]]}", "missing field `input_ids`"),
        (
            "{\"input_ids\": [[1, \"a\"]]}",
            "`input_ids[0][1]` must be an integer",
        ),
        (
            "{\"input_ids\": [[1, 2], [3]]}",
            "row 1 has 1 tokens but row 0 has 2",
        ),
        (
            "{\"input_ids\": [[1, 600]]}",
            "token id 600 at row 0, position 1 is out of range for a vocabulary of 512",
        ),
        (
            "{\"input_ids\": [[1, 2]], \"attention_mask\": [[1, 3]]}",
            "attention_mask must hold only 0 and 1",
        ),
        ("LONG", "exceeds the model's max_position_embeddings (128)"),
    ];
    for (i, (json, expected)) in cases.iter().enumerate() {
        let input = tmp.path().join(format!("in{i}.json"));
        let output = tmp.path().join(format!("out{i}.safetensors"));
        let json = if *json == "LONG" {
            serde_json::json!({ "input_ids": [vec![1; 129]] }).to_string()
        } else {
            json.to_string()
        };
        std::fs::write(&input, json).unwrap();
        let out = forward(&model_dir, &input, &output, &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "case {i}: {err}");
        assert!(
            err.contains(input.to_str().unwrap()),
            "case {i} does not name the input file: {err}"
        );
        assert!(
            err.contains(expected),
            "case {i}: expected {expected:?} in {err}"
        );
        assert!(!err.contains("panicked"), "case {i} panicked: {err}");
        assert!(!output.exists(), "case {i} left an output file");
    }
    // No temporary files left either.
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn forward_reports_a_broken_model_and_the_adapter_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.json");
    let output = tmp.path().join("out.safetensors");
    std::fs::write(&input, "{\"input_ids\": [[1, 2]]}").unwrap();
    let out = forward(tmp.path(), &input, &output, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("config.json: not found"),
        "{}",
        stderr(&out)
    );
    let out = forward(
        &model("qwen2-gqa-tied"),
        &input,
        &output,
        &["--adapter", "some/adapter"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("some/adapter/adapter_config.json: not found"),
        "{}",
        stderr(&out)
    );
    assert!(!output.exists());
}

#[test]
fn forward_and_generate_with_adapters_of_every_method() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.json");
    let output = tmp.path().join("out.safetensors");
    for (name, method) in [
        ("llama-mqa-sharded", "prompt-tuning"),
        ("qwen2-gqa-tied", "p-tuning-lstm"),
        ("bloom-6-heads", "prefix-tuning"),
        ("llama-mqa-sharded", "p-tuning-v2"),
        ("llama-biases", "bitfit"),
    ] {
        let adapter = root().join("fixtures/adapters").join(name).join(method);
        let peft_expected = expected(&format!("adapters/{name}-{method}"), "safetensors");
        // PEFT's batch: row 1 right-padded.
        let ids = read_i64_rows(&peft_expected, "input_ids");
        let mask = read_i64_rows(&peft_expected, "attention_mask");
        let (shape, ours) = adapter_logits(
            name,
            &adapter,
            serde_json::json!({"input_ids": ids, "attention_mask": mask}),
        );
        let (want_shape, want) = read_f32(&peft_expected, "logits");
        assert_eq!(shape, want_shape, "logits of the real tokens only");
        let vocab = shape[2];
        let real: Vec<i64> = mask.concat();
        let real_positions = (0..real.len())
            .filter(|&i| real[i] == 1)
            .flat_map(|i| i * vocab..(i + 1) * vocab);
        let diff = max_abs_diff(real_positions.map(|j| (&ours[j], &want[j])));
        assert!(
            diff <= 1e-4,
            "{name}/{method}: logits differ from PEFT's by {diff}"
        );

        let out = peft(&[
            "generate",
            "--model",
            model(name).to_str().unwrap(),
            "--prompt",
            "Hello",
            "--adapter",
            adapter.to_str().unwrap(),
            "--max-new-tokens",
            "4",
        ]);
        assert!(out.status.success(), "{name}/{method}: {}", stderr(&out));
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("Hello"));
    }

    // A method this workspace does not have is named.
    std::fs::write(&input, r#"{"input_ids": [[1, 2, 3]]}"#).unwrap();
    let other = tmp.path().join("lora");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(
        other.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "task_type": "CAUSAL_LM"}"#,
    )
    .unwrap();
    let out = forward(
        &model("qwen2-gqa-tied"),
        &input,
        &output,
        &["--adapter", other.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("key `peft_type` \"LORA\" is not supported"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn info_prints_peft_lines_for_the_real_configs() {
    // fixtures/configs/oracle.json: what PEFT's print_trainable_parameters printed for these
    // configs (scripts/check_info_oracle.py); 10 virtual tokens, P-tuning encoder width 1024.
    let oracle: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures/configs/oracle.json")).unwrap(),
    )
    .unwrap();
    let cases: [(&str, &[&str]); 6] = [
        ("prompt-tuning", &["--method", "prompt-tuning"]),
        (
            "p-tuning-mlp",
            &["--method", "p-tuning", "--encoder-hidden-size", "1024"],
        ),
        (
            "p-tuning-lstm",
            &[
                "--method",
                "p-tuning",
                "--encoder-reparameterization-type",
                "lstm",
                "--encoder-hidden-size",
                "1024",
            ],
        ),
        ("prefix-tuning", &["--method", "prefix-tuning"]),
        ("p-tuning-v2", &["--method", "p-tuning-v2"]),
        ("bitfit", &["--method", "bitfit"]),
    ];
    let mut checked = 0;
    for config in [
        "qwen2.5-0.5b",
        "qwen2.5-1.5b",
        "bloomz-560m",
        "bloom-1b4-zh",
        // Issue 20: explicit head_dim (Qwen3), llama3 RoPE, Mistral.
        "qwen3-0.6b",
        "qwen3-4b",
        "llama-3.2-1b",
        "llama-3.1-8b",
        "mistral-7b-v0.3",
    ] {
        // A directory and a config.json path both work.
        let path = root().join("fixtures/configs").join(config);
        let path = if checked % 2 == 0 {
            path
        } else {
            path.join("config.json")
        };
        for (method, flags) in cases {
            let mut args = vec![
                "info",
                "--model",
                path.to_str().unwrap(),
                "--num-virtual-tokens",
                "10",
            ];
            args.extend_from_slice(flags);
            let out = peft(&args);
            assert!(out.status.success(), "{config}/{method}: {}", stderr(&out));
            let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
            assert_eq!(line, oracle[config]["lines"][method], "{config}/{method}");
            checked += 1;
        }
    }
    assert_eq!(checked, 54);
    // A bias subset, and bad flags.
    let bloomz = root().join("fixtures/configs/bloomz-560m");
    let out = peft(&[
        "info",
        "--model",
        bloomz.to_str().unwrap(),
        "--method",
        "bitfit",
        "--bias-pattern",
        "query_key_value",
    ]);
    // 24 layers x 3 x 1024 query/key/value biases.
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .starts_with("trainable params: 73,728 || all params: 559,214,592"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = peft(&[
        "info",
        "--model",
        bloomz.to_str().unwrap(),
        "--method",
        "bitfit",
        "--bias-pattern",
        "(",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out)
            .contains("--bias-pattern: bias_pattern: \"(\" is not a valid regular expression"),
        "{}",
        stderr(&out)
    );
    let out = peft(&["info", "--model", "no/such/dir", "--method", "bitfit"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no/such/dir"), "{}", stderr(&out));
}

#[test]
fn export_folds_the_encoder_into_peft_inference_files() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, method) in [
        ("qwen2-gqa-tied", "p-tuning-mlp"),
        ("bloom-6-heads", "prefix-tuning"),
        ("llama-biases", "bitfit"),
    ] {
        let adapter = root().join("fixtures/adapters").join(name).join(method);
        let exported = tmp.path().join(format!("{name}-{method}"));
        let out = peft(&[
            "export",
            "--model",
            model(name).to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--output",
            exported.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{name}/{method}: {}", stderr(&out));
        let mut files: Vec<String> = std::fs::read_dir(&exported)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(
            files,
            ["adapter_config.json", "adapter_model.safetensors"],
            "{name}/{method}"
        );
        // The exported file gives PEFT's logits through `forward`.
        let peft_expected = expected(&format!("adapters/{name}-{method}"), "safetensors");
        let ids = read_i64_rows(&peft_expected, "input_ids");
        let (_, ours) = adapter_logits(
            name,
            &exported,
            serde_json::json!({"input_ids": [ids[0].clone()]}),
        );
        let (_, want) = read_f32(&peft_expected, "logits");
        let diff = max_abs_diff(ours.iter().zip(&want[..ours.len()]));
        assert!(
            diff <= 1e-4,
            "{name}/{method}: exported adapter differs from PEFT by {diff}"
        );
    }
    // An adapter for another model is refused, naming the key, and nothing is written.
    let target = tmp.path().join("refused");
    let out = peft(&[
        "export",
        "--model",
        model("bloom-6-heads").to_str().unwrap(),
        "--adapter",
        root()
            .join("fixtures/adapters/qwen2-gqa-tied/p-tuning-mlp")
            .to_str()
            .unwrap(),
        "--output",
        target.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("key `token_dim`"), "{}", stderr(&out));
    assert!(!target.exists());
}

#[test]
fn generate_streams_the_greedy_continuation_of_transformers() {
    let name = "qwen2-gqa-tied";
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(expected(name, "json")).unwrap()).unwrap();
    let prompt = meta["prompts"][1].as_str().unwrap();
    let tokens: Vec<u32> = serde_json::from_value(meta["greedy_single"][1].clone()).unwrap();
    let tokenizer = peft_models::load_tokenizer(model(name)).unwrap();
    let continuation = tokenizer.decode(&tokens, true).unwrap();
    let out = peft(&[
        "generate",
        "--model",
        model(name).to_str().unwrap(),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "16",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{prompt}{continuation}\n")
    );

    // Sampling with a seed is reproducible.
    let sample = |seed: &str| {
        peft(&[
            "generate",
            "--model",
            model(name).to_str().unwrap(),
            "--prompt",
            prompt,
            "--temperature",
            "0.9",
            "--top-p",
            "0.95",
            "--seed",
            seed,
        ])
        .stdout
    };
    assert_eq!(sample("3"), sample("3"));
    for (flag, value, expected) in [
        (
            "--top-p",
            "2",
            "generation setting `top_p` must be in (0, 1]",
        ),
        ("--temperature", "-1", "--temperature: must be >= 0"),
        (
            "--top-k",
            "0",
            "generation setting `top_k` must be at least 1",
        ),
        (
            "--max-new-tokens",
            "200",
            "exceeds the model's max_position_embeddings (128)",
        ),
    ] {
        let arg = format!("{flag}={value}");
        let out = peft(&[
            "generate",
            "--model",
            model(name).to_str().unwrap(),
            "--prompt",
            prompt,
            &arg,
        ]);
        assert_eq!(out.status.code(), Some(1), "{flag} {value}");
        assert!(
            stderr(&out).contains(expected),
            "{flag} {value}: {}",
            stderr(&out)
        );
        assert!(!stderr(&out).contains("panicked"));
    }
}

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("peft-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `peft train` of `method` on the Qwen2 fixture with `data` as the training file.
fn train_on(dir: &Path, method: &str, data: &str, extra: &[&str]) -> (Output, PathBuf) {
    let train = dir.join("train.jsonl");
    std::fs::write(&train, data).unwrap();
    let output = dir.join("adapter");
    let model = model("qwen2-gqa-tied");
    let mut args = vec![
        "train",
        "--model",
        model.to_str().unwrap(),
        "--method",
        method,
        "--num-virtual-tokens",
        "4",
        "--train",
        train.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    (peft(&args), output)
}

#[test]
fn train_rejects_bad_rows_with_file_and_line_and_writes_nothing() {
    let dir = scratch("bad-rows");
    let rows = "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\", \"completion\": 3}\n{\"text\": \"ok\"}\n";
    let (out, adapter) = train_on(&dir, "prompt-tuning", rows, &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(
            "train.jsonl:2: field \"completion\" must be a string, found 3 (pass --skip-bad-rows"
        ),
        "{err}"
    );
    assert!(!adapter.exists(), "a failed run left {}", adapter.display());

    // With --skip-bad-rows the row is counted and training goes on.
    let (out, adapter) = train_on(
        &dir,
        "prompt-tuning",
        rows,
        &["--skip-bad-rows", "--epochs", "1"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("2 rows, 1 bad rows skipped (lines 2)"),
        "{stdout}"
    );
    assert!(adapter.join("adapter_model.safetensors").is_file());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn train_rejects_an_empty_file_and_over_long_targets() {
    let dir = scratch("empty");
    let (out, adapter) = train_on(&dir, "prompt-tuning", "", &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("train.jsonl: no examples (0 bad rows skipped)"),
        "{}",
        stderr(&out)
    );
    assert!(!adapter.exists());

    let long = "{\"prompt\": \"a\", \"completion\": \"a long answer that cannot fit\"}\n";
    let (out, adapter) = train_on(&dir, "prompt-tuning", long, &["--max-length", "4"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("train.jsonl:1: the target is"), "{err}");
    assert!(err.contains("more than --max-length 4"), "{err}");
    assert!(!adapter.exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn train_writes_adapter_metrics_and_curve_and_eval_reads_them_back() {
    let dir = scratch("train");
    let rows: String = (0..16)
        .map(|i| {
            format!(
                "{{\"instruction\": \"Count\", \"input\": \"{i}\", \"output\": \"{}\"}}\n",
                i + 1
            )
        })
        .collect();
    let eval = dir.join("eval.jsonl");
    std::fs::write(&eval, &rows).unwrap();
    let (out, adapter) = train_on(
        &dir,
        "p-tuning",
        &rows,
        &[
            "--eval",
            eval.to_str().unwrap(),
            "--epochs",
            "2",
            "--batch-size",
            "4",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("trainable params: "), "{stdout}");
    assert!(stdout.contains("eval @ step 0: loss"), "{stdout}");
    assert!(stdout.contains("eval @ step 8: loss"), "{stdout}");
    for file in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "adapter_encoder.safetensors",
        "metrics.jsonl",
        "checkpoint-8/optimizer.safetensors",
    ] {
        assert!(adapter.join(file).is_file(), "{file} missing");
    }
    let png = std::fs::read(adapter.join("loss_curve.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let metrics = std::fs::read_to_string(adapter.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let train_lines = lines.iter().filter(|l| l["kind"] == "train").count();
    assert_eq!(train_lines, 8);
    let last_eval = lines.iter().rev().find(|l| l["kind"] == "eval").unwrap();
    let first_eval = lines.iter().find(|l| l["kind"] == "eval").unwrap();
    assert!(
        last_eval["loss"].as_f64() < first_eval["loss"].as_f64(),
        "{metrics}"
    );

    // `peft eval` on the saved adapter reproduces the last evaluation.
    let model = model("qwen2-gqa-tied");
    let out = peft(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        eval.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let expected = format!("loss {:.4}", last_eval["loss"].as_f64().unwrap());
    assert!(stdout.contains(&expected), "{stdout} vs {expected}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn train_starts_prefixes_from_text_as_peft_does_and_refuses_contradictions() {
    let dir = scratch("prefix-text");
    let rows = "{\"prompt\": \"ab\", \"completion\": \"ba\"}\n{\"prompt\": \"abc\", \"completion\": \"cba\"}\n";
    // The text of scripts/make_prefix_text_fixtures.py; the fixture model has no chat template, so
    // it is tokenized plainly. At lr 0 the saved prefix is the initial one: PEFT's.
    let text = "  You sort the letters of a word.  ";
    let (_, peft_prefix) = read_f32(
        &root().join("fixtures/expected/prefix-init-text/qwen2-gqa-tied.safetensors"),
        "plain_prompt_embeddings",
    );
    // P-tuning v2 (and length-grouped batches): the prefix is PEFT's. Prefix tuning (PEFT refuses
    // a projection): the projection is fitted to output that prefix, exactly in f64 and so to
    // f32's rounding of its two Linears.
    for (method, extra, bound) in [
        ("p-tuning-v2", Some("--group-by-length"), 1e-5),
        ("prefix-tuning", None, 1e-4),
    ] {
        let mut args = vec![
            "--prefix-init-text",
            text,
            "--lr",
            "0",
            "--weight-decay",
            "0",
            "--epochs",
            "1",
        ];
        args.extend(extra);
        let (out, adapter) = train_on(&dir, method, rows, &args);
        assert!(out.status.success(), "{method}: {}", stderr(&out));
        let (_, ours) = read_f32(
            &adapter.join("adapter_model.safetensors"),
            "prompt_embeddings",
        );
        assert_eq!(ours.len(), peft_prefix.len());
        let diff = max_abs_diff(ours.iter().zip(&peft_prefix));
        assert!(
            diff < bound,
            "{method}: prefix differs from PEFT's by {diff}"
        );
        if method == "prefix-tuning" {
            // The fitted projection itself, to train on from.
            assert!(adapter.join("adapter_encoder.safetensors").exists());
        }
        std::fs::remove_dir_all(&adapter).unwrap();
    }

    for (method, extra, message) in [
        (
            "p-tuning-v2",
            vec!["--prefix-init-text", text, "--prefix-zero-init"],
            "--prefix-init-text: contradicts --prefix-zero-init",
        ),
        (
            "prompt-tuning",
            vec!["--prefix-init-text", text],
            "--prefix-init-text: applies to prefix-tuning and p-tuning-v2 only",
        ),
        (
            "p-tuning-v2",
            vec!["--prefix-init-text", "ab"],
            "--prefix-init-text: init_text: the text encodes to",
        ),
        (
            "p-tuning-v2",
            vec!["--prefix-init-plain"],
            "--prefix-init-plain: needs --prefix-init-text",
        ),
    ] {
        let (out, adapter) = train_on(&dir, method, rows, &extra);
        assert!(!out.status.success());
        assert!(stderr(&out).contains(message), "{}", stderr(&out));
        assert!(!adapter.join("metrics.jsonl").exists());
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn train_refuses_absurd_settings_before_loading_and_writes_nothing() {
    // Each of these once panicked, aborted on a huge allocation, or was silently accepted
    // (issue 19's bad-input findings); each now names its flag and leaves no output.
    let dir = scratch("absurd");
    let rows = "{\"prompt\": \"a\", \"completion\": \"b\"}\n";
    let cases: [(&str, &[&str], &str); 10] = [
        (
            "p-tuning",
            &["--encoder-hidden-size", "0"],
            "--encoder-hidden-size: encoder_hidden_size: must be at least 1",
        ),
        (
            "prefix-tuning",
            &["--encoder-hidden-size", "0"],
            "--encoder-hidden-size:",
        ),
        (
            "p-tuning",
            &[
                "--encoder-reparameterization-type",
                "lstm",
                "--encoder-num-layers",
                "0",
            ],
            "--encoder-num-layers:",
        ),
        (
            "prompt-tuning",
            &["--num-virtual-tokens", "1000000000"],
            "takes at most 128 positions (max_position_embeddings)",
        ),
        (
            "prompt-tuning",
            &["--max-grad-norm=-1"],
            "--max-grad-norm: must be a finite number > 0, found -1",
        ),
        (
            "prompt-tuning",
            &["--adam-beta1", "1"],
            "--adam-beta1: must be in [0, 1), found 1",
        ),
        (
            "prompt-tuning",
            &["--weight-decay", "nan"],
            "--weight-decay: must be a finite number >= 0, found NaN",
        ),
        (
            "prompt-tuning",
            &["--adam-epsilon", "0"],
            "--adam-epsilon: must be a finite number > 0",
        ),
        (
            "bitfit",
            &["--bias-pattern", "no_such_module"],
            "--bias-pattern: bias_pattern: \"no_such_module\" matches none of the base model's",
        ),
        ("prompt-tuning", &["--resume"], "--resume: "),
    ];
    for (method, extra, message) in cases {
        let (out, adapter) = train_on(&dir, method, rows, extra);
        assert!(!out.status.success(), "{method} {extra:?} trained");
        let err = stderr(&out);
        assert!(err.contains(message), "{method} {extra:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            !adapter.exists(),
            "{method} {extra:?} left {}",
            adapter.display()
        );
    }
    let (out, _) = train_on(&dir, "prompt-tuning", rows, &["--resume"]);
    assert!(
        stderr(&out).contains("holds no checkpoint to resume from"),
        "{}",
        stderr(&out)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn info_refuses_an_encoder_of_width_zero() {
    let model = model("qwen2-gqa-tied");
    for method in ["p-tuning", "prefix-tuning"] {
        let out = peft(&[
            "info",
            "--model",
            model.to_str().unwrap(),
            "--method",
            method,
            "--encoder-hidden-size",
            "0",
        ]);
        assert!(!out.status.success(), "{method}");
        assert!(
            stderr(&out).contains("--encoder-hidden-size:"),
            "{method}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn train_reads_a_byte_order_mark_and_names_the_line_of_invalid_utf8() {
    let dir = scratch("utf8");
    let row = "{\"prompt\": \"a\", \"completion\": \"b\"}\n";
    let (out, adapter) = train_on(
        &dir,
        "prompt-tuning",
        &format!("\u{feff}{row}{row}"),
        &["--epochs", "1", "--eval-steps", "1000"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(adapter.join("adapter_model.safetensors").is_file());
    std::fs::remove_dir_all(&adapter).unwrap();

    let train = dir.join("train.jsonl");
    let mut bytes = row.as_bytes().to_vec();
    bytes.extend_from_slice(b"{\"prompt\": \"a\xff\", \"completion\": \"b\"}\n");
    std::fs::write(&train, bytes).unwrap();
    let model = model("qwen2-gqa-tied");
    let out = peft(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--method",
        "prompt-tuning",
        "--train",
        train.to_str().unwrap(),
        "--output",
        adapter.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("train.jsonl:2: not valid UTF-8 (byte 14 of the line)"),
        "{}",
        stderr(&out)
    );
    assert!(!adapter.exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_tokenizer_that_makes_ids_past_the_vocabulary_is_named() {
    // The fixture's config with a smaller vocabulary than its tokenizer: the rows' ids have no
    // embedding. Training stops before loading weights, naming the tokenizer and the row.
    let dir = scratch("vocab");
    let model_dir = dir.join("model");
    std::fs::create_dir_all(&model_dir).unwrap();
    for entry in std::fs::read_dir(model("qwen2-gqa-tied")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model_dir.join(entry.file_name())).unwrap();
    }
    let config_path = model_dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["vocab_size"] = 40.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let train = dir.join("train.jsonl");
    std::fs::write(
        &train,
        "{\"prompt\": \"Reverse cat\", \"completion\": \"tac\"}\n",
    )
    .unwrap();
    let output = dir.join("adapter");
    let out = peft(&[
        "train",
        "--model",
        model_dir.to_str().unwrap(),
        "--method",
        "prompt-tuning",
        "--train",
        train.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("tokenizer.json: line 1 of"), "{err}");
    assert!(
        err.contains("has vocab_size 40: is the tokenizer from another model?"),
        "{err}"
    );
    assert!(!output.exists());
    let out = peft(&[
        "generate",
        "--model",
        model_dir.to_str().unwrap(),
        "--prompt",
        "Reverse cat",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_adapter_too_large_for_memory_is_refused_before_it_is_built() {
    // BLOOM (ALiBi) has no position limit, so only the adapter's size can refuse this.
    let dir = scratch("huge-adapter");
    let train = dir.join("train.jsonl");
    std::fs::write(&train, "{\"prompt\": \"a\", \"completion\": \"b\"}\n").unwrap();
    let output = dir.join("adapter");
    let model = model("bloom-6-heads");
    for extra in [
        &[
            "--method",
            "prompt-tuning",
            "--num-virtual-tokens",
            "1000000000000",
        ][..],
        &[
            "--method",
            "p-tuning",
            "--encoder-reparameterization-type",
            "lstm",
            "--encoder-num-layers",
            "1000000000000",
        ][..],
    ] {
        let mut args = vec![
            "train",
            "--model",
            model.to_str().unwrap(),
            "--train",
            train.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = peft(&args);
        assert!(!out.status.success(), "{extra:?}");
        let err = stderr(&out);
        assert!(err.contains("GiB of memory available"), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!output.exists());
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// A Hugging Face Hub cache under `dir` as `huggingface_hub` lays it out: the fixture model
/// `name` as `models--fixtures--NAME`, its files in `blobs/` (named by a fake hash) linked from
/// `snapshots/COMMIT/`, and `refs/main` holding the commit.
#[cfg(unix)]
fn hub_cache(dir: &Path, name: &str, commit: &str) -> PathBuf {
    let repo = dir.join(format!("models--fixtures--{name}"));
    let (blobs, snapshot) = (repo.join("blobs"), repo.join("snapshots").join(commit));
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    for (i, entry) in std::fs::read_dir(model(name)).unwrap().enumerate() {
        let entry = entry.unwrap();
        let blob = blobs.join(format!("{i:040x}"));
        std::fs::copy(entry.path(), &blob).unwrap();
        std::os::unix::fs::symlink(
            Path::new("../../blobs").join(blob.file_name().unwrap()),
            snapshot.join(entry.file_name()),
        )
        .unwrap();
    }
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    repo
}

#[cfg(unix)]
#[test]
fn hub_ids_resolve_in_the_local_cache_and_missing_ones_name_id_revision_and_path() {
    let dir = scratch("hub");
    let cache = dir.join("hub");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = hub_cache(&cache, "qwen2-gqa-tied", commit);
    let with_cache = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_peft"))
            .args(args)
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    // The same logits through the id, the id at its commit, and the directory.
    let input = dir.join("in.json");
    std::fs::write(&input, r#"{"input_ids": [[1, 2, 3, 4]]}"#).unwrap();
    let mut outputs = Vec::new();
    for model in [
        "fixtures/qwen2-gqa-tied",
        &format!("fixtures/qwen2-gqa-tied@{commit}"),
        model("qwen2-gqa-tied").to_str().unwrap(),
    ] {
        let output = dir.join(format!("out-{}.safetensors", outputs.len()));
        let out = with_cache(&[
            "forward",
            "--model",
            model,
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{model}: {}", stderr(&out));
        outputs.push(std::fs::read(output).unwrap());
    }
    assert!(outputs[0] == outputs[2] && outputs[1] == outputs[2]);
    let out = with_cache(&[
        "info",
        "--model",
        "fixtures/qwen2-gqa-tied",
        "--method",
        "prompt-tuning",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Training records the id, as PEFT records a Hub model.
    let data = dir.join("train.jsonl");
    std::fs::write(&data, "{\"prompt\": \"a\", \"completion\": \"b\"}\n").unwrap();
    let adapter = dir.join("adapter");
    let out = with_cache(&[
        "train",
        "--model",
        "fixtures/qwen2-gqa-tied",
        "--method",
        "prompt-tuning",
        "--num-virtual-tokens",
        "2",
        "--train",
        data.to_str().unwrap(),
        "--output",
        adapter.to_str().unwrap(),
        "--epochs",
        "1",
        "--no-exact-match",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["base_model_name_or_path"], "fixtures/qwen2-gqa-tied");

    // What is not cached is named: the id, the revision and the path searched.
    for (model, expected) in [
        (
            "fixtures/no-such-model".to_string(),
            format!(
                "`fixtures/no-such-model` (revision main) is neither a directory nor a model in \
                 the Hugging Face cache: {}: no such directory",
                cache.join("models--fixtures--no-such-model").display()
            ),
        ),
        (
            "fixtures/qwen2-gqa-tied@v2".to_string(),
            format!(
                "(revision v2) is neither a directory nor a model in the Hugging Face cache: {}: \
                 the revision is not cached",
                repo.join("refs/v2").display()
            ),
        ),
        (
            "fixtures/qwen2-gqa-tied@89abcdef0123456789abcdef0123456789abcdef".to_string(),
            "the snapshot has no config.json".to_string(),
        ),
    ] {
        let out = with_cache(&["info", "--model", &model, "--method", "prompt-tuning"]);
        assert_eq!(out.status.code(), Some(1), "{model}");
        assert!(
            stderr(&out).contains(&expected),
            "{model}: {}",
            stderr(&out)
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// A Hugging Face Hub lookalike on a loopback port, serving the fixture model `name` as
/// `fixtures/NAME` at one commit: the repository listing (`/api/models/.../revision/...`) and
/// `resolve/` downloads with the headers `huggingface_hub` clients read (`x-repo-commit`, `etag`,
/// `content-range`), honouring byte ranges. With `token`, every request must carry it.
struct MockHub {
    endpoint: String,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl MockHub {
    fn start(name: &str, commit: &'static str, token: Option<&'static str>) -> Self {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let files: Vec<(String, Vec<u8>)> = std::fs::read_dir(model(name))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = requests.clone();
        let repo = format!("fixtures/{name}");
        std::thread::spawn(move || {
            // Bounded: a test makes a few dozen requests.
            for stream in listener.incoming().take(200) {
                let Ok(mut stream) = stream else { continue };
                stream
                    .set_read_timeout(Some(std::time::Duration::from_secs(10)))
                    .unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                let (mut range, mut auth) = (None, None);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                        break;
                    }
                    let (key, value) = line.split_once(':').unwrap_or((&line, ""));
                    match key.trim().to_ascii_lowercase().as_str() {
                        "range" => range = Some(value.trim().to_string()),
                        "authorization" => auth = Some(value.trim().to_string()),
                        _ => {}
                    }
                }
                let path = request_line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("")
                    .to_string();
                log.lock().unwrap().push(path.clone());
                let respond = |stream: &mut std::net::TcpStream,
                               status: &str,
                               headers: &[(&str, String)],
                               body: &[u8]| {
                    let mut head = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
                        body.len()
                    );
                    for (k, v) in headers {
                        head.push_str(&format!("{k}: {v}\r\n"));
                    }
                    head.push_str("\r\n");
                    let _ = stream.write_all(head.as_bytes());
                    let _ = stream.write_all(body);
                };
                if let Some(token) = token
                    && auth.as_deref() != Some(&format!("Bearer {token}"))
                {
                    respond(
                        &mut stream,
                        "401 Unauthorized",
                        &[],
                        b"{\"error\": \"gated\"}",
                    );
                    continue;
                }
                if path == format!("/api/models/{repo}/revision/main") {
                    let siblings: Vec<serde_json::Value> = files
                        .iter()
                        .map(|(f, _)| serde_json::json!({"rfilename": f}))
                        .collect();
                    let body = serde_json::json!({"sha": commit, "siblings": siblings}).to_string();
                    respond(
                        &mut stream,
                        "200 OK",
                        &[("Content-Type", "application/json".into())],
                        body.as_bytes(),
                    );
                    continue;
                }
                let prefix = format!("/{repo}/resolve/main/");
                let Some((index, (_, bytes))) = path
                    .strip_prefix(&prefix)
                    .and_then(|f| files.iter().enumerate().find(|(_, (name, _))| name == f))
                else {
                    respond(&mut stream, "404 Not Found", &[], b"");
                    continue;
                };
                let start: usize = range
                    .as_deref()
                    .and_then(|r| r.strip_prefix("bytes="))
                    .and_then(|r| r.split('-').next())
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let end = match range.as_deref() {
                    Some("bytes=0-0") => 1,
                    _ => bytes.len(),
                };
                respond(
                    &mut stream,
                    "206 Partial Content",
                    &[
                        ("x-repo-commit", commit.to_string()),
                        ("etag", format!("\"{index:064x}\"")),
                        (
                            "content-range",
                            format!("bytes {start}-{}/{}", end - 1, bytes.len()),
                        ),
                    ],
                    &bytes[start..end],
                );
            }
        });
        Self { endpoint, requests }
    }
}

#[cfg(unix)]
#[test]
fn hub_ids_not_cached_are_downloaded_with_the_token_and_refused_offline_or_unreachable() {
    let dir = scratch("hub-download");
    let commit = "fedcba9876543210fedcba9876543210fedcba98";
    let hub = MockHub::start("qwen2-gqa-tied", commit, Some("hf_test_token"));
    let run = |cache: &Path, env: &[(&str, &str)], args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_peft"));
        command
            .args(args)
            .env("HF_HUB_CACHE", cache)
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("HF_TOKEN")
            .env_remove("HF_HOME");
        for (k, v) in env {
            command.env(k, v);
        }
        command.output().unwrap()
    };
    let input = dir.join("in.json");
    std::fs::write(&input, r#"{"input_ids": [[1, 2, 3, 4]]}"#).unwrap();
    let forward_args = |output: &Path| {
        vec![
            "forward".to_string(),
            "--model".into(),
            "fixtures/qwen2-gqa-tied".into(),
            "--input".into(),
            input.to_str().unwrap().into(),
            "--output".into(),
            output.to_str().unwrap().into(),
        ]
    };
    let cache = dir.join("hub");
    let endpoint = hub.endpoint.as_str();

    // Without the token the gated repository refuses: the error names id, revision and cache.
    let output = dir.join("refused.safetensors");
    let args = forward_args(&output);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(&cache, &[("HF_ENDPOINT", endpoint)], &args);
    assert_eq!(out.status.code(), Some(1));
    let expected = format!(
        "`fixtures/qwen2-gqa-tied` is not a directory, and as a Hub id could not be downloaded \
         (revision main) into {}: listing the repository:",
        cache.join("models--fixtures--qwen2-gqa-tied").display()
    );
    assert!(stderr(&out).contains(&expected), "{}", stderr(&out));
    assert!(!output.exists());

    // With HF_TOKEN it downloads config, tokenizer and weights into the cache's layout and gives
    // the directory's logits.
    let output = dir.join("downloaded.safetensors");
    let args = forward_args(&output);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(
        &cache,
        &[("HF_ENDPOINT", endpoint), ("HF_TOKEN", "hf_test_token")],
        &args,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let repo = cache.join("models--fixtures--qwen2-gqa-tied");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main"))
            .unwrap()
            .trim(),
        commit
    );
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        let cached = repo.join("snapshots").join(commit).join(file);
        assert_eq!(
            std::fs::read(&cached).unwrap(),
            std::fs::read(model("qwen2-gqa-tied").join(file)).unwrap(),
            "{file}"
        );
    }
    let direct = dir.join("direct.safetensors");
    let out = forward(&model("qwen2-gqa-tied"), &input, &direct, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(&output).unwrap(),
        std::fs::read(&direct).unwrap()
    );

    // Cached now: offline, and with the Hub gone quiet, the same id still works.
    let requests = hub.requests.lock().unwrap().len();
    let again = dir.join("again.safetensors");
    let args = forward_args(&again);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(&cache, &[("HF_HUB_OFFLINE", "1")], &args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        hub.requests.lock().unwrap().len(),
        requests,
        "offline asked the Hub"
    );

    // A sharded checkpoint: the index, then each shard it names.
    let sharded = MockHub::start("llama-mqa-sharded", commit, None);
    let output = dir.join("sharded.safetensors");
    let out = run(
        &cache,
        &[("HF_ENDPOINT", sharded.endpoint.as_str())],
        &[
            "forward",
            "--model",
            "fixtures/llama-mqa-sharded",
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let direct = dir.join("sharded-direct.safetensors");
    let out = forward(&model("llama-mqa-sharded"), &input, &direct, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(&output).unwrap(),
        std::fs::read(&direct).unwrap()
    );

    // Offline and not cached, or the Hub unreachable: named errors, nothing written.
    let empty = dir.join("empty-cache");
    let out = run(&empty, &[("HF_HUB_OFFLINE", "1")], &args);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("(HF_HUB_OFFLINE is set: nothing is downloaded)"),
        "{}",
        stderr(&out)
    );
    let unreachable = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = format!("http://{}", unreachable.local_addr().unwrap());
    drop(unreachable);
    let out = run(&empty, &[("HF_ENDPOINT", closed.as_str())], &args);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(
            "`fixtures/qwen2-gqa-tied` is not a directory, and as a Hub id could not be \
             downloaded (revision main)"
        ),
        "{}",
        stderr(&out)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn eval_writes_one_prediction_per_row_consistent_with_its_summary() {
    let dir = scratch("predictions");
    let rows: String = (0..6)
        .map(|i| {
            format!(
                "{{\"prompt\": \"Count {i}\", \"completion\": \" {}\"}}\n",
                i + 1
            )
        })
        .chain(std::iter::once("{\"text\": \"a text row\"}\n".to_string()))
        .collect();
    let (out, adapter) = train_on(&dir, "prompt-tuning", &rows, &["--epochs", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let data = dir.join("train.jsonl");
    let predictions = dir.join("predictions.jsonl");
    let model_dir = model("qwen2-gqa-tied");
    let eval = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            model_dir.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--batch-size",
            "4",
        ];
        args.extend_from_slice(extra);
        peft(&args)
    };
    let out = eval(&["--predictions", predictions.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&predictions)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 7, "{lines:?}");
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["line"], i + 1);
        assert!(line["loss"].as_f64().unwrap().is_finite());
    }
    assert_eq!(lines[0]["prompt"], "Count 0");
    assert_eq!(lines[0]["target"], " 1");
    // The text row has no continuation; the completion rows each have one, and the summary's
    // exact-match count and loss are those of the rows.
    assert!(lines[6]["generated"].is_null() && lines[6]["exact_match"].is_null());
    let hits = lines[..6]
        .iter()
        .filter(|l| l["exact_match"].as_bool().unwrap())
        .count();
    assert!(
        summary.contains(&format!("({hits} of 6)")),
        "{summary}\n{lines:?}"
    );
    let scored: f64 = lines
        .iter()
        .map(|l| l["scored_tokens"].as_f64().unwrap())
        .sum();
    let loss: f64 = lines
        .iter()
        .map(|l| l["loss"].as_f64().unwrap() * l["scored_tokens"].as_f64().unwrap())
        .sum::<f64>()
        / scored;
    assert!(
        summary.contains(&format!("loss {loss:.4}")),
        "{summary}: rows give {loss}"
    );
    // Nothing but the file is left beside it.
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("predictions"))
        .collect();
    assert_eq!(names, ["predictions.jsonl"]);

    // A file that cannot be written is refused before the model is read.
    let missing = dir.join("no/such/dir/p.jsonl");
    let out = eval(&["--predictions", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("--predictions: ") && stderr(&out).contains("no directory"),
        "{}",
        stderr(&out)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn generate_from_a_file_in_batches_equals_each_prompt_alone() {
    // transformers' greedy continuations of the fixture prompts (batched with left padding there
    // too), and with a PEFT adapter, each prompt alone through `--prompt`.
    let dir = scratch("generate-file");
    let name = "qwen2-gqa-tied";
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(expected(name, "json")).unwrap()).unwrap();
    let prompts: Vec<String> = meta["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let input = dir.join("prompts.jsonl");
    let rows: String = prompts
        .iter()
        .map(|p| format!("{}\n\n", serde_json::json!({ "prompt": p })))
        .collect();
    std::fs::write(&input, rows).unwrap();
    let tokenizer = peft_models::load_tokenizer(model(name)).unwrap();
    let adapter = root().join("fixtures/adapters/qwen2-gqa-tied/p-tuning-v2");
    for with_adapter in [false, true] {
        let output = dir.join(format!("out-{with_adapter}.jsonl"));
        let mut args: Vec<String> = vec![
            "generate".into(),
            "--model".into(),
            model(name).to_str().unwrap().to_string(),
            "--input".into(),
            input.to_str().unwrap().to_string(),
            "--output".into(),
            output.to_str().unwrap().to_string(),
            "--batch-size".into(),
            "2".into(),
            "--max-new-tokens".into(),
            "16".into(),
        ];
        if with_adapter {
            args.extend(["--adapter".into(), adapter.to_str().unwrap().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = peft(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains("3 prompts -> "));
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&output)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        for (i, line) in lines.iter().enumerate() {
            // Blank lines are skipped but counted.
            assert_eq!(line["line"], 2 * i + 1);
            assert_eq!(line["prompt"], prompts[i]);
            let expected = if with_adapter {
                let mut single = vec!["generate", "--model", "", "--prompt", &prompts[i]];
                let model_dir = model(name);
                single[2] = model_dir.to_str().unwrap();
                single.extend([
                    "--max-new-tokens",
                    "16",
                    "--adapter",
                    adapter.to_str().unwrap(),
                ]);
                let out = peft(&single);
                assert!(out.status.success(), "{}", stderr(&out));
                let text = String::from_utf8(out.stdout).unwrap();
                text.strip_prefix(prompts[i].as_str())
                    .unwrap()
                    .trim_end_matches('\n')
                    .to_string()
            } else {
                let tokens: Vec<u32> =
                    serde_json::from_value(meta["greedy_single"][i].clone()).unwrap();
                tokenizer.decode(&tokens, true).unwrap()
            };
            assert_eq!(
                line["generated"],
                expected.as_str(),
                "row {i}, adapter {with_adapter}"
            );
            assert!(["stop", "length"].contains(&line["finish_reason"].as_str().unwrap()));
        }
    }

    // Bad rows are named by file and line, and nothing is written.
    let output = dir.join("refused.jsonl");
    for (rows, expected) in [
        (
            "{\"prompt\": \"a\"}\n{\"prompt\": 3}\n",
            "prompts.jsonl:2: must be an object with a string `prompt`",
        ),
        (
            "{\"prompt\": \"a\"}\nnot json\n",
            "prompts.jsonl:2: not JSON",
        ),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
            "prompts.jsonl:1: a chat row, but the model",
        ),
        (
            "{\"messages\": [{\"role\": \"user\"}]}\n",
            "prompts.jsonl:1: messages[0].content must be a string",
        ),
        (
            "{\"prompt\": \"a\"}\n{\"messages\": [{\"role\": \"usr\", \"content\": \"hi\"}]}\n",
            "prompts.jsonl:2: messages[0].role is \"usr\"; expected \"system\", \"user\" or",
        ),
        ("{\"messages\": []}\n", "prompts.jsonl:1: messages is empty"),
    ] {
        std::fs::write(&input, rows).unwrap();
        let out = peft(&[
            "generate",
            "--model",
            model(name).to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(1), "{rows}");
        assert!(stderr(&out).contains(expected), "{}", stderr(&out));
        assert!(!output.exists());
    }
    // --input needs --output, and excludes --prompt.
    let out = peft(&["generate", "--model", "m", "--input", "x.jsonl"]);
    assert_eq!(out.status.code(), Some(2));
    let out = peft(&[
        "generate", "--model", "m", "--prompt", "p", "--input", "x", "--output", "y",
    ]);
    assert_eq!(out.status.code(), Some(2));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn train_on_chat_rows_with_a_template_file_and_refuse_them_without_one() {
    let dir = scratch("chat-train");
    let rows: String = (0..8)
        .map(|i| {
            format!(
                "{}\n",
                serde_json::json!({"messages": [
                    {"role": "system", "content": "You count."},
                    {"role": "user", "content": format!("After {i}?")},
                    {"role": "assistant", "content": format!("{}", i + 1)},
                ]})
            )
        })
        .collect();
    // The fixture model has no chat template: the row is refused by file and line.
    let (out, adapter) = train_on(&dir, "prompt-tuning", &rows, &["--epochs", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("train.jsonl:1: a chat row, but the model has no chat template"),
        "{}",
        stderr(&out)
    );
    assert!(!adapter.exists());
    // With --chat-template it trains on the assistant turns, and eval reads the same rows.
    let template = root().join("fixtures/expected/chat/chatml.jinja");
    let (out, adapter) = train_on(
        &dir,
        "prompt-tuning",
        &rows,
        &[
            "--epochs",
            "1",
            "--chat-template",
            template.to_str().unwrap(),
            "--train-on",
            "last",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = peft(&[
        "eval",
        "--model",
        model("qwen2-gqa-tied").to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        dir.join("train.jsonl").to_str().unwrap(),
        "--chat-template",
        template.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("of 8)"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_prefix_adapter_counts_its_positions_in_the_context_check() {
    // qwen2-gqa-tied takes 128 positions; the P-tuning v2 fixture adds a 4-position prefix. 125
    // tokens fit alone and not with the prefix: refused up front, nothing written.
    let dir = scratch("prefix-context");
    let input = dir.join("in.json");
    let ids: Vec<i64> = (1..=125).collect();
    std::fs::write(
        &input,
        serde_json::json!({ "input_ids": [ids] }).to_string(),
    )
    .unwrap();
    let output = dir.join("out.safetensors");
    let out = forward(&model("qwen2-gqa-tied"), &input, &output, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::remove_file(&output).unwrap();
    let adapter = root().join("fixtures/adapters/qwen2-gqa-tied/p-tuning-v2");
    let out = forward(
        &model("qwen2-gqa-tied"),
        &input,
        &output,
        &["--adapter", adapter.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out)
            .contains("sequence of 129 tokens exceeds the model's max_position_embeddings (128)"),
        "{}",
        stderr(&out)
    );
    assert!(!output.exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_gguf_model_trains_evaluates_and_generates_as_its_folder_does() {
    // The GGUF fixture against a folder of the same dequantized weights, with the tokenizer the
    // GGUF's metadata describes saved as its tokenizer.json: every command must give the same.
    let dir = scratch("gguf");
    let gguf = root().join("fixtures/gguf/qwen2-gqa-tied.gguf");
    let folder = dir.join("folder");
    std::fs::create_dir_all(&folder).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(
            root().join("fixtures/gguf/qwen2-gqa-tied").join(file),
            folder.join(file),
        )
        .unwrap();
    }
    peft_models::load_tokenizer(&gguf)
        .unwrap()
        .save(folder.join("tokenizer.json"), false)
        .unwrap();
    let rows: String = (0..8)
        .map(|i| {
            format!(
                "{{\"prompt\": \"Count {i}:\", \"completion\": \" {}\"}}\n",
                i + 1
            )
        })
        .collect();
    let data = dir.join("train.jsonl");
    std::fs::write(&data, &rows).unwrap();
    let mut adapters = Vec::new();
    let mut outputs = Vec::new();
    for (name, model) in [("gguf", &gguf), ("folder", &folder)] {
        let adapter = dir.join(format!("adapter-{name}"));
        let out = peft(&[
            "train",
            "--model",
            model.to_str().unwrap(),
            "--method",
            "p-tuning-v2",
            "--num-virtual-tokens",
            "3",
            "--train",
            data.to_str().unwrap(),
            "--eval",
            data.to_str().unwrap(),
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--output",
            adapter.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let generated = peft(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--prompt",
            "Count 3:",
            "--max-new-tokens",
            "6",
        ]);
        assert!(generated.status.success(), "{name}: {}", stderr(&generated));
        let info = peft(&[
            "info",
            "--model",
            model.to_str().unwrap(),
            "--method",
            "p-tuning-v2",
        ]);
        assert!(info.status.success(), "{name}: {}", stderr(&info));
        outputs.push((
            String::from_utf8_lossy(&out.stdout).into_owned(),
            generated.stdout,
            info.stdout,
        ));
        adapters.push(std::fs::read(adapter.join("adapter_model.safetensors")).unwrap());
    }
    // Bit-identical training, same evaluation lines, same text, same parameter counts.
    assert!(adapters[0] == adapters[1], "the adapters differ");
    let evals = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| l.contains("eval @"))
            .map(String::from)
            .collect()
    };
    assert!(!evals(&outputs[0].0).is_empty(), "{}", outputs[0].0);
    assert_eq!(evals(&outputs[0].0), evals(&outputs[1].0));
    assert_eq!(outputs[0].1, outputs[1].1);
    assert_eq!(outputs[0].2, outputs[1].2);

    // A GGUF whose tokenizer is not rebuilt is refused naming the file and the key.
    let mut bytes = std::fs::read(&gguf).unwrap();
    let key = b"tokenizer.ggml.pre";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap();
    // The value after the key (u32 type, u64 length, "qwen2"): make it "qwen9".
    let value = at + key.len() + 4 + 8;
    assert_eq!(&bytes[value..value + 5], b"qwen2");
    bytes[value + 4] = b'9';
    let bad = dir.join("bad.gguf");
    std::fs::write(&bad, bytes).unwrap();
    let out = peft(&[
        "generate",
        "--model",
        bad.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("bad.gguf") && err.contains("tokenizer.ggml.pre") && err.contains("qwen9"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn train_on_two_devices_equals_accumulating_their_shards_and_refuses_zero() {
    let dir = scratch("devices");
    let rows: String = (0..16)
        .map(|i| {
            format!(
                "{{\"prompt\": \"Count {i}:\", \"completion\": \" {}\"}}\n",
                i + 1
            )
        })
        .collect();
    let mut adapters = Vec::new();
    for (name, extra) in [
        ("two-devices", vec!["--devices", "2"]),
        ("accumulated", vec!["--gradient-accumulation-steps", "2"]),
    ] {
        let sub = dir.join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let mut args = vec!["--batch-size", "4", "--epochs", "2"];
        args.extend(extra);
        let (out, adapter) = train_on(&sub, "prefix-tuning", &rows, &args);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        adapters.push(std::fs::read(adapter.join("adapter_model.safetensors")).unwrap());
    }
    assert!(adapters[0] == adapters[1], "the adapters differ");
    let (out, adapter) = train_on(&dir, "prompt-tuning", &rows, &["--devices", "0"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--devices: must be at least 1"),
        "{}",
        stderr(&out)
    );
    assert!(!adapter.exists());
    std::fs::remove_dir_all(dir).unwrap();
}
