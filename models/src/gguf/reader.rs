//! The GGUF container: header, metadata key/values, tensor infos, and each tensor's bytes on
//! demand.
//!
//! Layout (little-endian, versions 2 and 3 — identical on disk):
//!
//! ```text
//! "GGUF"  u32 version  u64 tensor_count  u64 kv_count
//! kv_count × { string key, u32 value_type, value }
//! tensor_count × { string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset }
//! padding to `general.alignment` (default 32)
//! data section: tensor i at data_start + offset_i (offsets multiples of the alignment)
//! ```
//!
//! A string is a `u64` byte length and UTF-8 bytes; an array a `u32` element type, a `u64`
//! count and the elements (arrays may nest).
//!
//! Every count, length and offset is checked against the bytes that remain in the file before
//! anything is allocated for it, so a corrupt or hostile header is a
//! [`ModelError::Checkpoint`] naming the key or tensor, never a huge allocation, an overflow or
//! a panic. Only the header is read when a file is opened; a tensor's bytes are read from the
//! file when asked for ([`GgufFile::tensor_bytes`], [`GgufFile::dequantize`]), so a model's
//! weights are never held twice.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::dequant::{GgmlType, dequantize, supported_type_names};
use crate::error::{ModelError, Result};

/// The four magic bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of every tensor offset when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a ggml tensor can have (`GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;
/// Deepest nesting of arrays inside arrays accepted in metadata.
pub const MAX_ARRAY_DEPTH: usize = 8;

/// A metadata value (GGUF value types 0–12).
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Type 0.
    U8(u8),
    /// Type 1.
    I8(i8),
    /// Type 2.
    U16(u16),
    /// Type 3.
    I16(i16),
    /// Type 4.
    U32(u32),
    /// Type 5.
    I32(i32),
    /// Type 6.
    F32(f32),
    /// Type 7 (one byte; any non-zero byte is `true`).
    Bool(bool),
    /// Type 8.
    String(String),
    /// Type 9.
    Array(GgufArray),
    /// Type 10.
    U64(u64),
    /// Type 11.
    I64(i64),
    /// Type 12.
    F64(f64),
}

/// A metadata array: its elements, stored by element type (so a large array of small numbers
/// takes no more memory than in the file).
#[derive(Debug, Clone, PartialEq)]
pub enum GgufArray {
    /// Elements of type 0.
    U8(Vec<u8>),
    /// Elements of type 1.
    I8(Vec<i8>),
    /// Elements of type 2.
    U16(Vec<u16>),
    /// Elements of type 3.
    I16(Vec<i16>),
    /// Elements of type 4.
    U32(Vec<u32>),
    /// Elements of type 5.
    I32(Vec<i32>),
    /// Elements of type 6.
    F32(Vec<f32>),
    /// Elements of type 7.
    Bool(Vec<bool>),
    /// Elements of type 8.
    String(Vec<String>),
    /// Elements of type 9: nested arrays, each with its own element type.
    Array(Vec<GgufArray>),
    /// Elements of type 10.
    U64(Vec<u64>),
    /// Elements of type 11.
    I64(Vec<i64>),
    /// Elements of type 12.
    F64(Vec<f64>),
}

impl GgufArray {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::U8(v) => v.len(),
            Self::I8(v) => v.len(),
            Self::U16(v) => v.len(),
            Self::I16(v) => v.len(),
            Self::U32(v) => v.len(),
            Self::I32(v) => v.len(),
            Self::F32(v) => v.len(),
            Self::Bool(v) => v.len(),
            Self::String(v) => v.len(),
            Self::Array(v) => v.len(),
            Self::U64(v) => v.len(),
            Self::I64(v) => v.len(),
            Self::F64(v) => v.len(),
        }
    }

    /// Whether the array has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Integer elements as `i64` (`None` for arrays of floats, bools, strings or arrays, or a
    /// `u64` above `i64::MAX`).
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        fn conv<T: Copy>(v: &[T], f: impl Fn(T) -> Option<i64>) -> Option<Vec<i64>> {
            v.iter().map(|&x| f(x)).collect()
        }
        match self {
            Self::U8(v) => conv(v, |x| Some(x.into())),
            Self::I8(v) => conv(v, |x| Some(x.into())),
            Self::U16(v) => conv(v, |x| Some(x.into())),
            Self::I16(v) => conv(v, |x| Some(x.into())),
            Self::U32(v) => conv(v, |x| Some(x.into())),
            Self::I32(v) => conv(v, |x| Some(x.into())),
            Self::U64(v) => conv(v, |x| i64::try_from(x).ok()),
            Self::I64(v) => Some(v.clone()),
            _ => None,
        }
    }

    /// The elements of a string array.
    pub fn as_strings(&self) -> Option<&[String]> {
        match self {
            Self::String(v) => Some(v),
            _ => None,
        }
    }
}

