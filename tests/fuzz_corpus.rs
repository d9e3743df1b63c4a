//! Replays the kept fuzz corpora (tests/fuzz_corpus/<target>/, minimised from fuzzing runs of
//! the three readers plus their seeds) through the same checks as the fuzz targets.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_corpus")
        .join(target);
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let bytes = std::fs::read(&p).unwrap();
        let r = std::panic::catch_unwind(|| check(&bytes));
        assert!(r.is_ok(), "{target}: {} panicked", p.display());
        n += 1;
    }
    assert!(n > 100, "{target}: only {n} corpus files");
}

#[test]
fn checkpoint_reader_corpus() {
    replay("checkpoint_reader", qdora::fuzzing::checkpoint_reader);
}

#[test]
fn adapter_config_corpus() {
    replay("adapter_config", qdora::fuzzing::adapter_config);
}

#[test]
fn dataset_reader_corpus() {
    replay("dataset_reader", qdora::fuzzing::dataset_reader);
}
