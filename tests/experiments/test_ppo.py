"""experiments/ppo.py: the per-token rewards (terminal reward, KL, empty
responses), GAE targets, explained variance, a tabular bandit whose PPO
optimum with KL in the reward is known (π_ref·exp(r/β)/Z), the value model's
init from the reward model, the `tiny` variant end to end with exact resume,
config errors, and the prompts of the HH preference file (smollm2_hh)."""
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ppo as ppo_config
from experiments import ppo as driver
from jaxreward import parallel
from jaxreward.data.records import read_prompts
from jaxreward.models.reward_io import load_reward_model
from jaxreward.train import defaults, rollout
from jaxreward.train import state as state_lib
from jaxreward.train import step as step_lib


@pytest.fixture(autouse=True)
def _mesh_uses_first_devices(monkeypatch):
    """A (1, 1, 1) mesh runs on device 0 alone."""
    real = parallel.make_mesh

    def make_mesh(d, f, t, devices=None):
        return real(d, f, t, devices=jax.devices()[:d * f * t] if devices is None else devices)
    monkeypatch.setattr(parallel, "make_mesh", make_mesh)


def _tiny(**train):
    c = ppo_config.get_config("tiny")
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    c.train.update(train)
    return c


# ---------------------------------------------------------------------------
# Per-token rewards, GAE targets, explained variance (hand-computed)


def test_terminal_reward_and_kl_per_token_with_an_empty_response():
    # Log-prob grid of 5 columns: row 0 has response tokens at columns 1..3,
    # row 1 is an empty response (no token, so no place for its reward).
    mask = np.array([[False, True, True, True, False],
                     [False, False, False, False, False]])
    k1 = np.array([[9.0, 0.2, -0.4, 0.0, 9.0],
                   [9.0, 9.0, 9.0, 9.0, 9.0]], np.float32)  # masked slots are never read
    out = driver.token_rewards(np.array([1.5, 7.0], np.float32), k1, mask, beta=0.5)
    # row 0: −β·k1 = [−0.1, 0.2, −0.0] and the reward 1.5 on the last token (column 3).
    np.testing.assert_allclose(out[0], [0.0, -0.1, 0.2, 1.5, 0.0], atol=1e-7)
    np.testing.assert_array_equal(out[1], np.zeros(5))  # the empty response gets nothing


