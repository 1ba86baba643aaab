//! The HTTP server as a server: started on a loopback port, driven by a real HTTP client (ureq),
//! with bounded request counts and time limits. Served text equals what the library generates for
//! the same request alone; bad requests get OpenAI's error JSON naming the field; a full queue
//! answers 429; a client that goes away frees its row.

use std::io::{BufRead, BufReader};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::prelude::*;
use burn::tensor::DType;
use peft::core::{Adapter, GenerationConfig, Injection, PeftModel, generate};
use peft::models::{AutoCausalLm, ChatMessage, ChatTemplate, SpecialTokens, load_tokenizer};
use peft_serve::http::{RunningServer, ServeOptions, Server};
use serde_json::{Value, json};

mod common;
use common::{copy_dir, fixtures};

/// The adapters served in these tests: every method on the base (BitFit's rows carry bias
/// deltas), and one that cannot be served (another base's).
const ADAPTERS: [(&str, &str); 7] = [
    ("prompt", "qwen2-gqa-tied/prompt-tuning"),
    ("mlp", "qwen2-gqa-tied/p-tuning-mlp"),
    ("lstm", "qwen2-gqa-tied/p-tuning-lstm"),
    ("prefix", "qwen2-gqa-tied/prefix-tuning"),
    ("ptv2", "qwen2-gqa-tied/p-tuning-v2"),
    ("biases", "qwen2-gqa-tied/bitfit"),
    ("for-bloom", "bloom-6-heads/prompt-tuning"),
];

/// A model folder (the qwen2-gqa-tied fixture, with a ChatML template when `chat`) and an
/// adapters folder, under a fresh temporary directory.
fn setup(tag: &str, chat: bool) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("peft-serve-http-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let model = dir.join("tiny-qwen2");
    copy_dir(&fixtures().join("models/qwen2-gqa-tied"), &model);
    if chat {
        std::fs::copy(
            fixtures().join("expected/chat/chatml.jinja"),
            model.join("chat_template.jinja"),
        )
        .unwrap();
    }
    let adapters = dir.join("adapters");
    for (name, from) in ADAPTERS {
        copy_dir(
            &fixtures().join("adapters").join(from),
            &adapters.join(name),
        );
    }
    (model, adapters)
}

fn start(model: &Path, options: ServeOptions) -> RunningServer {
    Server::load(model, options, &Device::default())
        .unwrap()
        .spawn("127.0.0.1:0".parse().unwrap())
        .unwrap()
}