impl GgufValue {
    /// An integer value (any integer type; `u64` above `i64::MAX` gives `None`).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::U8(x) => Some(x.into()),
            Self::I8(x) => Some(x.into()),
            Self::U16(x) => Some(x.into()),
            Self::I16(x) => Some(x.into()),
            Self::U32(x) => Some(x.into()),
            Self::I32(x) => Some(x.into()),
            Self::U64(x) => i64::try_from(x).ok(),
            Self::I64(x) => Some(x),
            _ => None,
        }
    }

    /// A non-negative integer value as `u64`.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U64(x) => Some(x),
            _ => self.as_i64().and_then(|x| u64::try_from(x).ok()),
        }
    }

    /// A float or integer value as `f64` (`f32` widened exactly).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(x) => Some(x.into()),
            Self::F64(x) => Some(x),
            _ => self.as_i64().map(|x| x as f64),
        }
    }

    /// A boolean value.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// A string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// An array value.
    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The value's GGUF type name (`u8`, ..., `string`, `array`), for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::U8(_) => "u8",
            Self::I8(_) => "i8",
            Self::U16(_) => "u16",
            Self::I16(_) => "i16",
            Self::U32(_) => "u32",
            Self::I32(_) => "i32",
            Self::F32(_) => "f32",
            Self::Bool(_) => "bool",
            Self::String(_) => "string",
            Self::Array(_) => "array",
            Self::U64(_) => "u64",
            Self::I64(_) => "i64",
            Self::F64(_) => "f64",
        }
    }
}

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// Tensor name (llama.cpp naming, e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// Sizes in ggml order: `ne[0]` is the fastest-varying (innermost) dimension, so a
    /// row-major `[rows, cols]` matrix has `ne = [cols, rows]`.
    pub ne: Vec<u64>,
    /// Storage type.
    pub ggml_type: GgmlType,
    /// Offset of the first byte from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Number of elements (validated not to overflow when the file was opened).
    pub fn n_elements(&self) -> u64 {
        self.ne.iter().product()
    }

    /// Row-major shape (`ne` reversed): a PyTorch `[out, in]` weight has shape `[out, in]`.
    pub fn shape(&self) -> Vec<usize> {
        // Each size was checked to fit in usize when the file was opened.
        self.ne.iter().rev().map(|&n| n as usize).collect()
    }

    /// Bytes the tensor occupies, `None` for a type whose block layout is unknown.
    pub fn byte_len(&self) -> Option<u64> {
        self.ggml_type.byte_len(self.n_elements())
    }
}

enum Source {
    File(Mutex<File>),
    Bytes(Vec<u8>),
}

/// An opened GGUF file: header, metadata and tensor infos parsed and validated, tensor data
/// left in the file until asked for.
pub struct GgufFile {
    path: PathBuf,
    source: Source,
    version: u32,
    file_size: u64,
    metadata: BTreeMap<String, GgufValue>,
    metadata_order: Vec<String>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: BTreeMap<String, usize>,
    alignment: u64,
    data_start: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

/// Bounded little-endian reader over the header: every read is checked against the bytes
/// left in the file first.
struct HeaderReader<R> {
    inner: R,
    pos: u64,
    len: u64,
}

/// Smallest encoded size of a value of each type (a string or array is at least its length
/// prefix), used to bound counts before allocating.
fn min_value_size(value_type: u32) -> u64 {
    match value_type {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,
        9 => 12,
        _ => 8,
    }
}

impl<R: Read> HeaderReader<R> {
    fn remaining(&self) -> u64 {
        self.len - self.pos
    }

    fn bytes(&mut self, n: u64, what: &dyn Fn() -> String) -> std::result::Result<Vec<u8>, String> {
        if n > self.remaining() {
            return Err(format!(
                "{}: needs {n} bytes at offset {} but the file has only {} left",
                what(),
                self.pos,
                self.remaining()
            ));
        }
        let mut buf = vec![0u8; n as usize];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| format!("{}: read failed at offset {}: {e}", what(), self.pos))?;
        self.pos += n;
        Ok(buf)
    }

