//! GGUF v3, llama.cpp's file format: a header (`GGUF`, version, tensor count, metadata count),
//! typed key/value metadata, a tensor table (name, dimensions innermost first, ggml type,
//! offset) and the tensor data, each tensor aligned to `general.alignment` (32 bytes).
//!
//! [`Writer`] streams: the table is fixed up front from shapes and types, then each tensor's
//! bytes are appended in table order, so an export holds one tensor at a time; the file is
//! written under a temporary name and renamed into place. [`GgufFile::open`] reads a file back
//! (tests, and checking an export). The ggml block formats live in [`blocks`]. Errors are
//! the checkpoint files' ([`crate::io::Error`]): a file that cannot be read or written, or one
//! that is not what it claims.

pub mod blocks;

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::io::io_err;

pub use blocks::GgmlType;

/// The four magic bytes.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// The version written.
pub const VERSION: u32 = 3;
/// Tensor data alignment (llama.cpp's default, written as `general.alignment` by no one).
pub const ALIGNMENT: u64 = 32;

pub use crate::io::{Error, Result};

/// A metadata value, with the GGUF type it is written as.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `UINT8` (0).
    U8(u8),
    /// `INT8` (1).
    I8(i8),
    /// `UINT16` (2).
    U16(u16),
    /// `INT16` (3).
    I16(i16),
    /// `UINT32` (4).
    U32(u32),
    /// `INT32` (5).
    I32(i32),
    /// `FLOAT32` (6).
    F32(f32),
    /// `BOOL` (7).
    Bool(bool),
    /// `STRING` (8): u64 length + UTF-8 bytes.
    Str(String),
    /// `ARRAY` (9): element type, u64 count, elements (all of the element type).
    Array(u32, Vec<Value>),
    /// `UINT64` (10).
    U64(u64),
    /// `INT64` (11).
    I64(i64),
    /// `FLOAT64` (12).
    F64(f64),
}

impl Value {
    /// The GGUF type id.
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(..) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// An array of strings.
    pub fn strings(v: impl IntoIterator<Item = String>) -> Self {
        Value::Array(8, v.into_iter().map(Value::Str).collect())
    }

    /// An array of f32.
    pub fn f32s(v: impl IntoIterator<Item = f32>) -> Self {
        Value::Array(6, v.into_iter().map(Value::F32).collect())
    }