def test_gae_with_lambda_1_gamma_1_gives_the_returns_as_value_targets():
    c = _tiny()
    c.algorithm.update(gamma=1.0, lam=1.0, whiten_advantages=False)
    mask = np.array([[False, True, True, True, False]])
    rewards = driver.token_rewards(np.array([1.5], np.float32),
                                   np.array([[0.0, 0.2, -0.4, 0.0, 0.0]], np.float32), mask, beta=0.5)
    values = np.array([[5.0, 0.3, 0.5, 0.7, 5.0]], np.float32)
    adv, ret = driver.advantages_and_returns(c, rewards, values, mask)
    # Per-token rewards r = [−0.1, 0.2, 1.5]; returns G_t = Σ_{s≥t} r_s:
    #   G_3 = 1.5, G_2 = 0.2 + 1.5 = 1.7, G_1 = −0.1 + 1.7 = 1.6;
    # advantages G − V = [1.6 − 0.3, 1.7 − 0.5, 1.5 − 0.7] = [1.3, 1.2, 0.8].
    np.testing.assert_allclose(ret[0], [0.0, 1.6, 1.7, 1.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(adv[0], [0.0, 1.3, 1.2, 0.8, 0.0], atol=1e-6)
    # Whitening changes the advantages (mean 0, std 1 over valid tokens), not the targets.
    c.algorithm.whiten_advantages = True
    adv_w, ret_w = driver.advantages_and_returns(c, rewards, values, mask)
    np.testing.assert_array_equal(ret_w, ret)
    np.testing.assert_allclose([adv_w[mask].mean(), adv_w[mask].std()], [0.0, 1.0], atol=1e-5)
    assert np.all(adv_w[~mask] == 0)
    # A perfect critic (V = G) explains all the variance; predicting the mean explains none.
    assert rollout.explained_variance(ret, ret, mask) == pytest.approx(1.0)
    mean = np.where(mask, ret[mask].mean(), 0.0)
    assert rollout.explained_variance(mean, ret, mask) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------
# Tabular bandit: PPO with KL in the reward converges to π_ref·exp(r/β)/Z


def _table_fns():
    """The policy is a logit table over a one-token response, the critic one value.

    Rows are [prompt token, response token]; on the log-prob grid only
    column 0 (the log-prob of the response token, the value of the prompt
    state) is a response slot."""
    def logps_fn(params, mb):
        lp = jax.nn.log_softmax(params["logits"])[mb["tokens"][:, 1]]
        return jnp.stack([lp, jnp.zeros_like(lp)], axis=1)

    def values_fn(params, mb):
        v = jnp.broadcast_to(params["v"], mb["tokens"].shape[:1])
        return jnp.stack([v, jnp.zeros_like(v)], axis=1)
    return logps_fn, values_fn


def test_tabular_bandit_converges_to_the_kl_regularized_optimum():
    r = np.array([1.0, 0.0, 0.5, -0.5, 0.2], np.float32)
    ref_logits = np.array([0.5, 0.0, -0.5, 0.3, 0.1], np.float32)
    beta, R, num_steps = 0.5, 2048, 150
    pi_ref = np.exp(ref_logits) / np.exp(ref_logits).sum()
    target = pi_ref * np.exp(r / beta)
    target /= target.sum()

    c = _tiny()
    c.kl.beta = beta
    c.algorithm.update(num_epochs=2, num_minibatches=2, gamma=1.0, lam=0.95, whiten_advantages=True)
    for opt in (c.optimizer, c.value_optimizer):
        opt.update(learning_rate=0.05, warmup_steps=0, final_lr_ratio=0.05)
    mesh = parallel.make_mesh(1, 1, 1)
    logps_fn, values_fn = _table_fns()
    steps_total = num_steps * c.algorithm.num_epochs * c.algorithm.num_minibatches

    def build(params, loss_fns, opt):
        tx, schedule = state_lib.make_optimizer(opt, steps_total)
        shardings = step_lib.state_shardings(mesh, params, tx)
        loss_fn, metrics_fn, totals_fn = loss_fns
        step = step_lib.make_train_step(loss_fn, metrics_fn, tx, schedule, mesh, shardings, totals_fn=totals_fn)
        return step, state_lib.init_state(params, tx, 0)

    policy_step, state = build({"logits": jnp.asarray(ref_logits)},
                               driver.make_policy_loss_fns(c, 1, logps_fn), c.optimizer)
    value_step, value_state = build({"v": jnp.zeros((), jnp.float32)},
                                    driver.make_value_loss_fns(c, 1, values_fn), c.value_optimizer)
    rng = np.random.default_rng(0)
    mask = np.zeros((R, 2), bool)
    mask[:, 0] = True
    for step in range(num_steps):
        logits = np.asarray(state.params["logits"], np.float64)
        logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        actions = rng.choice(len(r), size=R, p=np.exp(logp))
        tokens = np.stack([np.zeros(R, np.int32), actions.astype(np.int32)], axis=1)
        old_logps = np.where(mask, logp[actions][:, None], 0.0).astype(np.float32)
        ref_logps = np.where(mask, np.log(pi_ref)[actions][:, None], 0.0).astype(np.float32)
        old_values = np.where(mask, float(value_state.params["v"]), 0.0).astype(np.float32)
        rewards = driver.token_rewards(r[actions], old_logps - ref_logps, mask, beta)
        adv, ret = driver.advantages_and_returns(c, rewards, old_values, mask)
        batch = {"tokens": tokens, "attention_mask": np.ones((R, 2), bool),
                 "positions": np.tile(np.arange(2, dtype=np.int32), (R, 1)), "mask": mask,
                 "advantages": adv, "old_logps": old_logps, "ref_logps": ref_logps, "returns": ret,
                 "old_values": old_values}
        state, value_state, _ = driver.update(policy_step, value_step, state, value_state, batch, c, step, mesh)
    pi = np.asarray(jax.nn.softmax(state.params["logits"]), np.float64)
    tv = 0.5 * np.abs(pi - target).sum()
    assert tv <= 0.05, (pi, target, tv)
    # The critic learns the value of the KL-regularized objective at π:
    # E_π[r] − β·KL(π‖π_ref) (at the optimum β·log Z).
    objective = float(pi @ r - beta * (pi * np.log(pi / pi_ref)).sum())
    assert float(value_state.params["v"]) == pytest.approx(objective, abs=0.02)


# ---------------------------------------------------------------------------
# The tiny variant end to end; exact resume


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_tiny_runs_end_to_end_and_resumes_bit_for_bit(tmp_path):
    straight = tmp_path / "straight"
    straight.mkdir()
    out = driver.run(_tiny(), str(straight))
    assert [h["step"] for h in out["history"]] == [1, 2, 3, 4]
    for name in ("reward/mean", "reward/gold", "kl/k1", "kl/beta", "entropy", "clipfrac", "loss",
                 "response_length/mean", "advantages/mean", "value/loss", "value/clipfrac",
                 "value/explained_variance", "value/mean", "value/grad_norm"):
        assert name in out["history"][-1], name
    for h in out["history"]:
        assert all(math.isfinite(v) for v in h.values()), h
    for name in ("metrics.jsonl", "ppo.json", "reward_vs_kl.png", "policy/config.json",
                 "proxy_reward_model/reward_model.json", "checkpoints/4"):
        assert (straight / name).exists(), name
    summary = json.loads((straight / "ppo.json").read_text())
    assert [p["step"] for p in summary["points"]] == [0, 2, 4]
    assert int(out["state"].step) == 4 * 2 * 2  # steps × epochs × minibatches
    assert int(out["value_state"].step) == 16

    # The value model starts from the proxy reward model: at the last token
    # of a sequence its value is the proxy's reward ("last" pooling).
    rm, rm_params, _ = load_reward_model(str(straight / "proxy_reward_model"))
    base_model, base_params, _ = rollout.load_policy(_tiny(), "")
    value_model, value_params = rollout.value_model_init(_tiny(), str(straight), base_model.config, base_params)
    tokens = jnp.asarray(np.random.default_rng(1).integers(1, 64, (3, 10)), jnp.int32)
    v = value_model.apply({"params": value_params}, tokens)
    np.testing.assert_allclose(v[:, -1], rm.apply({"params": rm_params}, tokens)[:, 0], rtol=1e-5, atol=1e-6)

    # 2 steps, a restart, 2 more == 4 straight: both states (params, optimizers) and the metrics.
    split = tmp_path / "split"
    split.mkdir()
    shutil.copytree(straight / "proxy_reward_model", split / "proxy_reward_model")
    half = driver.run(_tiny(stop_after_steps=2), str(split))
    assert half["stopped_at"] == 2
    resumed = driver.run(_tiny(), str(split))
    for key in ("state", "value_state"):
        a, b = _leaves(resumed[key]), _leaves(out[key])
        assert len(a) == len(b)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    timing = lambda h: {k: v for k, v in h.items() if not k.startswith("time/") and not k.endswith("tokens/s")}
    assert [timing(h) for h in resumed["history"]] == [timing(h) for h in out["history"][2:]]
    assert resumed["final"] == out["final"]


# ---------------------------------------------------------------------------
# Config errors name the field; the smollm2_hh prompts


@pytest.mark.parametrize("field, value, names", [
    ("value.init", "critic", "value.init"),
    ("value.trainable_blocks", -2, "value.trainable_blocks"),
    ("value_optimizer.learning_rate", 0.0, "value_optimizer.learning_rate"),
    ("algorithm.lam", 1.5, "algorithm.lam"),
    ("algorithm.value_clip", -0.1, "algorithm.value_clip"),
    ("algorithm.num_minibatches", 3, "algorithm.num_minibatches"),
    ("reward.truncated", "drop", "reward.truncated"),
    ("eval.best_of_n_max_n", -1, "eval.best_of_n_max_n"),
    ("eval.best_of_n_max_n", 6, "eval.best_of_n_max_n=6: best-of-N runs N = 1, 2, 4"),
    ("kl.beta", -1.0, "kl.beta"),
    ("data.source", "hh", "data.source"),
    ("ensemble.std_coef", -1.0, "ensemble.std_coef"),
])
def test_check_config_names_the_field(field, value, names):
    c = _tiny()
    node = c
    *parents, last = field.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    with pytest.raises(defaults.ConfigError, match=names.replace(".", r"\.")):
        driver.check_config(c)


def test_check_config_cross_field_errors(tmp_path):
    c = _tiny()
    c.reward.kind = "gold"  # no reward model to start the critic from
    with pytest.raises(defaults.ConfigError, match=r"value\.init"):
        driver.check_config(c)
    c.value.init = "path"
    with pytest.raises(defaults.ConfigError, match=r"value\.path is empty"):
        driver.check_config(c)
    c.value.init = "policy"
    driver.check_config(c)
    c.kl.update(adaptive=True, horizon=0)
    with pytest.raises(defaults.ConfigError, match=r"kl\.horizon"):
        driver.check_config(c)
    c = ppo_config.get_config("smollm2_hh")  # the reward model is the user's
    pairs = tmp_path / "pairs.jsonl"  # a local prompts file: runs where ../shared/data is absent
    pairs.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    c.data.prompts_path = str(pairs)
    with pytest.raises(defaults.ConfigError, match=r"reward\.reward_model_dir"):
        driver.check_config(c)
    for variant in ppo_config.VARIANTS[:2]:
        driver.check_config(ppo_config.get_config(variant))
    # An ensemble scores the rollouts, but the critic starts from one reward model.
    (tmp_path / "reward_ensemble").mkdir()
    (tmp_path / "reward_ensemble" / "ensemble.json").write_text("{}")
    c = _tiny()
    c.reward.update(kind="reward_model", reward_model_dir=str(tmp_path / "reward_ensemble"))
    with pytest.raises(defaults.ConfigError, match=r"value\.init: .* is an ensemble export .* value\.path="
                                                   r"'.*member_0', or value\.init='policy'"):
        driver.check_config(c)
    c.value.init = "policy"
    driver.check_config(c)


def test_hh_pairs_give_prompts_that_read_prompts_cannot(hh_file):
    records, report = read_prompts(str(hh_file))
    assert not records and report.num_skipped == report.lines  # HH lines have no `prompt`
    prompts, report = rollout.pair_prompts(str(hh_file), None)
    assert report.kept > 2000 and len(prompts) > 2000
    assert len({p.prompt for p in prompts}) == len(prompts)  # distinct, in file order
    assert all(p.prompt.startswith("\n\nHuman:") and p.prompt.endswith("\n\nAssistant:") for p in prompts)
    assert all(p.answer is None for p in prompts)


def test_pair_prompts_keep_the_prompt_of_a_pair_whose_replies_are_at_fault(tmp_path):
    """The RL / VAS `data.source=pairs` need only the prompts, yet a pair whose
    chosen reply was empty (4 such pairs in HH harmless-base test) or whose
    transcripts differed before the last reply was skipped whole, so its
    prompt was lost. It is now kept (counted in the summary); DPO and reward
    models still skip the pair."""
    import json
    from jaxreward.data.preference import read_preference_pairs
    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
            {"chosen": "\n\nHuman: bye\n\nAssistant:", "rejected": "\n\nHuman: bye\n\nAssistant: no"},
            {"chosen": "\n\nHuman: why\n\nAssistant: because", "rejected": "\n\nHuman: how\n\nAssistant: so"},
            {"chosen": "no turns at all", "rejected": "\n\nHuman: x\n\nAssistant: y"}]
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, report = rollout.pair_prompts(str(path), None, chat=False)
    assert [r.prompt for r in records] == ["\n\nHuman: hi\n\nAssistant:", "\n\nHuman: bye\n\nAssistant:",
                                           "\n\nHuman: why\n\nAssistant:"]
    assert report.summary() == (
        "hh.jsonl: read 4 lines (hh): kept 3 (2 for the prompt only: empty chosen response: 1 [hh.jsonl:2]; "
        "prompt mismatch: 1 [hh.jsonl:3]), skipped 1 (no assistant turn: 1 [hh.jsonl:4])")
    pairs, report = read_preference_pairs(path)  # the pair readers (DPO, reward models): unchanged
    assert len(pairs) == 1 and report.num_skipped == 3


# ---------------------------------------------------------------------------
# Mesh shape and prefix sharing do not change the update


def _mesh_run(workdir, mesh, prefix_sharing, proxy_from=None):
    """One PPO step of `tiny` with 16 prompts × G = 2 (two minibatches of 8
    groups, so each of 8 shards holds one whole group) and reference
    forwards of 6 rows (whole groups, not a multiple of 8 shards)."""
    c = _tiny(stop_after_steps=1)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    c.model.prefix_sharing = prefix_sharing
    c.rollout.update(prompts_per_step=16, group_size=2)
    c.reference.batch_size = 6
    workdir.mkdir()
    if proxy_from is not None:   # the same proxy reward model (and value init) for every run
        shutil.copytree(proxy_from / "proxy_reward_model", workdir / "proxy_reward_model")
    real = parallel.make_mesh    # the first d·f·t devices (module fixtures miss the autouse patch)
    parallel.make_mesh = lambda d, f, t, devices=None: real(d, f, t, devices=jax.devices()[:d * f * t])
    try:
        return driver.run(c, str(workdir))
    finally:
        parallel.make_mesh = real


@pytest.fixture(scope="module")
def one_device_shared(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ppo_mesh") / "base"
    return workdir, _mesh_run(workdir, (1, 1, 1), True)


@pytest.mark.parametrize("mesh,prefix_sharing", [((1, 1, 1), False), ((8, 1, 1), True), ((2, 2, 2), True)])
def test_mesh_shape_and_prefix_sharing_do_not_change_the_update(tmp_path, one_device_shared, mesh,
                                                               prefix_sharing):
    """The baseline packs each group's prompt once in every forward over the
    rollout (reference, values, both updates) on one device. One row per
    completion on one device, and packed groups on 8 devices (8×1×1,
    2×2×2), give the same policy and value model after the step's 2 epochs
    × 2 minibatches, and the same metrics."""
    base_dir, base = one_device_shared
    out = _mesh_run(tmp_path / "run", mesh, prefix_sharing, proxy_from=base_dir)
    assert out["stopped_at"] == base["stopped_at"] == 1
    assert len(out["mesh"].devices.ravel()) == mesh[0] * mesh[1] * mesh[2]
    assert int(out["state"].step) == int(base["state"].step) == 4
    for key in ("state", "value_state"):
        a, b = _leaves(out[key].params), _leaves(base[key].params)
        assert len(a) == len(b)
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=key)
    _same_metrics(out["history"][0], base["history"][0])
    assert base["history"][0]["value/loss"] > 0


def test_minibatches_keep_groups_whole():
    rng = np.random.default_rng(0)
    parts = rollout.group_minibatches(rng, 6, 3, 2)
    assert [len(p) for p in parts] == [9, 9]
    rows = np.concatenate(parts)
    assert sorted(rows.tolist()) == list(range(18))
    for p in parts:   # each group's rows contiguous and in order
        np.testing.assert_array_equal(p.reshape(-1, 3) % 3, np.tile(np.arange(3), (3, 1)))
        assert np.all(p.reshape(-1, 3)[:, 0] % 3 == 0)
    np.testing.assert_array_equal(rollout.group_minibatches(rng, 2, 2, 1)[0], [0, 1, 2, 3])
    with pytest.raises(ValueError, match="do not divide"):
        rollout.group_minibatches(rng, 5, 2, 2)


def test_prefix_sharing_with_early_stops_and_masked_truncation(tmp_path, monkeypatch):
    """With stop tokens (ids 3 and 5 of the tiny vocabulary of 64) some
    completions end early, so packed groups hold padding between their
    completions, and `reward.truncated=mask` drops the rows that ran to
    `max_new_tokens`. Sharing on and off still train the same policy and
    critic."""
    real = rollout.sampling_kwargs
    monkeypatch.setattr(rollout, "sampling_kwargs", lambda c, tok: {**real(c, tok), "stop_ids": (3, 5)})
    outs = {}
    for share in (True, False):
        c = _tiny(stop_after_steps=1)
        c.model.prefix_sharing = share
        c.reward.truncated = "mask"
        c.rollout.update(group_size=3, max_new_tokens=12)
        c.reference.batch_size = 6
        workdir = tmp_path / str(share)
        workdir.mkdir()
        if not share:
            shutil.copytree(tmp_path / "True" / "proxy_reward_model", workdir / "proxy_reward_model")
        outs[share] = driver.run(c, str(workdir))
    h = outs[True]["history"][0]
    assert 0 < h["response_length/min"] < 12 and h["response_length/max"] == 12   # stops and cut-offs
    assert 0 < h["response_length/clipped_frac"] < 1
    for key in ("state", "value_state"):
        for x, y in zip(_leaves(outs[False][key].params), _leaves(outs[True][key].params)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=key)
    _same_metrics(h, outs[False]["history"][0])


def _same_metrics(got: dict, want: dict) -> None:
    """Equal to 1e-5 except timings; a clip fraction may differ by one token
    in a few hundred (round-off can move a ratio or value across the clip
    boundary)."""
    for k, v in want.items():
        if "time/" not in k and "tokens/s" not in k:
            atol = 0.01 if "clipfrac" in k else 1e-6
            np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=atol, err_msg=k)
