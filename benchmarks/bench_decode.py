"""Decode speed on SmolLM2-135M-Instruct: our KV-cache sampler vs HF generate.

Batch 1 and 8, the chat-templated prompt (its length is in the table),
exactly 64 new tokens (no stop token), float32, temperature 1 sampling for
ours and greedy `generate(do_sample=False, min_new_tokens=64)` for HF
transformers (torch CPU) on the same GGUF weights. Tokens/s counts new
tokens of all rows; times are medians of 3 runs after a warm-up (ours
excludes compile; the compile time is reported separately).

`weights_floor_s` is the memory floor of the row: new tokens × weight bytes
÷ the read bandwidth measured in this process (a jitted float32 sum over as
many bytes as the weights). Each decode step reads every weight once, so no
float32 decoder can go below it; HF's row has `max_speedup_vs_hf`, its
seconds over that floor: the largest speedup any decoder could show.

MFU counts the model FLOPs of the job, the same for both implementations:
per row, a forward over the P prompt tokens and the first M - 1 new ones
(2 × non-embedding params per token, plus attention 4 × layers × heads ×
head_dim × the causal context it attends to) and the output layer on the M
positions that produce a new token (2 × vocab × hidden each); divided by
`common.peak_flops("float32")` (on CPU the best matmul measured in this
process; on a known GPU its stated peak). Decode at small batch is bound by
memory traffic, not FLOPs, so expect small MFUs.

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


def decode_flops(cfg, batch: int, prompt_len: int, new: int) -> float:
    """Model FLOPs of prefilling `prompt_len` tokens and sampling `new` per row."""
    non_embedding = cfg.num_params() - cfg.vocab_size * cfg.hidden_size
    if not cfg.tie_embeddings:
        non_embedding -= cfg.vocab_size * cfg.hidden_size
    fed = prompt_len + max(new - 1, 0)  # the last new token is never fed back
    context = fed * (fed + 1) / 2       # token i attends to i + 1 slots
    attn = 4 * cfg.num_layers * cfg.num_heads * cfg.dim_per_head * context
    return batch * (2.0 * non_embedding * fed + attn + 2.0 * cfg.vocab_size * cfg.hidden_size * new)


def _speed_fields(cfg, batch: int, prompt_len: int, new: int, sec: float) -> dict:
    mem, mem_src = common.peak_memory_bytes()
    return {"tokens_per_s": batch * new / sec,
            **common.mfu_fields(decode_flops(cfg, batch, prompt_len, new) / sec),
            "peak_mem_GiB": mem / 2**30, "mem_source": mem_src}


def bench_ours(model, params, tokenizer, batch: int, new: int) -> dict:
    tokens, mask = prompt_batch(tokenizer, batch)
    run = lambda: generate(model, params, tokens, mask, rng=jax.random.PRNGKey(0),
                           max_new_tokens=new, temperature=1.0).tokens_RM
    first, sec = common.time_fn(run, warmup=1, iters=3)
    return {"impl": "jaxreward", "batch": batch, "prompt_len": tokens.shape[1], "new_tokens": new,
            "compile_s": first - sec, "seconds": sec,
            **_speed_fields(model.config, batch, tokens.shape[1], new, sec)}


def bench_hf(gguf_path, tokenizer, cfg, batch: int, new: int) -> dict:
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
            "new_tokens": new, "compile_s": 0.0, "seconds": sec,
            **_speed_fields(cfg, batch, tokens.shape[1], new, sec)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    common.peak_flops("float32")  # measured (CPU) before the model loads
    model, params, tokenizer = jaxreward.load_pretrained("smollm2-135m-instruct")
    batches = [int(b) for b in args.batches.split(",")]
    rows = [bench_ours(model, params, tokenizer, b, args.new) for b in batches]
    if not args.no_hf:
        gguf_path = pretrained.resolve("smollm2-135m-instruct")
        rows += [bench_hf(gguf_path, tokenizer, model.config, b, args.new) for b in batches]
        for b in batches:
            ours = next(r for r in rows if r["batch"] == b and r["impl"] == "jaxreward")
            hf = next(r for r in rows if r["batch"] == b and r["impl"] != "jaxreward")
            ours["speedup_vs_hf"] = ours["tokens_per_s"] / hf["tokens_per_s"]
    # The memory floor: each decode step reads every weight once. No decoder
    # of these float32 weights can beat (steps × weight bytes / read bandwidth).
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    bw = common.measure_read_bandwidth(weight_bytes)
    for r in rows:
        r["weights_floor_s"] = r["new_tokens"] * weight_bytes / bw["bytes_per_s"]
    for b in batches if not args.no_hf else []:
        hf = next(r for r in rows if r["batch"] == b and r["impl"] != "jaxreward")
        hf["max_speedup_vs_hf"] = hf["seconds"] / hf["weights_floor_s"]
    print(f"weights: {weight_bytes / 2**20:.0f} MiB read per decode step at "
          f"{bw['bytes_per_s'] / 1e9:.1f} GB/s (best jitted float32 sum of that size): "
          f"floor {weight_bytes / bw['bytes_per_s'] * 1e3:.1f} ms per step")
    common.report(f"decode_{jax.default_backend()}", rows, args.out,
                  {"peak_mem_note": "peak_mem_GiB is the process high-water mark after each "
                                    "row (rows run in table order, ours first)",
                   "weight_bytes": weight_bytes, "read_bandwidth": bw})


if __name__ == "__main__":
    main()
