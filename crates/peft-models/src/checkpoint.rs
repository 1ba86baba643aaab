//! Reading Hugging Face safetensors checkpoints (single file or sharded) into burn tensors.
//!
//! Models build themselves from a [`Checkpoint`] by asking for each tensor under its Hugging
//! Face name and PyTorch shape, in the candle `VarBuilder` style: a missing tensor, a shape that
//! disagrees with `config.json`, an unsupported dtype, or a tensor nothing asked for is a typed
//! error naming the file and the tensor. Files are memory-mapped; F32, F16 and BF16 data is
//! converted to the compute dtype as it is copied to the device.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::{DType, TensorCreationOptions};
use memmap2::Mmap;
use peft_core::adapter_file::{describe_safetensors_error, first_non_finite, float_dtype};
use safetensors::{Dtype, SafeTensors};

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::gguf_model::{gguf_tensor_name, unpermute_rows};
use crate::hf_config::ConfigError;

/// File name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of the index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
    /// In a GGUF checkpoint: the tensor's llama.cpp name, and the heads of a q/k projection
    /// whose rows llama.cpp permuted.
    gguf: Option<(String, Option<usize>)>,
}

/// An opened checkpoint: the tensors of one or more safetensors files, or of a GGUF file, by
/// Hugging Face name.
pub struct Checkpoint {
    files: Vec<(PathBuf, Mmap, usize)>,
    gguf: Option<GgufFile>,
    entries: BTreeMap<String, Entry>,
    used: HashSet<String>,
    device: Device,
    dtype: DType,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field(
                "files",
                &self.files.iter().map(|f| &f.0).collect::<Vec<_>>(),
            )
            .field("tensors", &self.entries.len())
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl Checkpoint {
    /// Opens the checkpoint of a model directory: `model.safetensors`, or the shards listed by
    /// `model.safetensors.index.json`. Tensors will be created on `device` in `dtype`
    /// (F32, F16 or BF16).
    pub fn open_dir(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        for path in [&single, &index] {
            check_not_a_directory(path)?;
        }
        if single.is_file() {
            Self::open_files(&[single], device, dtype)
        } else if index.is_file() {
            let shards = read_index(&index)?;
            Self::open_files(&shards, device, dtype)
        } else {
            Err(ModelError::MissingFile {
                path: single,
                what: "the weights (model.safetensors or model.safetensors.index.json)",
            })
        }
    }

    /// Opens the given safetensors files as one checkpoint.
    pub fn open_files(paths: &[PathBuf], device: &Device, dtype: DType) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut entries = BTreeMap::new();
        for (index, path) in paths.iter().enumerate() {
            check_not_a_directory(path)?;
            let file = File::open(path).map_err(|source| {
                if source.kind() == std::io::ErrorKind::NotFound {
                    ModelError::MissingFile {
                        path: path.clone(),
                        what: "a checkpoint shard",
                    }
                } else {
                    ModelError::Io {
                        path: path.clone(),
                        source,
                    }
                }
            })?;
            // SAFETY: the map is read-only and lives as long as the checkpoint; a concurrent
            // writer truncating the file is outside what any loader can defend against.
            let map = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io {
                path: path.clone(),
                source,
            })?;
            let (header, metadata) =
                SafeTensors::read_metadata(&map).map_err(|e| ModelError::Safetensors {
                    path: path.clone(),
                    message: describe_safetensors_error(&map, &e),
                })?;
            let data_start = 8 + header;
            for (name, info) in metadata.tensors() {
                entries.insert(
                    name,
                    Entry {
                        file: index,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: data_start + info.data_offsets.0,
                        end: data_start + info.data_offsets.1,
                        gguf: None,
                    },
                );
            }
            files.push((path.clone(), map, data_start));
        }
        Ok(Self {
            files,
            gguf: None,
            entries,
            used: HashSet::new(),
            device: device.clone(),
            dtype,
        })
    }

    /// A checkpoint over the tensors of a GGUF file: `names` lists, for each tensor, its
    /// Hugging Face name, its llama.cpp name and, for a q/k projection llama.cpp permuted, the
    /// heads to undo the permutation over (see `gguf_model`). Tensors are dequantized to f32
    /// when asked for, then converted to `dtype`.
    pub fn from_gguf(
        file: GgufFile,
        names: Vec<(String, String, Option<usize>)>,
        device: &Device,
        dtype: DType,
    ) -> Self {
        let entries = names
            .into_iter()
            .filter_map(|(hf, gguf, heads)| {
                let shape = file.tensor(&gguf)?.shape.clone();
                let entry = Entry {
                    file: 0,
                    dtype: Dtype::F32,
                    shape,
                    start: 0,
                    end: 0,
                    gguf: Some((gguf, heads)),
                };
                Some((hf, entry))
            })
            .collect();
        Self {
            files: Vec::new(),
            gguf: Some(file),
            entries,
            used: HashSet::new(),
            device: device.clone(),
            dtype,
        }
    }

    /// The device tensors are created on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Where errors about a tensor should point: its file, or the first file when it is missing.
    fn path_of(&self, name: &str) -> PathBuf {
        if let Some(gguf) = &self.gguf {
            return gguf.path().to_path_buf();
        }
        let file = self.entries.get(name).map_or(0, |e| e.file);
        self.files
            .get(file)
            .map_or_else(|| PathBuf::from(SINGLE_FILE), |f| f.0.clone())
    }

    /// Marks a tensor as consumed without loading it (e.g. a tied `lm_head.weight`).
    pub fn skip(&mut self, name: &str) {
        self.used.insert(name.to_string());
    }

    /// Raw bytes and dtype of `name`, after checking its shape is `expected` (PyTorch layout).
    fn raw(&mut self, name: &str, expected: &[usize]) -> Result<(Vec<u8>, DType)> {
        if let Some(file) = &self.gguf {
            let bytes = gguf_raw(file, self.entries.get(name), name, expected)?;
            self.used.insert(name.to_string());
            return Ok((bytes, DType::F32));
        }
        let Some(entry) = self.entries.get(name) else {
            return Err(ModelError::MissingTensor {
                path: self.path_of(name),
                name: name.to_string(),
            });
        };
        let path = || self.files[entry.file].0.clone();
        if entry.shape != expected {
            return Err(ModelError::ShapeMismatch {
                path: path(),
                name: name.to_string(),
                expected: expected.to_vec(),
                found: entry.shape.clone(),
            });
        }
        let dtype = float_dtype(entry.dtype).ok_or_else(|| ModelError::UnsupportedDtype {
            path: path(),
            name: name.to_string(),
            dtype: format!("{:?}", entry.dtype),
        })?;
        let bytes = self.files[entry.file].1[entry.start..entry.end].to_vec();
        if let Some(index) = first_non_finite(&bytes, dtype) {
            return Err(ModelError::NonFinite {
                path: path(),
                name: name.to_string(),
                index,
            });
        }
        self.used.insert(name.to_string());
        Ok((bytes, dtype))
    }

    /// Loads `name`, which must have shape `shape`, in the compute dtype.
    pub fn tensor<const D: usize>(&mut self, name: &str, shape: [usize; D]) -> Result<Tensor<D>> {
        let (bytes, dtype) = self.raw(name, &shape)?;
        Ok(self.upload(bytes, shape.to_vec(), dtype))
    }

    /// Loads a PyTorch `nn.Linear` weight `[out, in]` as burn's `[in, out]`.
    pub fn linear_weight(&mut self, name: &str, out: usize, input: usize) -> Result<Tensor<2>> {
        let (bytes, dtype) = self.raw(name, &[out, input])?;
        let transposed = transpose_bytes(&bytes, out, input, dtype.size());
        Ok(self.upload(transposed, vec![input, out], dtype))
    }

    fn upload<const D: usize>(&self, bytes: Vec<u8>, shape: Vec<usize>, dtype: DType) -> Tensor<D> {
        let data = TensorData::from_bytes_vec(bytes, shape, dtype);
        Tensor::from_data(
            data,
            TensorCreationOptions::new(self.device.clone()).with_dtype(self.dtype),
        )
    }

    /// Succeeds when every tensor of the checkpoint was consumed; otherwise names the first
    /// (in name order) that nothing asked for.
    pub fn finish(self) -> Result<()> {
        match self.entries.keys().find(|name| !self.used.contains(*name)) {
            None => Ok(()),
            Some(name) if self.gguf.is_some() => Err(ModelError::Gguf {
                path: self.path_of(name),
                message: format!(
                    "tensor {:?} ({name}) is not part of the model its metadata describes",
                    self.entries[name]
                        .gguf
                        .as_ref()
                        .map_or("?", |g| g.0.as_str())
                ),
            }),
            Some(name) => Err(ModelError::UnexpectedTensor {
                path: self.path_of(name),
                name: name.clone(),
            }),
        }
    }
}

