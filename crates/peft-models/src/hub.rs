//! Hugging Face Hub ids (`ORG/NAME[@REVISION]`) resolved in the local Hub cache, laid out as
//! `huggingface_hub` writes it: `models--ORG--NAME/refs/REVISION` holds a commit, whose files are
//! under `snapshots/COMMIT/` (links into `blobs/`).
//!
//! Written here rather than taken from the `hf-hub` crate: its 1.0 pulls reqwest and tokio into
//! every build for what is, offline, reading one small file and joining paths.

use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

/// A Hub model id with its revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    /// `ORG/NAME`.
    pub repo: String,
    /// A branch, tag or commit; `main` when not given.
    pub revision: String,
}

impl HubId {
    /// Parses `ORG/NAME` or `ORG/NAME@REVISION`; `None` for anything else (a path).
    pub fn parse(text: &str) -> Option<Self> {
        let (repo, revision) = match text.split_once('@') {
            Some((repo, revision)) => (repo, revision),
            None => (text, "main"),
        };
        let (org, name) = repo.split_once('/')?;
        let part = |s: &str| {
            !s.is_empty()
                && !s.starts_with(['.', '-'])
                && !s.contains("..")
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        let revision_ok = !revision.is_empty()
            && !revision.contains("..")
            && revision
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
        (part(org) && part(name) && revision_ok).then(|| Self {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }

    /// `models--ORG--NAME`, the repository's folder in the cache.
    pub fn cache_folder(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }
}

/// The Hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`, as
/// `huggingface_hub` chooses it.
pub fn hub_cache_dir() -> PathBuf {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var("HF_HUB_CACHE") {
        return dir;
    }
    if let Some(home) = var("HF_HOME") {
        return home.join("hub");
    }
    let home = var("HOME").unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("huggingface").join("hub")
}

/// Where a model argument points: an existing path as it is, else a Hub id's snapshot in the cache
/// `cache` (which must hold its `config.json`). Anything else is returned unchanged, for the
/// loader to report as a missing directory.
///
/// # Errors
///
/// A Hub id whose repository, revision or snapshot is not in the cache, naming the id, the
/// revision and the path searched.
pub fn resolve_model(arg: &Path, cache: &Path) -> Result<PathBuf> {
    if arg.exists() {
        return Ok(arg.to_path_buf());
    }
    let Some(id) = arg.to_str().and_then(HubId::parse) else {
        return Ok(arg.to_path_buf());
    };
    let repo_dir = cache.join(id.cache_folder());
    let not_cached = |searched: PathBuf, why: String| ModelError::NotInCache {
        id: id.repo.clone(),
        revision: id.revision.clone(),
        searched,
        why,
    };
    if !repo_dir.is_dir() {
        return Err(not_cached(repo_dir, "no such directory".into()));
    }
    let is_commit = id.revision.len() == 40 && id.revision.chars().all(|c| c.is_ascii_hexdigit());
    let commit = if is_commit {
        id.revision.clone()
    } else {
        let reference = repo_dir.join("refs").join(&id.revision);
        let text = std::fs::read_to_string(&reference).map_err(|e| {
            not_cached(
                reference.clone(),
                format!("the revision is not cached ({e})"),
            )
        })?;
        let commit = text.trim().to_string();
        if commit.len() != 40 || !commit.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(not_cached(
                reference,
                format!("holds {commit:?}, not a commit hash"),
            ));
        }
        commit
    };
    let snapshot = repo_dir.join("snapshots").join(&commit);
    if !snapshot.join("config.json").is_file() {
        return Err(not_cached(
            snapshot,
            "the snapshot has no config.json".into(),
        ));
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_and_paths_do_not() {
        assert_eq!(
            HubId::parse("Qwen/Qwen2.5-0.5B-Instruct"),
            Some(HubId {
                repo: "Qwen/Qwen2.5-0.5B-Instruct".into(),
                revision: "main".into()
            })
        );
        assert_eq!(
            HubId::parse("meta-llama/Llama-3.2-1B@refs/pr/3")
                .unwrap()
                .revision,
            "refs/pr/3"
        );
        // `ORG/NAME` is also a relative path: `resolve_model` tries the path first.
        for path in ["./a/b", "/abs/x", "a/b/c", "../x/y", "a/..", "org/", "a/b@"] {
            assert_eq!(HubId::parse(path), None, "{path}");
        }
        assert_eq!(
            HubId::parse("Qwen/Qwen3-0.6B").unwrap().cache_folder(),
            "models--Qwen--Qwen3-0.6B"
        );
    }
}
