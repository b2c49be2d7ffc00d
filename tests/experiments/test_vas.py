"""experiments/vas.py: TD(λ) targets (hand-computed), the value grid, the
held-out diagnostics, policy improvement on a depth-3 tree through the
driver's own loss and targets, and the `tiny` variant end to end: cached
samples (reused, stale ones refused), composition, exact resume, mesh shape
and micro-batches of the value step, and bad input."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import vas as vas_config
from experiments import vas as driver
from jaxreward import parallel
from jaxreward.errors import CorruptFileError, UserError
from jaxreward.sampling import value_guided as vg
from jaxreward.train import defaults, preference, rollout
from tests.experiments.test_cli import _cli
from tests.experiments.test_policy_gradient import (_assert_user_error, _compilation_cache,  # noqa: F401
                                                    _first_devices, _tiny_text_model)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# ---------------------------------------------------------------------------
# TD(λ) targets, the value grid and the diagnostics (hand-computed)


def test_value_grid_runs_from_the_last_prompt_token_to_the_last_response_token():
    # P = 3 columns of prompt, then M = 3 response columns; row 0 has 2
    # response tokens, row 1 three.
    loss_mask = np.array([[0, 0, 0, 1, 1, 0],
                          [0, 0, 0, 1, 1, 1]], bool)
    grid = driver.value_grid(loss_mask)
    np.testing.assert_array_equal(grid, [[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]])
    rewards = driver.token_rewards(np.array([2.0, -1.0]), grid)
    np.testing.assert_array_equal(rewards, [[0, 0, 0, 0, 2.0, 0], [0, 0, 0, 0, 0, -1.0]])


@pytest.mark.parametrize("gamma, expected", [
    # γ = 1, λ = 0.5, V on the grid = [0.5, 1.0, 2.0], r = 3 on the last state:
    #   G_2 = 3 (terminal); G_1 = 0.5·V_2 + 0.5·G_2 = 1 + 1.5 = 2.5;
    #   G_0 = 0.5·V_1 + 0.5·G_1 = 0.5 + 1.25 = 1.75.
    (1.0, [1.75, 2.5, 3.0]),
    # γ = 0.9: G_1 = 0.9·(0.5·2 + 0.5·3) = 2.25; G_0 = 0.9·(0.5·1 + 0.5·2.25) = 1.4625.
    (0.9, [1.4625, 2.25, 3.0]),
])
def test_td_lambda_targets_by_hand_under_either_padding(gamma, expected):
    values = np.array([[0.5, 1.0, 2.0, 0.0, 0.0],      # grid at columns 0..2 (right padding)
                       [0.0, 0.0, 0.5, 1.0, 2.0]])     # grid at columns 2..4 (left padding)
    grid = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]], bool)
    rewards = driver.token_rewards(np.array([3.0, 3.0]), grid)
    out = np.asarray(driver.td_lambda_targets(rewards, values, grid, gamma=gamma, lam=0.5))
    np.testing.assert_allclose(out[0, :3], expected, rtol=1e-6)
    np.testing.assert_allclose(out[1, 2:], expected, rtol=1e-6)
    assert not out[0, 3:].any() and not out[1, :2].any()
    # λ = 1, γ = 1: the Monte-Carlo return r at every state, whatever the values.
    mc = np.asarray(driver.td_lambda_targets(rewards, values, grid, gamma=1.0, lam=1.0))
    np.testing.assert_allclose(mc[grid], 3.0, rtol=1e-6)


def test_value_diagnostics_by_hand():
    grid = np.array([[0, 1, 1, 1], [0, 1, 1, 1]], bool)
    values = np.array([[9.0, 0.0, 0.5, 1.0],   # first state 0, last 1
                       [9.0, 1.0, 1.0, -1.0]])  # first state 1, last −1
    d = driver.value_diagnostics(values, np.array([1.0, -1.0]), grid)
    assert d["first_mse"] == pytest.approx((1.0 + 4.0) / 2)        # (0 − 1)², (1 + 1)²
    assert d["first_corr"] == pytest.approx(-1.0)
    assert d["last_mse"] == pytest.approx(0.0) and d["last_corr"] == pytest.approx(1.0)
    # MC returns r per grid token: [1, 1, 1, −1, −1, −1] (variance 1); errors
    # r − V = [1, 0.5, 0, −2, −2, 0]: mean −2.5/6 = −0.41667, mean square
    # 9.25/6 = 1.54167, variance 1.54167 − 0.17361 = 1.36806; EV = 1 − 1.36806.
    assert d["explained_variance"] == pytest.approx(1 - 1.3680556, abs=1e-6)


# ---------------------------------------------------------------------------
# A depth-3 tree: TD(λ) through the driver's loss reaches Q^{π_ref}, and the
# guided policy improves on the base policy for every β > 0


VOCAB, DEPTH = 4, 3


def _state_id(prefix) -> int:
    """0 for the root; then depth by depth, in lexicographic order."""
    base = sum(VOCAB ** d for d in range(len(prefix)))
    return base + sum(a * VOCAB ** (len(prefix) - 1 - i) for i, a in enumerate(prefix))


def _tree():
    rng = np.random.default_rng(3)
    probs = {}  # π_ref(·|s): a permutation of (0.1, 0.2, 0.3, 0.4), so π(seq)·1000 is an integer
    for d in range(DEPTH):
        for idx in np.ndindex(*(VOCAB,) * d):
            probs[tuple(idx)] = rng.permutation([0.1, 0.2, 0.3, 0.4])
    reward = {seq: float(rng.normal()) for seq in np.ndindex(*(VOCAB,) * DEPTH)}
    return probs, reward


def _enumerated_values(probs, reward) -> np.ndarray:
    """V^{π_ref}(prefix) for every prefix (Q(s, a) = V(s·a)), by enumeration."""
    table = np.zeros(sum(VOCAB ** d for d in range(DEPTH + 1)))
    for seq, r in reward.items():
        table[_state_id(seq)] = r
    for d in range(DEPTH - 1, -1, -1):
        for idx in np.ndindex(*(VOCAB,) * d):
            table[_state_id(idx)] = sum(probs[idx][a] * table[_state_id(idx + (a,))] for a in range(VOCAB))
    return table


def _expected_reward(policy, reward, prefix=()):
    if len(prefix) == DEPTH:
        return reward[prefix]
    return sum(policy[prefix][a] * _expected_reward(policy, reward, prefix + (a,)) for a in range(VOCAB))


@pytest.mark.parametrize("lam, epochs", [(1.0, 1), (0.5, DEPTH + 2)])
def test_td_lambda_on_a_tree_learns_q_and_guidance_improves_the_policy(lam, epochs):
    probs, reward = _tree()
    exact = _enumerated_values(probs, reward)
    # The data: every sequence, repeated 1000·π_ref(seq) times (the exact
    # distribution of the policy's samples); column 0 is the prompt token.
    rows = []
    for seq, r in reward.items():
        count = round(1000 * np.prod([probs[seq[:d]][seq[d]] for d in range(DEPTH)]))
        rows += [(seq, r)] * count
    assert len(rows) == 1000
    seqs = np.array([s for s, _ in rows])
    loss_mask = np.concatenate([np.zeros((len(rows), 1), bool), np.ones((len(rows), DEPTH), bool)], axis=1)
    grid = driver.value_grid(loss_mask)
    states = np.array([[_state_id(tuple(s[:t])) for t in range(DEPTH + 1)] for s in seqs])
    batch = {"state": states, "grid": grid}

    def values_fn(params, mb):  # a tabular value model: V(prefix) = table[prefix]
        return params["table"][mb["state"]]

    loss_fn, _, totals_fn = driver.make_value_loss_fns(values_fn)
    rewards_RL = driver.token_rewards(np.array([r for _, r in rows]), grid)
    params = {"table": jnp.zeros(len(exact))}
    steps = 400
    tx = optax.adam(optax.cosine_decay_schedule(0.2, steps))

    @jax.jit
    def fit(params, targets):  # regresses the fixed targets of one epoch
        mb = {**batch, "targets": targets}
        totals = totals_fn(mb)
        grad = jax.grad(lambda p: loss_fn(p, mb, None, totals)[0])

        def body(_, carry):
            p, opt = carry
            updates, opt = tx.update(grad(p), opt, p)
            return optax.apply_updates(p, updates), opt
        return jax.lax.fori_loop(0, steps, body, (params, tx.init(params)))[0]

    for _ in range(epochs):
        targets = driver.td_lambda_targets(rewards_RL, values_fn(params, batch), grid, gamma=1.0, lam=lam)
        params = fit(params, targets)
    table = np.asarray(params["table"])
    np.testing.assert_allclose(table, exact, atol=2e-3)

    # The guided policy at each internal state: the decoder's own step with
    # k = V and scores β·(Q(s, a) − mean_a Q(s, a)) from the learned table.
    internal = [idx for d in range(DEPTH) for idx in np.ndindex(*(VOCAB,) * d)]
    logits = jnp.log(jnp.asarray(np.array([probs[s] for s in internal]), jnp.float32))
    q = jnp.asarray(np.array([[table[_state_id(s + (a,))] for a in range(VOCAB)] for s in internal]), jnp.float32)
    base = _expected_reward(probs, reward)
    assert base == pytest.approx(exact[0], abs=1e-9)
    for beta in (0.25, 1.0, 4.0, 16.0, 64.0):
        def scores(logp_RV, cand_RK, beta=beta):
            qc = jnp.take_along_axis(q, cand_RK, axis=1)
            return beta * (qc - qc.mean(1, keepdims=True)), None
        out = vg.guided_step(logits, scores, temperature=1.0, k=VOCAB)
        g = np.zeros((len(internal), VOCAB))
        np.put_along_axis(g, np.asarray(out["cand_RK"]), np.exp(np.asarray(out["glogp_RK"])), axis=1)
        guided = {s: g[i] for i, s in enumerate(internal)}
        improved = _expected_reward(guided, reward)
        assert improved >= base - 1e-6, (beta, improved, base)
        assert improved > base + 0.05  # strictly better: the rewards differ within every subtree
    # Depth 1 of the same rule: g(a|root) ∝ π_ref(a|root)·exp(β·Q(root, a)).
    expect = probs[()] * np.exp(4.0 * q[0]) / np.sum(probs[()] * np.exp(4.0 * q[0]))
    out = vg.guided_step(logits[:1], lambda lp, c: (4.0 * jnp.take_along_axis(q[:1], c, 1), None), 1.0, VOCAB)
    got = np.zeros(VOCAB)
    got[np.asarray(out["cand_RK"][0])] = np.exp(np.asarray(out["glogp_RK"][0]))
    np.testing.assert_allclose(got, expect, rtol=1e-5)


# ---------------------------------------------------------------------------
# configs/vas.py:tiny end to end


def _tiny(**train):
    c = vas_config.get_config("tiny")
    c.mesh.data = 1
    c.train.update(train)
    return c


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The tiny variant with a composed second value model, run once."""
    workdir = tmp_path_factory.mktemp("vas_straight")
    c = _tiny()
    c.compose.kind = "second_gold"
    with _first_devices():
        out = driver.run(c, str(workdir))
    return out, workdir


