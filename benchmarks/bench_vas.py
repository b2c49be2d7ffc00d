"""Value-augmented sampling (VAS) speed: guided decode vs plain decode.

For each batch size B (`--batch-sizes`, default 1,8) and candidate count k
(`--ks`, default 10,20): the time of one decode step of plain `generate`
and of `guided_generate` with a `vas_guide` (one value model), their
tokens/s, the measured overhead (guided step ÷ plain step) and the bound
the issue sets on it, `1 + k · c_value / c_policy`.

Models (`--model`):

- `smollm2` (default): policy = SmolLM2-135M-Instruct from
  `jaxreward.load_pretrained`; value model = `heads.ValueModel` on the same
  architecture, its backbone a copy of the policy's weights
  (`value_params_from_policy`) and a random head N(0, 1/E) instead of the
  zero one, so values and scores are not trivially zero (β = `--beta`,
  default 1). The prompt is the chat-templated prompt of `bench_decode.py`,
  repeated B times.
- `tiny`: a random 2-layer Llama (vocab 512, hidden 64, FFN 128, 4/2 heads)
  for policy and value model, random prompts of `--prompt-len` tokens, pad
  id 0, no tokenizer: a smoke test that runs in seconds.

Both decoders sample at `--temperature` (default 1) with no stop ids, so
every row decodes exactly M = `--max-new-tokens` tokens; plain decode is
`generate` with no top-k/top-p truncation (what one runs without a guide).

Per-step time (prefill and compile excluded). Each run is a prefill
(policy; for guided also the value model's) followed by M decode steps, of
which the first reads the prefill's logits and the other M − 1 each run a
policy forward. So t(M) − t(1) is exactly M − 1 steps (policy forward +
sampling; for guided also top-k, the value model's forward on the k
candidates of every row, and the commit of the chosen candidate's K/V):

    step = (t(M) − t(1)) / (M − 1)

where t(·) is the median wall time of `--repeats` runs after one warm-up
run (which compiles; compile time = first run − median) with
`block_until_ready`. The runs of one batch size (plain and every k, M = 1
and M) are interleaved repeat by repeat, so a load change on a shared
machine hits them alike. Small bias: the M = 1 run's caches are M − 1
slots shorter, so its prefill attends to fewer (masked) slots. The
difference must stand well above run-to-run noise: with the tiny model
(steps of ~0.1 ms) or a small M on a busy machine a step can even come out
negative; use a larger M and more repeats for figures to quote.
tokens/s = B / step: new tokens of all rows per second in steady decoding
(the JSON's `timings` also give `e2e_tokens_per_s` = B·M / t(M), prefill
included, and every run's seconds and compile time).

FLOP model of the bound. c = forward FLOPs per token = 2 × matmul params:
the policy's include its LM head (V·E, tied or not, the logits GEMM runs);
the value model's have no LM head but its scalar head (E·1). Matmul params
= per layer the q/k/v/o projections and the three MLP matrices; embedding
lookups, norms, biases and attention-score FLOPs (~4·layers·heads·head_dim
per cached slot, ~1% at these lengths) are left out. A guided step runs one
policy token and k value-model tokens per row, so its FLOPs are
c_policy + k·c_value per row and the bound on its cost relative to a plain
step is 1 + k·c_value/c_policy (SmolLM2-135M: c_value/c_policy = 0.79, so
8.9 at k = 10 and 16.8 at k = 20). Decode at small batch is bound by memory
traffic more than FLOPs, and the value model reads its weights once for
all k candidates, so the measured overhead can be well under the bound;
`overhead_vs_bound` = overhead ÷ bound (≤ 1: within it). The bound is
reported, never asserted.

`gflops_per_s` / `mfu` are the guided decode's: B·(c_policy + k·c_value)
per step ÷ the guided step time, against `common.peak_flops(dtype)`.
Peak memory is `common.peak_memory_bytes()` (device `peak_bytes_in_use`
where reported, else the process's max RSS) after the batch size's runs:
a high-water mark of the whole process so far.

    python benchmarks/bench_vas.py [--model smollm2|tiny] [--batch-sizes 1,8] [--ks 10,20]
        [--max-new-tokens 32] [--repeats 3] [--dtype bfloat16|float32] [--out benchmarks/results]
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
from jaxreward.models.heads import ValueModel, value_params_from_policy  # noqa: E402
from jaxreward.models.llama import Decoder, LlamaConfig  # noqa: E402
from jaxreward.sampling.sampler import generate  # noqa: E402
from jaxreward.sampling.value_guided import guided_generate, vas_guide  # noqa: E402
from jaxreward.train.step import unbox  # noqa: E402

TINY = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, max_position_embeddings=2048)


def block_matmul_params(cfg: LlamaConfig) -> int:
    """Matmul weights of the transformer blocks: q/k/v/o projections and the MLP."""
    e, d = cfg.hidden_size, cfg.dim_per_head
    attn = e * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    return cfg.num_layers * (attn + 3 * e * cfg.intermediate_size)


def policy_flops_per_token(cfg: LlamaConfig) -> float:
    """2 × matmul params of the policy, LM head (V·E) included."""
    return 2.0 * (block_matmul_params(cfg) + cfg.vocab_size * cfg.hidden_size)


def value_flops_per_token(cfg: LlamaConfig) -> float:
    """2 × matmul params of the value model: the blocks and the scalar head (E·1)."""
    return 2.0 * (block_matmul_params(cfg) + cfg.hidden_size)


def load_models(name: str, dtype: str, seed: int = 0):
    """(policy, params, value model, value params, prompt fn B -> (tokens, mask), pad_id)."""
    if name == "tiny":
        cfg = dataclasses.replace(TINY, dtype=dtype, param_dtype=dtype)
        policy = Decoder(cfg)
        params = jax.jit(lambda: unbox(policy.init(jax.random.PRNGKey(seed),
                                                   jnp.zeros((1, 2), jnp.int32))["params"]))()
        pad_id, tokenizer = 0, None
    elif name == "smollm2":
        import jaxreward
        policy, params, tokenizer = jaxreward.load_pretrained("smollm2-135m-instruct", dtype=dtype)
        cfg = policy.config
        pad_id = tokenizer.pad_id
    else:
        raise ValueError(f"unknown --model {name!r} (smollm2 or tiny)")
    value_model = ValueModel(cfg)
    vparams = value_params_from_policy(params)
    # Its own copy of the weights (a separate value model would have them),
    # and a random head so that the guide's scores are not all zero.
    E = cfg.hidden_size
    head = np.random.default_rng(seed + 1).standard_normal((E, 1)) / np.sqrt(E)
    vparams = {"backbone": jax.tree.map(jnp.copy, vparams["backbone"]),
               "head": {"kernel": jnp.asarray(head, jnp.float32)}}

    def prompts(batch: int, prompt_len: int):
        if tokenizer is not None:
            from bench_decode import prompt_batch
            return prompt_batch(tokenizer, batch)
        toks = np.random.default_rng(seed + 2).integers(1, cfg.vocab_size, (1, prompt_len))
        toks = np.tile(toks.astype(np.int32), (batch, 1))
        return toks, np.ones_like(toks, bool)

    return policy, params, value_model, vparams, prompts, pad_id


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - t0, out


def bench_batch(policy, params, guide, tokens, mask, ks, M: int, repeats: int, temperature: float,
                pad_id: int) -> dict:
    """Median run times {(impl, k, m): seconds} for m in (1, M), plus compile times.

    impl "plain" (k None) or "guided"; every run warmed up once, then the
    runs are interleaved `repeats` times.
    """
    rng = jax.random.PRNGKey(0)
    kw = dict(rng=rng, temperature=temperature, stop_ids=(), pad_id=pad_id)

    def plain(m):
        return lambda: generate(policy, params, tokens, mask, max_new_tokens=m, **kw).tokens_RM

    def guided(k, m):
        return lambda: guided_generate(policy, params, tokens, mask, guide, max_new_tokens=m, k=k,
                                       **kw).tokens_RM

    runs = {("plain", None, m): plain(m) for m in (1, M)}
    runs.update({("guided", k, m): guided(k, m) for k in ks for m in (1, M)})
    first = {}
    for key, fn in runs.items():
        first[key], out = _timed(fn)
        if out.shape != (tokens.shape[0], key[2]):
            raise RuntimeError(f"{key}: tokens of shape {out.shape}, expected "
                               f"{(tokens.shape[0], key[2])}")
    times = {key: [] for key in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            times[key].append(_timed(fn)[0])
    med = {key: float(np.median(v)) for key, v in times.items()}
    return {"median_s": med, "first_s": first, "all_s": times}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", choices=("smollm2", "tiny"))
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--ks", default="10,20")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default=None,
                    help="params/compute dtype (default bfloat16 on GPU, float32 otherwise)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--beta", type=float, default=1.0, help="VAS weight of the value model")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (--model tiny)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                    help="directory for the JSON")
    args = ap.parse_args()
    dtype = args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    M = args.max_new_tokens
    if M < 2:
        ap.error("--max-new-tokens must be >= 2 (the step time is (t(M) - t(1)) / (M - 1))")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    common.peak_flops(dtype)  # measured (CPU) before the models load
    policy, params, value_model, vparams, prompts, pad_id = load_models(args.model, dtype)
    cfg = policy.config
    guide = vas_guide(value_model, vparams, args.beta)
    c_policy, c_value = policy_flops_per_token(cfg), value_flops_per_token(cfg)
    ratio = c_value / c_policy

    rows, timings = [], []
    for B in batches:
        tokens, mask = prompts(B, args.prompt_len)
        res = bench_batch(policy, params, guide, tokens, mask, ks, M, args.repeats,
                          args.temperature, pad_id)
        med, first = res["median_s"], res["first_s"]
        step = lambda impl, k: (med[(impl, k, M)] - med[(impl, k, 1)]) / (M - 1)
        plain_step = step("plain", None)
        mem, mem_src = common.peak_memory_bytes()
        for k in ks:
            guided_step = step("guided", k)
            overhead = guided_step / plain_step
            bound = 1.0 + k * ratio
            rows.append({
                "model": args.model, "batch": B, "k": k, "prompt_len": int(tokens.shape[1]),
                "new_tokens": M, "plain_step_ms": 1e3 * plain_step,
                "guided_step_ms": 1e3 * guided_step, "plain_tokens_per_s": B / plain_step,
                "guided_tokens_per_s": B / guided_step, "overhead": overhead, "bound": bound,
                "overhead_vs_bound": overhead / bound,
                **common.mfu_fields(B * (c_policy + k * c_value) / guided_step, dtype),
                "peak_mem_GiB": mem / 2**30, "mem_source": mem_src})
        for (impl, k, m), sec in med.items():
            timings.append({"batch": B, "impl": impl, "k": k, "max_new_tokens": m,
                            "median_s": sec, "runs_s": res["all_s"][(impl, k, m)],
                            "compile_s": first[(impl, k, m)] - sec,
                            **({"e2e_tokens_per_s": B * m / sec} if m == M else {})})

    common.report(f"vas_{args.model}_{jax.default_backend()}_{dtype}", rows, args.out, {
        "dtype": dtype, "temperature": args.temperature, "beta": args.beta, "repeats": args.repeats,
        "flops_per_token": {"policy": c_policy, "value": c_value, "value_over_policy": ratio},
        "method": "step = (median t(M) - median t(1)) / (M - 1); bound = 1 + k * c_value / c_policy, "
                  "c = 2 x matmul params per token (policy with LM head, value model with its "
                  "scalar head)",
        "peak_mem_note": "peak_mem_GiB is the process high-water mark after each batch size's runs",
        "timings": timings})
    print(f"c_policy = {c_policy / 1e6:.4g} MFLOP/token, c_value = {c_value / 1e6:.4g} MFLOP/token, "
          f"c_value/c_policy = {ratio:.3f}; step = (t({M}) - t(1)) / {M - 1}, medians of "
          f"{args.repeats} runs; {dtype}")


if __name__ == "__main__":
    main()
