//! Parquet data as Hugging Face `datasets` and pyarrow write it: one file, or a folder of shards
//! (every `*.parquet` below it, in path order, as `data/train-00000-of-00002.parquet` ...).
//! Each row becomes the JSON record its columns spell (`text`, `instruction`/`output`,
//! `messages`, `conversations`, `input_ids`/`labels`: the same shapes as JSONL), read one row
//! group at a time so a large file is never held whole. Snappy, gzip, LZ4 and zstd pages are
//! read. Errors name the file, the row group and the row (and the column, through the record's
//! message).

use std::fs::File;
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};
use serde_json::Value;

use super::error::{Error, Result};

/// Whether `path` is Parquet data: a `.parquet` file, or a folder holding any.
pub fn is_parquet(path: &Path) -> bool {
    if path.is_dir() {
        return !shards(path).is_empty();
    }
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

fn shards(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
            {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Where a record came from: the file and row group (as the error's "path") and the 1-based row
/// within the file (as its "line").
pub struct RowPlace {
    /// `file.parquet (row group G)`.
    pub label: String,
    /// 1-based row in the file.
    pub row: usize,
}

/// Calls `f` with each row of the file or shards at `path`, as a JSON object, in order.
///
/// # Errors
/// [`Error::Dataset`] naming the file (and row group) for unreadable Parquet, and whatever `f`
/// returns.
pub fn for_each_record(
    path: &Path,
    f: &mut dyn FnMut(RowPlace, Value) -> Result<()>,
) -> Result<()> {
    let files = if path.is_dir() {
        shards(path)
    } else {
        vec![path.to_path_buf()]
    };
    if files.is_empty() {
        return Err(Error::Dataset {
            path: path.display().to_string(),
            msg: "no .parquet files in this folder".into(),
        });
    }
    for file in files {
        let name = file.display().to_string();
        let bad = |where_: String, e: &dyn std::fmt::Display| Error::Dataset {
            path: where_,
            msg: format!("unreadable Parquet: {e}"),
        };
        let reader = File::open(&file)
            .map_err(|e| bad(name.clone(), &e))
            .and_then(|fh| SerializedFileReader::new(fh).map_err(|e| bad(name.clone(), &e)))?;
        let mut row = 0;
        for g in 0..reader.num_row_groups() {
            let label = format!("{name} (row group {g})");
            let group = reader
                .get_row_group(g)
                .map_err(|e| bad(label.clone(), &e))?;
            let rows = group
                .get_row_iter(None)
                .map_err(|e| bad(label.clone(), &e))?;
            for r in rows {
                row += 1;
                let r = r.map_err(|e| bad(format!("{label}, row {row}"), &e))?;
                f(
                    RowPlace {
                        label: label.clone(),
                        row,
                    },
                    r.to_json_value(),
                )?;
            }
        }
    }
    Ok(())
}