fn options(adapters: &Path) -> ServeOptions {
    ServeOptions {
        adapters: Some(adapters.to_path_buf()),
        ..ServeOptions::default()
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// Status and JSON body of a POST.
fn post(server: &RunningServer, path: &str, body: &str) -> (u16, Value) {
    post_with(server, path, body, None)
}

fn post_with(server: &RunningServer, path: &str, body: &str, key: Option<&str>) -> (u16, Value) {
    let mut request = agent()
        .post(format!("{}{path}", server.url()))
        .header("Content-Type", "application/json");
    if let Some(key) = key {
        request = request.header("Authorization", format!("Bearer {key}"));
    }
    let mut response = request.send(body).unwrap();
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn get(server: &RunningServer, path: &str) -> (u16, String) {
    let mut response = agent()
        .get(format!("{}{path}", server.url()))
        .call()
        .unwrap();
    let status = response.status().as_u16();
    (status, response.body_mut().read_to_string().unwrap())
}

/// The data of every server-sent event of a streamed POST, `[DONE]` included.
fn post_stream(server: &RunningServer, path: &str, body: &str) -> Vec<String> {
    let response = agent()
        .post(format!("{}{path}", server.url()))
        .header("Content-Type", "application/json")
        .send(body)
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    BufReader::new(response.into_body().into_reader())
        .lines()
        .map(Result::unwrap)
        .filter_map(|line| line.strip_prefix("data: ").map(str::to_string))
        .collect()
}

/// The text `model` continues `prompt` with, greedily, generated alone by the library, and the
/// number of tokens it took (an EOS counted).
fn alone(
    model_dir: &Path,
    adapters: &Path,
    adapter: Option<&str>,
    prompt: &[u32],
    max: usize,
) -> (String, usize) {
    let device = Device::default();
    let base = AutoCausalLm::from_pretrained(model_dir, &device, DType::F32).unwrap();
    let special = SpecialTokens::from_dir(model_dir).unwrap();
    let config = GenerationConfig::new()
        .with_max_new_tokens(max)
        .with_eos_token_ids(special.eos_token_ids.clone());
    let prompts = [prompt.to_vec()];
    let tokens = match adapter {
        Some(name) => {
            let (base, adapter) = peft::AutoAdapter::load(&adapters.join(name), base).unwrap();
            PeftModel::new(base, adapter.into_inference())
                .generate(&prompts, &config, |_| ControlFlow::Continue(()))
        }
        None => generate(&base, &prompts, Injection::default(), &config, |_| {
            ControlFlow::Continue(())
        }),
    }
    .unwrap()
    .new_tokens
    .remove(0);
    let count = tokens.len();
    let text: Vec<u32> = tokens
        .into_iter()
        .filter(|t| !special.eos_token_ids.contains(t))
        .collect();
    let tokenizer = load_tokenizer(model_dir).unwrap();
    (tokenizer.decode(&text, true).unwrap(), count)
}

#[test]
fn completions_and_chat_equal_each_request_generated_alone_under_concurrency() {
    let (model, adapters) = setup("answers", true);
    let server = start(&model, options(&adapters));
    let tokenizer = load_tokenizer(&model).unwrap();

    // /v1/models: the base (named after its folder) and every adapter.
    let (status, body) = get(&server, "/v1/models");
    assert_eq!(status, 200);
    let body: Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids[0], "tiny-qwen2");
    let mut expected: Vec<&str> = ADAPTERS.iter().map(|(n, _)| *n).collect();
    expected.sort_unstable();
    assert_eq!(&ids[1..], &expected[..]);

    // Every method and the base, concurrently (they share batches), each equal to itself alone.
    let served = [
        "prompt",
        "mlp",
        "lstm",
        "prefix",
        "ptv2",
        "biases",
        "tiny-qwen2",
    ];
    let prompts = [
        "Hello world",
        "The quick brown fox",
        "a",
        "Once upon a time there was",
    ];
    let cases: Vec<(String, String, usize)> = served
        .iter()
        .enumerate()
        .flat_map(|(i, m)| {
            prompts
                .iter()
                .enumerate()
                .filter(move |(j, _)| (i + j) % 2 == 0)
                .map(move |(j, p)| (m.to_string(), p.to_string(), 3 + (i * 3 + j) % 9))
        })
        .collect();
    let answers: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(m, p, max)| {
                let server = &server;
                scope.spawn(move || {
                    let body =
                        json!({"model": m, "prompt": p, "max_tokens": max, "temperature": 0});
                    post(server, "/v1/completions", &body.to_string())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((m, p, max), (status, body)) in cases.iter().zip(&answers) {
        assert_eq!(*status, 200, "{m} {p}: {body}");
        let ids = tokenizer
            .encode(p.as_str(), true)
            .unwrap()
            .get_ids()
            .to_vec();
        let adapter = (m != "tiny-qwen2").then_some(m.as_str());
        let (text, count) = alone(&model, &adapters, adapter, &ids, *max);
        assert_eq!(body["choices"][0]["text"], text, "{m} {p}");
        assert_eq!(body["object"], "text_completion");
        assert_eq!(body["model"], m.as_str());
        assert_eq!(body["usage"]["prompt_tokens"], ids.len());
        assert_eq!(body["usage"]["completion_tokens"], count);
        let finish = if count < *max { "stop" } else { "length" };
        assert_eq!(body["choices"][0]["finish_reason"], finish);
    }

    // Token ids as the prompt are taken as they are.
    let ids = tokenizer
        .encode("Hello world", true)
        .unwrap()
        .get_ids()
        .to_vec();
    let (status, body) = post(
        &server,
        "/v1/completions",
        &json!({"model": "prefix", "prompt": ids, "max_tokens": 5, "temperature": 0}).to_string(),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["text"],
        alone(&model, &adapters, Some("prefix"), &ids, 5).0
    );

    // Chat: the model's template with the generation prompt, encoded without added specials.
    let messages = [("system", "You sort letters."), ("user", "Sort: tea")];
    let template = ChatTemplate::from_dir(&model).unwrap().unwrap();
    let rendered = template
        .render(&messages.map(|(r, c)| ChatMessage::new(r, c)), true)
        .unwrap();
    let ids = tokenizer
        .encode(rendered.as_str(), false)
        .unwrap()
        .get_ids()
        .to_vec();
    let body = json!({
        "model": "ptv2", "max_tokens": 6, "temperature": 0,
        "messages": [{"role": "system", "content": "You sort letters."},
                     {"role": "user", "content": [{"type": "text", "text": "Sort: "}, {"type": "text", "text": "tea"}]}],
    });
    let (status, answer) = post(&server, "/v1/chat/completions", &body.to_string());
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        alone(&model, &adapters, Some("ptv2"), &ids, 6).0
    );
    assert_eq!(answer["usage"]["prompt_tokens"], ids.len());

    // Sampled with a seed: the same answer twice.
    let body = json!({"model": "mlp", "prompt": "Hello", "max_tokens": 8, "temperature": 0.9, "top_p": 0.95, "seed": 7});
    let first = post(&server, "/v1/completions", &body.to_string());
    let second = post(&server, "/v1/completions", &body.to_string());
    assert_eq!(first.0, 200);
    assert_eq!(first.1["choices"], second.1["choices"]);
}

#[test]
fn streams_send_the_same_text_in_chunks_then_usage_then_done() {
    let (model, adapters) = setup("stream", true);
    let server = start(&model, options(&adapters));
    for (path, body) in [
        (
            "/v1/completions",
            json!({"model": "prompt", "prompt": "Hello world", "max_tokens": 9, "temperature": 0}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "prefix", "max_tokens": 9, "temperature": 0,
            "messages": [{"role": "user", "content": "Sort: tea"}]}),
        ),
    ] {
        let (status, whole) = post(&server, path, &body.to_string());
        assert_eq!(status, 200, "{whole}");
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let events = post_stream(&server, path, &streamed.to_string());
        assert_eq!(events.last().unwrap(), "[DONE]", "{events:?}");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert!(chunks.len() >= 2, "{events:?}");
        let chat = path.contains("chat");
        let text: String = chunks
            .iter()
            .map(|c| {
                let choice = &c["choices"][0];
                if chat {
                    choice["delta"]["content"].as_str()
                } else {
                    choice["text"].as_str()
                }
                .unwrap_or_default()
                .to_string()
            })
            .collect();
        let expected = if chat {
            assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
            assert_eq!(chunks[0]["object"], "chat.completion.chunk");
            whole["choices"][0]["message"]["content"].clone()
        } else {
            whole["choices"][0]["text"].clone()
        };
        assert_eq!(text, expected.as_str().unwrap());
        let last = chunks.last().unwrap();
        assert_eq!(
            last["choices"][0]["finish_reason"],
            whole["choices"][0]["finish_reason"]
        );
        assert_eq!(last["usage"], whole["usage"]);
        for chunk in &chunks[..chunks.len() - 1] {
            assert!(chunk["choices"][0]["finish_reason"].is_null());
            assert!(chunk.get("usage").is_none());
        }
    }
}

#[test]
fn stop_strings_end_the_text_before_them() {
    let (model, adapters) = setup("stop", false);
    let server = start(&model, options(&adapters));
    let body =
        json!({"model": "prompt", "prompt": "Hello world", "max_tokens": 12, "temperature": 0});
    let (_, whole) = post(&server, "/v1/completions", &body.to_string());
    let text = whole["choices"][0]["text"].as_str().unwrap().to_string();
    // A stop string taken from the middle of the greedy text: the answer ends right before it.
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 4, "{text:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = &text[..text.find(&stop).unwrap()];
    for stream in [false, true] {
        let mut with_stop = body.clone();
        with_stop["stop"] = json!([stop, "never appears ##"]);
        with_stop["stream"] = json!(stream);
        let (answer, finish) = if stream {
            let events = post_stream(&server, "/v1/completions", &with_stop.to_string());
            let chunks: Vec<Value> = events[..events.len() - 1]
                .iter()
                .map(|e| serde_json::from_str(e).unwrap())
                .collect();
            let text: String = chunks
                .iter()
                .map(|c| c["choices"][0]["text"].as_str().unwrap().to_string())
                .collect();
            (
                text,
                chunks.last().unwrap()["choices"][0]["finish_reason"].clone(),
            )
        } else {
            let (status, answer) = post(&server, "/v1/completions", &with_stop.to_string());
            assert_eq!(status, 200);
            (
                answer["choices"][0]["text"].as_str().unwrap().to_string(),
                answer["choices"][0]["finish_reason"].clone(),
            )
        };
        assert_eq!(answer, cut, "stop {stop:?} in {text:?}");
        assert_eq!(finish, "stop");
    }
}

#[test]
fn bad_requests_get_openai_errors_naming_the_field() {
    let (model, adapters) = setup("errors", false);
    // A link out of the adapters folder, to an adapter that would otherwise load.
    let outside = adapters.parent().unwrap().join("outside");
    copy_dir(
        &fixtures().join("adapters/qwen2-gqa-tied/prompt-tuning"),
        &outside,
    );
    std::os::unix::fs::symlink(&outside, adapters.join("escape")).unwrap();
    let server = start(
        &model,
        ServeOptions {
            max_body_bytes: 64 * 1024,
            ..options(&adapters)
        },
    );
    let long: Vec<u32> = vec![5; 130];
    let cases: Vec<(Value, u16, &str, Option<&str>)> = vec![
        (
            json!({"prompt": "hi", "max_tokens": "many"}),
            400,
            "max_tokens",
            None,
        ),
        (json!({"prompt": 5}), 400, "prompt", None),
        (json!({"max_tokens": 3}), 400, "body", None),
        (json!({"prompt": ""}), 400, "prompt", None),
        (
            json!({"prompt": long}),
            400,
            "prompt",
            Some("context_length_exceeded"),
        ),
        (
            json!({"prompt": "hi", "max_tokens": 500}),
            400,
            "max_tokens",
            Some("context_length_exceeded"),
        ),
        (
            json!({"model": "prefix", "prompt": vec![5; 120], "max_tokens": 5}),
            400,
            "max_tokens",
            Some("context_length_exceeded"),
        ),
        (
            json!({"prompt": "hi", "max_tokens": 0}),
            400,
            "max_tokens",
            None,
        ),
        (
            json!({"prompt": "hi", "max_tokens": -1}),
            400,
            "max_tokens",
            None,
        ),
        (
            json!({"prompt": "hi", "temperature": 3.0}),
            400,
            "temperature",
            None,
        ),
        (
            json!({"prompt": "hi", "temperature": -0.5}),
            400,
            "temperature",
            None,
        ),
        (json!({"prompt": "hi", "top_p": 0.0}), 400, "top_p", None),
        (json!({"prompt": "hi", "top_p": 1.5}), 400, "top_p", None),
        (json!({"prompt": "hi", "n": 2}), 400, "n", None),
        (json!({"prompt": ["a", "b"]}), 400, "prompt", None),
        (json!({"prompt": [1, 99999]}), 400, "prompt", None),
        (
            json!({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}),
            400,
            "stop",
            None,
        ),
        (
            json!({"model": "nope", "prompt": "hi"}),
            404,
            "model",
            Some("model_not_found"),
        ),
        (
            json!({"model": "../adapters/prompt", "prompt": "hi"}),
            404,
            "model",
            Some("model_not_found"),
        ),
        (
            json!({"model": "/etc", "prompt": "hi"}),
            404,
            "model",
            Some("model_not_found"),
        ),
        (
            json!({"model": "escape", "prompt": "hi"}),
            404,
            "model",
            Some("model_not_found"),
        ),
        (
            json!({"model": "for-bloom", "prompt": "hi"}),
            400,
            "model",
            Some("adapter_unusable"),
        ),
    ];
    for (body, status, param, code) in cases {
        let (got, answer) = post(&server, "/v1/completions", &body.to_string());
        assert_eq!(got, status, "{body}: {answer}");
        let error = &answer["error"];
        assert_eq!(error["param"], param, "{body}: {answer}");
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{answer}"
        );
        assert!(error["type"].is_string(), "{answer}");
        if let Some(code) = code {
            assert_eq!(error["code"], code, "{body}: {answer}");
        }
    }
    // The other base's adapter is refused with its reason.
    let (_, answer) = post(
        &server,
        "/v1/completions",
        r#"{"model": "for-bloom", "prompt": "hi"}"#,
    );
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("for-bloom"),
        "{answer}"
    );

    // Not JSON, not an object, too large, no such route, chat without a template.
    for (path, body, status, param) in [
        ("/v1/completions", "{\"prompt\": ", 400, "body"),
        ("/v1/completions", "[1, 2]", 400, "body"),
        ("/v1/completions", "", 400, "body"),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "hi"}]}"#,
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": "hi"}"#,
            400,
            "messages",
        ),
    ] {
        let (got, answer) = post(&server, path, body);
        assert_eq!(got, status, "{body}: {answer}");
        assert_eq!(answer["error"]["param"], param, "{body}: {answer}");
    }
    let huge = json!({"prompt": "x".repeat(100_000)}).to_string();
    let (got, answer) = post(&server, "/v1/completions", &huge);
    assert_eq!(got, 413, "{answer}");
    assert_eq!(answer["error"]["code"], "request_too_large");
    let (got, answer) = post(&server, "/v1/embeddings", "{}");
    assert_eq!(got, 404);
    assert!(answer["error"]["message"].is_string());
    let (got, _) = get(&server, "/v1/completions");
    assert_eq!(got, 405);

    // After all that, the server still answers.
    let (got, answer) = post(
        &server,
        "/v1/completions",
        r#"{"prompt": "hi", "max_tokens": 2}"#,
    );
    assert_eq!(got, 200, "{answer}");
    assert_eq!(
        get(&server, "/health"),
        (200, r#"{"status":"ok"}"#.to_string())
    );
}

