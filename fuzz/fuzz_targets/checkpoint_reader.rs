//! Fuzzes the safetensors reader and the bitsandbytes quant-state reader: any bytes must give a
//! value or an error, never a panic; a weight that reads must dequantize.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qdora::io::Checkpoint;
use qdora::quant::bnb_io;

fuzz_target!(|data: &[u8]| {
    let Ok(ck) = Checkpoint::from_bytes("fuzz.safetensors", data.to_vec()) else { return };
    let keys: Vec<String> = ck.keys().map(String::from).collect();
    for k in &keys {
        if let Ok(t) = ck.get(k) {
            let _ = t.to_f32();
            let _ = t.to_i64();
        }
        if !bnb_io::is_quant_aux_key(k) && bnb_io::is_quantized(&ck, k) {
            if let Ok(w) = bnb_io::read_quantized(&ck, k) {
                if w.numel() <= 1 << 20 {
                    let d = w.dequantize();
                    assert_eq!(d.len(), w.numel());
                }
            }
        }
    }
});
