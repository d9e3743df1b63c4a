//! Byte-for-byte agreement with bitsandbytes 0.50 (CPU) on every case in tests/fixtures/nf4,
//! the spec's worked example, and the tiny-llama NF4 checkpoint.

use std::path::{Path, PathBuf};

use qdora::io::{Checkpoint, StDtype};
use qdora::quant::{Absmax, Dtype, QuantType, QuantizeOptions, QuantizedWeight};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn dtype_of(d: StDtype) -> Dtype {
    match d {
        StDtype::F32 => Dtype::F32,
        StDtype::BF16 => Dtype::Bf16,
        StDtype::F16 => Dtype::F16,
        other => panic!("unexpected dtype {other:?}"),
    }
}

#[test]
fn every_nf4_fixture_case_matches_byte_for_byte() {
    let mut cases = 0;
    let mut dirs: Vec<_> = std::fs::read_dir(fixtures().join("nf4"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for dir in dirs {
        let input = Checkpoint::open(&dir.join("input.safetensors")).unwrap();
        let inp = input.get("input").unwrap();
        let data = inp.to_f32().unwrap();
        let dtype = dtype_of(inp.dtype);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap() != "input.safetensors")
            .collect();
        files.sort();
        for f in files {
            let stem = f.file_stem().unwrap().to_str().unwrap().to_string();
            let parts: Vec<&str> = stem.split('-').collect();
            let qt = QuantType::parse(parts[0]).unwrap();
            let blocksize: usize = parts[1].trim_start_matches("bs").parse().unwrap();
            let dq = parts[2] == "dq1";
            let r = Checkpoint::open(&f).unwrap();
            let w = QuantizedWeight::quantize(
                &data,
                &inp.shape,
                dtype,
                QuantizeOptions {
                    quant_type: qt,
                    blocksize,
                    double_quant: dq,
                },
            )
            .unwrap();
            let case = format!("{}/{}", dir.file_name().unwrap().to_str().unwrap(), stem);
            assert_eq!(w.packed, r.get("packed").unwrap().data, "{case}: packed");
            let qjson = r.get("quant_state_json").unwrap();
            assert_eq!(
                w.quant_state_json(),
                std::str::from_utf8(qjson.data).unwrap(),
                "{case}: json"
            );
            match &w.absmax {
                Absmax::Plain(a) => {
                    assert_eq!(
                        a,
                        &r.get("absmax").unwrap().to_f32().unwrap(),
                        "{case}: absmax"
                    )
                }
                Absmax::Nested {
                    qabsmax,
                    nested_absmax,
                    offset,
                    ..
                } => {
                    assert_eq!(qabsmax, r.get("absmax").unwrap().data, "{case}: qabsmax");
                    assert_eq!(
                        nested_absmax,
                        &r.get("nested_absmax").unwrap().to_f32().unwrap(),
                        "{case}: nested_absmax"
                    );
                    assert_eq!(
                        *offset,
                        r.get("nested_offset").unwrap().to_f32().unwrap()[0],
                        "{case}: offset"
                    );
                }
            }
            assert_eq!(
                w.absmax_f32(),
                r.get("absmax_dequantized").unwrap().to_f32().unwrap(),
                "{case}: absmax_dequantized"
            );
            assert_eq!(
                w.quant_map.to_vec(),
                r.get("quant_map").unwrap().to_f32().unwrap(),
                "{case}: quant_map"
            );
            let want = r.get("dequantized").unwrap().to_f32().unwrap();
            let got = w.dequantize_as_stored();
            if let Some(i) = (0..want.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
                panic!("{case}: dequantized[{i}] = {} expected {}", got[i], want[i]);
            }
            cases += 1;
        }
    }
    assert_eq!(cases, 48);
}

#[test]
fn worked_example_spec_section_11() {
    // W[i][j] = f32((7j + 13i) % 17 - 8) / f32(16(i+1)), 4 × 64, one block per row.
    let mut w = vec![0f32; 4 * 64];
    for i in 0..4 {
        for j in 0..64 {
            w[i * 64 + j] = ((7 * j + 13 * i) % 17) as f32 - 8.0;
            w[i * 64 + j] /= (16 * (i + 1)) as f32;
        }
    }
    let opts = |dq| QuantizeOptions {
        quant_type: QuantType::Nf4,
        blocksize: 64,
        double_quant: dq,
    };
    let q = QuantizedWeight::quantize(&w, &[4, 64], Dtype::F32, opts(false)).unwrap();
    let hex: String = q.packed[..32].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex,
        "06e2b07f3c19f4d1a06e2b07f3c19f4d1a06e2b07f3c19f4d1a06e2b07f3c19f"
    );
    assert_eq!(q.absmax_f32(), &[0.5, 0.25, 0.16666667, 0.125]);
    let d = q.dequantize();
    assert_eq!(
        &d[..8],
        &[
            -0.5,
            -0.045525018,
            0.36147842,
            -0.26253653,
            0.16895762,
            -0.5,
            0.0,
            0.5
        ]
    );
    let dq = QuantizedWeight::quantize(&w, &[4, 64], Dtype::F32, opts(true)).unwrap();
    assert_eq!(dq.packed, q.packed);
    match &dq.absmax {
        Absmax::Nested {
            qabsmax,
            nested_absmax,
            offset,
            ..
        } => {
            assert_eq!(qabsmax, &[255, 84, 43, 30]);
            assert_eq!(nested_absmax, &[0.23958331]);
            assert_eq!(*offset, 0.2604167);
        }
        Absmax::Plain(_) => panic!("expected nested absmax"),
    }
    assert_eq!(dq.absmax_f32(), &[0.5, 0.25027183, 0.16739099, 0.12359214]);
    assert_eq!(
        dq.quant_state_json(),
        "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [4, 64], \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 0.2604166865348816}"
    );
    let fp4 = QuantizedWeight::quantize(
        &w,
        &[4, 64],
        Dtype::F32,
        QuantizeOptions {
            quant_type: QuantType::Fp4,
            blocksize: 64,
            double_quant: false,
        },
    )
    .unwrap();
    let hex: String = fp4.packed[..32]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        hex,
        "be2d4b03c5a63f2a7be2d4b03c5a63f2a7be2d4b03c5a63f2a7be2d4b03c5a63"
    );
    assert_eq!(
        &fp4.dequantize()[..8],
        &[
            -0.5,
            -0.083333336,
            0.33333334,
            -0.25,
            0.16666667,
            -0.5,
            0.0,
            0.5
        ]
    );
}

