"""GRPO step speed, split into rollout / scoring / reference / update seconds.

The step is the driver's (`experiments/policy_gradient.py`, configs/rl.py):
B = 2 prompts × G = 4 completions × 32 new tokens (no stop token), prompts of
32 tokens, the 4.5M-param Llama of the reward-model benchmark (hidden 256,
4 layers, 8/4 heads, FFN 1024, vocab 1024), float32 (`--dtype bfloat16`:
bfloat16 compute over float32 params), one device, every
parameter trained with AdamW, KL (k3, β = 0.04) in the loss so the
reference forward runs, one epoch of one minibatch. The reward is the
fraction of even token ids in the completion (a host Python function, as
the peers' benchmark rewards the fraction of even numbers in the text).
With prefix sharing (`model.prefix_sharing`, the driver's default) the
update and reference forwards run over one row [prompt | 4 completions] of
32 + 4 × 32 = 160 tokens per group (320 tokens) instead of 8 rows of 64
(512 tokens); `--prefix-sharing on,off` measures both.

    rollout    generate: prefill + 32 decode steps, behaviour log-probs
    scoring    the reward on the host + group advantages
    reference  the reference forward over the rollout's tokens
    update     one optimizer step: policy forward + backward + AdamW

FLOPs: rollout = the decode FLOPs of `bench_decode.decode_flops`; update =
3 × forward (6N per token + attention), reference = 1 × forward; MFU against
the matmul peak measured in this process (`common.peak_flops`).

With `--smollm2-rollout`, also the rollout tokens/s of SmolLM2-135M (random
weights, its architecture) for 64 completions × 128 new tokens (8 prompts ×
G = 8), the issue's rollout shape.

    python benchmarks/bench_rl_step.py [--steps 10] [--prefix-sharing on,off] [--smollm2-rollout]
        [--dtype float32|bfloat16]
        [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from bench_decode import decode_flops  # noqa: E402
from bench_dpo_step import MODELS, forward_flops  # noqa: E402
from configs import rl as rl_config  # noqa: E402
from experiments import policy_gradient as driver  # noqa: E402
from jaxreward import parallel  # noqa: E402
from jaxreward.models.llama import Decoder  # noqa: E402
from jaxreward.models.scoring import shift_mask  # noqa: E402
from jaxreward.sampling.sampler import generate  # noqa: E402
from jaxreward.train import rollout as rollout_lib  # noqa: E402
from jaxreward.train import state as state_lib, step as step_lib  # noqa: E402

B, G, P, M = 2, 4, 32, 32


def even_reward(tokens_RM: np.ndarray, mask_RM: np.ndarray) -> np.ndarray:
    """Fraction of even token ids among the completion's tokens (host Python)."""
    out = []
    for row, m in zip(tokens_RM.tolist(), mask_RM.tolist()):
        toks = [t for t, keep in zip(row, m) if keep]
        out.append(sum(1 for t in toks if t % 2 == 0) / max(1, len(toks)))
    return np.asarray(out, np.float32)


