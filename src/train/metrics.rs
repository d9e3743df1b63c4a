//! [`Metrics`]: a run's `metrics.jsonl` (one JSON object per logged step) and the train and
//! eval loss curves the plot is drawn from. A resumed run keeps the lines up to the step it
//! resumes from and continues the file from there. Each run writes a new file (renamed over the
//! old one), so a killed run's process that is still exiting writes only into the file it had
//! open, never into the lines of the run that resumed it.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use super::error::Result;

/// The metrics file being written and the curves so far.
pub struct Metrics {
    path: PathBuf,
    file: BufWriter<File>,
    /// (step, train loss).
    pub train_curve: Vec<(usize, f64)>,
    /// (step, eval loss), step 0 = before training.
    pub eval_curve: Vec<(usize, f64)>,
}

impl Metrics {
    /// Starts `out/metrics.jsonl`. When resuming at step `first > 0`, the lines of steps up to
    /// `first` are kept (with their points of the curves) and later ones dropped.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn open(out: &Path, first: usize) -> Result<Self> {
        let path = out.join("metrics.jsonl");
        let kept: Vec<String> = if first > 0 {
            std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .filter(|l| {
                    serde_json::from_str::<Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s as usize <= first)
                })
                .map(String::from)
                .collect()
        } else {
            Vec::new()
        };
        let fresh = out.join("metrics.jsonl.tmp");
        let file = File::create(&fresh).map_err(|source| crate::io::Error::Io {
            path: fresh.clone(),
            source,
        })?;
        let mut m = Metrics {
            path: fresh.clone(),
            file: BufWriter::new(file),
            train_curve: Vec::new(),
            eval_curve: Vec::new(),
        };
        for l in &kept {
            if let Ok(v) = serde_json::from_str::<Value>(l) {
                let s = v["step"].as_u64().unwrap_or(0) as usize;
                if let Some(x) = v["loss"].as_f64() {
                    m.train_curve.push((s, x));
                }
                if let Some(x) = v["eval_loss"].as_f64() {
                    m.eval_curve.push((s, x));
                }
            }
            m.write_line(l)?;
        }
        m.flush()?;
        std::fs::rename(&fresh, &path).map_err(|source| crate::io::Error::Io {
            path: path.clone(),
            source,
        })?;
        m.path = path;
        Ok(m)
    }

    fn io(&self) -> impl Fn(std::io::Error) -> crate::io::Error + '_ {
        |source| crate::io::Error::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn write_line(&mut self, line: &str) -> Result<()> {
        let r = writeln!(self.file, "{line}");
        r.map_err(self.io())?;
        Ok(())
    }

    /// Appends one record.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn log(&mut self, record: &impl Serialize) -> Result<()> {
        let line = serde_json::to_string(record).unwrap_or_default();
        self.write_line(&line)
    }

    /// Writes what is buffered to the file.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn flush(&mut self) -> Result<()> {
        let r = self.file.flush();
        r.map_err(self.io())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_resumed_file_keeps_its_steps_and_ignores_a_stale_writer() {
        let dir = tempfile::tempdir().unwrap();
        let mut old = Metrics::open(dir.path(), 0).unwrap();
        for step in 1..=4 {
            old.log(&json!({"step": step, "loss": step as f64}))
                .unwrap();
        }
        old.flush().unwrap();

        let mut resumed = Metrics::open(dir.path(), 2).unwrap();
        assert_eq!(resumed.train_curve, vec![(1, 1.0), (2, 2.0)]);
        // the killed run's process, not yet gone, goes on writing to what it had open
        for step in 5..=40 {
            old.log(&json!({"step": step, "loss": 0.5})).unwrap();
        }
        old.flush().unwrap();
        resumed.log(&json!({"step": 3, "loss": 3.5})).unwrap();
        resumed.flush().unwrap();

        let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        let steps: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, vec![1, 2, 3]);
        assert!(!dir.path().join("metrics.jsonl.tmp").exists());
    }
}