    /// An array of i32.
    pub fn i32s(v: impl IntoIterator<Item = i32>) -> Self {
        Value::Array(5, v.into_iter().map(Value::I32).collect())
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Value::U8(v) => out.push(*v),
            Value::I8(v) => out.extend(v.to_le_bytes()),
            Value::U16(v) => out.extend(v.to_le_bytes()),
            Value::I16(v) => out.extend(v.to_le_bytes()),
            Value::U32(v) => out.extend(v.to_le_bytes()),
            Value::I32(v) => out.extend(v.to_le_bytes()),
            Value::F32(v) => out.extend(v.to_le_bytes()),
            Value::Bool(v) => out.push(u8::from(*v)),
            Value::Str(s) => put_str(out, s),
            Value::Array(t, items) => {
                out.extend(t.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for i in items {
                    debug_assert_eq!(i.type_id(), *t, "array element of another type");
                    i.encode(out);
                }
            }
            Value::U64(v) => out.extend(v.to_le_bytes()),
            Value::I64(v) => out.extend(v.to_le_bytes()),
            Value::F64(v) => out.extend(v.to_le_bytes()),
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// llama.cpp's tensor name (`blk.0.attn_q.weight`).
    pub name: String,
    /// The shape as PyTorch writes it, outermost first (`[out, in]` for a linear); the file
    /// stores it reversed (ggml's `ne`, innermost first).
    pub shape: Vec<usize>,
    /// Storage type.
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Bytes of the tensor's data.
    pub fn nbytes(&self) -> usize {
        let n: usize = self.shape.iter().product();
        self.ggml_type.row_bytes(n)
    }
}

fn align(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// Streams a GGUF file: header, metadata and tensor table at [`create`](Self::create), then each
/// tensor's bytes with [`write`](Self::write) in table order, renamed into place by
/// [`finish`](Self::finish). Dropped unfinished, it removes its temporary file.
pub struct Writer {
    file: Option<BufWriter<File>>,
    tmp: PathBuf,
    dest: PathBuf,
    tensors: Vec<TensorInfo>,
    next: usize,
}

impl Writer {
    /// Writes the header, `metadata` (in order) and the table of `tensors` (offsets computed
    /// here, each aligned) into `dest`'s temporary file.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn create(
        dest: &Path,
        metadata: &[(String, Value)],
        tensors: &[(String, Vec<usize>, GgmlType)],
    ) -> Result<Self> {
        let mut head = Vec::new();
        head.extend(MAGIC);
        head.extend(VERSION.to_le_bytes());
        head.extend((tensors.len() as u64).to_le_bytes());
        head.extend((metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut head, k);
            head.extend(v.type_id().to_le_bytes());
            v.encode(&mut head);
        }
        let mut infos = Vec::with_capacity(tensors.len());
        let mut offset = 0u64;
        for (name, shape, t) in tensors {
            let info = TensorInfo {
                name: name.clone(),
                shape: shape.clone(),
                ggml_type: *t,
                offset,
            };
            put_str(&mut head, name);
            head.extend((shape.len() as u32).to_le_bytes());
            for d in shape.iter().rev() {
                head.extend((*d as u64).to_le_bytes());
            }
            head.extend((*t as u32).to_le_bytes());
            head.extend(offset.to_le_bytes());
            offset = align(offset + info.nbytes() as u64);
            infos.push(info);
        }
        head.resize(align(head.len() as u64) as usize, 0);
        let tmp = crate::io::tmp_path(dest);
        let f = File::create(&tmp).map_err(io_err(&tmp))?;
        let mut file = BufWriter::with_capacity(1 << 20, f);
        file.write_all(&head).map_err(io_err(&tmp))?;
        Ok(Self {
            file: Some(file),
            tmp,
            dest: dest.to_path_buf(),
            tensors: infos,
            next: 0,
        })
    }

    /// The tensor table, with offsets.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Appends the next tensor's bytes (and its alignment padding).
    ///
    /// # Panics
    /// If tensors come out of table order or with the wrong size (a bug in the caller).
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn write(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let info = &self.tensors[self.next];
        assert_eq!(info.name, name, "tensors written out of table order");
        assert_eq!(info.nbytes(), data.len(), "tensor {name}: byte count");
        self.next += 1;
        let pad = (align(data.len() as u64) - data.len() as u64) as usize;
        let Some(file) = self.file.as_mut() else {
            unreachable!("file is present until finish");
        };
        file.write_all(data)
            .and_then(|_| file.write_all(&[0u8; ALIGNMENT as usize][..pad]))
            .map_err(io_err(&self.tmp))
    }

    /// Flushes, syncs and renames the file into place.
    ///
    /// # Panics
    /// If a tensor of the table was not written.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn finish(mut self) -> Result<()> {
        assert_eq!(self.next, self.tensors.len(), "unwritten tensors");
        let Some(file) = self.file.take() else {
            unreachable!("finish runs once");
        };
        let f = file
            .into_inner()
            .map_err(|e| io_err(&self.tmp)(e.into_error()))?;
        f.sync_all().map_err(io_err(&self.tmp))?;
        std::fs::rename(&self.tmp, &self.dest).map_err(io_err(&self.dest))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// A GGUF file read whole: metadata in file order, the tensor table and the data section.
#[derive(Debug)]
pub struct GgufFile {
    /// Format version.
    pub version: u32,
    /// Key/value metadata in file order.
    pub metadata: Vec<(String, Value)>,
    /// The tensor table.
    pub tensors: Vec<TensorInfo>,
    data: Vec<u8>,
    path: PathBuf,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl Cursor<'_> {
    fn bad(&self, msg: impl Into<String>) -> Error {
        Error::Format {
            path: self.path.to_path_buf(),
            msg: format!("at byte {}: {}", self.pos, msg.into()),
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.buf.len().saturating_sub(self.pos) < n {
            return Err(self.bad(format!("truncated (needs {n} more bytes)")));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn count(&mut self, what: &str) -> Result<usize> {
        let n = self.u64()?;
        // Every element takes at least one byte: a larger count is a lie.
        if n > (self.buf.len() - self.pos) as u64 {
            return Err(self.bad(format!("{what} count {n} exceeds the file")));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String> {
        let n = self.count("string length")?;
        let b = self.take(n)?.to_vec();
        String::from_utf8(b).map_err(|_| self.bad("string is not UTF-8"))
    }

    fn value(&mut self, t: u32) -> Result<Value> {
        Ok(match t {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(i8::from_le_bytes(self.array()?)),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                let et = self.u32()?;
                if et == 9 {
                    return Err(self.bad("nested arrays are not supported"));
                }
                let n = self.count("array")?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(et)?);
                }
                Value::Array(et, v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            _ => return Err(self.bad(format!("unknown value type {t}"))),
        })
    }
}

impl GgufFile {
    /// Reads and checks a GGUF v2/v3 file (tensor extents inside the file, known types).
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::Format`] naming the byte offset at fault.
    pub fn open(path: &Path) -> Result<Self> {
        let mut buf = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut buf))
            .map_err(io_err(path))?;
        let mut c = Cursor {
            buf: &buf,
            pos: 0,
            path,
        };
        if c.take(4)? != MAGIC {
            return Err(c.bad("not a GGUF file (magic)"));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(c.bad(format!("GGUF version {version} (2 or 3 expected)")));
        }
        let n_tensors = c.count("tensor")?;
        let n_kv = c.count("metadata")?;
        let mut metadata = Vec::with_capacity(n_kv);
        for _ in 0..n_kv {
            let k = c.string()?;
            let t = c.u32()?;
            metadata.push((k, c.value(t)?));
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string()?;
            let nd = c.u32()?;
            if nd > 4 {
                return Err(c.bad(format!("tensor {name}: {nd} dimensions")));
            }
            let mut shape = Vec::new();
            for _ in 0..nd {
                shape.push(c.u64()? as usize);
            }
            shape.reverse();
            let t = c.u32()?;
            let ggml_type =
                GgmlType::from_id(t).ok_or_else(|| c.bad(format!("tensor {name}: type {t}")))?;
            let offset = c.u64()?;
            tensors.push(TensorInfo {
                name,
                shape,
                ggml_type,
                offset,
            });
        }
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, Value::U32(a))) if *a > 0 => u64::from(*a),
            _ => ALIGNMENT,
        };
        let start = (c.pos as u64).div_ceil(alignment) * alignment;
        let data = buf.get(start as usize..).unwrap_or(&[]).to_vec();
        for t in &tensors {
            let end = t.offset as usize + t.nbytes();
            if end > data.len() {
                return Err(Error::Format {
                    path: path.to_path_buf(),
                    msg: format!("tensor {} ends past the end of the file", t.name),
                });
            }
        }
        Ok(Self {
            version,
            metadata,
            tensors,
            data,
            path: path.to_path_buf(),
        })
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// A tensor's table entry and bytes.
    ///
    /// # Errors
    /// [`Error::Format`] when there is no such tensor.
    pub fn tensor(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        let t = self
            .tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| Error::Format {
                path: self.path.clone(),
                msg: format!("no tensor {name}"),
            })?;
        let o = t.offset as usize;
        Ok((t, &self.data[o..o + t.nbytes()]))
    }
}
