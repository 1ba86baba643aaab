//! PEFT's inference file for prompt-learning methods: `adapter_model.safetensors` holding one F32
//! tensor `prompt_embeddings` (metadata `{"format": "pt"}`), and atomic file writing.
//!
//! `prompt_embeddings` is the encoder's output: `[num_virtual_tokens, hidden]` for methods that
//! prepend virtual tokens, `[num_virtual_tokens, layers * 2 * token_dim]` for methods that give
//! every layer prefix key/values.

use std::io::Write;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::DType;

/// File name PEFT uses for adapter weights.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// Our trainable checkpoint of a method whose prompt comes out of an encoder: the encoder's
/// weights under the names of PEFT's `prompt_encoder` state dict. PEFT ignores the file.
pub const ADAPTER_ENCODER: &str = "adapter_encoder.safetensors";
/// The tensor PEFT saves for prompt-learning methods.
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";

/// Why an adapter file cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum AdapterFileError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The system error.
        source: std::io::Error,
    },
    /// The file is not valid safetensors.
    #[error("{path}: invalid safetensors file: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The tensor is absent.
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The tensor looked for.
        name: String,
    },
    /// The tensor is stored in a dtype other than F32, F16 or BF16.
    #[error("{path}: tensor `{name}` has dtype {dtype}; expected F32 (F16 and BF16 are converted)")]
    Dtype {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// The dtype found.
        dtype: String,
    },
    /// The file holds a tensor the model has no place for.
    #[error("{path}: tensor `{name}` {why}")]
    UnexpectedTensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// Why it does not fit.
        why: String,
    },
    /// The tensor holds NaN or infinity.
    #[error("{path}: tensor `{name}` holds NaN or infinity (element {index})")]
    NonFinite {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// Flat index of the first such element.
        index: usize,
    },
    /// The tensor's shape does not fit the model and configuration.
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?} ({why})")]
    Shape {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// The shape the adapter and base model imply.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
        /// Where the expectation comes from.
        why: String,
    },
}

/// The burn dtype of a safetensors float dtype this workspace reads (F32, F16, BF16), else `None`.
pub fn float_dtype(dtype: safetensors::Dtype) -> Option<DType> {
    match dtype {
        safetensors::Dtype::F32 => Some(DType::F32),
        safetensors::Dtype::F16 => Some(DType::F16),
        safetensors::Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

/// The index of the first NaN or infinite element of little-endian `bytes` of `dtype`: weights
/// like that make every logit NaN, so they are refused on load (F32, F16 and BF16 only; a model
/// checkpoint and an adapter file are checked by it alike).
pub fn first_non_finite(bytes: &[u8], dtype: DType) -> Option<usize> {
    // Every element whose exponent bits are all ones is a NaN or an infinity.
    match dtype {
        DType::F32 => bytes.chunks_exact(4).position(|b| {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7f80_0000 == 0x7f80_0000
        }),
        DType::F16 => bytes
            .chunks_exact(2)
            .position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7c00 == 0x7c00),
        DType::BF16 => bytes
            .chunks_exact(2)
            .position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7f80 == 0x7f80),
        _ => None,
    }
}

