//! OpenAI's request and error shapes, as far as this server implements them.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

/// An error answered as OpenAI answers it: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for a person.
    pub message: String,
    /// OpenAI's `type` (`invalid_request_error`, ...).
    pub kind: &'static str,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// A stable code (`model_not_found`, `queue_full`, ...).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
        }
    }

    /// An error of another status and type.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    /// The same error with a `code`.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The same error about `param`.
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// Parses a request body, naming the field of a value of the wrong type.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid(
            "body",
            "the request has no body: send a JSON object",
        ));
    }
    // serde would take a struct from an array too, and name its elements.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::invalid(
            "body",
            "the body must be a JSON object (`{...}`)",
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::invalid("body", format!("the body is not valid JSON: {inner}"))
        } else if path == "." {
            ApiError::invalid("body", format!("the body is not a valid request: {inner}"))
        } else {
            ApiError::invalid(path.clone(), format!("{path}: {inner}"))
        }
    })
}

/// `prompt` of a completion: text, token ids, or a list of one text.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// Text, tokenized with the model's tokenizer (special tokens added as it adds them).
    Text(String),
    /// Token ids, taken as they are.
    Tokens(Vec<u32>),
    /// Several texts (only one is served per request).
    Texts(Vec<String>),
}

/// `stop`: one string or up to four.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl StopInput {
    /// The strings.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// The fields both endpoints share, read from the same body as the endpoint's own
/// ([`CompletionRequest`] or [`ChatRequest`]; both parses ignore the other's fields), so that a
/// wrong type is still named by its path.
#[derive(Debug, Default, Deserialize)]
pub struct Sampling {
    /// The adapter's name, or the base's; the base when absent.
    pub model: Option<String>,
    /// Most new tokens (completions: OpenAI's default 16; chat: what the context has left).
    pub max_tokens: Option<u64>,
    /// Chat's newer name of `max_tokens` (it wins when both are given).
    pub max_completion_tokens: Option<u64>,
    /// Sampling temperature in [0, 2] (default 1; 0 decodes greedily).
    pub temperature: Option<f64>,
    /// Nucleus sampling mass in (0, 1].
    pub top_p: Option<f64>,
    /// Seed of the request's sampler.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Option<StopInput>,
    /// Server-sent events instead of one response.
    pub stream: Option<bool>,
    /// Choices per prompt (only 1).
    pub n: Option<u64>,
}

impl Sampling {
    /// `max_completion_tokens`, else `max_tokens`.
    pub fn max_new_tokens(&self) -> Option<u64> {
        self.max_completion_tokens.or(self.max_tokens)
    }
}

/// `POST /v1/completions`: the prompt (the rest is [`Sampling`]).
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// What to continue.
    pub prompt: PromptInput,
}

/// One message of a chat request.
#[derive(Debug, Deserialize)]
pub struct ChatMessageInput {
    /// `system`, `user`, `assistant` (or what the template knows).
    pub role: String,
    /// Text, or text parts.
    pub content: ContentInput,
}

/// A message's content: a string or a list of `{"type": "text", "text"}` parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ContentInput {
    /// Text.
    Text(String),
    /// Parts.
    Parts(Vec<ContentPart>),
}

/// A content part.
#[derive(Debug, Deserialize)]
pub struct ContentPart {
    /// `text` (the only kind served).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    pub text: Option<String>,
}

/// `POST /v1/chat/completions`: the conversation (the rest is [`Sampling`]).
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<ChatMessageInput>,
}
