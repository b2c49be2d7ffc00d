"""Decode speed on SmolLM2-135M-Instruct: our KV-cache sampler vs HF generate.

Batch 1 and 8, a 16-token chat prompt, exactly 64 new tokens (no stop
token), float32, temperature 1 sampling for ours and greedy
`generate(do_sample=False, min_new_tokens=64)` for HF transformers (torch
CPU) on the same GGUF weights. Tokens/s counts new tokens of all rows;
times are medians of 3 runs after a warm-up (ours excludes compile; the
compile time is reported separately).

    python benchmarks/bench_decode.py [--batches 1,8] [--new 64] [--no-hf]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
import jaxreward  # noqa: E402
from jaxreward.models import pretrained  # noqa: E402
from jaxreward.sampling.sampler import generate  # noqa: E402

PROMPT = "Tell me a short story about a robot."


def prompt_batch(tokenizer, batch: int) -> tuple[np.ndarray, np.ndarray]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                         add_generation_prompt=True)
    ids = tokenizer.encode(text, add_bos=tokenizer.add_bos)
    tokens = np.tile(np.asarray(ids, np.int32), (batch, 1))
    return tokens, np.ones_like(tokens, bool)


def bench_ours(model, params, tokenizer, batch: int, new: int) -> dict:
    tokens, mask = prompt_batch(tokenizer, batch)
    run = lambda: generate(model, params, tokens, mask, rng=jax.random.PRNGKey(0),
                           max_new_tokens=new, temperature=1.0).tokens_RM
    first, sec = common.time_fn(run, warmup=1, iters=3)
    return {"impl": "jaxreward", "batch": batch, "prompt_len": tokens.shape[1], "new_tokens": new,
            "compile_s": first - sec, "seconds": sec, "tokens_per_s": batch * new / sec}


def bench_hf(gguf_path, tokenizer, batch: int, new: int) -> dict:
    import torch
    import transformers
    torch.set_num_threads(os.cpu_count())
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, torch_dtype=torch.float32).eval()
    tokens, mask = prompt_batch(tokenizer, batch)
    ids = torch.tensor(tokens, dtype=torch.long)
    am = torch.ones_like(ids)

    def run():
        with torch.no_grad():
            return model.generate(ids, attention_mask=am, do_sample=False, max_new_tokens=new,
                                  min_new_tokens=new, pad_token_id=tokenizer.pad_id)
    run()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    sec = sorted(times)[1]
    return {"impl": "hf transformers generate", "batch": batch, "prompt_len": tokens.shape[1],
            "new_tokens": new, "compile_s": 0.0, "seconds": sec, "tokens_per_s": batch * new / sec}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    model, params, tokenizer = jaxreward.load_pretrained("smollm2-135m-instruct")
    batches = [int(b) for b in args.batches.split(",")]
    rows = [bench_ours(model, params, tokenizer, b, args.new) for b in batches]
    if not args.no_hf:
        gguf_path = pretrained.resolve("smollm2-135m-instruct")
        rows += [bench_hf(gguf_path, tokenizer, b, args.new) for b in batches]
        for b in batches:
            ours = next(r for r in rows if r["batch"] == b and r["impl"] == "jaxreward")
            hf = next(r for r in rows if r["batch"] == b and r["impl"] != "jaxreward")
            ours["speedup_vs_hf"] = ours["tokens_per_s"] / hf["tokens_per_s"]
    mem, src = common.peak_memory_bytes()
    common.report(f"decode_{jax.default_backend()}", rows, args.out,
                  {"peak_mem_GiB": mem / 2**30, "mem_source": src})


if __name__ == "__main__":
    main()