    fn array<const N: usize>(
        &mut self,
        what: &dyn Fn() -> String,
    ) -> std::result::Result<[u8; N], String> {
        let v = self.bytes(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(&v);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> std::result::Result<String, String> {
        let len = self.u64(what)?;
        if len > self.remaining() {
            return Err(format!(
                "{}: string length {len} at offset {} runs past the end of the file ({} bytes left)",
                what(),
                self.pos - 8,
                self.remaining()
            ));
        }
        let bytes = self.bytes(len, what)?;
        String::from_utf8(bytes).map_err(|e| format!("{}: string is not UTF-8: {e}", what()))
    }

    /// Checks that `count` elements of at least `min_size` bytes each fit in what is left.
    fn check_count(
        &self,
        count: u64,
        min_size: u64,
        what: &dyn Fn() -> String,
    ) -> std::result::Result<usize, String> {
        match count.checked_mul(min_size) {
            Some(n) if n <= self.remaining() => usize::try_from(count)
                .map_err(|_| format!("{}: count {count} does not fit in memory", what())),
            _ => Err(format!(
                "{}: count {count} cannot fit in the {} bytes left in the file",
                what(),
                self.remaining()
            )),
        }
    }

    fn value(
        &mut self,
        value_type: u32,
        depth: usize,
        what: &dyn Fn() -> String,
    ) -> std::result::Result<GgufValue, String> {
        Ok(match value_type {
            0 => GgufValue::U8(u8::from_le_bytes(self.array(what)?)),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(what)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(what)?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => GgufValue::Bool(self.array::<1>(what)?[0] != 0),
            8 => GgufValue::String(self.string(what)?),
            9 => GgufValue::Array(self.array_value(depth, what)?),
            10 => GgufValue::U64(u64::from_le_bytes(self.array(what)?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            other => return Err(format!("{}: unknown value type {other}", what())),
        })
    }

    fn array_value(
        &mut self,
        depth: usize,
        what: &dyn Fn() -> String,
    ) -> std::result::Result<GgufArray, String> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(format!("{}: arrays nested deeper than {MAX_ARRAY_DEPTH}", what()));
        }
        let element_type = self.u32(what)?;
        if element_type > 12 {
            return Err(format!("{}: unknown array element type {element_type}", what()));
        }
        let count = self.u64(what)?;
        let n = self.check_count(count, min_value_size(element_type), what)?;
        macro_rules! numbers {
            ($variant:ident, $t:ty) => {{
                let size = std::mem::size_of::<$t>();
                let raw = self.bytes((n * size) as u64, what)?;
                GgufArray::$variant(
                    raw.chunks_exact(size)
                        .map(|c| {
                            <$t>::from_le_bytes(c.try_into().expect("chunk of the type's size"))
                        })
                        .collect(),
                )
            }};
        }
        Ok(match element_type {
            0 => GgufArray::U8(self.bytes(n as u64, what)?),
            1 => numbers!(I8, i8),
            2 => numbers!(U16, u16),
            3 => numbers!(I16, i16),
            4 => numbers!(U32, u32),
            5 => numbers!(I32, i32),
            6 => numbers!(F32, f32),
            7 => GgufArray::Bool(self.bytes(n as u64, what)?.into_iter().map(|b| b != 0).collect()),
            8 => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.string(&|| format!("{}[{i}]", what()))?);
                }
                GgufArray::String(v)
            }
            9 => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.array_value(depth + 1, &|| format!("{}[{i}]", what()))?);
                }
                GgufArray::Array(v)
            }
            10 => numbers!(U64, u64),
            11 => numbers!(I64, i64),
            _ => numbers!(F64, f64),
        })
    }
}

