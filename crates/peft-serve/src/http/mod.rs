//! The HTTP server of `peft serve`: OpenAI's completion and chat endpoints over one [`Engine`],
//! each request naming its adapter (a subdirectory of the adapters folder) or the base.
//!
//! - `GET /v1/models`: the base and every adapter.
//! - `POST /v1/completions`, `POST /v1/chat/completions`: OpenAI's shapes; `stream: true` answers
//!   with server-sent events (`data: {chunk}` lines, the last chunk carrying `usage`, then
//!   `data: [DONE]`).
//! - `GET /health`, `GET /metrics` (Prometheus text).
//!
//! Errors are OpenAI's JSON (`{"error": {"message", "type", "param", "code"}}`): 400 for a bad
//! request (naming the field), 401 for a wrong API key, 404 for an unknown model or route, 413 for
//! a body over the limit, 429 when the queue is full. Memory is bounded by the batch size, the
//! queue, the body limit and the LRU of adapters. A client that goes away frees its row before the
//! next decode step.

pub mod api;
pub mod text;
mod worker;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use burn::prelude::*;
use burn::tensor::DType;
use futures_util::stream;
use peft::core::{Adapter, CausalLm, GenerationConfig};
use peft::models::{
    AutoCausalLm, ChatMessage, ChatTemplate, ModelError, SpecialTokens, Tokenizer, load_tokenizer,
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

pub use api::ApiError;
use api::{ChatRequest, CompletionRequest, ContentInput, PromptInput, Sampling};
pub use text::{FinishReason, TextStream};
pub use worker::Metrics;
use worker::{Submission, Update};

use crate::{AdapterStore, Engine, EngineError, Request, StoreError};

/// Most new tokens a request may ask of a model without a context limit (ALiBi): the KV cache of
/// a row must stay bounded.
const MAX_TOKENS_WITHOUT_CONTEXT: u64 = 32_768;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The adapters folder: each subdirectory with an `adapter_config.json` is an adapter named
    /// after it. `None` serves the base only.
    pub adapters: Option<PathBuf>,
    /// The base's name in requests and `/v1/models` (default: the model folder's name).
    pub served_model_name: Option<String>,
    /// When set, `/v1/*` requests need `Authorization: Bearer <api_key>`.
    pub api_key: Option<String>,
    /// Rows decoded together.
    pub max_batch_size: usize,
    /// Requests waiting for a row; more are answered 429.
    pub max_queue: usize,
    /// Adapters held in memory (least recently used leave first).
    pub max_loaded_adapters: usize,
    /// Largest request body, in bytes; larger ones are answered 413.
    pub max_body_bytes: usize,
    /// The base model's compute dtype.
    pub dtype: DType,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            adapters: None,
            served_model_name: None,
            api_key: None,
            max_batch_size: 16,
            max_queue: 256,
            max_loaded_adapters: 64,
            max_body_bytes: 4 << 20,
            dtype: DType::F32,
        }
    }
}

