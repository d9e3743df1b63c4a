//! Fuzz target: see `qdora::fuzzing::checkpoint_reader` (the corpus in tests/fuzz_corpus/checkpoint_reader replays it in CI).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qdora::fuzzing::checkpoint_reader(data));
