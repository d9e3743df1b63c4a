//! Checkpoint files: memory-mapped reading of (sharded) safetensors checkpoints as Hugging Face
//! writes them, and crash-safe writing (temporary file or folder, then rename).
//!
//! This is the only place that knows the safetensors byte layout; numerical code receives
//! slices. A streaming writer lets `qdora quantize` hold one tensor at a time.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
pub use safetensors::Dtype as StDtype;

/// Errors while reading or writing checkpoint files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Occurs when a file cannot be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Occurs when a file is not a valid safetensors file or index.
    #[error("{path}: {msg}")]
    Format {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// Occurs when a checkpoint lacks a tensor that is needed.
    #[error("{path}: missing tensor {name}")]
    MissingTensor {
        /// The checkpoint folder or file.
        path: PathBuf,
        /// The key that was looked up.
        name: String,
    },
    /// Occurs when a tensor has a dtype that cannot be used where it is.
    #[error("{path}: tensor {name} has dtype {dtype:?}, expected {expected}")]
    BadDtype {
        /// The file.
        path: PathBuf,
        /// The key.
        name: String,
        /// Its dtype.
        dtype: StDtype,
        /// What would have been accepted.
        expected: String,
    },
}

/// Result type of the `io` module.
pub type Result<T> = std::result::Result<T, Error>;

/// Wraps an OS error with the file it happened on.
pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A tensor's bytes inside a mapped file.
pub struct RawTensor<'a> {
    /// Checkpoint key.
    pub name: &'a str,
    /// Stored dtype.
    pub dtype: StDtype,
    /// Stored shape.
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub data: &'a [u8],
    /// The file it came from (for messages).
    pub path: &'a Path,
}

impl RawTensor<'_> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Converts F32 / BF16 / F16 data to f32 (exactly).
    ///
    /// # Errors
    /// [`Error::BadDtype`] for other dtypes.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let d = self.data;
        Ok(match self.dtype {
            StDtype::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            StDtype::BF16 => d
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            StDtype::F16 => d
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            other => {
                return Err(Error::BadDtype {
                    path: self.path.to_path_buf(),
                    name: self.name.to_string(),
                    dtype: other,
                    expected: "F32, BF16 or F16".into(),
                })
            }
        })
    }

    /// Reads an integer tensor (I64 / I32 / U8) as i64.
    ///
    /// # Errors
    /// [`Error::BadDtype`] for float dtypes.
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        let d = self.data;
        Ok(match self.dtype {
            StDtype::I64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
            StDtype::I32 => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            StDtype::U8 => d.iter().map(|&b| b as i64).collect(),
            other => {
                return Err(Error::BadDtype {
                    path: self.path.to_path_buf(),
                    name: self.name.to_string(),
                    dtype: other,
                    expected: "I64, I32 or U8".into(),
                })
            }
        })
    }
}

/// The bytes of a shard: memory-mapped from a file, or owned (parsed from memory).
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

struct Shard {
    path: PathBuf,
    mmap: Bytes,
    data_start: usize,
    tensors: HashMap<String, (StDtype, Vec<usize>, usize, usize)>,
}

/// A safetensors checkpoint: one file, or the shards listed by `model.safetensors.index.json`.
pub struct Checkpoint {
    root: PathBuf,
    shards: Vec<Shard>,
    index: BTreeMap<String, usize>,
}

impl Checkpoint {
    /// Opens a model folder (`model.safetensors` or `model.safetensors.index.json`) or a single
    /// `.safetensors` file.
    ///
    /// # Errors
    /// [`Error::Io`] if no checkpoint is there; [`Error::Format`] for a broken file or index.
    pub fn open(path: &Path) -> Result<Self> {
        let files: Vec<PathBuf> = if path.is_dir() {
            let single = path.join("model.safetensors");
            let index = path.join("model.safetensors.index.json");
            if single.exists() {
                vec![single]
            } else if index.exists() {
                let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
                let v: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| Error::Format {
                        path: index.clone(),
                        msg: format!("invalid JSON: {e}"),
                    })?;
                let map = v
                    .get("weight_map")
                    .and_then(|m| m.as_object())
                    .ok_or_else(|| Error::Format {
                        path: index.clone(),
                        msg: "no \"weight_map\" object".into(),
                    })?;
                let mut names: Vec<String> = map
                    .values()
                    .filter_map(|f| f.as_str().map(String::from))
                    .collect();
                names.sort();
                names.dedup();
                for n in &names {
                    if n.contains('/') || n.contains('\\') || n.contains("..") {
                        return Err(Error::Format {
                            path: index.clone(),
                            msg: format!("shard name {n:?} is not a plain file name"),
                        });
                    }
                }
                names.into_iter().map(|n| path.join(n)).collect()
            } else {
                return Err(Error::Io {
                    path: single,
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no model.safetensors or model.safetensors.index.json in this folder",
                    ),
                });
            }
        } else {
            vec![path.to_path_buf()]
        };
        let mut shards = Vec::new();
        let mut index = BTreeMap::new();
        for f in files {
            let shard = open_shard(&f)?;
            for name in shard.tensors.keys() {
                index.insert(name.clone(), shards.len());
            }
            shards.push(shard);
        }
        Ok(Self {
            root: path.to_path_buf(),
            shards,
            index,
        })
    }

    /// Parses a safetensors file held in memory (`name` is used in messages).
    ///
    /// # Errors
    /// [`Error::Format`] for anything malformed.
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Self> {
        let shard = parse_shard(Path::new(name), Bytes::Owned(bytes))?;
        let index = shard.tensors.keys().map(|k| (k.clone(), 0)).collect();
        Ok(Self {
            root: PathBuf::from(name),
            shards: vec![shard],
            index,
        })
    }

    /// The folder or file this checkpoint was opened from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// All tensor names, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(|s| s.as_str())
    }

    /// Whether `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The tensor `name`.
    ///
    /// # Errors
    /// [`Error::MissingTensor`].
    pub fn get(&self, name: &str) -> Result<RawTensor<'_>> {
        let (key, &si) = self
            .index
            .get_key_value(name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.root.clone(),
                name: name.to_string(),
            })?;
        let shard = &self.shards[si];
        let (dtype, shape, s, e) = &shard.tensors[name];
        Ok(RawTensor {
            name: key,
            dtype: *dtype,
            shape: shape.clone(),
            data: &shard.mmap[shard.data_start + s..shard.data_start + e],
            path: &shard.path,
        })
    }
}

