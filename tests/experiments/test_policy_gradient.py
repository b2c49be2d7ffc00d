"""experiments/policy_gradient.py: the fixed points of its update on a bandit
(exact expected gradients), the on-policy ratio and KL at the first
minibatch under left padding, mesh shape, micro-batches, degenerate groups
and DAPO's filter, the tiny variant end to end with an exact resume, and
bad input through the CLI.

Driver runs use the synthetic task (no files): configs/rl.py:tiny as is for
the end-to-end and resume runs; one step of a variant with left-padded
prompts and a test reward (no proxy reward model) for the first-minibatch,
DAPO and mesh checks. The bandit and micro-batch checks run the driver's
loss functions on table "models" through `step.make_train_step`.
"""
import contextlib
import functools
import itertools
import json
import os
import shutil
import string

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import rl as rl_config
from experiments import policy_gradient as driver
from jaxreward.errors import UserError
from jaxreward import main as cli
from jaxreward import parallel, rewards
from jaxreward.data import synthetic
from jaxreward.data.prompts import PromptSampler
from jaxreward.models.scoring import shift_mask
from jaxreward.train import defaults, rollout
from jaxreward.train import step as step_lib
from jaxreward.train.state import TrainState
from tests.experiments.test_cli import _cli

# ---------------------------------------------------------------------------
# Helpers


@contextlib.contextmanager
def _first_devices():
    """A (d, f, t) mesh runs on the first d·f·t devices (1 device for (1, 1, 1))."""
    real = parallel.make_mesh

    def make_mesh(data=-1, fsdp=1, tensor=1, devices=None):
        if devices is None and data > 0:
            devices = jax.devices()[:data * fsdp * tensor]
        return real(data, fsdp, tensor, devices=devices)
    parallel.make_mesh = make_mesh
    try:
        yield
    finally:
        parallel.make_mesh = real


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    """A persistent compilation cache for this module only: the driver builds
    its jitted functions afresh in every run, and runs of one config (straight,
    stopped, resumed) compile the same programs (≈ 30 s each on 2 CPU cores
    without it)."""
    from jax.experimental.compilation_cache import compilation_cache
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = [getattr(jax.config, name) for name in names]
    jax.config.update(names[0], str(tmp_path_factory.mktemp("compilation_cache")))
    jax.config.update(names[1], 0.1)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        for name, value in zip(names, saved):
            jax.config.update(name, value)
        compilation_cache.reset_cache()


@pytest.fixture(autouse=True)
def _mesh_uses_first_devices():
    with _first_devices():
        yield


@contextlib.contextmanager
def _spy_updates():
    """Records every call of the driver's update step: the minibatch it got
    (numpy) and its metrics (floats), in call order."""
    calls = []
    real = step_lib.make_train_step

    def make_train_step(*args, **kwargs):
        update = real(*args, **kwargs)

        def spy(state, batch):
            new_state, metrics = update(state, batch)
            calls.append({"batch": jax.device_get(batch),
                          "metrics": {k: float(v) for k, v in jax.device_get(metrics).items()}})
            return new_state, metrics
        return spy
    step_lib.make_train_step = make_train_step
    try:
        yield calls
    finally:
        step_lib.make_train_step = real


def _left_padded_prompts(real_prompt_set):
    """`rollout.prompt_set` with prompt i left-padded by i % 4 slots (masked, pad id)."""
    def prompt_set(config, tokenizer, task):
        out = real_prompt_set(config, tokenizer, task)
        for split in out.values():
            tokens, mask = split["tokens"].copy(), split["mask"].copy()
            for i in range(len(tokens)):
                tokens[i, :i % 4], mask[i, :i % 4] = synthetic.PAD_ID, False
            split["tokens"], split["mask"] = tokens, mask
        return out
    return prompt_set


def _small_config(mesh=(1, 1, 1), **algorithm):
    """configs/rl.py:tiny with the gold reward, 16 prompts × 2 completions per step
    (R = 32 rows: whole groups on 8 data shards), 2 minibatches, no best-of-N."""
    c = rl_config.get_config("tiny")
    c.reward.kind = "gold"
    c.rollout.update(prompts_per_step=16, group_size=2)
    c.algorithm.num_minibatches = 2
    c.algorithm.update(algorithm)
    c.eval.update(samples_per_prompt=1, best_of_n_max_n=0, plot=False)
    c.train.update(eval_every=0, stop_after_steps=1)
    c.export = False
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    return c


def _run(workdir, config):
    os.makedirs(workdir, exist_ok=True)
    return driver.run(config, str(workdir))


def _leaves(params):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(params))]


def _replicated_update(loss_fns, params, tx, micro_batches=1):
    """`step.make_train_step` of a table "model" on one device, and its first state."""
    loss_fn, metrics_fn, totals_fn = loss_fns
    mesh = parallel.make_mesh(1, 1, 1)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(0))
    shardings = jax.tree.map(lambda _: parallel.replicated(mesh), state)
    update = step_lib.make_train_step(loss_fn, metrics_fn, tx, lambda step: 0.0, mesh, shardings,
                                      micro_batches=micro_batches, totals_fn=totals_fn)
    return update, state, mesh


# ---------------------------------------------------------------------------
# Bandit: one-token responses, a softmax table as the policy, exact expected gradients


def bandit_logps(params, tokens, attention_mask, positions):
    """Policy softmax(logits), the same for every prompt: logps[:, t] = log π(tokens[:, t + 1])."""
    del positions
    logp = jax.nn.log_softmax(params["logits"])
    nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    return jnp.where(shift_mask(attention_mask), logp[jnp.clip(nxt, 0, logp.shape[0] - 1)], 0.0)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def _train_bandit(config, r, ref_logits, steps, lr, kl_in_reward_beta=0.0):
    """Trains the logits with the driver's loss on the *expected* GRPO/RLOO update.

    Every group of G actions is enumerated (V^G groups; rows [prompt, a]); the
    driver's `compute_advantages` gives each row its group advantage. Each row
    is fed off-policy with π_old chosen so that its importance ratio
    π(a)/π_old(a) = n_groups · P(group), P(group) = Π_i π(a_i): the loss (a
    mean over rows) then is Σ_groups P(group) · (its mean row loss), the exact
    expectation of the sampled on-policy loss, and its gradient the exact
    expected gradient (the PPO clip is set out of reach; the KL loss is
    weighted by the same ratio, objectives/kl.py). With `kl_in_reward_beta`
    the reward is r − β·k1 as in the driver (k1 = log π − log π_ref).
    """
    V, G = len(r), config.rollout.group_size
    groups = np.array(list(itertools.product(range(V), repeat=G)))   # [n, G]
    n = len(groups)
    actions = groups.reshape(-1)                                      # [R], R = n·G
    R = len(actions)
    batch = {"tokens": np.stack([np.full(R, V), actions], 1).astype(np.int32),
             "attention_mask": np.ones((R, 2), bool),
             "positions": np.tile(np.array([0, 1], np.int32), (R, 1)),
             "mask": np.tile(np.array([True, False]), (R, 1)),
             "ref_logps": np.zeros((R, 2), np.float32),
             "on_policy": np.zeros(R, bool)}
    ref = _log_softmax(ref_logits)
    batch["ref_logps"][:, 0] = ref[actions]
    loss_fns = driver.make_loss_fns(bandit_logps, config, max_len=1)
    tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
    update, state, mesh = _replicated_update(loss_fns, {"logits": jnp.asarray(ref_logits, jnp.float32)}, tx)
    for _ in range(steps):
        logp = _log_softmax(np.asarray(state.params["logits"]))
        weight_R = np.repeat(n * np.exp(logp[groups].sum(1)), G)
        old = np.zeros((R, 2), np.float32)
        old[:, 0] = logp[actions] - np.log(weight_R)
        seq_rewards = np.asarray(r, np.float64)[actions] - kl_in_reward_beta * (logp - ref)[actions]
        adv = driver.compute_advantages(config, seq_rewards.astype(np.float32), np.ones(R, bool),
                                        np.zeros((R, 2), np.float32), batch["mask"], None)
        state, _ = update(state, parallel.shard_batch({**batch, "old_logps": old, "advantages": adv}, mesh))
    return np.exp(_log_softmax(np.asarray(state.params["logits"])))