/// Why the server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The model (or its tokenizer or chat template) cannot be loaded.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// An option out of its domain.
    #[error("{field}: {message}")]
    Option {
        /// The [`ServeOptions`] field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The adapters folder cannot be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The folder.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// What every handler shares.
struct Shared {
    base_name: String,
    tokenizer: Arc<Tokenizer>,
    eos_token_ids: Arc<[u32]>,
    chat: Option<ChatTemplate>,
    max_positions: Option<usize>,
    vocab_size: usize,
    store: Option<Mutex<AdapterStore>>,
    api_key: Option<String>,
    submissions: SyncSender<Submission>,
    metrics: Arc<Metrics>,
    next_id: AtomicU64,
    created: u64,
    requests_rejected: AtomicU64,
}

/// A loaded model with its engine running, ready to answer HTTP requests.
pub struct Server {
    shared: Arc<Shared>,
    max_body_bytes: usize,
}

impl Server {
    /// Loads the model of `model_dir` (weights, tokenizer, chat template, special tokens) on
    /// `device` and starts its engine thread.
    ///
    /// # Errors
    ///
    /// A model that does not load, options out of their domain, an adapters folder that is not
    /// one.
    pub fn load(
        model_dir: &Path,
        options: ServeOptions,
        device: &Device,
    ) -> Result<Self, ServeError> {
        for (field, value) in [
            ("max_batch_size", options.max_batch_size),
            ("max_queue", options.max_queue),
            ("max_loaded_adapters", options.max_loaded_adapters),
            ("max_body_bytes", options.max_body_bytes),
        ] {
            if value == 0 {
                return Err(ServeError::Option {
                    field,
                    message: "must be at least 1".into(),
                });
            }
        }
        if let Some(dir) = &options.adapters
            && let Err(source) = std::fs::read_dir(dir)
        {
            return Err(ServeError::Io {
                path: dir.clone(),
                source,
            });
        }
        let tokenizer = load_tokenizer(model_dir)?;
        let special = SpecialTokens::from_dir(model_dir)?;
        let chat = ChatTemplate::from_dir(model_dir)?;
        let model = AutoCausalLm::from_pretrained(model_dir, device, options.dtype)?;
        let base_name = options.served_model_name.clone().unwrap_or_else(|| {
            model_dir
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "base".into())
        });
        Ok(Self::new(
            model,
            tokenizer,
            special.eos_token_ids,
            chat,
            base_name,
            &options,
        ))
    }

    /// A server over a model already loaded, with its tokenizer, EOS ids and chat template.
    pub fn new(
        model: AutoCausalLm,
        tokenizer: Tokenizer,
        eos_token_ids: Vec<u32>,
        chat: Option<ChatTemplate>,
        base_name: String,
        options: &ServeOptions,
    ) -> Self {
        let geometry = model.geometry();
        let store = options.adapters.as_ref().map(|dir| {
            Mutex::new(AdapterStore::new(
                dir,
                peft::core::BaseShape::of(&model),
                &model.device(),
                options.max_loaded_adapters,
            ))
        });
        let engine = Engine::new(model, options.max_batch_size, options.max_queue);
        let metrics = Arc::new(Metrics::default());
        let (submissions, receiver) = std::sync::mpsc::sync_channel(options.max_queue);
        let worker_metrics = metrics.clone();
        std::thread::Builder::new()
            .name("peft-serve-engine".into())
            .spawn(move || worker::run(engine, receiver, worker_metrics))
            .expect("the engine thread starts");
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            shared: Arc::new(Shared {
                base_name,
                tokenizer: Arc::new(tokenizer),
                eos_token_ids: eos_token_ids.into(),
                chat,
                max_positions: geometry.max_positions,
                vocab_size: geometry.vocab_size,
                store,
                api_key: options.api_key.clone(),
                submissions,
                metrics,
                next_id: AtomicU64::new(1),
                created,
                requests_rejected: AtomicU64::new(0),
            }),
            max_body_bytes: options.max_body_bytes,
        }
    }

    /// The base's name in requests.
    pub fn base_name(&self) -> &str {
        &self.shared.base_name
    }

    /// The adapters served (the subdirectories of the adapters folder), sorted.
    pub fn adapter_names(&self) -> Vec<String> {
        self.shared
            .store
            .as_ref()
            .map(|s| lock(s).names())
            .unwrap_or_default()
    }

    /// The routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/models", get(models))
            .route("/v1/completions", post(completions))
            .route("/v1/chat/completions", post(chat_completions))
            .route("/health", get(health))
            .route("/metrics", get(metrics))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(DefaultBodyLimit::max(self.max_body_bytes))
            .with_state(self.shared.clone())
    }

    /// Serves on `listener` until `shutdown` completes (requests running then are finished).
    ///
    /// # Errors
    ///
    /// What the listener fails with.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }

    /// Serves on `addr` from a thread of its own (with its own tokio runtime); the server stops
    /// when the returned handle is dropped or [`RunningServer::stop`] is called. Port 0 takes a
    /// free port: [`RunningServer::addr`] says which.
    ///
    /// # Errors
    ///
    /// The address cannot be bound.
    pub fn spawn(self, addr: SocketAddr) -> std::io::Result<RunningServer> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind(addr))?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("peft-serve-http".into())
            .spawn(move || {
                runtime.block_on(self.serve(listener, async move {
                    let _ = stopped.await;
                }))
            })?;
        Ok(RunningServer {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

/// A server running on a thread of its own (see [`Server::spawn`]).
pub struct RunningServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl RunningServer {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, finishes the requests running and returns what the server ended with.
    ///
    /// # Errors
    ///
    /// What the listener failed with.
    pub fn stop(mut self) -> std::io::Result<()> {
        self.stop_now()
    }

    fn stop_now(&mut self) -> std::io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the server thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.stop_now();
    }
}

type AppState = State<Arc<Shared>>;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while the store was held left it consistent (it only pushes and pops whole
    // entries): keep serving.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn authorize(shared: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &shared.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|given| constant_time_eq(given.as_bytes(), key.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "missing or wrong API key: send the header `Authorization: Bearer <key>`",
        )
        .with_code("invalid_api_key"))
    }
}

