//! GGUF access: parse the header once, then read only the tensors a shard asks for.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;

use crate::error::{EngineError, Result};
use crate::quant::QWeight;

/// An open GGUF file: metadata and tensor directory in memory, tensor data left on disk.
pub struct GgufFile {
    path: PathBuf,
    /// Kept open so shards read their tensors without reopening the file.
    file: File,
    /// Size on disk, to report truncation before reading past the end.
    size: u64,
    content: Content,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile").field("path", &self.path).field("tensors", &self.content.tensor_infos.len()).finish()
    }
}

impl GgufFile {
    /// Opens `path` and parses the GGUF header (metadata and tensor directory).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut file = File::open(&path).map_err(|source| EngineError::OpenModel { path: path.clone(), source })?;
        let size = file.metadata().map_err(|source| EngineError::OpenModel { path: path.clone(), source })?.len();
        let mut magic = [0u8; 4];
        let got = read_up_to(&mut file, &mut magic).map_err(|source| EngineError::OpenModel { path: path.clone(), source })?;
        if got < 4 || &magic != b"GGUF" {
            return Err(EngineError::NotGguf { path, magic: magic[..got].to_vec() });
        }
        file.seek(SeekFrom::Start(0)).map_err(|source| EngineError::OpenModel { path: path.clone(), source })?;
        let mut reader = std::io::BufReader::new(&mut file);
        let content = Content::read(&mut reader).map_err(|e| EngineError::BadGgufHeader { path: path.clone(), reason: e.to_string() })?;
        Ok(Self { path, file, size, content })
    }

    /// The file this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value, if present.
    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// A required string value.
    pub fn meta_str(&self, key: &str) -> Result<&str> {
        match self.meta(key) {
            None => Err(EngineError::MissingMetadata { key: key.to_string() }),
            Some(v) => v.to_string().map(|s| s.as_str()).map_err(|e| bad(key, e)),
        }
    }

    /// A required unsigned integer value (any integer width).
    pub fn meta_u64(&self, key: &str) -> Result<u64> {
        let v = self.meta(key).ok_or_else(|| EngineError::MissingMetadata { key: key.to_string() })?;
        value_u64(v).ok_or_else(|| EngineError::BadMetadata { key: key.to_string(), reason: format!("expected a non-negative integer, got {v:?}") })
    }

    /// An optional unsigned integer value.
    pub fn meta_u64_opt(&self, key: &str) -> Result<Option<u64>> {
        match self.meta(key) {
            None => Ok(None),
            Some(_) => self.meta_u64(key).map(Some),
        }
    }

    /// An optional float value (f32 or f64).
    pub fn meta_f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::F32(v)) => Ok(Some(*v as f64)),
            Some(Value::F64(v)) => Ok(Some(*v)),
            Some(v) => Err(EngineError::BadMetadata { key: key.to_string(), reason: format!("expected a float, got {v:?}") }),
        }
    }

    /// An optional boolean value.
    pub fn meta_bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.meta(key) {
            None => Ok(None),
            Some(v) => v.to_bool().map(Some).map_err(|e| bad(key, e)),
        }
    }

    /// An array value.
    pub fn meta_array(&self, key: &str) -> Result<&Vec<Value>> {
        match self.meta(key) {
            None => Err(EngineError::MissingMetadata { key: key.to_string() }),
            Some(v) => v.to_vec().map_err(|e| bad(key, e)),
        }
    }

    /// Whether the file holds a tensor with this name.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Shape of a tensor, outermost dimension first (`[rows, row_len]` for a matrix).
    pub fn tensor_shape(&self, name: &str) -> Result<(Vec<usize>, GgmlDType)> {
        let info = self.content.tensor_infos.get(name).ok_or_else(|| EngineError::MissingTensor { name: name.to_string() })?;
        Ok((info.shape.dims().to_vec(), info.ggml_dtype))
    }

    /// Reads one tensor's raw bytes from disk.
    pub fn read_weight(&mut self, name: &str) -> Result<QWeight> {
        let info = self.content.tensor_infos.get(name).ok_or_else(|| EngineError::MissingTensor { name: name.to_string() })?;
        let dims = info.shape.dims().to_vec();
        let dtype = info.ggml_dtype;
        let elems: usize = dims.iter().product();
        let block = dtype.block_size();
        let row_len = *dims.last().unwrap_or(&1);
        if row_len % block != 0 {
            return Err(EngineError::TensorShape { name: name.to_string(), expected: vec![row_len.div_ceil(block) * block], actual: dims });
        }
        let bytes = (elems / block * dtype.type_size()) as u64;
        let start = self.content.tensor_data_offset + info.offset;
        let needed = start + bytes;
        if needed > self.size {
            return Err(EngineError::Truncated { path: self.path.clone(), tensor: name.to_string(), needed, size: self.size });
        }
        let mut data = vec![0u8; bytes as usize];
        let io = |source| EngineError::ReadTensor { tensor: name.to_string(), source };
        self.file.seek(SeekFrom::Start(start)).map_err(io)?;
        self.file.read_exact(&mut data).map_err(io)?;
        QWeight::new(name, dtype, dims, data)
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

fn bad(key: &str, e: candle_core::Error) -> EngineError {
    EngineError::BadMetadata { key: key.to_string(), reason: e.to_string() }
}

/// Any integer metadata value as u64, if it is non-negative.
pub(crate) fn value_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x as u64),
        Value::U16(x) => Some(x as u64),
        Value::U32(x) => Some(x as u64),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}