def _bandit_config(**algorithm):
    c = rl_config.get_config("dr_grpo")
    c.rollout.group_size = 3
    c.algorithm.update(clip_eps=1e6, **algorithm)   # no clipping: the ratios are enumeration weights
    return c


def _tv(p, q):
    return 0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum()


R_BANDIT = np.array([1.0, 0.6, 0.2, -0.4])
REF_LOGITS = np.array([-0.6, 0.3, 0.5, 0.0], np.float32)


def _grpo_k3_fixed_point(r, ref, beta, c):
    """Solves c·π_a·(r_a − E_π r) = β·(π_a − π_ref,a) for a distribution π.

    π_a = β·π_ref,a / (β − c·(r_a − m)) with m = E_π r; Σ_a π_a = 1 picks m
    (then m = Σ_a π_a r_a follows: Σ_a π_a (β − c(r_a − m)) = β Σ π_ref = β).
    The sum falls from +∞ at m = max r − β/c to ≤ 1 at m = max r: bisection.
    """
    lo, hi = r.max() - beta / c, r.max()
    for _ in range(200):
        m = 0.5 * (lo + hi)
        if (beta * ref / (beta - c * (r - m))).sum() > 1.0:
            lo = m
        else:
            hi = m
    return beta * ref / (beta - c * (r - m))


def test_dr_grpo_with_k3_in_the_loss_reaches_its_own_fixed_point():
    """Dr. GRPO (A = r − group mean), k3 in the loss, G = 3, β = 0.2, on a 4-armed bandit.

    Expected gradient (kl.py): k3 in the loss gives ∇KL(π_ref‖π); the group
    advantage's conditional mean is E[A_i | a_i = a] = r_a − (r_a + (G−1)·E_π r)/G
    = (1 − 1/G)(r_a − E_π r). So the update ascends (1 − 1/G)·E_π[r] − β·KL(π_ref‖π),
    concave in π, whose maximizer satisfies, for softmax logits θ
    (∂/∂θ_b: (1−1/G)·π_b(r_b − E_π r) − β(π_b − π_ref,b) = 0),

        (2/3)·π_a·(r_a − E_π r) = 0.2·(π_a − π_ref,a)  for every a,

    solved by `_grpo_k3_fixed_point`: π* ≈ (0.6331, 0.1948, 0.1269, 0.0453)
    from π_ref ≈ (0.121, 0.297, 0.363, 0.220). Neither π_ref·e^{(2/3)r/β}/Z
    (reverse-KL optimum, TV 0.15 away) nor the fixed point without the
    1 − 1/G factor (TV 0.11 away) is it.
    """
    beta, G = 0.2, 3
    config = _bandit_config()
    config.kl.update(placement="loss", estimator="k3", beta=beta)
    ref = np.exp(_log_softmax(REF_LOGITS))
    target = _grpo_k3_fixed_point(R_BANDIT, ref, beta, 1 - 1 / G)
    np.testing.assert_allclose(target, [0.6331, 0.1948, 0.1269, 0.0453], atol=1e-4)
    np.testing.assert_allclose((1 - 1 / G) * target * (R_BANDIT - target @ R_BANDIT),
                               beta * (target - ref), atol=1e-12)
    tilted = ref * np.exp((1 - 1 / G) * R_BANDIT / beta)
    tilted /= tilted.sum()
    without_scale = _grpo_k3_fixed_point(R_BANDIT, ref, beta, 1.0)
    assert _tv(target, tilted) > 0.1 and _tv(target, without_scale) > 0.1 and _tv(target, ref) > 0.5

    pi = _train_bandit(config, R_BANDIT, REF_LOGITS, steps=300, lr=0.1)
    assert _tv(pi, target) <= 0.01, (pi, target)   # exact expected gradients: well inside 0.05
    assert _tv(pi, tilted) > 0.05 and _tv(pi, without_scale) > 0.05


def test_rloo_with_k1_in_the_reward_reaches_the_tilted_reference():
    """RLOO, reward r − β·k1 (k1 = log π/π_ref of the sampled action), β = 0.2.

    E[A_i | a_i = a] = r̃_a − E_π r̃ (the leave-one-out mean is an unbiased
    baseline), with r̃_a = r_a − β·log(π_a/π_ref,a) held constant: the
    expected gradient is that of E_π[r] − β·KL(π‖π_ref), zero iff r̃ is
    constant, i.e. π = π_ref·e^{r/β}/Z ≈ (0.7197, 0.2396, 0.0396, 0.0012).
    """
    beta = 0.2
    config = _bandit_config(advantage="rloo", loss_agg_mode="token-mean")
    config.kl.update(placement="reward", estimator="k1", beta=beta)
    ref = np.exp(_log_softmax(REF_LOGITS))
    target = ref * np.exp(R_BANDIT / beta)
    target /= target.sum()
    np.testing.assert_allclose(target, [0.7197, 0.2396, 0.0396, 0.0012], atol=1e-4)
    pi = _train_bandit(config, R_BANDIT, REF_LOGITS, steps=300, lr=0.1, kl_in_reward_beta=beta)
    assert _tv(pi, target) <= 0.01, (pi, target)   # exact expected gradients: well inside 0.05
    assert _tv(ref, target) > 0.5


# ---------------------------------------------------------------------------
# A bigram table as the model: micro-batches and masked rows through the driver's loss


def bigram_logps(params, tokens, attention_mask, positions):
    """logps[:, t] = log softmax(logits[tokens[:, t]])[tokens[:, t + 1]]; 0 where t + 1 is padding."""
    del positions
    tokens = jnp.where(attention_mask, tokens, 0)
    logp = jax.nn.log_softmax(params["logits"][tokens], axis=-1)
    nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    out = jnp.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0]
    return jnp.where(shift_mask(attention_mask), out, 0.0)


V_BIGRAM = 7


def _bigram_batch(on_policy: bool, seed=0):
    """8 rows (4 groups of 2): prompts of 3, 2, 1, 3, ... tokens left-padded to P = 3,
    responses of 1..5 tokens right-padded to M = 5; row 5 is masked out (e.g. truncated)."""
    rng = np.random.default_rng(seed)
    R, P, M = 8, 3, 5
    prompt_len = [3, 2, 1, 3, 2, 1, 3, 2]
    resp_len = [5, 1, 3, 4, 2, 5, 1, 3]
    tokens = rng.integers(1, V_BIGRAM, (R, P + M)).astype(np.int32)
    attn = np.zeros((R, P + M), bool)
    loss = np.zeros((R, P + M), bool)
    for i in range(R):
        attn[i, P - prompt_len[i]:P + resp_len[i]] = True
        loss[i, P:P + resp_len[i]] = True
    tokens = np.where(attn, tokens, 99)   # padding ids are never read
    mask = np.array(shift_mask(loss))
    mask[5] = False
    positions = np.maximum(np.cumsum(attn, 1) - 1, 0).astype(np.int32)
    logits = rng.normal(size=(V_BIGRAM, V_BIGRAM)).astype(np.float32)
    logps = np.asarray(bigram_logps({"logits": logits}, tokens, attn, positions))
    old = np.where(mask, logps + rng.normal(0, 0.3, logps.shape), 0.0).astype(np.float32)
    ref = np.where(mask, logps + rng.normal(0, 0.3, logps.shape), 0.0).astype(np.float32)
    rewards_R = rng.normal(size=R).astype(np.float32)
    batch = {"tokens": tokens, "attention_mask": attn, "positions": positions, "mask": mask,
             "old_logps": old, "ref_logps": ref, "on_policy": np.full(R, on_policy)}
    return batch, logits, rewards_R


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_two_micro_batches_give_the_one_shot_update(mode):
    """train.micro_batches = 2 (rows 0–3, on-policy, and 4–7, off-policy: parts
    with 13 and 6 valid tokens) equals one shot: the whole-batch normalizers
    make the parts' sum the one-shot loss. SGD with lr 1, so params move by
    exactly −∇ (Adam would hide a scale error); k3 in the loss, weighted by
    π/π_old off-policy."""
    config = rl_config.get_config("tiny")
    config.algorithm.update(loss_agg_mode=mode)
    config.kl.update(placement="loss", estimator="k3", beta=0.1)
    config.rollout.group_size = 2
    batch, logits, rewards_R = _bigram_batch(on_policy=False)
    batch["on_policy"] = np.arange(8) < 4
    batch["advantages"] = driver.compute_advantages(config, rewards_R, np.ones(8, bool), None,
                                                    batch["mask"], None)
    assert np.count_nonzero(batch["mask"][:4]) == 13 and np.count_nonzero(batch["mask"][4:]) == 6
    results = []
    for k in (1, 2):
        loss_fns = driver.make_loss_fns(bigram_logps, config, max_len=5)
        update, state, mesh = _replicated_update(loss_fns, {"logits": jnp.asarray(logits)}, optax.sgd(1.0),
                                                 micro_batches=k)
        state, metrics = update(state, parallel.shard_batch(batch, mesh))
        results.append((np.asarray(state.params["logits"]), jax.device_get(metrics)))
    (p1, m1), (p2, m2) = results
    assert np.abs(p1 - logits).max() > 1e-3   # it moved
    np.testing.assert_allclose(p2, p1, rtol=1e-5, atol=1e-6)
    assert set(m1) == set(m2)
    for key in m1:
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert 0.0 < float(m1["clipfrac"]) <= 6 / 19   # the clip is active on some of the 6 off-policy tokens