def bench_grpo(steps: int, prefix_sharing: bool, dtype: str = "float32") -> dict:
    cfg = dataclasses.replace(MODELS["llama4.5m"], max_position_embeddings=P + M, dtype=dtype)
    config = rl_config.get_config("synthetic")
    config.model.prefix_sharing = prefix_sharing
    config.rollout.update(prompts_per_step=B, group_size=G, max_new_tokens=M)
    config.kl.update(placement="loss", estimator="k3", beta=0.04)
    config.optimizer.learning_rate = 1e-4
    policy = Decoder(cfg)
    dummy = jnp.zeros((1, 2), jnp.int32)
    boxed = jax.eval_shape(lambda: policy.init(jax.random.PRNGKey(0), dummy))["params"]
    params = jax.jit(lambda: step_lib.unbox(policy.init(jax.random.PRNGKey(0), dummy)["params"]))()
    ref_params = params
    mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tx, schedule = state_lib.make_optimizer(config.optimizer, 1000, state_lib.block_trainable(cfg.num_layers, -1))
    shardings = step_lib.state_shardings(mesh, boxed, tx)
    loss_fn, metrics_fn, totals_fn = driver.make_loss_fns(driver.decoder_logps_fn(policy, config), config, M)
    update = step_lib.make_train_step(loss_fn, metrics_fn, tx, schedule, mesh, shardings, totals_fn=totals_fn)
    state = jax.jit(lambda p: state_lib.init_state(p, tx, 0), out_shardings=shardings)(params)
    ref_fn = rollout_lib.logps_fn(policy, 1.0, 0, 1.0, G if prefix_sharing else 1, M)
    prompts = np.random.default_rng(0).integers(1, cfg.vocab_size, (B, P)).astype(np.int32)
    pmask = np.ones_like(prompts, bool)
    times = {"rollout": [], "scoring": [], "reference": [], "update": []}
    first = None
    for i in range(steps + 2):
        t0 = time.perf_counter()
        out = generate(policy, state.params, prompts, pmask, rng=jax.random.PRNGKey(i), max_new_tokens=M,
                       num_samples=G)
        samples = out.sequences()
        jax.block_until_ready(samples.tokens_RL)
        t1 = time.perf_counter()
        rewards = even_reward(np.asarray(samples.response_tokens_RM), np.asarray(samples.response_mask_RM))
        mask = np.asarray(shift_mask(samples.loss_mask_RL))
        adv = driver.compute_advantages(config, rewards, np.ones(B * G, bool), None, mask, None)
        t2 = time.perf_counter()
        arrays = rollout_lib.rollout_arrays(samples)
        ref = np.asarray(ref_fn(ref_params, arrays))
        t3 = time.perf_counter()
        batch = {**arrays, "mask": mask, "advantages": adv, "old_logps": np.asarray(samples.sample_logps_RL),
                 "ref_logps": ref, "on_policy": np.ones(B * G, bool)}
        state, met = update(state, parallel.shard_batch(batch, mesh))
        jax.block_until_ready(state.params)
        t4 = time.perf_counter()
        if i == 0:
            first = t4 - t0
            print(f"  grpo prefix sharing {prefix_sharing}: first step {first:.1f} s (compile)", flush=True)
        if i >= 2:  # two warm-up steps (compile, then caches)
            for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[k].append(v)
    med = {k: float(np.median(v)) for k, v in times.items()}
    step_s = float(np.median([sum(x) for x in zip(*times.values())]))
    # The update and reference forwards run over one packed row per group
    # (P + G·M tokens) with prefix sharing, else over G rows of P + M.
    T = P + G * M if prefix_sharing else P + M
    rows = B if prefix_sharing else B * G
    flops = (decode_flops(cfg, B * G, P, M) + 4.0 * forward_flops(cfg, rows * T, T))
    mem, mem_src = common.peak_memory_bytes()
    return {"job": "grpo step (4.5M Llama)", "dtype": dtype, "prefix_sharing": prefix_sharing, "rows": B * G,
            "forward_tokens": rows * T, "new_tokens": B * G * M, "first_step_s": first,
            "step_s": step_s, **{f"{k}_s": v for k, v in med.items()},
            "rollout_tokens_per_s": B * G * M / med["rollout"], **common.mfu_fields(flops / step_s, dtype),
            "peak_mem_GiB": mem / 2**30, "mem_source": mem_src}


def bench_smollm2_rollout(dtype: str = "float32") -> dict:
    # Weights in the compute dtype, as `load_pretrained(..., dtype=)` gives them.
    cfg = dataclasses.replace(MODELS["smollm2"], max_position_embeddings=2048, dtype=dtype, param_dtype=dtype)
    model = Decoder(cfg)
    params = jax.jit(lambda: step_lib.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
                                            ["params"]))()
    prompts = np.random.default_rng(0).integers(1, cfg.vocab_size, (8, 32)).astype(np.int32)
    run = lambda: generate(model, params, prompts, np.ones_like(prompts, bool), rng=jax.random.PRNGKey(0),
                           max_new_tokens=128, num_samples=8).tokens_RM
    first, sec = common.time_fn(run, warmup=1, iters=2)
    flops = decode_flops(cfg, 64, 32, 128)
    return {"job": "rollout SmolLM2-135M, 8 prompts x 8 x 128", "dtype": dtype, "rows": 64,
            "new_tokens": 64 * 128, "first_step_s": first, "step_s": sec, "rollout_tokens_per_s": 64 * 128 / sec,
            **common.mfu_fields(flops / sec, dtype)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--smollm2-rollout", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="compute dtype (the GRPO policy keeps float32 params; the SmolLM2 rollout's "
                         "weights are in this dtype)")
    ap.add_argument("--prefix-sharing", default="on,off", type=common.csv_choices(("on", "off")),
                    help="on: the update and reference forwards encode each group's prompt once "
                         "(the driver's default); off: one row per sample")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    common.peak_flops(args.dtype)  # measured (CPU) before any model is built
    rows = [bench_grpo(args.steps, v == "on", args.dtype) for v in args.prefix_sharing]
    if args.smollm2_rollout:
        rows.append(bench_smollm2_rollout(args.dtype))
    common.report(f"rl_step_{jax.default_backend()}_{args.dtype}", rows, args.out,
                  {"shape": f"{B} prompts x {G} completions x {M} new tokens, prompts of {P} tokens"})


if __name__ == "__main__":
    main()
