//! llama.cpp's GGUF files: the container (header, metadata, tensor infos, aligned data) and the
//! dequantization of its tensor types into f32, as ggml's reference `dequantize_row_*` computes
//! it.
//!
//! Why our own reader: the crates of the field either pull a runtime of their own (candle's
//! `gguf_file` comes with candle-core) or were not evaluated to check sizes before allocating.
//! GGUF's container is small (a header of counts, length-prefixed strings and a table of tensor
//! offsets), and every count and length here is checked against the bytes left before anything is
//! allocated, so a malformed or hostile file is an error naming the field, never an abort.
//!
//! Supported tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K (tested against
//! gguf-py's reference dequantization on `fixtures/gguf/`). Loading a model from a GGUF file
//! (names, q/k permutation, tokenizer and config from the metadata) builds on this module.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

use crate::error::{ModelError, Result};

const MAGIC: &[u8; 4] = b"GGUF";
/// The data section's alignment when `general.alignment` does not say.
const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions of a tensor (ggml's `GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Any unsigned integer type.
    UInt(u64),
    /// Any signed integer type.
    Int(i64),
    /// `f32` or `f64`.
    Float(f64),
    /// `bool`.
    Bool(bool),
    /// A UTF-8 string.
    String(String),
    /// An array of values.
    Array(Vec<GgufValue>),
}

/// A tensor's type, as ggml numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// bfloat16.
    BF16,
    /// Blocks of 32: an f16 scale and 32 signed bytes.
    Q8_0,
    /// Blocks of 32: an f16 scale and 32 4-bit values (offset 8).
    Q4_0,
    /// Blocks of 32: an f16 scale and minimum, and 32 4-bit values.
    Q4_1,
    /// Super-blocks of 256: 8 sub-blocks of 32 with 6-bit scales and minimums, 4-bit values.
    Q4K,
    /// Super-blocks of 256: as Q4_K with a fifth bit per value.
    Q5K,
    /// Super-blocks of 256: 16 sub-blocks of 16 with 8-bit scales, 6-bit values.
    Q6K,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// (values per block, bytes per block).
    fn block(self) -> (u64, u64) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q8_0 => (32, 34),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q4K => (256, 144),
            Self::Q5K => (256, 176),
            Self::Q6K => (256, 210),
        }
    }

    /// ggml's number for the type (as a GGUF tensor info stores it).
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::BF16 => 30,
        }
    }

    /// ggml's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q8_0 => "Q8_0",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
        }
    }
}

/// Where a tensor lies in the file and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// The tensor's name (llama.cpp's, e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// Its shape, outermost first (as PyTorch writes it: GGUF stores it innermost first).
    pub shape: Vec<usize>,
    /// Its type.
    pub ggml_type: GgmlType,
    /// Byte range in the file.
    start: usize,
    len: usize,
}

/// An open GGUF file: its metadata and tensor table, the data mapped, not read.
pub struct GgufFile {
    path: PathBuf,
    data: Mmap,
    /// Metadata by key.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Tensors in file order.
    pub tensors: Vec<GgufTensorInfo>,
}