fn is_llama_linear(key: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && key.starts_with("model.layers.") && key.ends_with("_proj.weight")
}

#[test]
fn quantizing_tiny_llama_reproduces_transformers_checkpoint() {
    let src = Checkpoint::open(&fixtures().join("models/tiny-llama")).unwrap();
    let reference = Checkpoint::open(&fixtures().join("models/tiny-llama-bnb-nf4")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model.safetensors");
    qdora::quant::bnb_io::quantize_checkpoint(
        &src,
        &out,
        QuantizeOptions::default(),
        &is_llama_linear,
        &mut |_, _, _| {},
    )
    .unwrap();
    let ours = Checkpoint::open(&out).unwrap();
    let ours_keys: Vec<&str> = ours.keys().collect();
    let ref_keys: Vec<&str> = reference.keys().collect();
    assert_eq!(ours_keys, ref_keys);
    for k in ref_keys {
        let (a, b) = (ours.get(k).unwrap(), reference.get(k).unwrap());
        assert_eq!(a.dtype, b.dtype, "{k}");
        assert_eq!(a.shape, b.shape, "{k}");
        assert!(a.data == b.data, "{k}: bytes differ");
    }
}

#[test]
fn reading_tiny_llama_nf4_dequantizes_bit_exactly() {
    let ckpt = Checkpoint::open(&fixtures().join("models/tiny-llama-bnb-nf4")).unwrap();
    let reference =
        Checkpoint::open(&fixtures().join("models/tiny-llama-bnb-nf4/reference.safetensors"))
            .unwrap();
    let mut n = 0;
    for k in reference.keys().filter(|k| k.starts_with("dequantized.")) {
        let wk = k.trim_start_matches("dequantized.");
        let w = qdora::quant::bnb_io::read_quantized(&ckpt, wk).unwrap();
        let want = reference.get(k).unwrap().to_f32().unwrap();
        assert!(
            w.dequantize_as_stored()
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{wk}"
        );
        n += 1;
    }
    assert_eq!(n, 2, "the fixture stores two dequantized weights");
}