def test_masked_rows_are_out_of_the_loss():
    """Rows whose mask is all False (a dropped group) change neither the loss
    nor the gradient: the whole-batch normalizers count only valid tokens
    (N = 13 + 6 − 2 = 17) and non-empty rows (S = 6), so the loss equals
    that of the batch without those rows."""
    config = rl_config.get_config("tiny")
    config.kl.update(placement="loss", estimator="k3", beta=0.1)
    config.rollout.group_size = 2
    batch, logits, rewards_R = _bigram_batch(on_policy=False)
    batch["mask"][4] = False    # row 5 is already masked: group (4, 5) is out
    batch["advantages"] = driver.compute_advantages(config, rewards_R, np.ones(8, bool), None,
                                                    batch["mask"], None)
    for key, junk in (("advantages", 1e3), ("old_logps", 5.0), ("ref_logps", -50.0)):
        batch[key][4:6] = junk   # what a masked row holds is never read
    kept = np.array([0, 1, 2, 3, 6, 7])
    small = {k: v[kept] for k, v in batch.items()}
    params = {"logits": jnp.asarray(logits)}
    for mode in ("token-mean", "seq-mean-token-mean"):   # normalized by N and by S
        config.algorithm.loss_agg_mode = mode
        loss_fn, _, totals_fn = driver.make_loss_fns(bigram_logps, config, max_len=5)

        @jax.jit
        def value_and_grad(b):
            return jax.value_and_grad(lambda p: loss_fn(p, b, None, totals_fn(b))[0])(params)
        (full, g_full), (part, g_part) = value_and_grad(batch), value_and_grad(small)
        np.testing.assert_allclose(full, part, rtol=1e-5, atol=1e-7, err_msg=mode)
        np.testing.assert_allclose(g_full["logits"], g_part["logits"], rtol=1e-5, atol=1e-7, err_msg=mode)


# ---------------------------------------------------------------------------
# Degenerate groups


def test_flat_groups_get_zero_advantage():
    # Groups of 3: (1, 1, 1) is flat; (0, 1, 2) has mean 1, std (ddof 1) 1.
    rewards_R = np.array([1.0, 1.0, 1.0, 0.0, 1.0, 2.0], np.float32)
    mask = np.ones((6, 2), bool)
    for advantage, scale, expected in [
            ("grpo", True, [0, 0, 0, -1, 0, 1]),                 # (r − 1)/(1 + 1e-6)
            ("grpo", False, [0, 0, 0, -1, 0, 1]),                # r − 1
            ("rloo", False, [0, 0, 0, -1.5, 0, 1.5])]:           # r_i − mean of the other two
        config = rl_config.get_config("tiny")
        config.rollout.group_size = 3
        config.algorithm.update(advantage=advantage, scale_by_std=scale)
        adv = driver.compute_advantages(config, rewards_R, np.ones(6, bool), None, mask, None)
        assert np.all(adv[:3] == 0.0), advantage   # exactly zero, not 0/eps round-off
        np.testing.assert_allclose(adv[:, 0], expected, rtol=1e-5, err_msg=advantage)
        np.testing.assert_array_equal(adv[:, 0], adv[:, 1])


def test_reference_batch_of_partial_groups_is_refused_with_prefix_sharing():
    config = rl_config.get_config("tiny")
    config.reference.batch_size = 6   # groups of 4: a packed forward needs whole groups
    with pytest.raises(ValueError) as e:
        cli.check_config(config)
    assert str(e.value) == ("config field reference.batch_size: 6 is not a multiple of rollout.group_size=4 "
                            "(with model.prefix_sharing a reference forward packs whole groups)")
    config.model.prefix_sharing = False
    cli.check_config(config)


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_group_size_one_is_refused(advantage):
    config = rl_config.get_config("tiny")
    config.algorithm.advantage = advantage
    config.rollout.group_size = 1
    with pytest.raises(ValueError) as e:
        cli.check_config(config)
    assert str(e.value) == (f"config field rollout.group_size: {advantage} needs groups of >= 2 "
                            "completions per prompt, got 1")


@pytest.mark.parametrize("advantage", ["reinforce_pp", "remax"])
def test_dynamic_sampling_with_groups_of_one_is_refused(advantage):
    """Every group of one completion is "flat" (all its rewards equal), so
    DAPO's filter would drop the whole rollout at every step: a run that
    trains nothing, reported only as groups/dropped."""
    config = rl_config.get_config("tiny")
    config.algorithm.update(advantage=advantage, dynamic_sampling=True)
    config.rollout.group_size = 1
    config.reference.batch_size = 16
    with pytest.raises(ValueError) as e:
        cli.check_config(config)
    assert str(e.value).startswith("config field algorithm.dynamic_sampling: drops groups whose G rewards "
                                   "are all equal, which is every group of rollout.group_size=1")
    config.algorithm.dynamic_sampling = False
    cli.check_config(config)   # groups of one are fine without the filter


def test_remax_with_whitening_is_refused():
    """ReMax's advantage is r - r(greedy): a whitened r is in batch units, the
    greedy score in reward units, so the difference would mean nothing."""
    config = rl_config.get_config("tiny")
    config.algorithm.advantage = "remax"
    config.reward.transform = "whiten"
    with pytest.raises(ValueError) as e:
        cli.check_config(config)
    assert str(e.value).startswith("config field reward.transform: 'whiten' with algorithm.advantage='remax'")
    config.reward.transform = "clip"
    cli.check_config(config)


def test_remax_baseline_gets_the_rewards_per_row_rules():
    """The greedy baseline is shaped like the sampled rewards it is subtracted
    from. Scores [2, 6, -8], the middle one truncated:
      penalty -1:            [2, -1, -8]
      penalty -1, clip 5:    [2, -1, -5]
      mask (no penalty):     [2, 6, -8]   (a baseline cannot leave the loss)
      mask, clip 5:          [2, 5, -5]
    and the sampled rewards under the same config go through the same rules
    (shape_rewards), so r - b is in one unit."""
    scores, trunc = np.array([2.0, 6.0, -8.0]), np.array([False, True, False])
    cfg = lambda **kw: ml_collections.ConfigDict({"truncated": "penalty", "truncated_penalty": -1.0,
                                                   "transform": "none", "clip": 5.0, **kw})
    np.testing.assert_array_equal(rollout.shape_baseline(cfg(), scores, trunc), [2, -1, -8])
    np.testing.assert_array_equal(rollout.shape_baseline(cfg(transform="clip"), scores, trunc), [2, -1, -5])
    np.testing.assert_array_equal(rollout.shape_baseline(cfg(truncated="mask"), scores, trunc), [2, 6, -8])
    np.testing.assert_array_equal(rollout.shape_baseline(cfg(truncated="mask", transform="clip"), scores, trunc),
                                  [2, 5, -5])
    shaped, _, _, _ = rollout.shape_rewards(cfg(transform="clip"), scores, trunc)
    np.testing.assert_array_equal(shaped, rollout.shape_baseline(cfg(transform="clip"), scores, trunc))