/// Equality whose time does not depend on where the inputs differ (the key is a secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                "invalid_request_error",
                "the request body is larger than the server's limit (max_body_bytes)",
            )
            .with_code("request_too_large")
        } else {
            ApiError::new(status, "invalid_request_error", rejection.body_text())
        }
    })
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "no such route: the server answers /v1/models, /v1/completions, /v1/chat/completions, \
         /health and /metrics",
    )
    .with_code("not_found")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "this route does not take this method (GET for /v1/models, /health, /metrics; POST for \
         completions)",
    )
}

async fn health() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

async fn metrics(State(shared): AppState) -> impl IntoResponse {
    let m = &shared.metrics;
    let loaded = shared.store.as_ref().map_or(0, |s| lock(s).loaded());
    let rows: [(&str, &str, &str, u64); 8] = [
        (
            "peft_queue_depth",
            "gauge",
            "Requests waiting for a row.",
            m.queued.load(Ordering::Relaxed),
        ),
        (
            "peft_running_rows",
            "gauge",
            "Rows decoding in the batch.",
            m.running.load(Ordering::Relaxed),
        ),
        (
            "peft_loaded_adapters",
            "gauge",
            "Adapters held in memory.",
            loaded as u64,
        ),
        (
            "peft_generated_tokens_total",
            "counter",
            "Tokens generated.",
            m.tokens_generated.load(Ordering::Relaxed),
        ),
        (
            "peft_requests_finished_total",
            "counter",
            "Requests that produced their EOS or max_tokens.",
            m.requests_finished.load(Ordering::Relaxed),
        ),
        (
            "peft_requests_cancelled_total",
            "counter",
            "Requests dropped because their client went away or a stop string ended them.",
            m.requests_cancelled.load(Ordering::Relaxed),
        ),
        (
            "peft_requests_rejected_total",
            "counter",
            "Requests answered 429 (queue full).",
            shared.requests_rejected.load(Ordering::Relaxed),
        ),
        (
            "peft_engine_failures_total",
            "counter",
            "Decode steps that failed.",
            m.engine_failures.load(Ordering::Relaxed),
        ),
    ];
    let mut text = String::new();
    for (name, kind, help, value) in rows {
        text.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

async fn models(State(shared): AppState, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&shared, &headers)?;
    let created = shared.created;
    let mut data = vec![json!({
        "id": shared.base_name, "object": "model", "created": created, "owned_by": "peft-burn",
    })];
    let names = match &shared.store {
        Some(store) => lock(store).names(),
        None => Vec::new(),
    };
    for name in names {
        data.push(json!({
            "id": name, "object": "model", "created": created, "owned_by": "peft-burn",
            "parent": shared.base_name,
        }));
    }
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

async fn completions(
    State(shared): AppState,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorize(&shared, &headers)?;
    let body = body_bytes(body)?;
    let request: CompletionRequest = api::parse_body(&body)?;
    let sampling: Sampling = api::parse_body(&body)?;
    let prompt = match request.prompt {
        PromptInput::Text(text) => encode(&shared, &text, true)?,
        PromptInput::Tokens(ids) => ids,
        PromptInput::Texts(mut texts) if texts.len() == 1 => {
            encode(&shared, &texts.remove(0), true)?
        }
        PromptInput::Texts(texts) => {
            return Err(ApiError::invalid(
                "prompt",
                format!(
                    "{} prompts in one request: this server takes one prompt per request (send \
                     them as concurrent requests; they share the batch)",
                    texts.len()
                ),
            ));
        }
    };
    let stream = sampling.stream.unwrap_or(false);
    let job = Job::admit(&shared, prompt, sampling, Kind::Completion).await?;
    Ok(job.respond(stream).await)
}

async fn chat_completions(
    State(shared): AppState,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorize(&shared, &headers)?;
    let body = body_bytes(body)?;
    let request: ChatRequest = api::parse_body(&body)?;
    let sampling: Sampling = api::parse_body(&body)?;
    let Some(template) = &shared.chat else {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "the model {:?} has no chat template (no `chat_template` in tokenizer_config.json, \
                 no chat_template.jinja): use /v1/completions",
                shared.base_name
            ),
        )
        .with_code("no_chat_template"));
    };
    if request.messages.is_empty() {
        return Err(ApiError::invalid("messages", "needs at least one message"));
    }
    let mut messages = Vec::with_capacity(request.messages.len());
    for (i, message) in request.messages.iter().enumerate() {
        let content = match &message.content {
            ContentInput::Text(text) => text.clone(),
            ContentInput::Parts(parts) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    match (&*part.kind, &part.text) {
                        ("text", Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::invalid(
                                format!("messages[{i}].content[{j}]"),
                                format!(
                                    "a {:?} part: only text parts (`{{\"type\": \"text\", \"text\": ...}}`) are served",
                                    part.kind
                                ),
                            ));
                        }
                    }
                }
                text
            }
        };
        messages.push(ChatMessage::new(message.role.clone(), content));
    }
    let rendered = template
        .render(&messages, true)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    // The template writes the special tokens itself (as transformers' apply_chat_template).
    let prompt = encode(&shared, &rendered, false)?;
    let stream = sampling.stream.unwrap_or(false);
    let job = Job::admit(&shared, prompt, sampling, Kind::Chat).await?;
    Ok(job.respond(stream).await)
}

