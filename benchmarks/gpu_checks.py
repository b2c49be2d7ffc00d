"""Numerics on an accelerator against the CPU, in one process (not speed).

Run on a machine whose JAX sees a GPU (or TPU) and the host CPU; each check
computes the same thing on `jax.devices()[0]` and on `jax.devices("cpu")[0]`
and prints the difference beside the bound it must stay within. On a
CPU-only machine both sides are the CPU and every check passes trivially
(a smoke test of this script).

Checks (the 4.5M Llama of the benchmarks with random weights, so that the
programs compile in seconds; batch rows left-padded by different amounts):

- `logits float32 (highest)`: the decoder's logits, float32 with
  `jax.default_matmul_precision("highest")` on both: ‖Δ‖/‖ref‖ ≤ 1e-4.
- `logits float32 (default)`: the accelerator at JAX's default matmul
  precision (TF32 on NVIDIA GPUs) against the CPU's float32: ≤ 1e-2.
- `logits bfloat16`: bfloat16 weights and activations on the accelerator
  against float32 on the CPU: ≤ 5e-2 (bfloat16 keeps 8 bits of mantissa).
- `token_logps float32`: `scoring.token_logps` on both, max |Δ| ≤ 1e-3 nats.
- `sampler logps vs recompute`: tokens drawn by `generate` on the
  accelerator; the behaviour log-probs it reports against `token_logps`
  recomputed on the CPU for those tokens (what PPO's ratio needs to be 1
  on-policy): max |Δ| ≤ 1e-3 nats.
- `dpo step float32`: 6 steps of the DPO driver's train step (4.5M Llama,
  reference in the step): the loss, `rewards/margins` and `grad_norm` of
  each step, max |Δ| / (|CPU's| + 1e-3) ≤ 1e-3.

    python benchmarks/gpu_checks.py [--out benchmarks/results]

Exits 1 if a check is out of its bound.
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

import bench_dpo_step  # noqa: E402
import common  # noqa: E402
from jaxreward.models import scoring  # noqa: E402
from jaxreward.models.llama import Decoder  # noqa: E402
from jaxreward.sampling.sampler import generate  # noqa: E402
from jaxreward.train.step import unbox  # noqa: E402


def rel(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def batch(vocab: int, B: int = 4, T: int = 96):
    """Token ids and a mask with rows left-padded by 0, 5, 17 and 40 slots."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, vocab, (B, T)).astype(np.int32)
    pad = np.array([0, 5, 17, 40])[:B]
    mask = np.arange(T)[None] >= pad[:, None]
    return np.where(mask, tokens, 0), mask


def on(device, fn, *args):
    """`fn(*args)` jitted with every input committed to `device`; a numpy result."""
    args = jax.device_put(args, device)
    return jax.tree.map(np.asarray, jax.jit(fn)(*args))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    acc, cpu = jax.devices()[0], jax.devices("cpu")[0]
    rows = []

    def check(name, value, bound, note=""):
        rows.append({"check": name, "value": value, "bound": bound, "ok": bool(value <= bound),
                     "note": note})
        print(f"  {name}: {value:.3g} (bound {bound:g})", flush=True)

    cfg = dataclasses.replace(bench_dpo_step.MODELS["llama4.5m"], max_position_embeddings=512)
    model = Decoder(cfg)
    with jax.default_device(cpu):
        params = jax.jit(lambda: unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
                                       ["params"]))()
    tokens, mask = batch(cfg.vocab_size)
    logits = lambda p, t, m: model.apply({"params": p}, t, m)
    with jax.default_matmul_precision("highest"):
        ref = on(cpu, logits, params, tokens, mask)
        hi = on(acc, logits, params, tokens, mask)
    m = mask[..., None]
    check("logits float32 (highest)", rel(hi * m, ref * m), 1e-4)
    check("logits float32 (default)", rel(on(acc, logits, params, tokens, mask) * m, ref * m), 1e-2,
          "TF32 matmuls on NVIDIA GPUs")
    cfg16 = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16")
    model16 = Decoder(cfg16)
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    lo = on(acc, lambda p, t, mk: model16.apply({"params": p}, t, mk).astype(jnp.float32),
            params16, tokens, mask)
    check("logits bfloat16", rel(lo * m, ref * m), 5e-2, "bf16 weights + activations vs float32 CPU")

    logps = lambda p, t, mk: scoring.token_logps(model, p, t, mk)
    with jax.default_matmul_precision("highest"):
        lp_ref = on(cpu, logps, params, tokens, mask)
        lp_acc = on(acc, logps, params, tokens, mask)
        check("token_logps float32", float(np.abs(lp_acc - lp_ref).max()), 1e-3, "nats")

        prompts, pmask = tokens[:, :32], mask[:, :32].copy()
        pmask[:, -1] = True  # every prompt needs a real token
        p_acc = jax.device_put(params, acc)
        out = generate(model, p_acc, jax.device_put(prompts, acc), jax.device_put(pmask, acc),
                       rng=jax.random.PRNGKey(3), max_new_tokens=24, num_samples=2)
        seq = out.sequences()
        recomputed = on(cpu, lambda p, t, mk, pos: scoring.token_logps(model, p, t, mk, pos), params,
                        np.asarray(seq.tokens_RL), np.asarray(seq.attention_mask_RL),
                        np.asarray(seq.positions_RL))
        # sample_logps_RL[:, t] is the log-prob of token t + 1, as token_logps'.
        on_grid = np.asarray(scoring.shift_mask(np.asarray(seq.loss_mask_RL)))
        diff = np.abs(np.where(on_grid, np.asarray(seq.sample_logps_RL) - recomputed, 0.0)).max()
        check("sampler logps vs recompute", float(diff), 1e-3, "nats, 8 rows x 24 new tokens")

    # A step's metrics are those of the params it starts from, and the
    # schedule's learning rate is 0 at step 0 (1e-4 · k after), so steps 0
    # and 1 see the initial params; steps 2..5 see trained ones.
    results = {}
    for dev in (acc, cpu):
        run, _ = bench_dpo_step.make_step("llama4.5m", "float32", False, True, devices=[dev])
        with jax.default_matmul_precision("highest"):
            ms = [run() for _ in range(6)]
        results[dev.platform] = np.array([[float(x[k]) for k in ("loss", "rewards/margins", "grad_norm")]
                                          for x in ms])
    a, c = results[acc.platform], results[cpu.platform]
    assert np.abs(c[-1, 1]) > 1e-3, f"the DPO check trained nothing: margins {c[:, 1]}"
    check("dpo step float32", float(np.max(np.abs(a - c) / (np.abs(c) + 1e-3))), 1e-3,
          "6 steps: loss, rewards/margins, grad_norm; |d| / (|cpu| + 1e-3)")

    common.report(f"gpu_checks_{jax.default_backend()}", rows, args.out,
                  {"accelerator": str(acc), "cpu": str(cpu)})
    bad = [r["check"] for r in rows if not r["ok"]]
    if bad:
        print("OUT OF BOUND: " + ", ".join(bad))
        sys.exit(1)


if __name__ == "__main__":
    main()
