//! `peft serve`: the model of `--model` and the adapters of `--adapters` behind an
//! OpenAI-compatible HTTP API (peft-serve's server), until Ctrl-C.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use burn::prelude::*;
use clap::Args;
use peft_serve::http::{ServeError, ServeOptions, Server};

use crate::cli::{CliError, Dtype};

/// `peft serve`'s flags.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Hugging Face model directory (with tokenizer.json), a GGUF file, or a Hub id in the local cache.
    #[arg(long)]
    pub model: PathBuf,
    /// Folder of adapters: each subdirectory with an adapter_config.json is served under its
    /// name. Without it, the base only.
    #[arg(long)]
    pub adapters: Option<PathBuf>,
    /// The base's name in requests and /v1/models (default: the model folder's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* (also read from PEFT_API_KEY).
    #[arg(long, env = "PEFT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Rows decoded together in one batch.
    #[arg(long, default_value_t = 16)]
    pub max_batch_size: usize,
    /// Requests waiting for a row; more are answered 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Adapters held in memory (least recently used leave first).
    #[arg(long, default_value_t = 64)]
    pub max_loaded_adapters: usize,
    /// Largest request body in bytes (413 above).
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Compute dtype of the base model.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Dtype,
}

fn flag_of_option(field: &str) -> &'static str {
    match field {
        "max_batch_size" => "--max-batch-size",
        "max_queue" => "--max-queue",
        "max_loaded_adapters" => "--max-loaded-adapters",
        "max_body_bytes" => "--max-body-bytes",
        _ => "--adapters",
    }
}

/// Serves until Ctrl-C (or SIGTERM); prints the address once listening.
pub fn serve(args: &ServeArgs, device: &Device, out: &mut dyn Write) -> Result<(), CliError> {
    let options = ServeOptions {
        adapters: args.adapters.clone(),
        served_model_name: args.served_model_name.clone(),
        api_key: args.api_key.clone(),
        max_batch_size: args.max_batch_size,
        max_queue: args.max_queue,
        max_loaded_adapters: args.max_loaded_adapters,
        max_body_bytes: args.max_body_bytes,
        dtype: args.dtype.into(),
    };
    let server = Server::load(&args.model, options, device).map_err(|e| match e {
        ServeError::Model(e) => CliError::Model(e),
        ServeError::Option { field, message } => CliError::Argument {
            flag: flag_of_option(field),
            message,
        },
        ServeError::Io { path, source } => CliError::Io { path, source },
    })?;
    let io = |source| CliError::Io {
        path: "<network>".into(),
        source,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(io)?;
    let addr = SocketAddr::new(args.host, args.port);
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(addr))
        .map_err(|source| CliError::Argument {
            flag: "--port",
            message: format!("cannot listen on {addr}: {source}"),
        })?;
    let bound = listener.local_addr().map_err(io)?;
    let adapters = server.adapter_names();
    writeln!(
        out,
        "peft serve: {} with {} adapter(s) on http://{bound} (Ctrl-C stops)",
        server.base_name(),
        adapters.len()
    )
    .and_then(|_| out.flush())
    .map_err(|source| CliError::Io {
        path: "<stdout>".into(),
        source,
    })?;
    runtime
        .block_on(server.serve(listener, shutdown_signal()))
        .map_err(io)
}

async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}