# ---------------------------------------------------------------------------
# The real driver, one step: first minibatch under left padding, DAPO's filter, mesh shape


def _flat_or_distinct_reward(config, workdir, task, tokenizer, policy, base_params, prompts=None):
    """Stands in for `rollout.make_reward_fn`: 0.5 for every completion of a prompt
    with an even index (a flat group), a distinct number per completion otherwise."""
    def score(samples, prompt_ids_R, split):
        toks = np.asarray(samples.response_tokens_RM).astype(np.float64)
        distinct = (toks * (1.0 + np.arange(toks.shape[1]))).sum(1) * 1e-3
        return np.where(np.asarray(prompt_ids_R) % 2 == 0, 0.5, distinct).astype(np.float32), {}
    return score, "test reward"


def _driver_step(workdir, mesh, prefix_sharing=True, reference_batch_size=None):
    """One step of `_small_config` with DAPO's dynamic sampling and clip-higher
    (token-mean), k3 in the loss, left-padded prompts and
    `_flat_or_distinct_reward`: the driver's output, its config, and the
    update calls (`_spy_updates`)."""
    config = _small_config(mesh=mesh, dynamic_sampling=True, clip_eps_high=0.28, loss_agg_mode="token-mean")
    config.model.prefix_sharing = prefix_sharing
    if reference_batch_size:
        config.reference.batch_size = reference_batch_size
    real_prompts, real_reward = rollout.prompt_set, rollout.make_reward_fn
    rollout.prompt_set = _left_padded_prompts(real_prompts)
    rollout.make_reward_fn = _flat_or_distinct_reward
    try:
        with _spy_updates() as calls:
            out = _run(workdir, config)
    finally:
        rollout.prompt_set, rollout.make_reward_fn = real_prompts, real_reward
    out["calls"], out["config"] = calls, config
    return out


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    with _first_devices():
        return _driver_step(tmp_path_factory.mktemp("mesh_1"), (1, 1, 1))


def test_first_minibatch_is_on_policy_and_policy_equals_reference(one_device):
    """Warmup makes the first update's learning rate 0, so both minibatches of
    step 1 see the initial policy = the reference. The first is on-policy:
    ratio exactly 1, nothing clipped, every KL estimate exactly 0. The second
    uses the sampler's log-probs as π_old: ratio 1 up to round-off (the
    sampler and the training forward agree under left padding)."""
    assert one_device["stopped_at"] == 1   # rollout steps, not optimizer steps
    assert int(one_device["state"].step) == 2
    first, second = one_device["calls"]
    mb = first["batch"]
    assert mb["on_policy"].all() and not second["batch"]["on_policy"].any()
    pad_rows = ~mb["attention_mask"][:, 0]
    assert 0 < pad_rows.sum() < len(pad_rows)   # left padding is really there
    assert first["metrics"]["learning_rate"] == 0.0
    m = first["metrics"]
    assert m["ratio/mean"] == 1.0
    assert m["clipfrac"] == m["clipfrac/low"] == m["clipfrac/high"] == 0.0
    assert m["approx_kl"] == 0.0
    assert m["update_kl/k1"] == m["update_kl/k2"] == m["update_kl/k3"] == 0.0
    m = second["metrics"]
    np.testing.assert_allclose(m["ratio/mean"], 1.0, atol=1e-5)
    assert m["clipfrac"] == 0.0
    assert m["update_kl/k1"] == m["update_kl/k2"] == m["update_kl/k3"] == 0.0
    assert m["learning_rate"] > 0.0


def test_dapo_dynamic_sampling_drops_flat_groups(one_device):
    """The flat groups (even prompt indices) are counted in groups/dropped and
    reach the update with mask False and advantage 0; the other groups keep
    every response token, with non-zero advantages."""
    config = one_device["config"]
    B, P = config.rollout.prompts_per_step, config.synthetic.prompt_length
    ids_B = PromptSampler(config.data.num_prompts, B, config.seed).next()
    assert 0 < (ids_B % 2 == 0).sum() < B
    assert one_device["history"][0]["groups/dropped"] == float((ids_B % 2 == 0).sum())
    task = synthetic.CountingTask(config.model.arch.vocab_size, P, config.rollout.max_new_tokens,
                                  seed=config.seed, label_beta=config.synthetic.label_beta)
    train = _left_padded_prompts(rollout.prompt_set)(config, None, task)["train"]
    known = np.where(train["mask"], train["tokens"], -1)
    seen = []
    for call in one_device["calls"]:   # two minibatches of whole groups
        mb = call["batch"]
        prompts = np.where(mb["attention_mask"][:, :P], mb["tokens"][:, :P], -1)
        ids_R = np.array([np.flatnonzero((known == row).all(1))[0] for row in prompts])
        seen += ids_R.tolist()
        flat = ids_R % 2 == 0
        assert not mb["mask"][flat].any()
        assert np.all(mb["advantages"][flat] == 0.0)
        response = np.asarray(shift_mask(np.broadcast_to(np.arange(mb["tokens"].shape[1]) >= P, mb["mask"].shape)))
        np.testing.assert_array_equal(mb["mask"][~flat], response[~flat])   # no stop tokens: all M
        assert np.all(mb["advantages"][~flat][mb["mask"][~flat]] != 0.0)
    assert sorted(seen) == sorted(np.repeat(ids_B, 2).tolist())


