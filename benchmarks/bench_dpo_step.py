"""DPO train-step speed: seconds/step, tokens/s, achieved GFLOP/s, MFU, for the
reference log-probs precomputed (`reference.precompute=True`, the default:
the step runs the policy only) and computed inside the step under
stop_gradient (`reference.precompute=False`: one more forward per step).

Models: `llama4.5m` (hidden 256, 4 layers, 8 heads, 4 KV heads, FFN 1024,
vocab 1024) and `smollm2` (SmolLM2-135M-Instruct architecture, random
weights: speed does not depend on them). Batch: 8 pairs × (32 prompt + 32
response) tokens, the two sides of a pair sharing their prompt, float32,
every policy parameter trained, AdamW, one device. The step is the
driver's: `experiments/dpo.py`'s loss functions in
`train.step.make_train_step`. With prefix sharing (`model.prefix_sharing`,
the driver's default) a pair is one packed row [prompt | chosen | rejected]
of 96 tokens; without it, two rows of 64 (16 sequences in one forward).
`tokens_per_s` counts the pairs' tokens (2 × 8 × 64 per step) either way,
as the peers do; `forward_tokens` is what the forward runs over.

FLOPs per step = 3 × policy forward (+ 1 × reference forward in-step),
forward = 2 × (non-embedding params) × forward tokens + attention 4 × layers × T ×
heads × head_dim per token (the 6N + 12·L·T·d accounting of "Scaling Laws
for Neural Language Models", 2020). The output layer is counted (it is a
real GEMM here, vocab × hidden per token, forward 2× that), over the
columns it runs on: with prefix sharing, only the responses' window of
each packed row (`scored_tokens`), the prompt's columns are not scored.

    python benchmarks/bench_dpo_step.py [--models llama4.5m,smollm2] [--dtype float32|bfloat16]
        [--seq-len 64] [--pairs 8] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from configs import dpo as dpo_config  # noqa: E402
from experiments import dpo as driver  # noqa: E402
from jaxreward import parallel  # noqa: E402
from jaxreward.models.llama import Decoder, LlamaConfig  # noqa: E402
from jaxreward.train import preference as pref  # noqa: E402
from jaxreward.train import state as state_lib, step as step_lib  # noqa: E402

MODELS = {
    "llama4.5m": LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=1024,
                             num_layers=4, num_heads=8, num_kv_heads=4),
    "smollm2": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                           num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                           rope_theta=100000.0),
}
PAIRS, PROMPT, RESPONSE = 8, 32, 32
QUERY_CHUNK = LlamaConfig.attention_query_chunk  # --attention-query-chunk (0 = one chunk)


def forward_flops(cfg: LlamaConfig, tokens: int, seq_len: int, scored: int | None = None) -> float:
    """Forward FLOPs over `tokens`; the output layer over `scored` of them (default all)."""
    non_embedding = cfg.num_params() - cfg.vocab_size * cfg.hidden_size
    output_layer = cfg.vocab_size * cfg.hidden_size  # tied or not, the logits GEMM runs
    attn = 4 * cfg.num_layers * seq_len * cfg.num_heads * cfg.dim_per_head
    scored = tokens if scored is None else scored
    return tokens * (2.0 * non_embedding + attn) + scored * 2.0 * output_layer


def make_batch(cfg: LlamaConfig, with_reference: bool) -> dict:
    rng = np.random.default_rng(0)
    T = PROMPT + RESPONSE
    batch = {}
    prompt = rng.integers(0, cfg.vocab_size, (PAIRS, PROMPT))  # one prompt per pair, as in real data
    for side in ("chosen", "rejected"):
        response = rng.integers(0, cfg.vocab_size, (PAIRS, RESPONSE))
        batch[f"{side}_tokens"] = np.concatenate([prompt, response], axis=1).astype(np.int32)
        batch[f"{side}_attention_mask"] = np.ones((PAIRS, T), bool)
        batch[f"{side}_loss_mask"] = np.arange(T)[None].repeat(PAIRS, 0) >= PROMPT
        batch[f"{side}_positions"] = np.tile(np.arange(T, dtype=np.int32), (PAIRS, 1))
    if with_reference:
        batch["ref_chosen_logps"] = rng.normal(-200, 5, PAIRS).astype(np.float32)
        batch["ref_rejected_logps"] = rng.normal(-200, 5, PAIRS).astype(np.float32)
    return batch


def make_step(name: str, dtype: str, precompute: bool, prefix_sharing: bool, devices=None):
    """The driver's DPO train step on a 1-device mesh of `devices[0]` (default: the first device).

    Returns `(run, info)`: `run()` takes one step on the benchmark batch and
    returns the metrics; `info` has the config, the packed lengths S and W,
    the batch, and the jitted `train_step` with its current `state()` and
    `device_batch` (for tracing the step, as `gemm_floor.py` does).
    """
    cfg = dataclasses.replace(MODELS[name], dtype=dtype, max_position_embeddings=PROMPT + RESPONSE,
                              attention_query_chunk=QUERY_CHUNK)
    config = dpo_config.get_config("synthetic")
    model = Decoder(cfg)
    dummy = jnp.zeros((1, 2), jnp.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy))["params"]
    mesh = parallel.make_mesh(1, 1, 1, devices=(devices or jax.devices())[:1])
    with jax.default_device(mesh.devices.flat[0]):
        params = jax.jit(lambda: step_lib.unbox(model.init(jax.random.PRNGKey(0), dummy)["params"]))()
    tree, boxed_tree = {"policy": params}, {"policy": boxed}
    if not precompute:
        tree["reference"], boxed_tree["reference"] = params, boxed
    tx, schedule = state_lib.make_optimizer(config.optimizer, 100,
                                            pref.policy_trainable(cfg.num_layers, -1))
    shardings = step_lib.state_shardings(mesh, boxed_tree, tx)
    batch = make_batch(cfg, precompute)
    S = pref.shared_prefix_length({"bench": batch}) if prefix_sharing else 0
    W = pref.shared_response_length({"bench": batch}) if S else 0
    logps_fn = pref.decoder_logps_fn(model, S, W)
    loss_fn, metrics_fn, _ = driver.make_loss_fns(config, logps_fn, logps_fn)
    train_step = step_lib.make_train_step(loss_fn, metrics_fn, tx, schedule, mesh, shardings)
    state = [jax.jit(lambda p: state_lib.init_state(p, tx, 0), out_shardings=shardings)(tree)]
    device_batch = parallel.shard_batch(batch, mesh)

    def run():
        state[0], metrics = train_step(state[0], device_batch)
        return metrics

    return run, {"cfg": cfg, "S": S, "W": W, "batch": batch, "train_step": train_step,
                 "state": lambda: state[0], "device_batch": device_batch}


def bench(name: str, dtype: str, precompute: bool, prefix_sharing: bool) -> dict:
    run, info = make_step(name, dtype, precompute, prefix_sharing)
    cfg, S, W = info["cfg"], info["S"], info["W"]
    first, sec = common.time_fn(lambda: run()["loss"], warmup=2, iters=5)
    print(f"  {name} {dtype} reference {'precomputed' if precompute else 'in-step'}, prefix sharing "
          f"{bool(S)}: first step {first:.1f} s (compile), then {sec * 1e3:.2f} ms", flush=True)
    T = PROMPT + RESPONSE
    tokens = 2 * PAIRS * T                              # the pairs' tokens (what peers count)
    model_tokens, seq = (PAIRS * S, S) if S else (tokens, T)  # what the forward runs over
    scored = PAIRS * min(W, S) if S else tokens                 # what the output layer runs over
    flops = (3.0 + (0.0 if precompute else 1.0)) * forward_flops(cfg, model_tokens, seq, scored)
    mem, mem_src = common.peak_memory_bytes()
    return {"model": name, "reference": "precomputed" if precompute else "in-step",
            "prefix_sharing": bool(S), "attention_query_chunk": cfg.attention_query_chunk,
            "dtype": dtype, "params_M": cfg.num_params() / 1e6,
            "pairs": PAIRS, "tokens_per_step": tokens, "forward_tokens": model_tokens,
            "scored_tokens": scored, "compile_s": first, "step_s": sec, "tokens_per_s": tokens / sec,
            **common.mfu_fields(flops / sec, dtype), "peak_mem_GiB": mem / 2**30,
            "mem_source": mem_src}


def main():
    global PAIRS, PROMPT, RESPONSE, QUERY_CHUNK
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama4.5m,smollm2", type=common.csv_choices(tuple(MODELS)))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--seq-len", type=int, default=PROMPT + RESPONSE,
                    help="tokens per sequence, half prompt and half response (the issue's SmolLM2 check: 256)")
    ap.add_argument("--pairs", type=int, default=PAIRS, help="preference pairs per step")
    ap.add_argument("--reference", default="precomputed,in-step", help="which variants to run",
                    type=common.csv_choices(("precomputed", "in-step")))
    ap.add_argument("--prefix-sharing", default="on,off", type=common.csv_choices(("on", "off")),
                    help="on: one [prompt | chosen | rejected] row per pair (the driver's default); "
                         "off: two rows per pair")
    ap.add_argument("--attention-query-chunk", type=int, default=QUERY_CHUNK,
                    help="least query positions per causal attention chunk (0 = one chunk)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    if args.pairs < 1:
        ap.error(f"--pairs must be at least 1 (got {args.pairs})")
    if args.seq_len < 2:  # a one-token row has no prompt, so no response token has a log-prob
        ap.error(f"--seq-len must be at least 2: half prompt, half response (got {args.seq_len})")
    PROMPT, RESPONSE = args.seq_len // 2, args.seq_len - args.seq_len // 2
    PAIRS = args.pairs
    if args.attention_query_chunk < 0:
        ap.error(f"--attention-query-chunk must be >= 0 (got {args.attention_query_chunk})")
    QUERY_CHUNK = args.attention_query_chunk
    common.peak_flops(args.dtype)  # measured (CPU) before any model is built
    variants = [v == "precomputed" for v in args.reference]
    sharing = [v == "on" for v in args.prefix_sharing]
    rows = [bench(m, args.dtype, precompute, share) for m in args.models
            for precompute in variants for share in sharing]
    common.report(f"dpo_step_{jax.default_backend()}_{args.dtype}_T{args.seq_len}_P{PAIRS}", rows, args.out,
                  {"batch": f"{PAIRS} pairs x ({PROMPT} prompt + {RESPONSE} response) tokens"})


if __name__ == "__main__":
    main()