def test_tiny_end_to_end(straight):
    out, workdir = straight
    c = _tiny()
    for name in ("samples.npz", "vas.json", "reward_vs_kl.png", "compose.png", "value/metrics.jsonl",
                 "value_b/metrics.jsonl"):
        assert (workdir / name).exists(), name
    summary = json.loads((workdir / "vas.json").read_text())
    assert [r["beta"] for r in summary["vas"]] == list(c.guide.betas)
    assert [r["N"] for r in summary["best_of_n"]] == [1, 2, 4]
    assert len(summary["compose"]) == len(c.compose.betas) ** 2
    B, n, k, M, P = c.data.num_eval_prompts, c.guide.samples_per_prompt, c.guide.k, c.rollout.max_new_tokens, \
        c.synthetic.prompt_length
    for row in summary["vas"]:
        # Synthetic responses have no stop token: every step scores k candidates per row.
        assert row["value_tokens"] == B * P + B * n * k * M
        assert row["kl"] > 0  # k = 8 < V = 64: the top-k truncation alone costs KL
        assert set(row) >= {"reward", "reward_se", "kl", "kl_se", "decode_s"} and "reward/gold" not in row
        assert row["scorer_tokens/output"] == row["value_tokens"] / (B * n)
    # β = (0, 0) of the composition is β = 0 of the sweep: the same guided draw.
    zero = next(r for r in summary["compose"] if r["beta_1"] == 0 and r["beta_2"] == 0)
    assert zero["reward"] == pytest.approx(summary["vas"][0]["reward"], abs=1e-6)
    assert zero["kl"] == pytest.approx(summary["vas"][0]["kl"], abs=1e-5)
    for bon in summary["best_of_n"]:
        assert bon["reward_tokens"] == bon["N"] * B * (P + M)
        assert bon["scorer_tokens/output"] == bon["N"] * (P + M) and bon["policy_tokens/output"] == P + bon["N"] * M
    # Samples: train prompts × samples per prompt, with both rewards and the gold extra.
    with np.load(workdir / "samples.npz") as data:
        S = c.data.num_prompts * c.rollout.samples_per_prompt
        assert data["train/tokens"].shape == (S, P + M)
        task = rollout.synthetic_task(c, c.model.arch.vocab_size)
        resp = data["train/tokens"][:, P:]
        np.testing.assert_allclose(data["train/rewards"], task.gold_reward(resp, data["train/loss_mask"][:, P:]),
                                   rtol=1e-6)
        assert "train/rewards_b" in data.files
        assert "eval/extra/gold" not in data.files     # the reward is the gold reward: stored once
    records = [json.loads(x) for x in (workdir / "value" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == [1, 2, 3, 4] and all(math.isfinite(r["train/explained_variance"])
                                               for r in records if "train/loss" in r)
    assert {"eval/first_mse", "eval/last_corr", "eval/explained_variance"} <= set(records[-1])


def test_samples_are_reused_by_other_value_runs_and_stale_ones_refused(straight, tmp_path):
    out, workdir = straight
    c = _tiny(num_steps=1)
    c.value.lam = 0.5                                   # another value-model hyper-parameter
    c.compose.kind = "second_gold"                      # the samples' rewards are those of the first run
    c.rollout.samples_path = str(workdir / "samples.npz")
    c.eval.best_of_n_max_n = 0
    c.guide.betas = (0.0,)
    with _first_devices():
        again = driver.run(c, str(tmp_path / "other"))
    assert again["samples"]["reused"] and not (tmp_path / "other" / "samples.npz").exists()
    c.seed = 1                                          # other prompts and samples: the file is stale
    c.rollout.temperature = 0.5
    with _first_devices(), pytest.raises(preference.StaleCacheError) as info:
        driver.run(c, str(tmp_path / "stale"))
    message = str(info.value)
    assert message.startswith("config field rollout.samples_path: ") and "drawn under other settings" in message
    assert "seed: 0 -> 1" in message and '"temperature": 0.5' in message  # what differs is named
    assert "set it to '' to draw new ones" in message and "delete" not in message
    # A file that is not a samples cache: one line naming it, nothing deleted.
    for name, content in (("garbage.npz", os.urandom(300)), ("empty.npz", b""), ("text.npz", b"hello\n")):
        (tmp_path / name).write_bytes(content)
        c.rollout.samples_path = str(tmp_path / name)
        with _first_devices(), pytest.raises(CorruptFileError, match=f"{name} is not a cache of policy samples"):
            driver.run(c, str(tmp_path / "bad"))
        assert (tmp_path / name).read_bytes() == content
    with pytest.raises(CorruptFileError, match="is not a cache of policy samples"):
        preference.read_cache(str(tmp_path), "policy samples")           # a directory


def test_resume_is_exact_mid_epoch_and_at_the_epoch_boundary(straight, tmp_path):
    out, _ = straight
    c = _tiny(stop_after_steps=1)                       # 2 steps per epoch: stop inside epoch 0
    c.eval.best_of_n_max_n = 0
    c.guide.betas = (0.0,)
    with _first_devices():
        first = driver.run(c, str(tmp_path))
        assert first["stopped_at"] == 1
        c.train.stop_after_steps = 3                    # resume with epoch 0's stored targets, cross into 1
        assert driver.run(c, str(tmp_path))["stopped_at"] == 3
        c.train.stop_after_steps = 0
        resumed = driver.run(c, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "td_targets" / "value")) == ["epoch_0.npy", "epoch_1.npy"]
    for a, b in zip(_leaves(resumed["trained"]["value"]["params"]), _leaves(out["trained"]["value"]["params"])):
        np.testing.assert_array_equal(a, b)
    steps = [json.loads(x)["step"] for x in (tmp_path / "value" / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in x]
    assert steps == [1, 2, 3, 4]                        # each step once


def _train_value(straight, workdir, mesh, micro):
    """Two value steps of the tiny config on the straight run's samples, on `mesh`."""
    out, run_dir = straight
    with np.load(run_dir / "samples.npz") as f:
        data = {s: {k.split("/", 1)[1]: f[k] for k in f.files if k.startswith(s + "/")} for s in ("train", "eval")}
    c = _tiny(num_steps=2, micro_batches=micro)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    with _first_devices():
        policy, params, _ = rollout.load_policy(c, "")
        _, init = rollout.value_model_init(c, str(workdir), policy.config, params)
        trained, _ = driver.train_value_model(c, str(workdir), "value", out["value_model"], init, data, "rewards",
                                              parallel.make_mesh(*mesh))
    return trained


@pytest.fixture(scope="module")
def one_device_value(straight, tmp_path_factory):
    return _train_value(straight, tmp_path_factory.mktemp("one_device"), (1, 1, 1), 1)


@pytest.mark.parametrize("mesh, micro", [((8, 1, 1), 1), ((2, 2, 2), 1), ((1, 1, 1), 2)])
def test_mesh_shape_and_micro_batches_do_not_change_the_value_step(straight, one_device_value, tmp_path, mesh,
                                                                   micro):
    trained = _train_value(straight, tmp_path, mesh, micro)
    assert trained["step"] == one_device_value["step"] == 2
    for a, b in zip(_leaves(trained["params"]), _leaves(one_device_value["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("field, value, names", [
    ("guide.betas", (-1.0,), "guide.betas"),
    ("compose.betas", (), "compose.betas"),
    ("rollout.top_k", 5, "rollout.top_k"),
    ("value.lam", 1.5, "value.lam"),
    ("guide.k", 0, "guide.k"),
    ("compose.kind", "text", "compose.kind"),           # the synthetic task has no text
    ("value.init", "reward_model", "value.init"),       # gold is not a reward model
    ("reward.kind", "text", "reward.kind must be one of proxy, gold, reward_model"),  # text needs text prompts
    ("eval.best_of_n_max_n", 3, r"eval.best_of_n_max_n=3: best-of-N runs N = 1, 2, 4, …; use 0 \(off\) or a "
                                r"power of two \(e.g. 2\)"),   # was silently cut to N = 2
])
def test_check_config_names_the_field(field, value, names):
    c = _tiny()
    section, key = field.split(".")
    c[section][key] = value
    with pytest.raises(defaults.ConfigError, match=names.replace(".", r"\.")):
        driver.check_config(c)


def test_best_of_n_max_n_may_be_off_or_a_power_of_two():
    for max_n in (0, 1, 2, 64):
        c = _tiny()
        c.eval.best_of_n_max_n = max_n
        driver.check_config(c)


def test_standard_errors_are_over_prompts_not_samples():
    """Two prompts × two samples, rewards [0, 0 | 1, 1]: the prompt means are
    0 and 1, SE = std([0, 1], ddof 1) / √2 = 0.5; counting the 4 samples as
    independent would give std([0, 0, 1, 1], ddof 1) / √4 = 0.2887."""
    assert driver.prompt_standard_error([0.0, 0.0, 1.0, 1.0], 2) == pytest.approx(0.5)
    # n = 1: the plain standard error; one prompt: 0 (no spread to measure).
    assert driver.prompt_standard_error([0.0, 0.0, 1.0, 1.0], 1) == pytest.approx(math.sqrt(1 / 3) / 2)
    assert driver.prompt_standard_error([3.0, 5.0], 2) == 0.0


def test_value_model_with_another_vocabulary_or_a_missing_path(tmp_path):
    _tiny_text_model(tmp_path / "text_model")
    c = _tiny()
    c.value.update(init="path", path=str(tmp_path / "text_model"))
    policy, params, _ = rollout.load_policy(c, "")
    with pytest.raises(UserError, match="has vocabulary .* the policy 64: they must share one tokenizer"):
        rollout.value_model_init(c, str(tmp_path), policy.config, params)
    proc = _cli("--config=configs/vas.py:tiny", f"--workdir={tmp_path / 'wd'}", "--config.value.init=path",
                "--config.value.path=/no/such/value_model", check=False)
    _assert_user_error(proc, "config field value.path: '/no/such/value_model' is neither an existing path nor a "
                             "known model name")
    assert not (tmp_path / "wd" / "config.json").exists()
    # Another run's workdir (a config.json that is not a model's) is named, not a traceback.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text('{"task": "vas"}')
    c.value.path = str(tmp_path / "run")
    with pytest.raises(UserError, match="config field value.path: .* is neither an exported reward model"):
        rollout.value_model_init(c, str(tmp_path), policy.config, params)
    # An ensemble export: the value model starts from one member, and the message names one.
    (tmp_path / "ens").mkdir()
    (tmp_path / "ens" / "ensemble.json").write_text("{}")
    c.value.path = str(tmp_path / "ens")
    with pytest.raises(defaults.ConfigError, match=r"config field value\.path: .* is an ensemble export .*"
                                                   r"member_0"):
        rollout.check_value_config(c)


def test_value_model_with_another_tokenizer_is_refused(tmp_path):
    import jaxreward
    _tiny_text_model(tmp_path / "text_model")
    c = _tiny()
    c.model.dtype = "float32"
    c.value.update(init="path", path=str(tmp_path / "text_model"))
    policy, params, tok = jaxreward.load_pretrained(str(tmp_path / "text_model"))
    tok._pad_id = tok.pad_id + 1         # same vocabulary size, another tokenizer (pad id)
    with pytest.raises(UserError, match="another tokenizer than the policy"):
        rollout.value_model_init(c, str(tmp_path), policy.config, params, tok)


def test_decode_time_settings_change_on_a_finished_workdir(tmp_path):
    """β, k and the eval settings are chosen at decode time: a workdir with
    trained value models re-decodes under new ones; training fields are refused."""
    from jaxreward import main
    c = _tiny()
    (tmp_path / "checkpoints" / "value").mkdir(parents=True)
    (tmp_path / "config.json").write_text(c.to_json_best_effort())
    c.guide.betas, c.guide.k, c.compose.betas, c.eval.best_of_n_max_n = (0.0, 5.0), 4, (1.0,), 8
    main.check_resume_config(c, str(tmp_path), driver.RESUMABLE_CHANGES)
    c.value.lam = 0.5
    with pytest.raises(defaults.ConfigError, match=r"changed fields:\n  value.lam: 0.95 -> 0.5\nUse a new"):
        main.check_resume_config(c, str(tmp_path), driver.RESUMABLE_CHANGES)


def test_prompts_longer_than_the_model_positions_are_refused_in_one_line(tmp_path):
    """As in the RL drivers: 319-token prompts + 3 new tokens do not fit the
    256 positions of `_tiny_text_model`; one line naming
    data.max_prompt_length, not the sampler's ValueError."""
    _tiny_text_model(tmp_path / "model")
    (tmp_path / "long.txt").write_text("".join("x" * 299 + f"{i}\n" for i in range(6)))
    c = _tiny(num_steps=2)
    c.model.pretrained = str(tmp_path / "model")
    c.data.update(source="jsonl", prompts_path=str(tmp_path / "long.txt"), num_eval_prompts=2, batch_size=8,
                  num_prompts=4, max_prompt_length=400)
    c.reward.update(kind="text", functions=(("length", 1.0),))
    c.rollout.max_new_tokens = 3
    with pytest.raises(UserError) as e, _first_devices():
        driver.run(c, str(tmp_path / "wd"))
    assert str(e.value) == ("config field data.max_prompt_length=400: prompts of up to 319 tokens + "
                            "rollout.max_new_tokens=3 exceed the model's max_position_embeddings 256; "
                            "use data.max_prompt_length <= 253")


def test_text_prompts_with_registered_rewards_and_a_composed_text_reward(tmp_path, capsys):
    """The text path on a tiny local model: prompts from a file, a registered
    Python reward, a second text reward composed at decode time, and the
    printed prompts with their base and guided completions."""
    _tiny_text_model(tmp_path / "model")
    (tmp_path / "prompts.txt").write_text("".join(f"say {ch}\n" for ch in "abcdefghij"))
    c = _tiny(num_steps=2)
    c.model.pretrained = str(tmp_path / "model")
    c.data.update(source="jsonl", prompts_path=str(tmp_path / "prompts.txt"), num_eval_prompts=2, batch_size=8,
                  num_prompts=6)
    c.reward.update(kind="text", functions=(("length_target", 1.0, {"target": 4, "scale": 4}),))
    c.compose.update(kind="text", functions=(("format_regex", 1.0, {"pattern": "a", "search": True}),), betas=(0.0, 1.0))
    c.guide.update(k=200, betas=(0.0, 3.0))               # k > V: clamped with a warning
    c.eval.update(best_of_n_max_n=2, show=1)
    with _first_devices():
        out = driver.run(c, str(tmp_path / "wd"))
    printed = capsys.readouterr().out
    assert "warning: guide.k=200 exceeds the vocabulary size" in printed
    assert "### say i" in printed and "--- β = 0, reward" in printed and "--- β = 3, reward" in printed
    assert out["samples"]["train"] == 6 * c.rollout.samples_per_prompt   # the first data.num_prompts prompts
    assert out["k"] == out["trained"]["value"]["params"]["backbone"]["embed_tokens"]["embedding"].shape[0]
    for row in out["vas"]:
        assert row["kl"] == pytest.approx(0.0, abs=1e-5) if row["beta"] == 0 else row["kl"] >= 0
    assert len(out["compose"]) == 4 and all(math.isfinite(r["reward_b"]) for r in out["compose"])


def test_a_prompt_file_needs_two_usable_prompts_and_a_reduced_eval_split_is_said(tmp_path, capsys):
    """One usable prompt gave 1 train and 0 eval prompts, and the driver later
    crashed with an IndexError in `sample_split` (the check said "need at
    least 2 (train and eval)" but tested n_train < 1). And data.num_eval_prompts
    was cut to half a small file silently; it is now said in one line."""
    import jaxreward
    _tiny_text_model(tmp_path / "model")
    _, _, tok = jaxreward.load_pretrained(str(tmp_path / "model"))
    c = _tiny()
    c.model.pretrained = str(tmp_path / "model")
    (tmp_path / "one.txt").write_text("hello there\n\n")
    c.data.update(source="jsonl", prompts_path=str(tmp_path / "one.txt"), num_eval_prompts=2)
    with pytest.raises(UserError, match=r"one.txt: 1 usable prompt\(s\); need at least 2 \(train and eval\)"):
        rollout.prompt_set(c, tok, None)
    (tmp_path / "three.txt").write_text("a b\nc d\ne f\n")
    c.data.prompts_path = str(tmp_path / "three.txt")
    prompts = rollout.prompt_set(c, tok, None)
    assert (len(prompts["train"]["tokens"]), len(prompts["eval"]["tokens"])) == (2, 1)
    assert (f"data.num_eval_prompts=2 is more than half of the 3 usable prompts of {tmp_path / 'three.txt'}: "
            "holding out 1 for eval") in capsys.readouterr().out


def test_samples_key_leaves_out_value_model_only_settings():
    """README: runs with other value hyper-parameters reuse the samples. But
    `model.remat` (rematerialize value-model blocks) was in the samples key,
    so `--config.model.remat=True --config.rollout.samples_path=...` was refused as stale."""
    c = _tiny()
    policy, params, tok = rollout.load_policy(c, "")
    prompts = rollout.prompt_set(c, tok, rollout.synthetic_task(c, policy.config.vocab_size))
    sampling = rollout.sampling_kwargs(c, tok)
    key, meta = driver._samples_key(c, params, tok, prompts, sampling)
    c.model.remat = True
    assert driver._samples_key(c, params, tok, prompts, sampling)[0] == key
    c.model.dtype = "bfloat16"  # the policy's compute dtype does change the samples
    assert driver._samples_key(c, params, tok, prompts, sampling)[0] != key


@pytest.mark.parametrize("name", ["vas", "ppo"])
def test_value_path_may_be_a_known_model_name(name):
    """configs/vas.py and `value_model_init` document value.path as "exported
    reward model, or HF dir / .gguf / name"; check_config refused a known
    name with "config field value.path: 'smollm2-135m-instruct' does not exist"
    (check_path ran before check_pretrained in the shared `check_value_config`)."""
    import importlib
    c = importlib.import_module(f"configs.{name}").get_config("smollm2_hh")
    c.reward.update(kind="text", functions=(("distinct_words", 1.0),))
    c.data.update(source="jsonl", prompts_path=__file__)  # any existing non-empty file
    c.value.update(init="path", path="smollm2-135m-instruct")
    rollout.check_value_config(c)
    c.value.path = "no-such-model"
    with pytest.raises(defaults.ConfigError, match="config field value.path: 'no-such-model' is neither an "
                                                   "existing path nor a known model name"):
        rollout.check_value_config(c)


def test_a_samples_path_that_is_not_samples_names_the_field_and_a_fix_that_works(tmp_path):
    """A user's rollout.samples_path that is not an npz: the message said
    "move it away to recompute it" (which then failed: check_config wants the
    path to exist) and did not name config field rollout.samples_path."""
    bad = tmp_path / "samples.txt"
    bad.write_text("not an npz\n")
    c = _tiny(progress_bar=False)
    c.rollout.samples_path = str(bad)
    driver.check_config(c)
    with pytest.raises(CorruptFileError) as e, _first_devices():
        driver.run(c, str(tmp_path))
    message = str(e.value)
    assert message.startswith(f"config field rollout.samples_path: {bad} is not a cache of policy samples"), message
    assert "move it away" not in message and "set it to '' to draw new samples" in message, message


@pytest.mark.parametrize("override, message", [
    ("vocab_size=1", "config field model.arch.vocab_size must be an integer >= 2, got 1"),
    ("num_kv_heads=3", "config field model.arch.num_kv_heads=3: model.arch.num_heads=2 must be a multiple"),
    ("hidden_size=1", "config field model.arch.hidden_size=1: the head size hidden_size // num_heads = 0"),
])
def test_impossible_model_arch_is_one_line_naming_the_field(tmp_path, override, message):
    """vocab_size=1 gave "ValueError: low >= high" (CountingTask.prompts),
    num_kv_heads=3 a ValueError from LlamaConfig, hidden_size=1 a
    ZeroDivisionError: ~28-line tracebacks. `defaults.check_arch` (shared by
    the RL, PPO, VAS, DPO and reward-model drivers) refuses them up front."""
    proc = _cli("--config=configs/vas.py:tiny", f"--workdir={tmp_path / 'w'}", f"--config.model.arch.{override}",
                "--config.eval.plot=False", check=False, timeout=120)
    _assert_user_error(proc, message)