/// A cursor over the file's bytes whose reads check the bytes left.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn error(&self, message: String) -> ModelError {
        ModelError::Gguf {
            path: self.path.to_path_buf(),
            message,
        }
    }

    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.left() {
            return Err(self.error(format!(
                "truncated: {what} needs {n} bytes at offset {}, the file has {} left",
                self.at,
                self.left()
            )));
        }
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items each at least `min_size` bytes long, checked against the bytes left.
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        if n > (self.left() / min_size.max(1)) as u64 {
            return Err(self.error(format!(
                "{what} is {n}, more than the {} bytes left can hold",
                self.left()
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.count(1, what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.error(format!("{what} is not UTF-8")))
    }

    fn value(&mut self, kind: u32, key: &str, depth: usize) -> Result<GgufValue> {
        Ok(match kind {
            0 => GgufValue::UInt(u64::from(self.array::<1>(key)?[0])),
            1 => GgufValue::Int(i64::from(self.array::<1>(key)?[0] as i8)),
            2 => GgufValue::UInt(u64::from(u16::from_le_bytes(self.array(key)?))),
            3 => GgufValue::Int(i64::from(i16::from_le_bytes(self.array(key)?))),
            4 => GgufValue::UInt(u64::from(self.u32(key)?)),
            5 => GgufValue::Int(i64::from(i32::from_le_bytes(self.array(key)?))),
            6 => GgufValue::Float(f64::from(f32::from_le_bytes(self.array(key)?))),
            7 => match self.array::<1>(key)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                other => return Err(self.error(format!("key {key:?}: bool byte {other}"))),
            },
            8 => GgufValue::String(self.string(key)?),
            9 if depth == 0 => {
                let item = self.u32(key)?;
                // Every item takes at least a byte (a string at least its 8-byte length).
                let min = if item == 8 { 8 } else { 1 };
                let n = self.count(min, key)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::UInt(self.u64(key)?),
            11 => GgufValue::Int(i64::from_le_bytes(self.array(key)?)),
            12 => GgufValue::Float(f64::from_le_bytes(self.array(key)?)),
            other => {
                return Err(self.error(format!("key {key:?}: unknown value type {other}")));
            }
        })
    }
}

impl GgufFile {
    /// Opens and maps `path`, reading the header, metadata and tensor table (not the tensors).
    ///
    /// # Errors
    ///
    /// A file that cannot be read, is not GGUF (v2 or v3), is truncated, holds counts or lengths
    /// its size cannot hold, a tensor type not supported, or tensor data outside the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let io = |source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // Safety: the map is read-only and the file is not expected to change while open (as
        // for safetensors checkpoints).
        let data = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (metadata, tensors) = {
            let mut c = Cursor {
                bytes: &data,
                at: 0,
                path,
            };
            if &c.array::<4>("the magic number")? != MAGIC {
                return Err(c.error("not a GGUF file (no `GGUF` magic number)".into()));
            }
            let version = c.u32("the version")?;
            if !(2..=3).contains(&version) {
                return Err(c.error(format!("GGUF version {version}; versions 2 and 3 are read")));
            }
            // A tensor info takes at least 8 + 4 + 4 + 8 bytes, a key/value at least 8 + 4 + 1.
            let tensor_count = c.u64("the tensor count")?;
            let kv_count = c.count(13, "the metadata count")?;
            let mut metadata = BTreeMap::new();
            for _ in 0..kv_count {
                let key = c.string("a metadata key")?;
                let kind = c.u32(&key)?;
                let value = c.value(kind, &key, 0)?;
                metadata.insert(key, value);
            }
            if tensor_count > (c.left() / 24) as u64 {
                return Err(c.error(format!(
                    "the tensor count is {tensor_count}, more than the {} bytes left can hold",
                    c.left()
                )));
            }
            let mut infos = Vec::with_capacity(tensor_count as usize);
            for _ in 0..tensor_count {
                let name = c.string("a tensor name")?;
                let dims = c.u32(&name)?;
                if dims == 0 || dims > MAX_DIMS {
                    return Err(c.error(format!("tensor {name:?}: {dims} dimensions")));
                }
                let mut shape = Vec::with_capacity(dims as usize);
                for _ in 0..dims {
                    shape.push(c.u64(&name)?);
                }
                let type_id = c.u32(&name)?;
                let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
                    c.error(format!(
                        "tensor {name:?}: ggml type {type_id} is not read (F32, F16, BF16, Q8_0, \
                         Q4_0, Q4_1, Q4_K, Q5_K and Q6_K are)"
                    ))
                })?;
                let offset = c.u64(&name)?;
                infos.push((name, shape, ggml_type, offset));
            }
            let alignment = match metadata.get("general.alignment") {
                None => DEFAULT_ALIGNMENT,
                Some(GgufValue::UInt(a)) if *a > 0 && a.is_power_of_two() => *a,
                Some(other) => {
                    return Err(c.error(format!(
                        "key \"general.alignment\" is {other:?}; expected a power of two"
                    )));
                }
            };
            let start = (c.at as u64).div_ceil(alignment) * alignment;
            let mut tensors = Vec::with_capacity(infos.len());
            for (name, dims, ggml_type, offset) in infos {
                let (block, size) = ggml_type.block();
                let elements = dims
                    .iter()
                    .try_fold(1u64, |n, &d| n.checked_mul(d))
                    .filter(|&n| n > 0)
                    .ok_or_else(|| c.error(format!("tensor {name:?}: shape {dims:?}")))?;
                if dims[0] % block != 0 {
                    return Err(c.error(format!(
                        "tensor {name:?}: rows of {} values do not split into {} blocks of {block}",
                        dims[0],
                        ggml_type.name()
                    )));
                }
                let len = elements / block * size;
                let begin = start.checked_add(offset);
                let end = begin.and_then(|b| b.checked_add(len));
                match (begin, end) {
                    (Some(begin), Some(end)) if end <= data.len() as u64 => {
                        tensors.push(GgufTensorInfo {
                            shape: dims.iter().rev().map(|&d| d as usize).collect(),
                            name,
                            ggml_type,
                            start: begin as usize,
                            len: len as usize,
                        });
                    }
                    _ => {
                        return Err(c.error(format!(
                            "tensor {name:?}: {len} bytes at offset {offset} lie outside the file"
                        )));
                    }
                }
            }
            (metadata, tensors)
        };
        Ok(Self {
            path: path.to_path_buf(),
            data,
            metadata,
            tensors,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored bytes of tensor `name` (whole blocks of its type).
    pub fn tensor_bytes(&self, name: &str) -> Option<&[u8]> {
        let info = self.tensor(name)?;
        Some(&self.data[info.start..info.start + info.len])
    }

    /// The tensor `name`'s entry.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The values of tensor `name`, dequantized to f32, row-major in [`GgufTensorInfo::shape`].
    ///
    /// # Errors
    ///
    /// No tensor of that name, or non-finite values (a corrupt scale).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.tensor(name).ok_or_else(|| ModelError::Gguf {
            path: self.path.clone(),
            message: format!("no tensor {name:?}"),
        })?;
        let bytes = &self.data[info.start..info.start + info.len];
        let values = dequantize(bytes, info.ggml_type);
        if let Some(at) = values.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::Gguf {
                path: self.path.clone(),
                message: format!("tensor {name:?} holds {} at index {at}", values[at]),
            });
        }
        Ok(values)
    }
}

