"""Checks `qdora export` with the real llama.cpp (through llama-cpp-python): each exported model
loads, its logits match `qdora logits` on the same (merged) model, and greedy text matches
`qdora generate --temperature 0`. Optional, not in CI (building llama.cpp takes minutes):

    pip install llama-cpp-python numpy safetensors tokenizers
    cargo build --release
    python scripts/check_llama_cpp.py            # prints one line per case and a summary table

Cases: the bundled stories260K in f32 / f16 / q8_0 / q4_0; stories260K with a QDoRA adapter
trained here for 30 steps, merged (f32 and q8_0); the tiny Llama / Llama 3 / Mistral / Qwen2 /
Qwen3 checkpoints of tests/fixtures/arch with the 96-token tokenizers of tests/fixtures/gguf.
"""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
QDORA = ROOT / "target/release/qdora"


def run(*args):
    subprocess.run([str(QDORA), *map(str, args)], check=True, stdout=subprocess.DEVNULL)


def qdora_logits(model_dir: Path, ids: list[int], tmp: Path, adapter=None) -> np.ndarray:
    inp, out = tmp / "ids.safetensors", tmp / "logits.safetensors"
    save_file({"input_ids": np.array([ids], dtype=np.int64)}, str(inp))
    extra = ["--adapter", adapter] if adapter else []
    run("logits", "--model", model_dir, *extra, "--input", inp, "--out", out)
    return load_file(str(out))["logits"][0]


def qdora_greedy(model_dir: Path, prompt: str, n: int) -> str:
    r = subprocess.run([str(QDORA), "generate", "--model", str(model_dir), "--prompt", prompt,
                        "--temperature", "0", "--max-new-tokens", str(n)],
                       check=True, capture_output=True, text=True)
    return r.stdout


def llama_cpp_case(gguf: Path, ids: list[int], lora=None):
    from llama_cpp import Llama

    # an f32 KV cache and no flash attention: llama.cpp's defaults store K and V in f16
    llm = Llama(model_path=str(gguf), n_ctx=max(64, len(ids) + 8), logits_all=True,
                verbose=False, n_threads=2, seed=0, type_k=0, type_v=0, flash_attn=False,
                lora_path=str(lora) if lora else None)
    llm.reset()
    llm.eval(ids)
    return llm, np.array(llm.scores[: len(ids)], dtype=np.float32)


