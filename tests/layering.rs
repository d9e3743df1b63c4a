//! The house plan, checked: modules depend one way (`sys`, `io`, `dist` → `ops`, `gguf` →
//! `quant` → `adapter` → `model` → `train`, `export` → `bench`, `fuzzing`, `embedded` → `cli`),
//! and `unsafe` stays in the kernel modules (`ops`, `quant`) and the few system doors that need
//! it. Reads the sources: every `crate::<module>` path in code (comments aside) must name a
//! module to the left.

use std::path::{Path, PathBuf};

/// Each top-level module and its rank: a module may use only modules of a lower rank.
const RANKS: [(&str, usize); 14] = [
    ("sys", 0),
    ("dist", 0),
    ("io", 0),
    ("gguf", 1),
    ("ops", 1),
    ("quant", 2),
    ("adapter", 3),
    ("model", 4),
    ("train", 5),
    ("export", 5),
    ("bench", 6),
    ("fuzzing", 6),
    ("embedded", 6),
    ("cli", 7),
];

/// Files allowed to hold `unsafe` outside `ops` and `quant`: the memory map of a checkpoint,
/// the allocator settings of the binary, and the Ctrl-C handler.
const UNSAFE_DOORS: [&str; 3] = ["src/io.rs", "src/main.rs", "src/sys.rs"];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file of `src/` belongs to (`None` for `lib.rs`).
fn module_of(file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src()).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    let name = first.trim_end_matches(".rs").to_string();
    (name != "lib").then_some(name)
}

/// The file's code lines with comments removed (line comments and doc comments).
fn code_lines(text: &str) -> Vec<(usize, String)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.split("//").next().unwrap_or("").to_string()))
        .filter(|(_, l)| !l.trim().is_empty())
        .collect()
}

fn rank(module: &str) -> Option<usize> {
    RANKS.iter().find(|(m, _)| *m == module).map(|(_, r)| *r)
}

#[test]
fn modules_depend_one_way() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut problems = Vec::new();
    for f in &files {
        let Some(me) = module_of(f) else { continue };
        if me == "main" {
            continue;
        }
        let my_rank = rank(&me).unwrap_or_else(|| panic!("{me}: a module missing from RANKS"));
        let text = std::fs::read_to_string(f).unwrap();
        for (line, code) in code_lines(&text) {
            for (at, _) in code.match_indices("crate::") {
                let used: String = code[at + 7..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if used == me || used.is_empty() {
                    continue;
                }
                match rank(&used) {
                    Some(r) if r < my_rank => {}
                    _ => problems.push(format!(
                        "{}:{line}: `{me}` uses `crate::{used}`",
                        f.strip_prefix(src()).unwrap().display()
                    )),
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn unsafe_stays_in_the_kernels() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut problems = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(root).unwrap().to_string_lossy().to_string();
        let module = module_of(f).unwrap_or_default();
        if ["ops", "quant"].contains(&module.as_str()) || UNSAFE_DOORS.contains(&rel.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        for (line, code) in code_lines(&text) {
            if code
                .split(|c: char| !c.is_alphanumeric() && c != '_')
                .any(|w| w == "unsafe")
            {
                problems.push(format!("{rel}:{line}: unsafe outside the kernels"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