fn dtype_size(d: StDtype) -> usize {
    d.bitsize().div_ceil(8)
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file = File::open(path).map_err(io_err(path))?;
    // SAFETY: the file is opened read-only; we never write through the map. Another process
    // truncating it while mapped is outside what any checkpoint reader can defend against.
    let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
    parse_shard(path, Bytes::Mapped(mmap))
}

fn parse_shard(path: &Path, mmap: Bytes) -> Result<Shard> {
    let fmt = |msg: String| Error::Format {
        path: path.to_path_buf(),
        msg,
    };
    if mmap.len() < 8 {
        return Err(fmt(format!(
            "file is {} bytes, too short for a safetensors header",
            mmap.len()
        )));
    }
    let hlen = u64::from_le_bytes(mmap[..8].try_into().unwrap_or([0; 8])) as usize;
    if hlen > mmap.len() - 8 || hlen > 100_000_000 {
        return Err(fmt(format!(
            "header length {hlen} exceeds the file size {}",
            mmap.len()
        )));
    }
    let header: serde_json::Value =
        serde_json::from_slice(&mmap[8..8 + hlen]).map_err(|e| fmt(format!("bad header: {e}")))?;
    let obj = header
        .as_object()
        .ok_or_else(|| fmt("header is not a JSON object".into()))?;
    let data_start = 8 + hlen;
    let data_len = mmap.len() - data_start;
    let mut tensors = HashMap::new();
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let info: safetensors::tensor::TensorInfo = serde_json::from_value(info.clone())
            .map_err(|e| fmt(format!("tensor {name}: bad entry: {e}")))?;
        let (s, e) = info.data_offsets;
        if s > e || e > data_len {
            return Err(fmt(format!(
                "tensor {name}: data offsets {s}..{e} outside the {data_len} data bytes"
            )));
        }
        let numel = info
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| fmt(format!("tensor {name}: shape {:?} overflows", info.shape)))?;
        let want = numel
            .checked_mul(dtype_size(info.dtype))
            .ok_or_else(|| fmt(format!("tensor {name}: size overflows")))?;
        if e - s != want {
            return Err(fmt(format!(
                "tensor {name}: {} bytes for shape {:?} of {:?}, expected {want}",
                e - s,
                info.shape,
                info.dtype
            )));
        }
        tensors.insert(name.clone(), (info.dtype, info.shape, s, e));
    }
    Ok(Shard {
        path: path.to_path_buf(),
        mmap,
        data_start,
        tensors,
    })
}

/// A tensor to be written: name, dtype, shape, bytes.
pub struct OwnedTensor {
    /// Key.
    pub name: String,
    /// Dtype.
    pub dtype: StDtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub data: Vec<u8>,
}

