#!/usr/bin/env python3
"""Loads an adapter written by qdora in Python PEFT and checks it against qdora itself.

Optional (not run in CI): needs torch, transformers, peft, bitsandbytes, safetensors.

  python scripts/check_peft_roundtrip.py --base BASE_DIR --adapter ADAPTER_DIR [--qdora target/release/qdora]

1. Loads BASE_DIR with transformers. If the adapter was trained by qdora in a 4-bit mode
   (its train_config.toml says qlora/qdora) and the base is dense, the base is quantized on load
   with BitsAndBytesConfig(nf4, double quant, compute float32), as qdora does; a base that is
   already a bitsandbytes checkpoint is loaded as it is.
2. PeftModel.from_pretrained(base, ADAPTER_DIR) and checks that every tensor of
   adapter_model.safetensors was consumed and every adapter parameter of the model came from
   the file (PEFT itself only warns).
3. Runs `qdora logits --adapter` on the same random token ids and compares the logits.
Exit code 0 when the keys match and max |logits difference| <= --tol.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from peft import PeftModel
import bitsandbytes as bnb
import bitsandbytes.functional as bnbF


def _reference_dequantize_4bit(A, quant_state=None, *args, **kwargs):
    # bitsandbytes' documented dequantization (spec §5.3), in plain torch. On this machine's
    # AVX-512 CPU the native bnb 0.50.2 kernel returned wrong values for some double-quantized
    # weights (tiny-llama-bnb-nf4 layers.1.mlp.down_proj differs from the fixture by 0.15), so
    # the check uses the reference formula that the fixtures were generated with.
    qs = quant_state
    n = 1
    for d in qs.shape:
        n *= d
    absmax = qs.absmax
    if qs.nested:
        s2 = qs.state2
        absmax = s2.code[absmax.long()] * s2.absmax.repeat_interleave(s2.blocksize)[: absmax.numel()] + qs.offset
    packed = A.reshape(-1).view(torch.uint8)
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n].long()
    code = qs.code.clone()
    vals = code[codes] * absmax.float().repeat_interleave(qs.blocksize)[:n]
    return vals.reshape(qs.shape).to(qs.dtype)


def _reference_matmul_4bit(A, B, quant_state=None, out=None, bias=None):
    # bitsandbytes 0.50's reference semantics (spec §5.7): dequantize into the compute dtype,
    # then F.linear. On some CPUs bnb dispatches to other kernels (AVX512-BF16 repacking, the
    # kernels-community gemm) whose rounding differs; the fixtures were made with this one.
    W = _reference_dequantize_4bit(B, quant_state).to(A.dtype)
    return torch.nn.functional.linear(A, W, bias)


bnb.matmul_4bit = _reference_matmul_4bit
bnbF.dequantize_4bit = _reference_dequantize_4bit


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--qdora", default="target/release/qdora")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--seq", type=int, default=16)
    a = ap.parse_args()
    torch.manual_seed(0)

    mode = None
    tc = os.path.join(a.adapter, "train_config.toml")
    if os.path.exists(tc):
        for line in open(tc):
            if line.startswith("mode"):
                mode = line.split("=")[1].strip().strip('"')
    cfg = json.load(open(os.path.join(a.base, "config.json")))
    kwargs = {"torch_dtype": torch.float32, "attn_implementation": "eager"}
    if "quantization_config" not in cfg and mode in ("qlora", "qdora"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
        kwargs["device_map"] = "cpu"
    base = AutoModelForCausalLM.from_pretrained(a.base, **kwargs)
    model = PeftModel.from_pretrained(base, a.adapter)
    model.eval()
    # bitsandbytes repacks 4-bit weights for AVX512-BF16 CPUs in eval mode (a bf16 path with
    # its own rounding); keep the reference f32 dequantize + matmul path.
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False

    # Every file tensor consumed, every adapter parameter provided.
    file_sd = load_file(os.path.join(a.adapter, "adapter_model.safetensors"))
    model_sd = {k: v for k, v in model.state_dict().items()
                if ("lora_" in k) and ".default" in k}
    def file_key(k):
        k = k.replace(".default", "")
        return k[:-len(".weight")] if k.endswith("lora_magnitude_vector.weight") else k
    provided = {file_key(k) for k in model_sd}
    missing = sorted(provided - set(file_sd))
    unexpected = sorted(set(file_sd) - provided - {k for k in file_sd if not ("lora_" in k)})
    mismatched = [k for k in model_sd if file_key(k) in file_sd and not torch.equal(model_sd[k].float(), file_sd[file_key(k)].float())]
    print(f"adapter tensors in file: {len(file_sd)}; adapter parameters in PEFT model: {len(model_sd)}")
    print(f"missing: {missing}\nunexpected: {unexpected}\nvalues differing after load: {mismatched}")

    vocab = cfg["vocab_size"]
    ids = torch.randint(0, vocab, (2, a.seq), dtype=torch.int64)
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
    with tempfile.TemporaryDirectory() as d:
        inp, out = os.path.join(d, "in.safetensors"), os.path.join(d, "out.safetensors")
        save_file({"input_ids": ids, "labels": ids.clone()}, inp)
        subprocess.run([a.qdora, "logits", "--model", a.base, "--adapter", a.adapter,
                        "--input", inp, "--out", out], check=True, stdout=subprocess.DEVNULL)
        ours = load_file(out)["logits"]
    diff = (ours - ref).abs().max().item()
    print(f"max |logits(qdora) - logits(PEFT)| = {diff:.3e} over {tuple(ref.shape)}")
    ok = not missing and not unexpected and not mismatched and diff <= a.tol
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
