//! Fuzz target: see `qdora::fuzzing::dataset_reader` (the corpus in tests/fuzz_corpus/dataset_reader replays it in CI).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qdora::fuzzing::dataset_reader(data));
