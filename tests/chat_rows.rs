//! Chat rows (`{"messages": [...]}`) through a model's chat template: the ids are transformers'
//! `apply_chat_template` ids for the same template, tokenizer and messages (ChatML, Llama 3 and a
//! Mistral-style template that raises; `scripts/make_chat_fixtures.py`), and only assistant turns
//! are scored.

use std::path::{Path, PathBuf};

use peft::TemplateRenderer;
use peft::core::loss::IGNORE_INDEX;
use peft::models::{ChatTemplate, Tokenizer, load_tokenizer};
use peft::train::data::{
    ChatOptions, DataError, DataOptions, Dataset, TokenizeOptions, TokenizedDataset,
    TokenizerEncoder, TrainOn,
};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn template(name: &str) -> (TemplateRenderer, Value) {
    let dir = root().join("fixtures/expected/chat");
    let fixture: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap())
            .unwrap();
    let special_tokens = fixture["special_tokens"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    let path = dir.join(format!("{name}.jinja"));
    let template = ChatTemplate {
        source: std::fs::read_to_string(&path).unwrap(),
        path,
        special_tokens,
    };
    (TemplateRenderer(template), fixture)
}

fn tokenizer() -> Tokenizer {
    load_tokenizer(root().join("fixtures/models/qwen2-gqa-tied")).unwrap()
}

/// The fixture tokenizer's `<|endoftext|>`, the EOS of the Mistral-style template.
const EOS: u32 = 0;

fn tokenize(
    renderer: &TemplateRenderer,
    jsonl: &str,
    train_on: TrainOn,
) -> Result<TokenizedDataset, DataError> {
    let dataset = Dataset::from_jsonl_str(Path::new("chat.jsonl"), jsonl, &DataOptions::default())?;
    let tokenizer = tokenizer();
    TokenizedDataset::with_chat(
        dataset,
        &TokenizerEncoder(&tokenizer),
        &TokenizeOptions {
            max_length: 512,
            eos_token_id: Some(EOS),
            skip_bad_rows: false,
        },
        Some(&ChatOptions { renderer, train_on }),
    )
}

#[test]
fn chat_rows_give_transformers_ids_and_score_only_assistant_turns() {
    let tokenizer = tokenizer();
    let mut compared = 0;
    for name in ["chatml", "llama3", "mistral"] {
        let (renderer, fixture) = template(name);
        for case in fixture["cases"].as_array().unwrap() {
            let row = serde_json::json!({ "messages": case["messages"] }).to_string();
            if let Some(error) = case["error"].as_str() {
                let err = tokenize(&renderer, &row, TrainOn::AllAssistantTurns)
                    .unwrap_err()
                    .to_string();
                assert!(
                    err.starts_with("chat.jsonl:1: the chat template refuses the row: ")
                        && err.contains(error),
                    "{name}: {err}"
                );
                continue;
            }
            let expected: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            let prompt: Vec<u32> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
            let contents: Vec<&str> = case["messages"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m["role"] == "assistant")
                .map(|m| m["content"].as_str().unwrap().trim())
                .collect();
            for train_on in [TrainOn::AllAssistantTurns, TrainOn::LastAssistantTurn] {
                let data = tokenize(&renderer, &row, train_on).unwrap();
                let example = &data.examples[0];
                // transformers' ids, up to the last scored token (what follows is not learned).
                assert_eq!(
                    example.input_ids[..],
                    expected[..example.input_ids.len()],
                    "{name}"
                );
                assert!(example.input_ids.len() + 2 >= expected.len(), "{name}");
                // The prompt of exact match is transformers' generation prompt.
                assert_eq!(example.prompt_ids(), &prompt[..], "{name}");
                let scored: Vec<u32> = example
                    .labels
                    .iter()
                    .filter(|&&l| l != IGNORE_INDEX)
                    .map(|&l| l as u32)
                    .collect();
                let text = tokenizer.decode(&scored, false).unwrap();
                let learned: Vec<&str> = match train_on {
                    TrainOn::AllAssistantTurns => contents.clone(),
                    TrainOn::LastAssistantTurn => vec![*contents.last().unwrap()],
                };
                let mut rest = text.as_str();
                for content in &learned {
                    let at = rest
                        .find(content)
                        .unwrap_or_else(|| panic!("{name}: {content:?} is not scored in {text:?}"));
                    rest = &rest[at + content.len()..];
                }
                // Nothing of the users' or the system's turns is scored.
                for m in case["messages"].as_array().unwrap() {
                    if m["role"] != "assistant" {
                        let content = m["content"].as_str().unwrap().trim();
                        assert!(!text.contains(content), "{name}: {content:?} scored");
                    }
                }
                if train_on == TrainOn::LastAssistantTurn && contents.len() > 1 {
                    assert!(
                        !text.contains(contents[0]),
                        "{name}: an earlier turn scored"
                    );
                }
                compared += 1;
            }
        }
    }
    assert_eq!(compared, 10);
}

#[test]
fn bad_chat_rows_are_named_by_line_and_field() {
    let (renderer, _) = template("chatml");
    for (row, expected) in [
        (
            r#"{"messages": [{"role": "robot", "content": "x"}]}"#,
            r#"chat.jsonl:1: field "messages[0].role" is "robot"; expected "system", "user" or "assistant""#,
        ),
        (
            r#"{"messages": [{"role": "user", "content": 3}]}"#,
            r#"chat.jsonl:1: field "messages[0].content" must be a string, found 3"#,
        ),
        (
            r#"{"messages": [{"role": "user", "content": "hi"}]}"#,
            r#"chat.jsonl:1: field "messages" has no assistant turn with text to learn"#,
        ),
        (
            r#"{"messages": "hi"}"#,
            r#"field "messages" must be a list"#,
        ),
    ] {
        let err = tokenize(&renderer, row, TrainOn::AllAssistantTurns)
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{err}");
    }
    // Without a template, a chat row is refused by line.
    let dataset = Dataset::from_jsonl_str(
        Path::new("chat.jsonl"),
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#,
        &DataOptions::default(),
    )
    .unwrap();
    let tokenizer = tokenizer();
    let err = TokenizedDataset::new(
        dataset,
        &TokenizerEncoder(&tokenizer),
        &TokenizeOptions {
            max_length: 64,
            eos_token_id: Some(EOS),
            skip_bad_rows: false,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("chat.jsonl:1: a chat row, but the model has no chat template"),
        "{err}"
    );
    // A conversation longer than max_length is a bad row, not a silent cut.
    let row = r#"{"messages": [{"role": "user", "content": "Hello world! Hello world!"}, {"role": "assistant", "content": "Once upon a time"}]}"#;
    let dataset =
        Dataset::from_jsonl_str(Path::new("chat.jsonl"), row, &DataOptions::default()).unwrap();
    let err = TokenizedDataset::with_chat(
        dataset,
        &TokenizerEncoder(&tokenizer),
        &TokenizeOptions {
            max_length: 8,
            eos_token_id: Some(EOS),
            skip_bad_rows: false,
        },
        Some(&ChatOptions {
            renderer: &renderer,
            train_on: TrainOn::AllAssistantTurns,
        }),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("tokens, more than max_length 8"), "{err}");
}