def main():
    tmp = Path(tempfile.mkdtemp(prefix="qdora-llama-cpp-"))
    stories = ROOT / "models/stories260K"
    cases = []  # (name, hf folder for qdora, gguf file, prompt or None, exported in f32)

    for t in ["f32", "f16", "q8_0", "q4_0"]:
        out = tmp / f"stories260K-{t}.gguf"
        run("export", "--model", stories, "--out", out, "--type", t)
        cases.append((f"stories260K {t}", stories, out, "Once upon a time", t == "f32"))

    adapter = tmp / "qdora-adapter"
    run("train", "--model", stories, "--mode", "qdora", "--max-steps", "30", "--lr", "3e-3",
        "--batch-size", "4", "--seq-len", "128", "--eval-every", "0", "--out", adapter)
    merged = tmp / "merged"
    run("merge", "--model", stories, "--adapter", adapter, "--out", merged)
    for t in ["f32", "q8_0"]:
        out = tmp / f"stories260K-qdora-{t}.gguf"
        run("export", "--model", stories, "--adapter", adapter, "--out", out, "--type", t)
        cases.append((f"stories260K + QDoRA merged {t}", merged, out, "Once upon a time", t == "f32"))

    # a plain LoRA adapter as a llama.cpp --lora file on the f32 base
    lora = tmp / "lora-adapter"
    run("train", "--model", stories, "--mode", "lora", "--max-steps", "30", "--lr", "3e-3",
        "--batch-size", "4", "--seq-len", "128", "--eval-every", "0", "--out", lora)
    lora_gguf = tmp / "stories260K-lora-f32.gguf"
    run("export", "--model", stories, "--adapter", lora, "--adapter-only", "--type", "f32",
        "--out", lora_gguf)
    lora_case = (lora, lora_gguf)

    fx = ROOT / "tests/fixtures"
    for name, tok in [("llama-rope-linear", "tok-spm"), ("llama3-rope-bias-tied", "tok-spm"),
                      ("mistral-sliding-window", "tok-spm"), ("qwen2-qkv-bias", "tok-bpe"),
                      ("qwen3-qk-norm", "tok-bpe")]:
        d = tmp / name
        shutil.copytree(fx / "arch" / name, d)
        for f in (fx / "gguf" / tok).iterdir():
            shutil.copy(f, d / f.name)
        out = tmp / f"{name}.gguf"
        run("export", "--model", d, "--out", out, "--type", "f32")
        cases.append((name, d, out, None, True))

    from tokenizers import Tokenizer

    rows = []
    worst_f32 = 0.0
    for name, hf_dir, gguf, prompt, is_f32 in cases:
        cfg = json.loads((hf_dir / "config.json").read_text())
        if prompt:
            tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
            ids = tok.encode(prompt).ids  # with BOS, as qdora generate encodes
            ids = ids + [i % cfg["vocab_size"] for i in range(40, 60)]
        else:
            # a sliding window of 5 in the Mistral fixture: stay inside it for llama.cpp
            n = 5 if "mistral" in name else 12
            ids = [(7 * i + 3) % cfg["vocab_size"] for i in range(n)]
        want = qdora_logits(hf_dir, ids, tmp)
        llm, got = llama_cpp_case(gguf, ids)
        diff = float(np.abs(got - want).max())
        if is_f32:
            worst_f32 = max(worst_f32, diff)
        text_ok = ""
        if prompt:
            lc_ids = llm.tokenize(prompt.encode(), add_bos=True)
            tok_ok = lc_ids == tok.encode(prompt).ids
            ours = qdora_greedy(hf_dir, prompt, 24)
            llm.reset()
            theirs = llm.create_completion(prompt, max_tokens=24, temperature=0.0, top_k=1)
            theirs = prompt + theirs["choices"][0]["text"]
            same = ours.strip().startswith(theirs.strip()[: len(theirs.strip())])
            text_ok = f"tokenize {'same' if tok_ok else 'DIFFERENT'}, greedy text {'same' if same else 'DIFFERENT'}"
            if not same:
                text_ok += f"\n    qdora:     {ours.strip()!r}\n    llama.cpp: {theirs.strip()!r}"
        rows.append((name, gguf.stat().st_size, diff, text_ok))
        print(f"{name:34s} {gguf.stat().st_size / 1024:8.1f} KiB  max|Δlogits| {diff:.2e}  {text_ok}")

    # the LoRA adapter file, applied by llama.cpp at load, against qdora with the PEFT adapter
    ids = Tokenizer.from_file(str(stories / "tokenizer.json")).encode("Once upon a time").ids
    ids = ids + list(range(40, 60))
    want = qdora_logits(stories, ids, tmp, adapter=lora_case[0])
    _, got = llama_cpp_case(tmp / "stories260K-f32.gguf", ids, lora=lora_case[1])
    diff = float(np.abs(got - want).max())
    worst_f32 = max(worst_f32, diff)
    rows.append(("stories260K f32 + LoRA adapter GGUF (--lora)", lora_case[1].stat().st_size, diff, ""))
    print(f"{'stories260K f32 + --lora adapter':34s} {lora_case[1].stat().st_size / 1024:8.1f} KiB  max|Δlogits| {diff:.2e}")

    print("\n| model | GGUF KiB | max abs Δ logits vs qdora | tokens and greedy text |")
    print("|---|---|---|---|")
    for name, size, diff, text in rows:
        print(f"| {name} | {size / 1024:.0f} | {diff:.1e} | {text.splitlines()[0] if text else 'ids given'} |")
    ok = worst_f32 < 1e-3
    print(f"\nf32 exports: worst max|Δlogits| {worst_f32:.2e} ({'within' if ok else 'OVER'} 1e-3)")
    shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
