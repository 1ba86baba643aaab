//! `--model ORG/NAME[@REVISION]`: a Hub id found in the local Hugging Face cache, or downloaded
//! into it with the `hf-hub` crate (progress bars on stderr), the way `huggingface_hub` fills it.
//!
//! Environment, as `huggingface_hub` reads it: `HF_HUB_CACHE` / `HF_HOME` (the cache),
//! `HF_HUB_OFFLINE=1` (never download), `HF_TOKEN` (else the `token` file beside the cache),
//! `HF_ENDPOINT` (another Hub, or a mirror).

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use peft_models::checkpoint::read_index;
use peft_models::{HubId, ModelError, resolve_model};

use crate::cli::CliError;

/// The files of a model repository a command reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFiles {
    /// `config.json` only (`info`, `export`).
    Config,
    /// Config, weights (one file or an index and its shards), tokenizer, generation config and
    /// chat template, where the repository has them.
    Everything,
}

/// Files beside the config and weights that a model directory may hold and we read.
const OPTIONAL: [&str; 5] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        matches!(
            v.trim(),
            "1" | "ON" | "YES" | "TRUE" | "on" | "yes" | "true"
        )
    })
}

/// Where `--model` points: an existing path, else a Hub id's snapshot in `cache` (downloading the
/// `files` it lacks unless offline). The id is returned beside the path when there was one.
///
/// # Errors
///
/// An id not cached while offline, or that cannot be downloaded (unreachable Hub, unknown
/// repository or revision, no token for a gated model), naming the id, the revision and the
/// cache path.
pub fn resolve(
    model: &Path,
    cache: &Path,
    files: ModelFiles,
) -> Result<(PathBuf, Option<HubId>), CliError> {
    let id = (!model.exists())
        .then(|| model.to_str().and_then(HubId::parse))
        .flatten();
    match resolve_model(model, cache) {
        Ok(path) if id.is_none() => Ok((path, None)),
        // Cached: complete it if the command needs more than the config.
        Ok(path) => {
            let id = id.expect("checked above");
            if files == ModelFiles::Everything && !has_weights(&path) && !offline() {
                return Ok((download(&id, cache, files)?, Some(id)));
            }
            Ok((path, Some(id)))
        }
        Err(ModelError::NotInCache { .. }) if !offline() => {
            let id = id.expect("only a Hub id is looked up in the cache");
            Ok((download(&id, cache, files)?, Some(id)))
        }
        Err(ModelError::NotInCache {
            id,
            revision,
            searched,
            why,
        }) => Err(ModelError::NotInCache {
            id,
            revision,
            searched,
            why: format!("{why} (HF_HUB_OFFLINE is set: nothing is downloaded)"),
        }
        .into()),
        Err(other) => Err(other.into()),
    }
}

fn has_weights(dir: &Path) -> bool {
    dir.join("model.safetensors").is_file() || dir.join("model.safetensors.index.json").is_file()
}

/// Downloads `files` of `id` into `cache` and returns the snapshot directory.
fn download(id: &HubId, cache: &Path, files: ModelFiles) -> Result<PathBuf, CliError> {
    let failed = |why: String| CliError::Download {
        id: id.repo.clone(),
        revision: id.revision.clone(),
        cache: cache.join(id.cache_folder()),
        why,
    };
    let token = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
        .or_else(|| Cache::new(cache.to_path_buf()).token());
    let mut builder = ApiBuilder::from_cache(Cache::new(cache.to_path_buf()))
        .with_progress(true)
        .with_token(token);
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
    }
    let api = builder.build().map_err(|e| failed(e.to_string()))?;
    let repo = api.repo(Repo::with_revision(
        id.repo.clone(),
        RepoType::Model,
        id.revision.clone(),
    ));
    let listed: Vec<String> = repo
        .info()
        .map_err(|e| failed(format!("listing the repository: {e}")))?
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .collect();
    let has = |name: &str| listed.iter().any(|f| f == name);
    if !has("config.json") {
        return Err(failed("the repository has no config.json".into()));
    }
    let get = |name: &str| -> Result<PathBuf, CliError> {
        repo.get(name)
            .map_err(|e| failed(format!("downloading {name}: {e}")))
    };
    let config = get("config.json")?;
    if files == ModelFiles::Everything {
        for name in OPTIONAL.into_iter().filter(|n| has(n)) {
            get(name)?;
        }
        if has("model.safetensors.index.json") {
            let index = get("model.safetensors.index.json")?;
            // The loader's own reading of the index (the same refusals), as names in the repo.
            let snapshot = index
                .parent()
                .expect("a downloaded file lies in its snapshot");
            for shard in read_index(&index).map_err(|e| failed(e.to_string()))? {
                let name = shard
                    .strip_prefix(snapshot)
                    .expect("shards lie beside their index");
                get(&name.to_string_lossy())?;
            }
        } else if has("model.safetensors") {
            get("model.safetensors")?;
        } else {
            return Err(failed(
                "the repository has no safetensors weights (model.safetensors or an index)".into(),
            ));
        }
    }
    Ok(config
        .parent()
        .expect("a downloaded file lies in its snapshot")
        .to_path_buf())
}
