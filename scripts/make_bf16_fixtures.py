#!/usr/bin/env python3
"""Writes tests/fixtures/peft-bf16: the PEFT fixtures' cases (lora, dora, qlora, qdora) run by
PEFT in bf16, as QLoRA recipes run them: the base loaded with torch_dtype=bfloat16 (a
bitsandbytes 4-bit base with bnb_4bit_compute_dtype=bfloat16), the adapter in f32
(autocast_adapter_dtype, PEFT's default). For each case: logits and mean loss of the fixture's
batch, and the gradient of every adapter tensor (keys as in adapter_model.safetensors).

Optional (not run in CI): needs torch, transformers, peft, bitsandbytes, safetensors.

  python scripts/make_bf16_fixtures.py [--fixtures tests/fixtures]

4-bit products use bitsandbytes' reference semantics (dequantize to the quant_state dtype, cast
to the compute dtype, F.linear), as scripts/check_peft_roundtrip.py does: on AVX-512 CPUs bnb
dispatches to repacking kernels with their own rounding.
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from peft import PeftModel
import bitsandbytes as bnb
import peft
import transformers


# bitsandbytes' reference dequantize + F.linear, patched in by importing the round-trip check
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_peft_roundtrip  # noqa: E402,F401


CASES = ["lora", "dora", "qlora", "qdora"]


def file_key(k):
    k = k.replace(".default", "")
    return k[: -len(".weight")] if k.endswith("lora_magnitude_vector.weight") else k


def run_case(fixtures, case, out_root):
    manifest = json.load(open(os.path.join(fixtures, "MANIFEST.json")))
    entry = next(c for c in manifest["cases"] if c["id"] == f"peft/{case}")
    base_dir = os.path.join(fixtures, entry["params"]["base_model"])
    adapter_dir = os.path.join(fixtures, "peft", case)
    ref = load_file(os.path.join(adapter_dir, "reference.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.bfloat16, attn_implementation="eager", device_map="cpu"
    )
    for m in base.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.compute_dtype = torch.bfloat16
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    model.train()
    ids, labels = ref["input_ids"].long(), ref["labels"].long()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    tensors = {
        "input_ids": ids,
        "labels": labels,
        "logits": out.logits.detach().float().contiguous(),
        "loss": out.loss.detach().float().reshape(1),
    }
    dtypes = set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            dtypes.add(str(p.dtype))
            tensors[file_key(name)] = p.grad.detach().float().contiguous()
    d = os.path.join(out_root, case)
    os.makedirs(d, exist_ok=True)
    save_file(tensors, os.path.join(d, "reference.safetensors"))
    f32_loss = ref["loss"].item()
    print(f"{case}: loss bf16 {out.loss.item():.6f} vs f32 {f32_loss:.6f}; "
          f"{len(tensors) - 4} gradients; adapter dtypes {sorted(dtypes)}")
    return {"case": case, "base_model": entry["params"]["base_model"], "adapter": f"peft/{case}",
            "loss": out.loss.item(), "f32_loss": f32_loss, "adapter_dtypes": sorted(dtypes)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default="tests/fixtures")
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    out_root = os.path.join(a.fixtures, "peft-bf16")
    cases = [run_case(a.fixtures, c, out_root) for c in CASES]
    info = {
        "generated_by": "scripts/make_bf16_fixtures.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "bitsandbytes": bnb.__version__},
        "cases": cases,
    }
    with open(os.path.join(out_root, "cases.json"), "w") as f:
        json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