/// `bytes` of tensor type `ggml_type` (whole blocks) as f32, as ggml's `dequantize_row_*`.
pub fn dequantize(bytes: &[u8], ggml_type: GgmlType) -> Vec<f32> {
    let (block, size) = ggml_type.block();
    let (block, size) = (block as usize, size as usize);
    let mut out = Vec::with_capacity(bytes.len() / size * block);
    let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    for x in bytes.chunks_exact(size) {
        match ggml_type {
            GgmlType::F32 => out.push(f32::from_le_bytes([x[0], x[1], x[2], x[3]])),
            GgmlType::F16 => out.push(half(x)),
            GgmlType::BF16 => out.push(bf16::from_le_bytes([x[0], x[1]]).to_f32()),
            GgmlType::Q8_0 => {
                let d = half(&x[0..2]);
                out.extend(x[2..34].iter().map(|&q| f32::from(q as i8) * d));
            }
            GgmlType::Q4_0 => {
                let d = half(&x[0..2]);
                let qs = &x[2..18];
                out.extend(
                    qs.iter()
                        .map(|&q| f32::from(q as i8 & 0x0F) - 8.0)
                        .map(|v| v * d),
                );
                out.extend(
                    qs.iter()
                        .map(|&q| f32::from((q >> 4) as i8) - 8.0)
                        .map(|v| v * d),
                );
            }
            GgmlType::Q4_1 => {
                let (d, m) = (half(&x[0..2]), half(&x[2..4]));
                let qs = &x[4..20];
                out.extend(qs.iter().map(|&q| f32::from(q & 0x0F) * d + m));
                out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
            }
            GgmlType::Q4K => {
                let (d, dmin) = (half(&x[0..2]), half(&x[2..4]));
                let scales = &x[4..16];
                let qs = &x[16..144];
                for j in 0..4 {
                    let q = &qs[32 * j..32 * j + 32];
                    let (sc, m) = scale_min_k4(2 * j, scales);
                    let (d1, m1) = (d * f32::from(sc), dmin * f32::from(m));
                    let (sc, m) = scale_min_k4(2 * j + 1, scales);
                    let (d2, m2) = (d * f32::from(sc), dmin * f32::from(m));
                    out.extend(q.iter().map(|&v| d1 * f32::from(v & 0x0F) - m1));
                    out.extend(q.iter().map(|&v| d2 * f32::from(v >> 4) - m2));
                }
            }
            GgmlType::Q5K => {
                let (d, dmin) = (half(&x[0..2]), half(&x[2..4]));
                let scales = &x[4..16];
                let qh = &x[16..48];
                let qs = &x[48..176];
                for j in 0..4 {
                    let ql = &qs[32 * j..32 * j + 32];
                    let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
                    let (sc, m) = scale_min_k4(2 * j, scales);
                    let (d1, m1) = (d * f32::from(sc), dmin * f32::from(m));
                    let (sc, m) = scale_min_k4(2 * j + 1, scales);
                    let (d2, m2) = (d * f32::from(sc), dmin * f32::from(m));
                    let high = |h: u8, u: u8| if h & u != 0 { 16.0 } else { 0.0 };
                    out.extend(
                        ql.iter()
                            .zip(qh)
                            .map(|(&l, &h)| d1 * (f32::from(l & 0x0F) + high(h, u1)) - m1),
                    );
                    out.extend(
                        ql.iter()
                            .zip(qh)
                            .map(|(&l, &h)| d2 * (f32::from(l >> 4) + high(h, u2)) - m2),
                    );
                }
            }
            GgmlType::Q6K => {
                let (ql, qh, sc) = (&x[0..128], &x[128..192], &x[192..208]);
                let d = half(&x[208..210]);
                for n in 0..2 {
                    let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
                    let mut y = [0f32; 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q = |low: u8, shift: u32| {
                            f32::from(((low | (((qh[l] >> shift) & 3) << 4)) as i8) - 32)
                        };
                        let scale = |k: usize| d * f32::from(sc[is + k] as i8);
                        y[l] = scale(0) * q(ql[l] & 0x0F, 0);
                        y[l + 32] = scale(2) * q(ql[l + 32] & 0x0F, 2);
                        y[l + 64] = scale(4) * q(ql[l] >> 4, 4);
                        y[l + 96] = scale(6) * q(ql[l + 32] >> 4, 6);
                    }
                    out.extend_from_slice(&y);
                }
            }
        }
    }
    out
}

/// The 6-bit scale and minimum of sub-block `j` of a Q4_K/Q5_K super-block (ggml's
/// `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}
