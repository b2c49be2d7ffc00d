"""Reward-model train-step speed: seconds/step, tokens/s, achieved GFLOP/s, MFU.

Models: `llama4.5m` (hidden 256, 4 layers, 8 heads, 4 KV heads, FFN 1024,
vocab 1024) and `smollm2` (SmolLM2-135M-Instruct architecture, random
weights: speed does not depend on them). Batch: 8 pairs × (32 prompt + 32
response) tokens = 16 sequences of 64 tokens, float32, all blocks trained,
AdamW, one device.

FLOPs per step = 3 × forward, forward = 2 × (non-embedding params) × tokens
+ attention 4 × layers × T × hidden per token (QKᵀ and AV, causal mask not
discounted) — the usual 6N + 12·L·T·d accounting ("Scaling Laws for Neural
Language Models", 2020). The head and embedding lookup are negligible.
MFU divides by `common.peak_flops(dtype)`: on CPU the best matmul measured
in this process before the models are built, on a known GPU its stated peak.

    python benchmarks/bench_reward_step.py [--models llama4.5m,smollm2] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from jaxreward import parallel  # noqa: E402
from jaxreward.models.heads import RewardModel  # noqa: E402
from jaxreward.models.llama import LlamaConfig  # noqa: E402
from jaxreward.train import defaults, pairwise  # noqa: E402
from jaxreward.train import state as state_lib, step as step_lib  # noqa: E402

MODELS = {
    "llama4.5m": LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=1024,
                             num_layers=4, num_heads=8, num_kv_heads=4),
    "smollm2": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                           num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                           rope_theta=100000.0),
}
PAIRS, T = 8, 64


def step_flops(cfg: LlamaConfig, tokens: int, seq_len: int) -> float:
    non_embedding = cfg.num_params() - cfg.vocab_size * cfg.hidden_size
    attn = 4 * cfg.num_layers * seq_len * cfg.num_heads * cfg.dim_per_head
    return 3.0 * tokens * (2.0 * non_embedding + attn)


def bench(name: str, dtype: str) -> dict:
    cfg = MODELS[name]
    import dataclasses
    cfg = dataclasses.replace(cfg, dtype=dtype)
    rng = np.random.default_rng(0)
    batch = {}
    for side in ("chosen", "rejected"):
        batch[f"{side}_tokens"] = rng.integers(0, cfg.vocab_size, (PAIRS, T)).astype(np.int32)
        batch[f"{side}_attention_mask"] = np.ones((PAIRS, T), bool)
        batch[f"{side}_positions"] = np.tile(np.arange(T, dtype=np.int32), (PAIRS, 1))
    model = RewardModel(cfg)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch["chosen_tokens"][:1]))
    params = jax.jit(lambda: step_lib.unbox(model.init(jax.random.PRNGKey(0),
                                                       batch["chosen_tokens"][:1])["params"]))()
    mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    opt = defaults.optimizer()
    tx, schedule = state_lib.make_optimizer(opt, 100)
    shardings = step_lib.state_shardings(mesh, boxed["params"], tx)
    loss_fn, metrics_fn = pairwise.make_loss_fns(model, defaults.loss().name)
    train_step = step_lib.make_train_step(loss_fn, metrics_fn, tx, schedule, mesh, shardings)
    state = [jax.jit(lambda p: state_lib.init_state(p, tx, 0), out_shardings=shardings)(params)]
    device_batch = parallel.shard_batch(batch, mesh)

    def run():
        state[0], metrics = train_step(state[0], device_batch)
        return metrics["loss"]

    first, sec = common.time_fn(run, warmup=2, iters=5)
    tokens = 2 * PAIRS * T
    flops = step_flops(cfg, tokens, T)
    mem, mem_src = common.peak_memory_bytes()
    return {"model": name, "dtype": dtype, "params_M": cfg.num_params() / 1e6,
            "tokens_per_step": tokens, "compile_s": first, "step_s": sec,
            "tokens_per_s": tokens / sec, **common.mfu_fields(flops / sec, dtype),
            "peak_mem_GiB": mem / 2**30, "mem_source": mem_src}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama4.5m,smollm2", type=common.csv_choices(tuple(MODELS)))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    common.peak_flops(args.dtype)  # measured (CPU) before any model is built
    rows = [bench(m, args.dtype) for m in args.models]
    common.report(f"reward_step_{jax.default_backend()}_{args.dtype}", rows, args.out,
                  {"batch": f"{PAIRS} pairs x {T} tokens"})


if __name__ == "__main__":
    main()
