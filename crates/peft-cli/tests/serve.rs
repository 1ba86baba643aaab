//! `peft serve` as a process: started on a free loopback port, driven by a real HTTP client; the
//! text it serves for each adapter equals what `peft generate --adapter` prints for the same
//! prompt, and it refuses bad flags before loading anything.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Kills the server when the test ends, however it ends.
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn served_greedy_text_equals_peft_generate_for_every_adapter() {
    let model = root().join("fixtures/models/qwen2-gqa-tied");
    let adapters = root().join("fixtures/adapters/qwen2-gqa-tied");
    let mut child = ServerProcess(
        Command::new(env!("CARGO_BIN_EXE_peft"))
            .args(["serve", "--model", model.to_str().unwrap()])
            .args(["--adapters", adapters.to_str().unwrap()])
            .args(["--port", "0", "--max-batch-size", "4"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut first = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let url = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .to_string();
    assert!(first.contains("6 adapter(s)"), "{first}");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    let prompt = "The quick brown fox";
    for adapter in [
        "prompt-tuning",
        "p-tuning-mlp",
        "p-tuning-lstm",
        "prefix-tuning",
        "p-tuning-v2",
    ] {
        let body = serde_json::json!({
            "model": adapter, "prompt": prompt, "max_tokens": 10, "temperature": 0,
        });
        let mut response = agent
            .post(format!("{url}/v1/completions"))
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .unwrap();
        let text = response.body_mut().read_to_string().unwrap();
        let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(answer["model"], adapter, "{answer}");
        let generated = Command::new(env!("CARGO_BIN_EXE_peft"))
            .args(["generate", "--model", model.to_str().unwrap()])
            .args(["--adapter", adapters.join(adapter).to_str().unwrap()])
            .args(["--prompt", prompt, "--max-new-tokens", "10"])
            .output()
            .unwrap();
        assert!(generated.status.success());
        let printed = String::from_utf8(generated.stdout).unwrap();
        let continuation = printed
            .strip_prefix(prompt)
            .and_then(|t| t.strip_suffix('\n'))
            .unwrap();
        assert_eq!(answer["choices"][0]["text"], continuation, "{adapter}");
    }
}

#[test]
fn bad_flags_are_refused_naming_the_flag() {
    let model = root().join("fixtures/models/qwen2-gqa-tied");
    for (flags, expected) in [
        (vec!["--max-batch-size", "0"], "--max-batch-size"),
        (vec!["--max-queue", "0"], "--max-queue"),
        (
            vec!["--adapters", "/nonexistent/adapters"],
            "/nonexistent/adapters",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_peft"))
            .args(["serve", "--model", model.to_str().unwrap(), "--port", "0"])
            .args(&flags)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{flags:?}: {stderr}");
    }
}