fn encode(shared: &Shared, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ApiError> {
    shared
        .tokenizer
        .encode(text, add_special_tokens)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| ApiError::invalid("prompt", format!("the tokenizer refused the text: {e}")))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// A request admitted into the engine, its tokens to come.
struct Job {
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    prompt_tokens: usize,
    updates: mpsc::UnboundedReceiver<Update>,
    text: TextStream,
}

impl Job {
    /// Checks the request against the model and its adapter and queues it.
    async fn admit(
        shared: &Arc<Shared>,
        prompt: Vec<u32>,
        sampling: Sampling,
        kind: Kind,
    ) -> Result<Self, ApiError> {
        if sampling.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid(
                "n",
                "only n = 1 is served: send n requests",
            ));
        }
        let model = sampling
            .model
            .clone()
            .unwrap_or_else(|| shared.base_name.clone());
        let adapter = if model == shared.base_name {
            None
        } else {
            Some(adapter(shared, &model).await?)
        };
        let added = adapter.as_ref().map_or(0, |a| a.added_positions());
        if prompt.is_empty() {
            return Err(ApiError::invalid("prompt", "the prompt has no tokens"));
        }
        if let Some(&id) = prompt.iter().find(|&&id| id as usize >= shared.vocab_size) {
            return Err(ApiError::invalid(
                "prompt",
                format!(
                    "token id {id} is outside the vocabulary ({} ids)",
                    shared.vocab_size
                ),
            ));
        }
        let used = (prompt.len() + added) as u64;
        let room = shared
            .max_positions
            .map(|max| (max as u64).saturating_sub(used));
        if room == Some(0) {
            return Err(ApiError::invalid(
                "prompt",
                format!(
                    "the prompt is {} tokens{}: the model's context ({} positions) leaves no room \
                     for a new token",
                    prompt.len(),
                    adapter_note(added, &model),
                    shared.max_positions.unwrap_or_default()
                ),
            )
            .with_code("context_length_exceeded"));
        }
        let default_max = match kind {
            Kind::Completion => 16,
            Kind::Chat => room.unwrap_or(1024),
        };
        let max_tokens = sampling
            .max_tokens
            .unwrap_or(default_max.min(room.unwrap_or(u64::MAX)));
        if max_tokens == 0 {
            return Err(ApiError::invalid("max_tokens", "must be at least 1"));
        }
        if let Some(room) = room
            && max_tokens > room
        {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "{max_tokens} new tokens after a prompt of {} tokens{} exceed the model's \
                     context of {} positions (at most {room})",
                    prompt.len(),
                    adapter_note(added, &model),
                    shared.max_positions.unwrap_or_default()
                ),
            )
            .with_code("context_length_exceeded"));
        }
        if room.is_none() && max_tokens > MAX_TOKENS_WITHOUT_CONTEXT {
            return Err(ApiError::invalid(
                "max_tokens",
                format!("at most {MAX_TOKENS_WITHOUT_CONTEXT}, found {max_tokens}"),
            ));
        }
        let temperature = sampling.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                "temperature",
                format!("must be in [0, 2] (0 decodes greedily), found {temperature}"),
            ));
        }
        if let Some(top_p) = sampling.top_p
            && !(top_p > 0.0 && top_p <= 1.0)
        {
            return Err(ApiError::invalid(
                "top_p",
                format!("must be in (0, 1], found {top_p}"),
            ));
        }
        let stops = sampling
            .stop
            .map(api::StopInput::into_vec)
            .unwrap_or_default();
        if stops.len() > 4 {
            return Err(ApiError::invalid(
                "stop",
                format!("at most 4 stop strings, found {}", stops.len()),
            ));
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        // A sampled request without a seed gets one of its own.
        let seed = sampling.seed.unwrap_or_else(|| {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            nanos ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        });
        let config = GenerationConfig::new()
            .with_max_new_tokens(max_tokens as usize)
            .with_do_sample(temperature > 0.0)
            .with_temperature(if temperature > 0.0 { temperature } else { 1.0 })
            .with_top_p(sampling.top_p)
            .with_seed(seed)
            .with_eos_token_ids(shared.eos_token_ids.to_vec());
        let prompt_tokens = prompt.len();
        let (updates_tx, updates) = mpsc::unbounded_channel();
        let (admitted_tx, admitted) = oneshot::channel();
        let submission = Submission {
            request: Request {
                id,
                prompt,
                adapter,
                config,
            },
            updates: updates_tx,
            admitted: admitted_tx,
        };
        let full = || {
            shared.requests_rejected.fetch_add(1, Ordering::Relaxed);
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "the server's queue is full: retry later",
            )
            .with_code("queue_full")
        };
        match shared.submissions.try_send(submission) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(full()),
            Err(TrySendError::Disconnected(_)) => return Err(engine_gone()),
        }
        match admitted.await {
            Ok(Ok(())) => {}
            Ok(Err(EngineError::QueueFull { .. })) => return Err(full()),
            Ok(Err(EngineError::Invalid { source, .. })) => {
                return Err(ApiError::invalid("prompt", source.to_string()));
            }
            Ok(Err(error @ EngineError::Unservable { .. })) => {
                return Err(
                    ApiError::invalid("model", error.to_string()).with_code("adapter_unusable")
                );
            }
            Err(_) => return Err(engine_gone()),
        }
        let prefix = match kind {
            Kind::Completion => "cmpl",
            Kind::Chat => "chatcmpl",
        };
        Ok(Self {
            kind,
            id: format!("{prefix}-{id}"),
            model,
            created: now(),
            prompt_tokens,
            updates,
            text: TextStream::new(
                shared.tokenizer.clone(),
                shared.eos_token_ids.clone(),
                stops,
            ),
        })
    }

    /// The whole answer, or its stream of events.
    async fn respond(self, stream: bool) -> Response {
        if stream {
            self.stream().into_response()
        } else {
            self.collect().await
        }
    }

    /// The next piece of text; `Err` when the engine failed.
    async fn next(&mut self) -> Result<String, ApiError> {
        match self.updates.recv().await {
            Some(Update::Token(token)) => Ok(self.text.push(token)),
            Some(Update::Done) => Ok(self.text.finish_length()),
            Some(Update::Failed(message)) => Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                format!("the engine failed while decoding this request: {message}"),
            )),
            None => Err(engine_gone()),
        }
    }

    async fn collect(mut self) -> Response {
        let mut content = String::new();
        while self.text.finished().is_none() {
            match self.next().await {
                Ok(piece) => content.push_str(&piece),
                Err(e) => return e.into_response(),
            }
        }
        let finish = self.text.finished().map(FinishReason::as_str);
        let choice = match self.kind {
            Kind::Completion => json!({
                "index": 0, "text": content, "logprobs": null, "finish_reason": finish,
            }),
            Kind::Chat => json!({
                "index": 0, "message": {"role": "assistant", "content": content},
                "logprobs": null, "finish_reason": finish,
            }),
        };
        let object = match self.kind {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion",
        };
        axum::Json(json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": [choice], "usage": self.usage(),
        }))
        .into_response()
    }

    fn usage(&self) -> Value {
        let completion = self.text.generated();
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }

    /// A chunk of the stream with `delta` text (and, at the end, why and the usage).
    fn chunk(&self, delta: &str, finish: Option<FinishReason>, first: bool) -> Value {
        let finish = finish.map(FinishReason::as_str);
        let mut chunk = match self.kind {
            Kind::Completion => json!({
                "id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "text": delta, "logprobs": null, "finish_reason": finish}],
            }),
            Kind::Chat => {
                let delta = match (first, delta.is_empty()) {
                    (true, _) => json!({"role": "assistant", "content": delta}),
                    (false, true) => json!({}),
                    (false, false) => json!({"content": delta}),
                };
                json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
                })
            }
        };
        if finish.is_some() {
            chunk["usage"] = self.usage();
        }
        chunk
    }

    /// Server-sent events: a chunk per piece of text, the last with `finish_reason` and `usage`,
    /// then `[DONE]`. Dropping the stream (the client went away) cancels the request.
    fn stream(
        self,
    ) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
        struct Streaming {
            job: Job,
            pending: std::collections::VecDeque<SseEvent>,
            first: bool,
            ended: bool,
        }
        let state = Streaming {
            job: self,
            pending: std::collections::VecDeque::new(),
            first: true,
            ended: false,
        };
        let events = stream::unfold(state, |mut s| async move {
            loop {
                if let Some(event) = s.pending.pop_front() {
                    return Some((Ok(event), s));
                }
                if s.ended {
                    return None;
                }
                match s.job.next().await {
                    Ok(piece) => {
                        let finish = s.job.text.finished();
                        if !piece.is_empty() || s.first || finish.is_some() {
                            let chunk = s.job.chunk(&piece, finish, s.first);
                            s.first = false;
                            s.pending
                                .push_back(SseEvent::default().data(chunk.to_string()));
                        }
                        if finish.is_some() {
                            s.pending.push_back(SseEvent::default().data("[DONE]"));
                            s.ended = true;
                        }
                    }
                    Err(error) => {
                        s.pending
                            .push_back(SseEvent::default().data(error.body().to_string()));
                        s.pending.push_back(SseEvent::default().data("[DONE]"));
                        s.ended = true;
                    }
                }
            }
        });
        Sse::new(events)
    }
}