impl GgufFile {
    /// Opens a GGUF file and parses its header (metadata and tensor infos); tensor data stays
    /// in the file.
    ///
    /// # Errors
    /// [`ModelError::Io`] if the file cannot be opened; [`ModelError::Checkpoint`] naming the
    /// problem (and the key or tensor) for a file that is not GGUF, a version other than 2 or
    /// 3, a count, length or offset past the end of the file, an unknown value type, a
    /// duplicate key or tensor name, a misaligned tensor offset, or a bad `general.alignment`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
        let mut parsed = {
            let reader = HeaderReader { inner: BufReader::new(&file), pos: 0, len };
            Self::parse(path, reader)?
        };
        parsed.source = Source::File(Mutex::new(file));
        Ok(parsed)
    }

    /// Parses a GGUF file held in memory; `name` stands for its path in errors.
    ///
    /// # Errors
    /// As [`open`](Self::open), except I/O.
    pub fn from_bytes(bytes: Vec<u8>, name: impl Into<PathBuf>) -> Result<Self> {
        let path = name.into();
        let len = bytes.len() as u64;
        let mut parsed = {
            let reader = HeaderReader { inner: bytes.as_slice(), pos: 0, len };
            Self::parse(&path, reader)?
        };
        parsed.source = Source::Bytes(bytes);
        Ok(parsed)
    }

    fn parse<R: Read>(path: &Path, mut r: HeaderReader<R>) -> Result<Self> {
        let bad = |message: String| ModelError::Checkpoint { path: path.to_path_buf(), message };
        let magic: [u8; 4] = r.array(&|| "magic".to_string()).map_err(bad)?;
        if magic != GGUF_MAGIC {
            return Err(bad(format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")")));
        }
        let version = r.u32(&|| "version".to_string()).map_err(bad)?;
        match version {
            2 | 3 => {}
            1 => return Err(bad("GGUF version 1 is not supported (only 2 and 3)".into())),
            v if (1..=3).contains(&v.swap_bytes()) => {
                return Err(bad(format!(
                    "big-endian GGUF (version {}) is not supported",
                    v.swap_bytes()
                )));
            }
            v => {
                return Err(bad(format!("GGUF version {v} is not supported (only 2 and 3)")));
            }
        }
        let tensor_count = r.u64(&|| "tensor count".to_string()).map_err(bad)?;
        let kv_count = r.u64(&|| "metadata count".to_string()).map_err(bad)?;
        // A key/value takes at least 13 bytes (key length, value type, one byte), a tensor
        // info at least 24 (name length, n_dims, type, offset).
        let kv_count =
            r.check_count(kv_count, 13, &|| "metadata count".to_string()).map_err(bad)?;
        let tensor_count =
            r.check_count(tensor_count, 24, &|| "tensor count".to_string()).map_err(bad)?;

        let mut metadata = BTreeMap::new();
        let mut metadata_order = Vec::with_capacity(kv_count);
        for i in 0..kv_count {
            let key = r.string(&|| format!("metadata key #{i}")).map_err(bad)?;
            let what = || format!("metadata `{key}`");
            let value_type = r.u32(&what).map_err(bad)?;
            let value = r.value(value_type, 0, &what).map_err(bad)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(bad(format!("metadata key `{key}` occurs twice")));
            }
            metadata_order.push(key);
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(GgufValue::U32(a)) if a.is_power_of_two() => u64::from(*a),
            Some(v) => {
                return Err(bad(format!(
                    "`general.alignment` must be a u32 power of two, got {v:?}"
                )));
            }
        };

        let mut tensors = Vec::with_capacity(tensor_count);
        let mut tensor_index = BTreeMap::new();
        for i in 0..tensor_count {
            let name = r.string(&|| format!("tensor #{i} name")).map_err(bad)?;
            let what = || format!("tensor `{name}`");
            let n_dims = r.u32(&what).map_err(bad)?;
            if n_dims > MAX_DIMS {
                return Err(bad(format!("{}: {n_dims} dimensions (at most {MAX_DIMS})", what())));
            }
            let mut ne = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                ne.push(r.u64(&what).map_err(bad)?);
            }
            let ggml_type = GgmlType::from_id(r.u32(&what).map_err(bad)?);
            let offset = r.u64(&what).map_err(bad)?;
            let n_elements = ne.iter().try_fold(1u64, |acc, &n| acc.checked_mul(n));
            let fits = n_elements.is_some_and(|n| usize::try_from(n).is_ok());
            if !fits {
                return Err(bad(format!("{}: size {ne:?} overflows", what())));
            }
            if offset % alignment != 0 {
                return Err(bad(format!(
                    "{}: offset {offset} is not a multiple of the alignment {alignment}",
                    what()
                )));
            }
            if tensor_index.insert(name.clone(), i).is_some() {
                return Err(bad(format!("tensor `{name}` occurs twice")));
            }
            tensors.push(GgufTensorInfo { name, ne, ggml_type, offset });
        }

        let data_start = r.pos.div_ceil(alignment) * alignment;
        let file_size = r.len;
        for t in &tensors {
            let start = data_start.checked_add(t.offset);
            let end = match t.ggml_type.byte_len(t.n_elements()) {
                Some(n) => start.and_then(|s| s.checked_add(n)),
                // Unknown layout: only the start can be checked until the tensor is read.
                None => start,
            };
            match end {
                Some(end) if end <= file_size => {}
                _ => {
                    return Err(bad(format!(
                        "tensor `{}` ({:?}, ne {:?}) at data offset {} runs past the end of \
                         the file ({file_size} bytes, data section at {data_start})",
                        t.name, t.ggml_type, t.ne, t.offset
                    )));
                }
            }
            if let Some(block) = t.ggml_type.block_size() {
                let ne0 = t.ne.first().copied().unwrap_or(1);
                if ne0 % block as u64 != 0 {
                    return Err(bad(format!(
                        "tensor `{}`: row size {ne0} is not a multiple of the {:?} block size {block}",
                        t.name, t.ggml_type
                    )));
                }
            }
        }

        Ok(Self {
            path: path.to_path_buf(),
            source: Source::Bytes(Vec::new()),
            version,
            file_size,
            metadata,
            metadata_order,
            tensors,
            tensor_index,
            alignment,
            data_start,
        })
    }

    /// The file's path (or the name given to [`from_bytes`](Self::from_bytes)).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Size of the file in bytes.
    pub fn file_size(&self) -> u64 {
        self.file_size
    }

    /// Alignment of the data section (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Offset of the data section in the file.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// Every metadata key/value, keyed by name.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// Metadata keys in file order.
    pub fn metadata_keys(&self) -> &[String] {
        &self.metadata_order
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// One tensor's info.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    fn error(&self, message: String) -> ModelError {
        ModelError::Checkpoint { path: self.path.clone(), message }
    }

    fn info(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.tensor(name).ok_or_else(|| self.error(format!("no tensor `{name}`")))
    }

    /// A tensor's raw bytes, as stored.
    ///
    /// # Errors
    /// [`ModelError::Checkpoint`] if there is no such tensor or its type's layout is unknown
    /// (naming the type id); [`ModelError::Io`] if reading fails.
    pub fn tensor_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let info = self.info(name)?;
        let len = info.byte_len().ok_or_else(|| {
            self.error(format!(
                "tensor `{name}` has ggml type {} whose layout is not known",
                info.ggml_type
            ))
        })?;
        let start = self.data_start + info.offset;
        // Both were checked against the file size when it was opened.
        let (start_us, len_us) = (start as usize, len as usize);
        match &self.source {
            Source::Bytes(bytes) => Ok(bytes[start_us..start_us + len_us].to_vec()),
            Source::File(file) => {
                let mut file = file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                let mut buf = vec![0u8; len_us];
                file.seek(SeekFrom::Start(start))
                    .and_then(|_| file.read_exact(&mut buf))
                    .map_err(|e| ModelError::io(&self.path, e))?;
                Ok(buf)
            }
        }
    }

    /// A tensor dequantized to `f32`, row-major in [`GgufTensorInfo::shape`] order; bit for bit
    /// what the `gguf` Python package's `gguf.quants.dequantize` returns.
    ///
    /// # Errors
    /// [`ModelError::Checkpoint`] naming the tensor and its type if the type cannot be
    /// dequantized (see [`GgmlType::is_supported`]); as [`tensor_bytes`](Self::tensor_bytes)
    /// otherwise.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.info(name)?;
        if !info.ggml_type.is_supported() {
            return Err(self.error(format!(
                "tensor `{name}`: ggml type {} cannot be dequantized (supported: {})",
                info.ggml_type,
                supported_type_names()
            )));
        }
        let bytes = self.tensor_bytes(name)?;
        dequantize(info.ggml_type, &bytes).map_err(|m| self.error(format!("tensor `{name}`: {m}")))
    }

    /// A string metadata value.
    ///
    /// # Errors
    /// [`ModelError::Checkpoint`] if `key` is absent or not a string.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.require(key)?.as_str().ok_or_else(|| self.error(self.wrong_type(key, "a string")))
    }

    /// A non-negative integer metadata value (any integer type).
    ///
    /// # Errors
    /// [`ModelError::Checkpoint`] if `key` is absent or not a non-negative integer.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.require(key)?
            .as_u64()
            .ok_or_else(|| self.error(self.wrong_type(key, "a non-negative integer")))
    }

    /// A number metadata value (any float or integer type) as `f64`.
    ///
    /// # Errors
    /// [`ModelError::Checkpoint`] if `key` is absent or not a number.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        self.require(key)?.as_f64().ok_or_else(|| self.error(self.wrong_type(key, "a number")))
    }

    fn require(&self, key: &str) -> Result<&GgufValue> {
        self.get(key).ok_or_else(|| self.error(format!("required metadata `{key}` is missing")))
    }

    fn wrong_type(&self, key: &str, expected: &str) -> String {
        let found = self.get(key).map_or("nothing", GgufValue::type_name);
        format!("metadata `{key}` must be {expected}, found {found}")
    }
}