@pytest.mark.parametrize("mesh,prefix_sharing", [((8, 1, 1), True), ((2, 2, 2), True), ((1, 1, 1), False)])
def test_mesh_shape_and_prefix_sharing_do_not_change_the_update(tmp_path, one_device, mesh, prefix_sharing):
    """The baseline packs each group's prompt once (update, reference); one
    row per sample gives the same update, on 1 device as on 8. Here the
    reference forward takes 6 rows at a time: whole groups of 2 but not a
    multiple of 8 shards (rounded up to 8 there; that crashed on 8 devices),
    and 32 rows leave a padded last batch."""
    out = _driver_step(tmp_path / "mesh", mesh, prefix_sharing, reference_batch_size=6)
    assert len(out["mesh"].devices.ravel()) == mesh[0] * mesh[1] * mesh[2]
    assert out["stopped_at"] == 1 and int(out["state"].step) == 2
    if mesh[2] > 1:
        kernel = out["state"].params["layers_0"]["mlp"]["up_proj"]["kernel"]
        assert "tensor" in str(kernel.sharding.spec)
    assert len(out["calls"]) == len(one_device["calls"]) == 2
    for a, b in zip(out["calls"], one_device["calls"]):
        np.testing.assert_array_equal(a["batch"]["tokens"], b["batch"]["tokens"])   # same rollout
        for key in b["metrics"]:
            np.testing.assert_allclose(a["metrics"][key], b["metrics"][key], rtol=1e-5, atol=1e-6,
                                       err_msg=key)
    for a, b in zip(_leaves(out["state"].params), _leaves(one_device["state"].params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    base = one_device["history"][0]
    for key, value in out["history"][0].items():
        if "time/" not in key and "tokens/s" not in key:
            np.testing.assert_allclose(value, base[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_remax_driver_clips_the_greedy_baseline_like_the_rewards(tmp_path):
    """ReMax through the driver with `reward.transform=clip` at 0.25 and a
    reward of 0.5 for every completion, the greedy one included: after
    clipping both are 0.25, so every advantage is exactly 0 (step 1: π =
    π_ref, so the k1 term is 0 too). With the greedy score left unclipped
    they were 0.25 − 0.5 = −0.25."""
    config = _small_config(advantage="remax", num_minibatches=1)
    config.reward.update(transform="clip", clip=0.25)

    def half(config, workdir, task, tokenizer, policy, base_params, prompts=None):
        return (lambda samples, ids, split: (np.full(len(np.asarray(ids)), 0.5, np.float32), {})), "0.5"
    real_reward = rollout.make_reward_fn
    rollout.make_reward_fn = half
    try:
        with _first_devices(), _spy_updates() as calls:
            out = _run(tmp_path, config)
    finally:
        rollout.make_reward_fn = real_reward
    adv, mask = calls[0]["batch"]["advantages"], calls[0]["batch"]["mask"].astype(bool)
    assert mask.any(1).all()
    np.testing.assert_array_equal(adv, 0.0)
    assert out["history"][0]["reward/mean"] == 0.25 and out["history"][0]["reward/raw_mean"] == 0.5


def test_rollouts_are_split_over_the_batch_shards_and_sample_the_same():
    """`rollout.sample_rollout`: 8 prompts on an 8-way data mesh go into
    `generate` split over the shards (not replicated), and the samples are
    those of one device (tokens bit for bit); 6 prompts (not a multiple of 8) go in
    whole and give the first 12 rows again (the keys are per sample)."""
    policy, params, _ = rollout.load_policy(_tiny(), "")
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 60, (8, 5)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    mask[1, :2] = False   # left padding on one row
    seen = []
    real = rollout.generate

    def spy(model, p, tokens_BP, mask_BP, **kw):
        seen.append(getattr(tokens_BP, "sharding", None))
        return real(model, p, tokens_BP, mask_BP, **kw)
    kw = dict(rng=jax.random.PRNGKey(3), num_samples=2, max_new_tokens=6, temperature=1.0)
    rollout.generate = spy
    try:
        eight = rollout.sample_rollout(policy, params, tokens, mask, parallel.make_mesh(8, 1, 1), **kw)
        one = rollout.sample_rollout(policy, params, tokens, mask,
                                     parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1]), **kw)
        six = rollout.sample_rollout(policy, params, tokens[:6], mask[:6], parallel.make_mesh(8, 1, 1), **kw)
    finally:
        rollout.generate = real
    assert len(seen[0].device_set) == 8 and not seen[0].is_fully_replicated
    assert seen[2] is None   # numpy: whole
    for field in ("tokens_RL", "attention_mask_RL", "sample_logps_RL", "positions_RL"):
        a, b, c = (np.asarray(getattr(x, field)) for x in (eight, one, six))
        assert isinstance(getattr(eight, field), np.ndarray) and a.shape[0] == 16
        # Log-probs to round-off (a GEMM of 2 rows and one of 16 may sum in another order).
        check = (functools.partial(np.testing.assert_allclose, atol=2e-6, rtol=0) if field == "sample_logps_RL"
                 else np.testing.assert_array_equal)
        check(a, b, err_msg=field)
        check(c, b[:12], err_msg=field)


def test_eval_points_and_best_of_n_sample_over_the_batch_shards_and_agree_with_one_device():
    """`rollout.eval_point` and `rollout.best_of_n_points` draw their samples with
    the 8 held-out prompts split over an 8-way data mesh, and report what one
    device reports: rewards, best-of-N picks and lengths exactly (same tokens),
    the KLs to round-off."""
    policy, params, _ = rollout.load_policy(_tiny(), "")
    ref_params = jax.tree.map(lambda x: x * 0.9, params)   # another reference: KL > 0
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, 60, (8, 5)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    mask[2, :3] = False
    split = {"tokens": tokens, "mask": mask, "texts": [None] * 8, "columns": {}}

    def score(samples, ids, _):
        r = np.asarray(samples.response_tokens_RM).sum(1).astype(np.float32)
        return r, {"twice": 2 * r}
    sampling = dict(max_new_tokens=6, temperature=1.0, top_k=0, top_p=1.0, stop_ids=(), pad_id=0)
    logps = rollout.logps_fn(policy, 1.0, 0, 1.0)
    seen, real = [], rollout.generate

    def spy(model, p, tokens_BP, mask_BP, **kw):
        seen.append(getattr(tokens_BP, "sharding", None))
        return real(model, p, tokens_BP, mask_BP, **kw)
    out = {}
    rollout.generate = spy
    try:
        for name, mesh in (("eight", parallel.make_mesh(8, 1, 1)),
                           ("one", parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1]))):
            out[name] = (rollout.eval_point(policy, params, split, score, sampling, logps, logps, ref_params,
                                            samples_per_prompt=2, batch_size=8, mesh=mesh, seed=0),
                         rollout.best_of_n_points(policy, ref_params, split, score, sampling, 4, 0, mesh))
    finally:
        rollout.generate = real
    assert len(seen) == 4 and all(len(s.device_set) == 8 and not s.is_fully_replicated for s in seen[:2])
    (point8, bon8), (point1, bon1) = out["eight"], out["one"]
    assert point1["kl_k3"] > 0 and [r["N"] for r in bon1] == [1, 2, 4]
    assert bon8 == bon1
    for k, v in point1.items():
        if k.startswith("kl") or k == "sqrt_kl":
            np.testing.assert_allclose(point8[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
        else:
            assert point8[k] == v, k


# ---------------------------------------------------------------------------
# configs/rl.py:tiny end to end, and an exact resume


def _tiny(**train):
    c = rl_config.get_config("tiny")
    c.mesh.data = 1
    c.train.update(train)
    return c


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """configs/rl.py:tiny (4 steps, checkpoints at 2 and 4) straight through, and
    in another workdir stopped at step 2 then re-run to 4."""
    with _first_devices():
        straight_dir = tmp_path_factory.mktemp("straight")
        straight = _run(straight_dir, _tiny())
        resumed_dir = tmp_path_factory.mktemp("resumed")
        # The proxy reward model is trained once per workdir (same seed, same model);
        # the copy saves retraining it, and the resumed run reloads it as any resume does.
        shutil.copytree(straight_dir / "proxy_reward_model", resumed_dir / "proxy_reward_model")
        half = _run(resumed_dir, _tiny(stop_after_steps=2))
        resumed = _run(resumed_dir, _tiny())
    return {"straight": straight, "straight_dir": straight_dir, "half": half, "resumed": resumed,
            "resumed_dir": resumed_dir}


def test_tiny_variant_end_to_end(tiny_runs):
    out, wd = tiny_runs["straight"], tiny_runs["straight_dir"]
    assert int(out["state"].step) == 4
    assert [h["step"] for h in out["history"]] == [1, 2, 3, 4]
    for h in out["history"]:
        for key in ("reward/mean", "reward/gold", "kl/k1", "kl/k3", "loss", "grad_norm", "entropy",
                    "ratio/mean", "clipfrac", "response_length/mean"):
            assert np.isfinite(h[key]), key
        assert h["response_length/mean"] == 8.0 and h["ratio/mean"] == 1.0   # one on-policy minibatch
    assert [p["step"] for p in out["points"]] == [0, 2, 4]
    for p in out["points"]:
        assert all(np.isfinite(v) for v in p.values())
    assert out["points"][0]["kl_k1"] == out["points"][0]["kl_k3"] == 0.0   # step 0: π = π_ref
    # best-of-N of the reference: KL bound log N − (N−1)/N = 0, 0.193147, 0.636294
    np.testing.assert_allclose([c["kl_bound"] for c in out["best_of_n"]], [0.0, 0.193147, 0.636294],
                               atol=1e-6)
    with open(wd / "rl.json") as f:
        summary = json.load(f)
    assert summary["final"] == out["final"] and summary["reward"] == "proxy reward"
    assert os.path.getsize(wd / "reward_vs_kl.png") > 1000
    exported = os.listdir(wd / driver.EXPORT_DIR)
    assert "config.json" in exported and any(f.endswith(".safetensors") for f in exported)
    assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4"]
    rows = [json.loads(line) for line in open(wd / "metrics.jsonl")]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    # HF export round trip: the saved policy is the trained one.
    import jaxreward
    _, params, _ = jaxreward.load_pretrained(str(wd / driver.EXPORT_DIR))
    for a, b in zip(_leaves(params), _leaves(out["state"].params)):
        np.testing.assert_array_equal(a, b)


def test_an_ensemble_export_scores_the_rollouts_by_its_aggregate(tmp_path):
    """reward.kind=reward_model on an ensemble export (3 random reward models).
    Step 1 samples the same rollouts whatever the aggregate (same seed, same
    initial policy), so `min` scores them below `mean` (min ≤ mean on every
    row, < where members differ) and the gold reward is the same."""
    from jaxreward.models import ensemble
    from jaxreward.models.heads import RewardModel
    from jaxreward.train.step import unbox
    base = _tiny(num_steps=1)
    policy, _, _ = rollout.load_policy(base, "")
    rm = RewardModel(policy.config)
    members = [unbox(rm.init(jax.random.PRNGKey(7 + e), jnp.zeros((1, 4), jnp.int32))["params"])
               for e in range(3)]
    ens_dir = str(tmp_path / "reward_ensemble")
    ensemble.export_ensemble(ens_dir, rm, ensemble.stack(members), "random")
    first = {}
    for aggregate in ("mean", "min"):
        c = _tiny(num_steps=1)
        c.reward.update(kind="reward_model", reward_model_dir=ens_dir)
        c.ensemble.aggregate = aggregate
        c.eval.best_of_n_max_n = 0
        c.export = False
        driver.check_config(c)
        with _first_devices():
            first[aggregate] = _run(tmp_path / aggregate, c)["history"][0]
    assert first["min"]["reward/mean"] < first["mean"]["reward/mean"]
    assert first["min"]["reward/gold"] == first["mean"]["reward/gold"]


def test_resume_is_exact(tiny_runs):
    half, resumed, straight = tiny_runs["half"], tiny_runs["resumed"], tiny_runs["straight"]
    assert half["stopped_at"] == 2 and int(resumed["state"].step) == 4
    a, b = _leaves(resumed["state"].params), _leaves(straight["state"].params)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(jax.tree.leaves(jax.device_get(resumed["state"].opt_state)),
                    jax.tree.leaves(jax.device_get(straight["state"].opt_state))):
        np.testing.assert_array_equal(x, y)

    def data_state(wd, step):
        with open(wd / "checkpoints" / str(step) / "data" / "metadata") as f:
            return json.load(f)
    for step in (2, 4):
        assert data_state(tiny_runs["resumed_dir"], step) == data_state(tiny_runs["straight_dir"], step)
    assert data_state(tiny_runs["straight_dir"], 4)["prompts"]["position"] == 16   # 4 steps × 4 prompts

    def lines(wd):   # every metric of every step but the wall-clock ones
        return [{k: v for k, v in json.loads(line).items() if "time/" not in k and "tokens/s" not in k}
                for line in open(wd / "metrics.jsonl")]
    assert lines(tiny_runs["resumed_dir"]) == lines(tiny_runs["straight_dir"])
    assert resumed["final"] == straight["final"]


# ---------------------------------------------------------------------------
# Bad input: reward functions, then the CLI


def _register_once(name, fn):
    if name not in rewards.names():
        rewards.register(name)(fn)


def _raise_on_row_2(prompts, completions, columns):
    if len(completions) > 2:
        raise ValueError(f"cannot score {completions[2]!r}")
    return np.zeros(len(completions), np.float32)


def _nan_on_row_1(prompts, completions, columns):
    out = np.ones(len(completions), np.float32)
    out[1] = np.nan
    return out


class _Chars:
    """A character tokenizer stand-in for `decode_completions`."""

    def decode(self, ids):
        return "".join(string.ascii_lowercase[i % 26] for i in ids)


class _Samples:
    def __init__(self, tokens_RM):
        self.response_tokens_RM = np.asarray(tokens_RM)
        self.response_mask_RM = np.ones_like(self.response_tokens_RM, bool)


@pytest.mark.parametrize("name,message", [
    ("test_raise_on_row_2", "text reward 'test_raise_on_row_2' raised ValueError: cannot score 'ccc'"),
    ("test_nan_on_row_1", "text reward 'test_nan_on_row_1' returned NaN/inf for 1 of 4 rows: row 1 'bbb'"),
])
def test_a_failing_reward_function_names_itself_and_the_row(name, message):
    _register_once("test_raise_on_row_2", _raise_on_row_2)
    _register_once("test_nan_on_row_1", _nan_on_row_1)
    config = rl_config.get_config("smollm2_arith")
    config.reward.functions = (("exact_match", 0.5), (name, 1.0))
    score, label = rollout.make_reward_fn(config, "", None, _Chars(), None, None)
    assert label == f"0.5·exact_match + 1·{name}"
    split = {"texts": ["p0", "p1"], "columns": {"answer": ["1", "2"]}}
    samples = _Samples([[0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3]])
    with pytest.raises(rewards.RewardFunctionError) as e:
        score(samples, np.array([0, 0, 1, 1]), split)
    assert str(e.value) == message


def _assert_user_error(proc, message):
    """One `error:` line naming the problem, exit status 2, no traceback."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]


def test_bad_prompt_files_and_reward_names_through_the_cli(tmp_path):
    missing = _cli("--config=configs/rl.py:tiny", f"--workdir={tmp_path / 'a'}",
                   "--config.data.source=jsonl", "--config.data.prompts_path=/no/such/prompts.jsonl",
                   check=False)
    _assert_user_error(missing, "config field data.prompts_path: '/no/such/prompts.jsonl' does not exist")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    refused = _cli("--config=configs/rl.py:tiny", f"--workdir={tmp_path / 'b'}",
                   "--config.data.source=jsonl", f"--config.data.prompts_path={empty}", check=False)
    _assert_user_error(refused, f"config field data.prompts_path: '{empty}' is empty (no records)")
    # An unknown reward name, refused before SmolLM2 loads.
    unknown = _cli("--config=configs/rl.py:smollm2_arith", f"--workdir={tmp_path / 'c'}",
                   "--config.reward.functions=(('exact_matc', 1.0),)", check=False)
    _assert_user_error(unknown, "config field reward.functions: reward spec 0: no text reward named "
                                "'exact_matc'; registered:")
    for where in ("a", "b", "c"):
        assert not os.path.exists(tmp_path / where / "config.json")   # nothing written


def test_a_reward_of_the_wrong_signature_registered_in_a_config_file_is_one_line(tmp_path):
    """`rewards.register` refuses a function without a `columns` parameter
    while the config file loads; the user reads that refusal, not the
    `StopIteration` at the bottom of the exception chain of
    `inspect.Signature.bind` (it printed `error: StopIteration`)."""
    (tmp_path / "two_args.py").write_text(
        "import numpy as np\n"
        "from configs import rl\n"
        "from jaxreward import rewards\n\n"
        "@rewards.register('test_two_args')\n"
        "def two_args(prompts, completions):\n"
        "    return np.zeros(len(completions), np.float32)\n\n"
        "def get_config(variant=None):\n"
        "    return rl.get_config('tiny')\n")
    proc = _cli(f"--config={tmp_path / 'two_args.py'}", f"--workdir={tmp_path / 'wd'}", check=False)
    _assert_user_error(proc, "reward 'test_two_args' must accept (prompts, completions, columns) and take its "
                             "hyper-parameters as keywords with defaults; too many positional arguments")


def _tiny_text_model(directory):
    """A random 1-block decoder + a character BPE tokenizer with a ChatML template."""
    import tokenizers
    from tokenizers import decoders, models

    import jaxreward
    from jaxreward.data.tokenizer import Tokenizer
    from jaxreward.models.llama import Decoder, LlamaConfig
    from jaxreward.train.step import unbox
    specials = ["<pad>", "<s>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<pad>"))
    hf.decoder = decoders.Fuse()
    hf.add_special_tokens(specials)
    chatml = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
              "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    tok = Tokenizer(hf, bos_id=1, eos_id=3, pad_id=0, add_bos=False, chat_template=chatml)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, max_position_embeddings=256)
    decoder = Decoder(cfg)
    params = unbox(decoder.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"])
    jaxreward.save_pretrained(directory, cfg, params, tok)


@pytest.mark.parametrize("config_module,driver_module", [("rl", "policy_gradient"), ("ppo", "ppo")])
def test_kl_metrics_count_every_sample_also_those_masked_out_of_the_loss(tmp_path, config_module,
                                                                          driver_module):
    """`reward.truncated='mask'` takes truncated completions out of the
    loss, not out of the policy's samples: the logged KL of step 1 (the
    same rollout either way) must not depend on it. It was the sum over
    the kept rows divided by all rows (0 when every row is truncated), also
    fed to the adaptive KL controller."""
    import importlib
    import jaxreward
    from jaxreward.train import metrics as metrics_lib
    _tiny_text_model(tmp_path / "model")
    model, params, tok = jaxreward.load_pretrained(str(tmp_path / "model"))
    moved = jax.tree_util.tree_map(lambda p: p + 0.5 * jax.random.normal(jax.random.PRNGKey(1), p.shape, p.dtype),
                                   params)
    jaxreward.save_pretrained(tmp_path / "reference", model.config, moved, tok)   # π_ref ≠ π at step 1
    (tmp_path / "prompts.txt").write_text("say a\nsay b\nsay c\nsay d\nsay e\nsay f\n")
    logged = {}
    for truncated in ("score", "mask"):
        config = importlib.import_module(f"configs.{config_module}").get_config("tiny")
        config.model.pretrained = str(tmp_path / "model")
        config.reference.path = str(tmp_path / "reference")
        config.data.update(source="jsonl", prompts_path=str(tmp_path / "prompts.txt"), num_eval_prompts=2)
        config.reward.update(kind="text", functions=(("length", 1.0),), truncated=truncated)
        config.rollout.update(prompts_per_step=2, group_size=2, max_new_tokens=3)
        config.algorithm.num_minibatches = 1
        config.train.update(num_steps=1, eval_every=0)
        config.eval.update(best_of_n_max_n=0, plot=False, show=0)
        config.export = False
        config.mesh.data = 1
        if config_module == "ppo":
            config.value.init = "policy"
        workdir = str(tmp_path / f"wd_{truncated}")
        importlib.import_module(f"experiments.{driver_module}").run(config, workdir)
        logged[truncated] = [r for r in metrics_lib.read_metrics(workdir) if "train/kl/k1" in r][0]
    assert logged["mask"]["train/response_length/clipped_frac"] > 0   # some rows out of the loss
    for key in ("train/kl/k1", "train/kl/k2", "train/kl/k3"):
        assert logged["score"][key] > 0.01, key
        np.testing.assert_allclose(logged["mask"][key], logged["score"][key], rtol=1e-6, err_msg=key)


def test_a_reward_returning_nan_stops_the_run_with_one_line(tmp_path):
    """A text task on a tiny local model: a reward registered in the config
    file returns NaN on row 1 of sampled completions (not on the empty ones
    that `check_text_rewards` tries before training); the run ends at the
    first scoring (the eval at step 0) with one line naming the reward and
    the row."""
    _tiny_text_model(tmp_path / "model")
    (tmp_path / "prompts.txt").write_text("say a\nsay b\nsay c\nsay d\n")
    (tmp_path / "nan_reward.py").write_text(
        "import numpy as np\n"
        "from configs import rl\n"
        "from jaxreward import rewards\n\n"
        "def nan_on_row_1(prompts, completions, columns):\n"
        "    out = np.zeros(len(completions), np.float32)\n"
        "    if len(out) > 1 and any(completions):\n"
        "        out[1] = np.nan\n"
        "    return out\n\n"
        "if 'nan_on_row_1' not in rewards.names():\n"
        "    rewards.register('nan_on_row_1')(nan_on_row_1)\n\n"
        "def get_config(variant=None):\n"
        "    c = rl.get_config('tiny')\n"
        f"    c.model.pretrained = {str(tmp_path / 'model')!r}\n"
        f"    c.data.update(source='jsonl', prompts_path={str(tmp_path / 'prompts.txt')!r}, "
        "num_eval_prompts=2)\n"
        "    c.reward.update(kind='text', functions=(('nan_on_row_1', 1.0),))\n"
        "    c.rollout.update(prompts_per_step=2, group_size=2, max_new_tokens=3)\n"
        "    c.mesh.data = 1\n"
        "    return c\n")
    proc = _cli(f"--config={tmp_path / 'nan_reward.py'}", f"--workdir={tmp_path / 'wd'}", check=False)
    _assert_user_error(proc, "text reward 'nan_on_row_1' returned NaN/inf for 1 of 4 rows: row 1 ")


@pytest.mark.parametrize("config_module,driver_module", [("rl", "policy_gradient"), ("ppo", "ppo")])
def test_prompts_longer_than_the_model_positions_are_refused_in_one_line(tmp_path, config_module,
                                                                          driver_module):
    """A prompt of 300 characters (319 tokens with the chat template of
    `_tiny_text_model`, one token per character) + 3 new tokens cannot be
    sampled by a model of 256 positions: the driver refuses it naming
    data.max_prompt_length and the largest value that fits (256 − 3), not a
    ValueError traceback from the sampler."""
    import importlib
    _tiny_text_model(tmp_path / "model")
    (tmp_path / "long.txt").write_text("".join("x" * 299 + f"{i}\n" for i in range(4)))
    config = importlib.import_module(f"configs.{config_module}").get_config("tiny")
    config.model.pretrained = str(tmp_path / "model")
    config.data.update(source="jsonl", prompts_path=str(tmp_path / "long.txt"), num_eval_prompts=2,
                       max_prompt_length=400)
    config.reward.update(kind="text", functions=(("length", 1.0),))
    config.rollout.update(prompts_per_step=2, group_size=2, max_new_tokens=3)
    config.algorithm.num_minibatches = 1
    config.mesh.data = 1
    if config_module == "ppo":
        config.value.init = "policy"   # a text reward has no reward model to start the critic from
    run = importlib.import_module(f"experiments.{driver_module}").run
    with pytest.raises(UserError) as e:
        run(config, str(tmp_path / "wd"))
    assert str(e.value) == ("config field data.max_prompt_length=400: prompts of up to 319 tokens + "
                            "rollout.max_new_tokens=3 exceed the model's max_position_embeddings 256; "
                            "use data.max_prompt_length <= 253")
    config.rollout.max_new_tokens = 256   # no room for any prompt
    with pytest.raises(UserError) as e:
        run(config, str(tmp_path / "wd"))
    assert str(e.value) == ("config field rollout.max_new_tokens=256: leaves no room for a prompt in the "
                            "model's max_position_embeddings 256")


def test_a_prompt_a_text_reward_cannot_score_is_refused_before_training_naming_its_line():
    """`exact_match` needs each prompt's answer: the prompt of line 2 has
    none. `make_reward_fn` with the prompts tries every prompt first (an
    empty completion) and names the line, not a batch row mid-run."""
    splits = {"train": {"texts": ["p0", "p1"], "sources": ["q.jsonl:1", "q.jsonl:2"],
                        "columns": {"answer": ["1", None]}},
              "eval": {"texts": ["p2"], "sources": ["q.jsonl:3"], "columns": {"answer": ["3"]}}}
    config = rl_config.get_config("smollm2_arith")
    config.reward.functions = (("exact_match", 1.0),)
    with pytest.raises(UserError) as e:
        rollout.make_reward_fn(config, "", None, _Chars(), None, None, splits)
    assert str(e.value).startswith("q.jsonl:2: text reward 'exact_match' raised ValueError: "), str(e.value)
    assert "no reference answer" in str(e.value) and str(e.value).endswith(
        "(reward.functions, tried on an empty completion of this prompt before training)")
    splits["train"]["columns"]["answer"][1] = "2"
    score, _ = rollout.make_reward_fn(config, "", None, _Chars(), None, None, splits)   # all fine now
    assert callable(score)


def _one_too_many(prompts, completions, columns):
    return np.zeros(len(completions) + 1, np.float32)


def _fails_on_batches_of_three(prompts, completions, columns):
    if len(completions) >= 3:
        raise RuntimeError("batch too large")
    return np.zeros(len(completions), np.float32)


def test_a_reward_failing_on_every_prompt_is_blamed_not_the_first_line():
    """A reward returning one value too many fails on every prompt alone:
    the message names the reward, not line 1 of the prompt file. A reward
    failing only on the whole batch is refused before training too (it
    used to pass the check and stop the run at its first scoring)."""
    _register_once("test_one_too_many", _one_too_many)
    _register_once("test_fails_on_batches_of_three", _fails_on_batches_of_three)
    splits = {"train": {"texts": ["p0", "p1", "p2"], "sources": ["q.jsonl:1", "q.jsonl:2", "q.jsonl:3"],
                        "columns": {}}}
    config = rl_config.get_config("smollm2_arith")
    config.reward.functions = (("test_one_too_many", 1.0),)
    with pytest.raises(UserError) as e:
        rollout.make_reward_fn(config, "", None, _Chars(), None, None, splits)
    assert str(e.value) == ("text reward 'test_one_too_many' returned shape (2,) for 1 completions; expected "
                            "(1,) or (1, K) (reward.functions: fails on every prompt, each tried on an empty "
                            "completion before training)")
    config.reward.functions = (("test_fails_on_batches_of_three", 1.0),)
    with pytest.raises(UserError) as e:
        rollout.make_reward_fn(config, "", None, _Chars(), None, None, splits)
    assert str(e.value) == ("text reward 'test_fails_on_batches_of_three' raised RuntimeError: batch too large "
                            "(reward.functions, tried on an empty completion of every train prompt at once "
                            "before training)")


def test_eval_sqrt_kl_is_root_of_k3_and_never_clipped_to_zero():
    # One response, log-ratios x = [0.1, -0.3] (a third, masked token ignored):
    # k1 = 0.1 - 0.3 = -0.2 (negative: sampling noise), so √max(k1, 0) read 0.
    # k3 = (e^{-0.1} - 1 + 0.1) + (e^{0.3} - 1 - 0.3) = 0.00483742 + 0.04985881 = 0.05469623,
    # sqrt_kl = √0.05469623 = 0.23387225.
    lp = np.array([[-1.0, -2.0, 5.0]], np.float32)
    ref = np.array([[-1.1, -1.7, -5.0]], np.float32)
    stats = rollout.eval_kl_stats(lp, ref, np.array([[True, True, False]]))
    np.testing.assert_allclose(stats["kl_k1"], -0.2, rtol=1e-5)
    np.testing.assert_allclose(stats["kl_k3"], 0.05469623, rtol=1e-5)
    np.testing.assert_allclose(stats["sqrt_kl"], 0.23387225, rtol=1e-5)
    assert stats["kl_k1_se"] == stats["kl_k3_se"] == 0.0   # one response


def test_k3_metric_terms_by_hand_and_never_negative():
    # k3(x) = e^{-x} - 1 + x: k3(0) = 0; k3(1) = e^{-1} = 0.36787944; k3(-1) = e - 2 = 0.71828183.
    np.testing.assert_allclose(rollout.k3_terms(np.array([0.0, 1.0, -1.0], np.float32)),
                               [0.0, 0.36787944, 0.71828183], rtol=1e-6)
    # Near 0, float32 `exp(-x) - 1 + x` is negative for about a third of these
    # draws; the metric's terms are >= 0 and close to x^2 / 2.
    x = (np.random.default_rng(0).normal(size=10_000) * 1e-4).astype(np.float32)
    assert (np.exp(-x) - 1 + x < 0).sum() > 1000
    k3 = rollout.k3_terms(x)
    assert k3.dtype == np.float32 and (k3 >= 0).all()
    np.testing.assert_allclose(k3, x.astype(np.float64) ** 2 / 2, atol=1e-10)   # float32 round-off


def test_reward_mean_is_the_reward_trained_on():
    # scores [2, 6, −8, 1], rows 1 and 3 truncated, penalty −1.
    scores, truncated = np.array([2.0, 6.0, -8.0, 1.0], np.float32), np.array([False, True, False, True])
    cfg = lambda **kw: ml_collections.ConfigDict(dict(dict(truncated="score", truncated_penalty=-1.0,
                                                           transform="none", clip=5.0), **kw))
    # penalty: trained on [2, −1, −8, −1] → mean −8/4 = −2.0 (logged before: the raw mean
    # (2 + 6 − 8 + 1)/4 = 0.25); std √((4² + 1² + 6² + 1²)/4) = √13.5 = 3.6742346.
    r, valid, logged, m = rollout.shape_rewards(cfg(truncated="penalty"), scores, truncated)
    np.testing.assert_array_equal(r, [2.0, -1.0, -8.0, -1.0])
    assert valid.all() and m["reward/mean"] == -2.0 and m["reward/raw_mean"] == 0.25
    np.testing.assert_allclose(m["reward/std"], 3.6742346, rtol=1e-6)
    # penalty then clip ±5: [2, −1, −5, −1] → mean −5/4 = −1.25
    r, _, _, m = rollout.shape_rewards(cfg(truncated="penalty", transform="clip"), scores, truncated)
    np.testing.assert_array_equal(r, [2.0, -1.0, -5.0, -1.0])
    assert m["reward/mean"] == -1.25 and m["reward/raw_mean"] == 0.25
    # whiten: trained on the whitened rewards (mean 0), logged in reward units before it: 0.25
    r, _, logged, m = rollout.shape_rewards(cfg(transform="whiten"), scores, truncated)
    np.testing.assert_allclose(r.mean(), 0.0, atol=1e-6)
    np.testing.assert_array_equal(logged, scores)
    assert m["reward/mean"] == m["reward/raw_mean"] == 0.25
    # mask: scores untouched, truncated rows out of the loss
    r, valid, _, m = rollout.shape_rewards(cfg(truncated="mask"), scores, truncated)
    np.testing.assert_array_equal(valid, [True, False, True, False])
    assert m["reward/mean"] == 0.25


def test_beta_without_a_kl_placement_is_refused_in_one_line():
    # kl.placement='none' with the default β = 0.04 used to run with no KL term while logging
    # kl/beta = 0.04 (and paying for a reference pass); now it is refused naming both fields.
    c = _tiny()
    c.kl.update(placement="none", beta=0.04)
    with pytest.raises(defaults.ConfigError, match=r"^config field kl\.beta: 0\.04 with kl\.placement='none' "
                       r"would not be applied; set kl\.beta=0"):
        driver.check_config(c)
    c.kl.beta = 0.0   # no KL: fine (DAPO's variant)
    driver.check_config(c)


@pytest.mark.parametrize("max_n,ok", [(0, True), (1, True), (8, True), (3, False), (12, False)])
def test_best_of_n_max_n_is_off_or_a_power_of_two(max_n, ok):
    # The curve doubles N from 1, so any other maximum would be cut down unsaid.
    c = _tiny()
    c.eval.best_of_n_max_n = max_n
    if ok:
        driver.check_config(c)
    else:
        with pytest.raises(defaults.ConfigError, match=rf"eval\.best_of_n_max_n={max_n}: best-of-N runs N = 1, 2, 4"):
            driver.check_config(c)


@pytest.mark.parametrize("config_module,driver_module", [("rl", "policy_gradient"), ("ppo", "ppo")])
def test_a_minibatch_split_that_cuts_a_group_is_refused_before_the_model_loads(tmp_path, monkeypatch,
                                                                                 config_module, driver_module):
    """16 prompts × 2 completions in 3 minibatches: 32 // 3 = 10 rows, not whole groups over
    8 data shards; the run stops on that before it loads (or builds) any model."""
    import importlib
    config = importlib.import_module(f"configs.{config_module}").get_config("tiny")
    job = importlib.import_module(f"experiments.{driver_module}")
    config.rollout.update(prompts_per_step=16, group_size=2)
    config.algorithm.num_minibatches = 3
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 8, 1, 1

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the minibatch split was checked")
    monkeypatch.setattr(rollout, "load_policy", no_model)
    with pytest.raises(defaults.ConfigError, match=r"^config fields rollout, algorithm\.num_minibatches, "
                       r"train\.micro_batches, mesh: R=10 rows"):
        job.run(config, str(tmp_path))