#[test]
fn an_api_key_guards_the_api() {
    let (model, adapters) = setup("key", false);
    let server = start(
        &model,
        ServeOptions {
            api_key: Some("sesame".into()),
            ..options(&adapters)
        },
    );
    let body = r#"{"prompt": "hi", "max_tokens": 2}"#;
    for key in [None, Some("wrong"), Some("sesam"), Some("sesame2")] {
        let (status, answer) = post_with(&server, "/v1/completions", body, key);
        assert_eq!(status, 401, "{key:?}");
        assert_eq!(answer["error"]["code"], "invalid_api_key");
    }
    let response = agent()
        .get(format!("{}/v1/models", server.url()))
        .call()
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let (status, answer) = post_with(&server, "/v1/completions", body, Some("sesame"));
    assert_eq!(status, 200, "{answer}");
    // Health and metrics stay open (probes and scrapers).
    assert_eq!(get(&server, "/health").0, 200);
    assert_eq!(get(&server, "/metrics").0, 200);
}

fn metric(server: &RunningServer, name: &str) -> u64 {
    let (_, text) = get(server, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} not in {text}"))
        .parse()
        .unwrap()
}

#[test]
fn a_full_queue_answers_429_and_every_admitted_request_is_answered_right() {
    let (model, adapters) = setup("queue", false);
    let server = start(
        &model,
        ServeOptions {
            max_batch_size: 1,
            max_queue: 1,
            ..options(&adapters)
        },
    );
    let ids = load_tokenizer(&model)
        .unwrap()
        .encode("Hello world", true)
        .unwrap()
        .get_ids()
        .to_vec();
    let (expected, _) = alone(&model, &adapters, Some("prompt"), &ids, 40);
    let body =
        json!({"model": "prompt", "prompt": "Hello world", "max_tokens": 40, "temperature": 0})
            .to_string();
    let answers: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..12)
            .map(|_| scope.spawn(|| post(&server, "/v1/completions", &body)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut rejected = 0;
    for (status, answer) in &answers {
        match status {
            200 => assert_eq!(answer["choices"][0]["text"], expected.as_str()),
            429 => {
                assert_eq!(answer["error"]["code"], "queue_full");
                rejected += 1;
            }
            other => panic!("{other}: {answer}"),
        }
    }
    assert!(rejected > 0 && rejected < 12, "{rejected} of 12 rejected");
    assert_eq!(metric(&server, "peft_requests_rejected_total"), rejected);
    // Once the queue drains, requests are taken again.
    let (status, _) = post(&server, "/v1/completions", &body);
    assert_eq!(status, 200);
}

#[test]
fn a_client_that_goes_away_frees_its_row() {
    // BLOOM (ALiBi) has no context limit: a request for 20,000 tokens runs until its client goes.
    let dir = std::env::temp_dir().join(format!("peft-serve-http-gone-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(
        &fixtures().join("adapters/bloom-6-heads/prefix-tuning"),
        &dir.join("adapters/prefix"),
    );
    let server = start(
        &fixtures().join("models/bloom-6-heads"),
        options(&dir.join("adapters")),
    );
    let body = json!({"model": "prefix", "prompt": "Hello", "max_tokens": 20_000, "temperature": 0, "stream": true});
    {
        let response = agent()
            .post(format!("{}/v1/completions", server.url()))
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .unwrap();
        let mut lines = BufReader::new(response.into_body().into_reader()).lines();
        let first = lines.next().unwrap().unwrap();
        assert!(first.starts_with("data: "), "{first}");
        assert_eq!(metric(&server, "peft_running_rows"), 1);
        // The connection closes here, long before 20,000 tokens.
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&server, "peft_requests_cancelled_total") == 0 {
        assert!(Instant::now() < deadline, "the row was not freed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(metric(&server, "peft_running_rows"), 0);
    assert_eq!(metric(&server, "peft_requests_finished_total"), 0);
    assert!(metric(&server, "peft_generated_tokens_total") < 20_000);
    assert_eq!(metric(&server, "peft_loaded_adapters"), 1);
}