/// The f32 bytes of GGUF tensor `entry` (Hugging Face `name`), dequantized, its q/k rows put
/// back in Hugging Face's order, after checking it has shape `expected`.
fn gguf_raw(
    file: &GgufFile,
    entry: Option<&Entry>,
    name: &str,
    expected: &[usize],
) -> Result<Vec<u8>> {
    let error = |message: String| ModelError::Gguf {
        path: file.path().to_path_buf(),
        message,
    };
    let gguf_name = gguf_tensor_name(name).unwrap_or_else(|| name.to_string());
    let Some((entry, Some((gguf, heads)))) = entry.map(|e| (e, e.gguf.as_ref())) else {
        return Err(error(format!(
            "tensor {gguf_name:?} ({name}) is missing: the metadata's sizes call for it"
        )));
    };
    if entry.shape != expected {
        return Err(error(format!(
            "tensor {gguf:?} ({name}) has shape {:?} (outermost first); the metadata's sizes \
             make it {expected:?}",
            entry.shape
        )));
    }
    let mut values = file.dequantize(gguf)?;
    if let Some(heads) = *heads {
        let cols = expected.get(1).copied().unwrap_or(1);
        values = unpermute_rows(&values, heads, cols).ok_or_else(|| {
            error(format!(
                "tensor {gguf:?} ({name}): {} rows do not split into {heads} heads of two \
                 RoPE halves",
                expected[0]
            ))
        })?;
    }
    Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// Shard files named by a `model.safetensors.index.json` (beside it), each once, sorted; a name
/// that would leave the model directory (absolute, `..`) or an empty `weight_map` is refused,
/// naming the key.
///
/// # Errors
///
/// An unreadable or malformed index, or a shard name it must not hold.
pub fn read_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|source| ModelError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| ConfigError::Json {
            path: index.to_path_buf(),
            source,
        })?;
    let Some(map) = value.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(ConfigError::MissingKey {
            path: index.to_path_buf(),
            key: "weight_map".into(),
        }
        .into());
    };
    if map.is_empty() {
        return Err(ConfigError::InvalidValue {
            path: index.to_path_buf(),
            key: "weight_map".into(),
            message: "is empty: it must name the shard of every tensor".into(),
        }
        .into());
    }
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<PathBuf> = Vec::new();
    for (tensor, file) in map {
        let invalid = |message: &str| -> ModelError {
            ConfigError::InvalidValue {
                path: index.to_path_buf(),
                key: format!("weight_map.{tensor}"),
                message: message.into(),
            }
            .into()
        };
        let Some(file) = file.as_str() else {
            return Err(invalid("must be a file name"));
        };
        // A shard is a file of the model directory: an absolute path or `..` would read
        // whatever the index points at.
        let relative = Path::new(file);
        if file.is_empty()
            || !relative
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        {
            return Err(invalid(&format!(
                "{file:?} must be a file name inside the model directory"
            )));
        }
        let path = dir.join(file);
        if !shards.contains(&path) {
            shards.push(path);
        }
    }
    shards.sort();
    Ok(shards)
}

