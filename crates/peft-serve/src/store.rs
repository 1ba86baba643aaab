//! Adapters by name: the subdirectories of one folder, read on first use for the served base and
//! kept in a bounded LRU.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::prelude::*;
use peft::AutoAdapter;
use peft::core::adapter_config::{ADAPTER_CONFIG, AdapterError};
use peft::core::{Adapter, BaseShape};

/// Why an adapter cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The name is not a plain directory name (empty, `.`-prefixed, with a separator).
    #[error("adapter {name:?}: not an adapter name (a subdirectory of the adapters folder)")]
    BadName {
        /// The name asked for.
        name: String,
    },
    /// No such adapter in the folder.
    #[error("adapter {name:?}: no {} in {}", ADAPTER_CONFIG, .dir.display())]
    NotFound {
        /// The name asked for.
        name: String,
        /// Where it was looked for.
        dir: PathBuf,
    },
    /// The name leads outside the adapters folder (a link).
    #[error("adapter {name:?}: {} leads outside {}", .path.display(), .root.display())]
    Outside {
        /// The name asked for.
        name: String,
        /// The adapter's path.
        path: PathBuf,
        /// The adapters folder.
        root: PathBuf,
    },
    /// The adapter's files cannot be used with this base (another model, malformed files).
    #[error("adapter {name:?}: {source}")]
    Adapter {
        /// The name asked for.
        name: String,
        /// What is wrong, naming the file and key or tensor.
        source: Box<AdapterError>,
    },
}

/// The adapters of one folder for one base model.
pub struct AdapterStore {
    root: PathBuf,
    base: BaseShape,
    device: Device,
    max_loaded: usize,
    /// Loaded adapters, least recently used first.
    loaded: VecDeque<(String, Arc<AutoAdapter>)>,
}

impl AdapterStore {
    /// The adapters under `root` for a base of shape `base` on `device`, at most `max_loaded`
    /// (at least 1) kept in memory.
    pub fn new(root: &Path, base: BaseShape, device: &Device, max_loaded: usize) -> Self {
        Self {
            root: root.to_path_buf(),
            base,
            device: device.clone(),
            max_loaded: max_loaded.max(1),
            loaded: VecDeque::new(),
        }
    }

    /// The names of the subdirectories that hold an `adapter_config.json`, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join(ADAPTER_CONFIG).is_file())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| valid_name(n))
            .collect();
        names.sort();
        names
    }

    /// Adapters in memory now.
    pub fn loaded(&self) -> usize {
        self.loaded.len()
    }

    /// The adapter `name`, in its inference form, read on first use (the least recently used
    /// one leaves when more than `max_loaded` are held; rows running with it keep their copy).
    ///
    /// # Errors
    ///
    /// A name that is not a subdirectory's, that leads outside the folder, an adapter for another
    /// base or with malformed files.
    pub fn get(&mut self, name: &str) -> Result<Arc<AutoAdapter>, StoreError> {
        if let Some(at) = self.loaded.iter().position(|(n, _)| n == name) {
            let entry = self.loaded.remove(at).expect("found above");
            let adapter = entry.1.clone();
            self.loaded.push_back(entry);
            return Ok(adapter);
        }
        if !valid_name(name) {
            return Err(StoreError::BadName { name: name.into() });
        }
        let dir = self.root.join(name);
        if !dir.join(ADAPTER_CONFIG).is_file() {
            return Err(StoreError::NotFound {
                name: name.into(),
                dir: self.root.clone(),
            });
        }
        // A link may point anywhere: what it resolves to must still be inside the folder.
        let (real, root) = (dir.canonicalize(), self.root.canonicalize());
        match (real, root) {
            (Ok(real), Ok(root)) if real.starts_with(&root) => {}
            _ => {
                return Err(StoreError::Outside {
                    name: name.into(),
                    path: dir,
                    root: self.root.clone(),
                });
            }
        }
        let adapter = AutoAdapter::read(&dir, &self.base, &self.device).map_err(|source| {
            StoreError::Adapter {
                name: name.into(),
                source: Box::new(source),
            }
        })?;
        let adapter = Arc::new(adapter.into_inference());
        self.loaded.push_back((name.to_string(), adapter.clone()));
        while self.loaded.len() > self.max_loaded {
            self.loaded.pop_front();
        }
        Ok(adapter)
    }
}

/// One plain path component: no separator, not `.`/`..` or hidden, not empty.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0'])
        && Path::new(name).components().count() == 1
}
