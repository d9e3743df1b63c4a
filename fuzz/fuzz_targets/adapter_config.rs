//! Fuzzes `adapter_config.json` parsing: never a panic; a config that parses round-trips through
//! PEFT's writer and answers the matching questions.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qdora::adapter::LoraConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(cfg) = LoraConfig::from_json(text, "fuzz/adapter_config.json") else { return };
    let again = LoraConfig::from_json(&cfg.to_json(), "round-trip").expect("written config parses");
    assert_eq!(again.r, cfg.r);
    assert_eq!(again.use_dora, cfg.use_dora);
    for p in ["model.layers.0.self_attn.q_proj", "model.layers.11.mlp.down_proj", "lm_head"] {
        let _ = cfg.is_target(p, p == "lm_head", &["q_proj", "v_proj"]);
        let _ = cfg.resolve(p);
    }
});