impl OwnedTensor {
    /// An F32 tensor.
    pub fn f32(name: impl Into<String>, shape: Vec<usize>, data: &[f32]) -> Self {
        Self {
            name: name.into(),
            dtype: StDtype::F32,
            shape,
            data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// A U8 tensor.
    pub fn u8(name: impl Into<String>, shape: Vec<usize>, data: Vec<u8>) -> Self {
        Self {
            name: name.into(),
            dtype: StDtype::U8,
            shape,
            data,
        }
    }
}

fn dtype_name(d: StDtype) -> String {
    format!("{d:?}")
}

/// Writes safetensors incrementally: the header (names, dtypes, shapes) is fixed up front, then
/// each tensor's bytes are appended in that order, so only one tensor is in memory at a time.
pub struct StreamingWriter {
    file: std::io::BufWriter<File>,
    tmp: PathBuf,
    dest: PathBuf,
    order: Vec<(String, usize)>,
    next: usize,
}

impl StreamingWriter {
    /// Starts `dest` (written to `dest.tmp` until [`finish`](Self::finish)).
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn create(
        dest: &Path,
        plan: &[(String, StDtype, Vec<usize>)],
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self> {
        let mut header = serde_json::Map::new();
        if !metadata.is_empty() {
            header.insert("__metadata__".into(), serde_json::json!(metadata));
        }
        let mut off = 0usize;
        let mut order = Vec::new();
        for (name, dtype, shape) in plan {
            let n = shape.iter().product::<usize>() * dtype_size(*dtype);
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": dtype_name(*dtype), "shape": shape, "data_offsets": [off, off + n]}),
            );
            order.push((name.clone(), n));
            off += n;
        }
        let mut h = serde_json::to_vec(&header).map_err(|e| Error::Format {
            path: dest.to_path_buf(),
            msg: e.to_string(),
        })?;
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
        let tmp = tmp_path(dest);
        let f = File::create(&tmp).map_err(io_err(&tmp))?;
        let mut file = std::io::BufWriter::with_capacity(1 << 20, f);
        file.write_all(&(h.len() as u64).to_le_bytes())
            .and_then(|_| file.write_all(&h))
            .map_err(io_err(&tmp))?;
        Ok(Self {
            file,
            tmp,
            dest: dest.to_path_buf(),
            order,
            next: 0,
        })
    }

    /// Appends the next tensor's bytes.
    ///
    /// # Panics
    /// If tensors come out of the planned order or with the wrong size (a bug in the caller).
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn write(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let (want, n) = &self.order[self.next];
        assert_eq!(want, name, "tensors written out of plan order");
        assert_eq!(
            *n,
            data.len(),
            "tensor {name}: byte count differs from plan"
        );
        self.next += 1;
        self.file.write_all(data).map_err(io_err(&self.tmp))
    }

    /// Flushes, syncs and renames the file into place.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn finish(self) -> Result<()> {
        assert_eq!(
            self.next,
            self.order.len(),
            "not every planned tensor was written"
        );
        let f = self
            .file
            .into_inner()
            .map_err(|e| io_err(&self.tmp)(e.into_error()))?;
        f.sync_all().map_err(io_err(&self.tmp))?;
        std::fs::rename(&self.tmp, &self.dest).map_err(io_err(&self.dest))
    }
}

/// Writes a whole safetensors file atomically (temporary file, then rename).
///
/// # Errors
/// [`Error::Io`].
pub fn write_safetensors(
    dest: &Path,
    tensors: &[OwnedTensor],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let plan: Vec<_> = tensors
        .iter()
        .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
        .collect();
    let mut w = StreamingWriter::create(dest, &plan, metadata)?;
    for t in tensors {
        w.write(&t.name, &t.data)?;
    }
    w.finish()
}

/// The `{"format": "pt"}` metadata transformers and PEFT write.
pub fn pt_metadata() -> BTreeMap<String, String> {
    BTreeMap::from([("format".to_string(), "pt".to_string())])
}

/// Writes a text file atomically.
///
/// # Errors
/// [`Error::Io`].
pub fn write_text(dest: &Path, text: &str) -> Result<()> {
    let tmp = tmp_path(dest);
    {
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(text.as_bytes()).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    std::fs::rename(&tmp, dest).map_err(io_err(dest))
}

/// `dest` with `.tmp-<pid>` appended: where a file is written before it is renamed onto `dest`.
pub(crate) fn tmp_path(dest: &Path) -> PathBuf {
    let mut name = dest
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    dest.with_file_name(name)
}

/// An output folder under construction: files go into `<dest>.tmp-<pid>/` and the folder is
/// renamed onto `dest` by [`commit`](Self::commit), so a crash never leaves a half-written
/// result under the final name. An existing `dest` is replaced only at commit.
pub struct StagedDir {
    /// Where files are written now.
    pub path: PathBuf,
    dest: PathBuf,
}

impl StagedDir {
    /// Creates the staging folder next to `dest`.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn new(dest: &Path) -> Result<Self> {
        let path = tmp_path(dest);
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(io_err(&path))?;
        }
        std::fs::create_dir_all(&path).map_err(io_err(&path))?;
        Ok(Self {
            path,
            dest: dest.to_path_buf(),
        })
    }

    /// Moves the staged folder onto its destination (replacing an older one).
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn commit(self) -> Result<PathBuf> {
        if self.dest.exists() {
            let old = tmp_path(&self.dest).with_extension("old");
            std::fs::rename(&self.dest, &old).map_err(io_err(&self.dest))?;
            std::fs::rename(&self.path, &self.dest).map_err(io_err(&self.dest))?;
            std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
        } else {
            std::fs::rename(&self.path, &self.dest).map_err(io_err(&self.dest))?;
        }
        Ok(self.dest)
    }
}
