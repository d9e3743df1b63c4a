#!/usr/bin/env python3
"""The PyTorch + transformers + PEFT (+ bitsandbytes) side of `qdora bench train`.

Optional (not run in CI). Runs real training steps of a random-initialised Llama preset with the
settings of issue 6 (LoraConfig r=8, lora_alpha=32, lora_dropout=0.1 on q/k/v/o/gate/up/down,
fp32, batch 4 × seq 256, AdamW, no gradient checkpointing unless asked) and prints one JSON line
with the same fields as `qdora bench train`. `--dtype bf16` loads the model in bf16 and sets
`bnb_4bit_compute_dtype=torch.bfloat16`, as QLoRA recipes do (the ceiling is then a bf16 matmul).

  python scripts/peft_bench.py --preset llama-tiny-512 --mode qdora [--steps 3] [--threads 2] [--dtype bf16]
"""
import argparse
import json
import os
import resource
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig
from peft import LoraConfig, get_peft_model

PRESETS = {
    "llama-tiny-512": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8),
    "llama-small-1024": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16),
}


def ceiling_gflops(n=2048, reps=3, dtype=torch.float32):
    a, b = torch.ones(n, n, dtype=dtype), torch.full((n, n), 0.5, dtype=dtype)
    best = 1e9
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-tiny-512", choices=sorted(PRESETS))
    ap.add_argument("--mode", default="qdora", choices=["full", "lora", "dora", "qlora", "qdora"])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False, **PRESETS[a.preset])
    cfg._attn_implementation = "sdpa"
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_config(cfg, dtype=dt)
    if a.mode in ("qlora", "qdora"):
        d = tempfile.mkdtemp()
        model.save_pretrained(d)
        del model
        model = AutoModelForCausalLM.from_pretrained(d, device_map="cpu", dtype=dt, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dt))
    if a.mode != "full":
        lc = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, use_dora=a.mode in ("dora", "qdora"),
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM")
        model = get_peft_model(model, lc)
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 32000, (a.batch_size, a.seq_len))
    ceiling_before = ceiling_gflops(dtype=dt)
    times = []
    for s in range(a.steps + 1):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s > 0:
            times.append(time.perf_counter() - t)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # the higher of the readings before and after the steps, as `qdora bench train` reports it
    ceiling_after = ceiling_gflops(dtype=dt)
    ceiling = max(ceiling_before, ceiling_after)
    c = cfg
    d, f, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    n_params = L * (4 * d * d + 3 * d * f) + d * V
    T = a.batch_size * a.seq_len
    step = statistics.median(times)
    attn = 12.0 * a.batch_size * c.num_attention_heads * a.seq_len ** 2 * (d // c.num_attention_heads) * L
    flops = (6 if a.mode == "full" else 4) * n_params * T + attn
    print(json.dumps({
        "mode": a.mode, "preset": a.preset, "impl": "pytorch+peft", "dtype": a.dtype, "params_matmul": n_params, "tokens_per_step": T,
        "step_s": step, "tokens_per_s": T / step, "gflops": flops / step / 1e9, "ceiling_gflops": ceiling,
        "ceiling_readings": [ceiling_before, ceiling_after],
        "mfu": flops / step / 1e9 / ceiling, "peak_rss_mib": peak_rss_mib,
        "gradient_checkpointing": a.gradient_checkpointing, "batch": f"{a.batch_size}x{a.seq_len}", "loss": loss.item()}))


if __name__ == "__main__":
    main()