fn adapter_note(added: usize, model: &str) -> String {
    if added == 0 {
        String::new()
    } else {
        format!(" (and {added} positions of adapter {model:?})")
    }
}

fn engine_gone() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "the engine is not running",
    )
}

async fn adapter(shared: &Arc<Shared>, name: &str) -> Result<Arc<peft::AutoAdapter>, ApiError> {
    let not_found = |reason: String| {
        ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", reason)
            .with_param("model")
            .with_code("model_not_found")
    };
    if shared.store.is_none() {
        return Err(not_found(format!(
            "the model {name:?} does not exist: this server serves {:?} without adapters",
            shared.base_name
        )));
    }
    // Reading an adapter's files blocks: off the async threads.
    let shared_for_read = shared.clone();
    let name_owned = name.to_string();
    let read = tokio::task::spawn_blocking(move || {
        let store = shared_for_read.store.as_ref().expect("checked above");
        lock(store).get(&name_owned)
    })
    .await;
    match read {
        Ok(Ok(adapter)) => Ok(adapter),
        // Which of these it was (and where the server looked) is not the client's business.
        Ok(Err(
            StoreError::BadName { .. } | StoreError::NotFound { .. } | StoreError::Outside { .. },
        )) => Err(not_found(format!(
            "the model {name:?} does not exist: GET /v1/models lists the base and the adapters"
        ))),
        Ok(Err(error)) => {
            Err(ApiError::invalid("model", error.to_string()).with_code("adapter_unusable"))
        }
        Err(_) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("reading adapter {name:?} failed"),
        )),
    }
}