/// An adapter safetensors file read into memory, whose tensors are taken out by name with their
/// shapes checked.
pub struct TensorFile {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl TensorFile {
    /// Reads `path` and checks it is a safetensors file.
    pub fn open(path: &Path) -> Result<Self, AdapterFileError> {
        let bytes = std::fs::read(path).map_err(|source| AdapterFileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let file = Self {
            path: path.to_path_buf(),
            bytes,
        };
        file.parse()?;
        Ok(file)
    }

    fn parse(&self) -> Result<safetensors::SafeTensors<'_>, AdapterFileError> {
        safetensors::SafeTensors::deserialize(&self.bytes).map_err(|e| {
            AdapterFileError::Safetensors {
                path: self.path.clone(),
                message: describe_safetensors_error(&self.bytes, &e),
            }
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names of the tensors held, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .parse()
            .map(|st| st.names().into_iter().map(str::to_string).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The tensor `name` as F32 data, checking its shape is `expected`; `why` says where `expected`
    /// comes from (for the error message).
    pub fn data(
        &self,
        name: &str,
        expected: &[usize],
        why: &str,
    ) -> Result<TensorData, AdapterFileError> {
        let st = self.parse()?;
        let view = st
            .tensor(name)
            .map_err(|_| AdapterFileError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })?;
        let dtype = float_dtype(view.dtype()).ok_or_else(|| AdapterFileError::Dtype {
            path: self.path.clone(),
            name: name.to_string(),
            dtype: format!("{:?}", view.dtype()),
        })?;
        if view.shape() != expected {
            return Err(AdapterFileError::Shape {
                path: self.path.clone(),
                name: name.to_string(),
                expected: expected.to_vec(),
                found: view.shape().to_vec(),
                why: why.to_string(),
            });
        }
        if let Some(index) = first_non_finite(view.data(), dtype) {
            return Err(AdapterFileError::NonFinite {
                path: self.path.clone(),
                name: name.to_string(),
                index,
            });
        }
        Ok(
            TensorData::from_bytes_vec(view.data().to_vec(), expected.to_vec(), dtype)
                .convert::<f32>(),
        )
    }

    /// Refuses a tensor other than `expected`: a file with more than the method writes was made
    /// for something else (and its extra tensors would be silently dropped).
    pub fn expect_only(&self, expected: &[&str], why: &str) -> Result<(), AdapterFileError> {
        match self
            .names()
            .into_iter()
            .find(|n| !expected.contains(&n.as_str()))
        {
            None => Ok(()),
            Some(name) => Err(AdapterFileError::UnexpectedTensor {
                path: self.path.clone(),
                name,
                why: why.to_string(),
            }),
        }
    }

    /// The tensor `name` on `device` as F32, checking its shape is `expected` (see
    /// [`TensorFile::data`]).
    pub fn tensor<const D: usize>(
        &self,
        name: &str,
        expected: [usize; D],
        why: &str,
        device: &Device,
    ) -> Result<Tensor<D>, AdapterFileError> {
        let data = self.data(name, &expected, why)?;
        Ok(Tensor::from_data(
            data,
            burn::tensor::TensorCreationOptions::new(device.clone()).with_dtype(DType::F32),
        ))
    }
}

/// A `Linear(d_in, d_out)` with bias read from PyTorch's `{prefix}.weight` `[d_out, d_in]` and
/// `{prefix}.bias` `[d_out]`.
pub fn read_linear(
    file: &TensorFile,
    prefix: &str,
    [d_in, d_out]: [usize; 2],
    why: &str,
    device: &Device,
) -> Result<burn::nn::Linear, AdapterFileError> {
    let weight: Tensor<2> = file.tensor(&format!("{prefix}.weight"), [d_out, d_in], why, device)?;
    let bias: Tensor<1> = file.tensor(&format!("{prefix}.bias"), [d_out], why, device)?;
    // Materialize the transpose: a strided weight would run other matmul kernels than a freshly
    // initialized one, and a resumed run would drift from an uninterrupted one in the last bits.
    let weight = Tensor::<2>::from_data(weight.transpose().into_data(), device);
    Ok(burn::nn::Linear {
        weight: burn::module::Param::from_tensor(weight),
        bias: Some(burn::module::Param::from_tensor(bias)),
    })
}

/// A `Linear`'s weights under PyTorch's names and layout: `{prefix}.weight` `[d_out, d_in]` and
/// `{prefix}.bias` (if any).
pub fn linear_tensors(prefix: &str, linear: &burn::nn::Linear) -> Vec<(String, TensorData)> {
    let mut out = vec![(
        format!("{prefix}.weight"),
        linear.weight.val().transpose().into_data(),
    )];
    if let Some(bias) = &linear.bias {
        out.push((format!("{prefix}.bias"), bias.val().into_data()));
    }
    out
}

/// Reads PEFT's inference tensor `prompt_embeddings` from `dir/adapter_model.safetensors` onto
/// `device` as F32, checking its shape is `expected`; `why` says where `expected` comes from (for
/// the error message).
pub fn read_prompt_embeddings(
    dir: &Path,
    expected: [usize; 2],
    why: &str,
    device: &Device,
) -> Result<Tensor<2>, AdapterFileError> {
    let file = TensorFile::open(&dir.join(ADAPTER_WEIGHTS))?;
    let embeddings = file.tensor(PROMPT_EMBEDDINGS, expected, why, device)?;
    file.expect_only(
        &[PROMPT_EMBEDDINGS],
        "is not part of a prompt-learning adapter (PEFT writes `prompt_embeddings` only)",
    )?;
    Ok(embeddings)
}

/// What is wrong with a safetensors file that failed to parse, in words a user can act on: the
/// `safetensors` crate says "incomplete metadata" for a truncated file and names no tensor when
/// one's shape disagrees with its bytes. Our own reading of the header (here only, to explain an
/// error the crate already found) says which.
pub fn describe_safetensors_error(bytes: &[u8], error: &safetensors::SafeTensorError) -> String {
    let fallback = error.to_string();
    let Some(prefix) = bytes.get(..8) else {
        return format!(
            "{fallback} (the file is {} bytes, shorter than the 8-byte header length)",
            bytes.len()
        );
    };
    let header_len = u64::from_le_bytes(prefix.try_into().unwrap_or([0; 8]));
    let available = bytes.len() as u64 - 8;
    if header_len > available {
        return format!(
            "{fallback}: the header says it is {header_len} bytes but only {available} follow \
             (a truncated or partly written file?)"
        );
    }
    let Ok(header) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(
        &bytes[8..8 + header_len as usize],
    ) else {
        return fallback;
    };
    let data_len = available - header_len;
    for (name, info) in &header {
        if name == "__metadata__" {
            continue;
        }
        let width = match info.get("dtype").and_then(|d| d.as_str()) {
            Some("F64" | "I64" | "U64") => 8,
            Some("F32" | "I32" | "U32") => 4,
            Some("F16" | "BF16" | "I16" | "U16") => 2,
            Some("I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2") => 1,
            _ => continue,
        };
        let shape: Option<Vec<u64>> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|dims| dims.iter().filter_map(|d| d.as_u64()).collect());
        let offsets: Option<Vec<u64>> = info
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .map(|o| o.iter().filter_map(|d| d.as_u64()).collect());
        let (Some(shape), Some(offsets)) = (shape, offsets) else {
            continue;
        };
        let [start, end] = offsets[..] else { continue };
        let needed = shape.iter().try_fold(width, |n: u64, &d| n.checked_mul(d));
        if needed != end.checked_sub(start) {
            return format!(
                "{fallback}: tensor `{name}` of shape {shape:?} needs {} bytes but its data_offsets \
                 [{start}, {end}] give {}",
                needed.map_or("more than 2^64".to_string(), |n| n.to_string()),
                end.saturating_sub(start)
            );
        }
        if end > data_len {
            return format!(
                "{fallback}: tensor `{name}` ends at byte {end} of the data, which has only \
                 {data_len} (a truncated file?)"
            );
        }
    }
    fallback
}

/// Writes `tensors` (name, data of any rank) as F32 to a safetensors file with PEFT's metadata
/// `{"format": "pt"}`, atomically.
pub fn write_tensors(
    path: &Path,
    tensors: Vec<(&str, TensorData)>,
) -> Result<(), AdapterFileError> {
    let f32_data: Vec<(&str, TensorData)> = tensors
        .into_iter()
        .map(|(name, data)| (name, data.convert::<f32>()))
        .collect();
    let invalid = |e: safetensors::SafeTensorError| AdapterFileError::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let views = f32_data
        .iter()
        .map(|(name, data)| {
            let shape = data.shape().iter().copied().collect();
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, data.as_bytes())
                .map(|view| (name.to_string(), view))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(invalid)?;
    let metadata = Some(
        [("format".to_string(), "pt".to_string())]
            .into_iter()
            .collect(),
    );
    let bytes = safetensors::serialize(views, metadata).map_err(invalid)?;
    write_atomic(path, &bytes).map_err(|source| AdapterFileError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`, so a reader
/// sees the old file or the new one, never a part; the temporary file is removed on failure.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file")
        })?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("peft-core-adapter-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn round_trip_and_errors_name_the_tensor() {
        let device = Device::default();
        let path = dir().join(ADAPTER_WEIGHTS);
        let t = Tensor::<2>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3]),
            &device,
        );
        write_tensors(&path, vec![(PROMPT_EMBEDDINGS, t.to_data())]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
        let back = read_prompt_embeddings(path.parent().unwrap(), [2, 3], "test", &device).unwrap();
        assert_eq!(back.into_data(), t.into_data());

        let err = read_prompt_embeddings(
            path.parent().unwrap(),
            [2, 4],
            "token_dim 4 from the base model",
            &device,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: tensor `prompt_embeddings` has shape [2, 3], expected [2, 4] (token_dim 4 from the base model)",
                path.display()
            )
        );
        let err = TensorFile::open(&path)
            .unwrap()
            .tensor::<2>("prefix", [2, 3], "test", &device)
            .unwrap_err();
        assert!(
            matches!(err, AdapterFileError::MissingTensor { .. }),
            "{err}"
        );
        std::fs::write(&path, b"not safetensors").unwrap();
        let err =
            read_prompt_embeddings(path.parent().unwrap(), [2, 3], "test", &device).unwrap_err();
        assert!(matches!(err, AdapterFileError::Safetensors { .. }), "{err}");
        let leftovers = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".tmp-")
            })
            .count();
        assert_eq!(leftovers, 0);
    }
}