/// A directory (or a symbolic-link loop) where a weights file belongs says so, instead of "not found".
fn check_not_a_directory(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Err(ModelError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other("is a directory, expected a safetensors file"),
        }),
        Err(source) if source.kind() != std::io::ErrorKind::NotFound => Err(ModelError::Io {
            path: path.to_path_buf(),
            source,
        }),
        _ => Ok(()),
    }
}

/// Transposes a row-major `[rows, cols]` matrix of `elem`-byte elements.
fn transpose_bytes(bytes: &[u8], rows: usize, cols: usize, elem: usize) -> Vec<u8> {
    let mut out = vec![0u8; bytes.len()];
    for r in 0..rows {
        for c in 0..cols {
            let src = (r * cols + c) * elem;
            let dst = (c * rows + r) * elem;
            out[dst..dst + elem].copy_from_slice(&bytes[src..src + elem]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_moves_whole_elements() {
        // [[1, 2, 3], [4, 5, 6]] as u16 -> [[1, 4], [2, 5], [3, 6]]
        let m: Vec<u8> = [1u16, 2, 3, 4, 5, 6]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let t = transpose_bytes(&m, 2, 3, 2);
        let back: Vec<u16> = t
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(back, vec![1, 4, 2, 5, 3, 6]);
    }
}
