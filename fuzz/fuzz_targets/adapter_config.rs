//! Fuzz target: see `qdora::fuzzing::adapter_config` (the corpus in tests/fuzz_corpus/adapter_config replays it in CI).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qdora::fuzzing::adapter_config(data));
