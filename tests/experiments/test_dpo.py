"""experiments/dpo.py: loss values through the driver's loss function, masks,
the reference cache, reference-free losses, mesh shape, micro-batches,
resume, a tabular check of the DPO optimum, generation eval, HF export and
config errors. Driver runs use a tiny `synthetic` variant."""
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import dpo as dpo_config
from experiments import dpo as driver
from jaxreward import main as cli
from jaxreward.errors import UserError
from jaxreward import parallel
from jaxreward.train import defaults
from jaxreward.train import preference as pref
from jaxreward.train import step as step_lib

# ---------------------------------------------------------------------------
# Helpers


def _config(num_steps=6, mesh=(1, 1, 1), micro_batches=1, loss="dpo", **loss_kw):
    c = dpo_config.get_config("synthetic")
    c.seed = 3
    c.model.arch.update(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=4, num_kv_heads=2)
    c.synthetic.update(prompt_length=4, response_length=6, num_train_pairs=64, num_eval_pairs=16)
    c.data.update(batch_size=16, eval_batch_size=16)
    c.reference.batch_size = 32
    c.loss.name = loss
    c.loss.update(loss_kw)
    c.optimizer.update(learning_rate=1e-2, warmup_steps=0, weight_decay=0.01)
    c.train = defaults.train(num_steps=num_steps, log_every=1)
    c.train.update(progress_bar=False, micro_batches=micro_batches, checkpoint_every=100)
    c.eval.update(generate=False, num_prompts=8, samples_per_prompt=2, best_of_n_max_n=4)
    c.sampling.max_new_tokens = 6
    c.export = False
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    return c


@pytest.fixture(autouse=True)
def _mesh_uses_first_devices(monkeypatch):
    """A (1, 1, 1) mesh runs on device 0 alone; larger meshes on the first n."""
    real = parallel.make_mesh

    def make_mesh(d, f, t):
        return real(d, f, t, devices=jax.devices()[:d * f * t])
    monkeypatch.setattr(parallel, "make_mesh", make_mesh)


def _run(workdir, config):
    os.makedirs(workdir, exist_ok=True)
    return driver.run(config, str(workdir))


def _flat(params):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(params)])


def _assert_params_close(a, b, rtol):
    fa, fb = _flat(a), _flat(b)
    assert np.linalg.norm(fa - fb) <= rtol * np.linalg.norm(fb), np.abs(fa - fb).max()


def _train_metrics(out):
    """Every logged step's metrics, without the wall-clock tokens/s."""
    return [{k: v for k, v in h.items() if k != "tokens/s"} for h in out["history"]]


def _assert_metrics_close(a, b, rtol=1e-5, atol=1e-6):
    assert [h["step"] for h in a] == [h["step"] for h in b]
    for ha, hb in zip(a, b):
        assert set(ha) == set(hb)
        for k in ha:
            if k == "rewards/accuracies" and ha["step"] == 1:
                # Step 1's metrics are of the initial policy = the reference: every implicit
                # reward is 0 up to round-off, so which side "wins" is round-off too.
                continue
            np.testing.assert_allclose(ha[k], hb[k], rtol=rtol, atol=atol, err_msg=f"{k} at {ha['step']}")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """6 DPO steps on one device; its workdir is reused by the cache tests."""
    parallel_make_mesh = parallel.make_mesh
    parallel.make_mesh = lambda d, f, t: parallel_make_mesh(d, f, t, devices=jax.devices()[:d * f * t])
    try:
        workdir = tmp_path_factory.mktemp("baseline")
        pref.FORWARDS.clear()
        out = driver.run(_config(), str(workdir))
        out["forwards"] = dict(pref.FORWARDS)
        out["workdir"] = workdir
        return out
    finally:
        parallel.make_mesh = parallel_make_mesh


# ---------------------------------------------------------------------------
# Loss values through the driver's loss function (a table "model")


def table_logps(params, tokens_BT, attention_mask_BT, positions_BT):
    """A log-prob table as the model: logps[b, t] = table[tokens[b, t + 1]]."""
    del attention_mask_BT, positions_BT
    nxt = jnp.concatenate([tokens_BT[:, 1:], jnp.zeros_like(tokens_BT[:, :1])], axis=1)
    logps = params["table"][nxt]
    return logps.at[:, -1].set(0.0)


def _two_pairs():
    """Rows [prompt 5, 5 | response | pad]; loss_mask over the response only.

    pair 1: chosen [1, 2], rejected [3];  pair 2: chosen [4], rejected [1, 3].
    """
    rows = {"chosen": [[1, 2], [4]], "rejected": [[3], [1, 3]]}
    batch = {}
    for side, responses in rows.items():
        T = 5
        tokens = np.zeros((2, T), np.int32)
        attn = np.zeros((2, T), bool)
        loss = np.zeros((2, T), bool)
        for b, resp in enumerate(responses):
            row = [5, 5] + resp
            tokens[b, :len(row)] = row
            attn[b, :len(row)] = True
            loss[b, 2:len(row)] = True
        batch[f"{side}_tokens"] = tokens
        batch[f"{side}_attention_mask"] = attn
        batch[f"{side}_loss_mask"] = loss
        batch[f"{side}_positions"] = np.maximum(np.cumsum(attn, axis=1) - 1, 0).astype(np.int32)
    return batch


# Token:               0     1     2     3     4     5 (prompt)
POLICY_TABLE = np.array([0.0, -1.0, -2.0, -0.5, -1.5, 100.0], np.float32)
REF_TABLE = np.array([0.0, -1.2, -1.8, -1.0, -1.0, -50.0], np.float32)
# Policy: c1 = -1 - 2 = -3, r1 = -0.5, c2 = -1.5, r2 = -1 - 0.5 = -1.5
# Ref:    c1 = -1.2 - 1.8 = -3, r1 = -1, c2 = -1, r2 = -1.2 - 1 = -2.2
# ρc = (0, -0.5), ρr = (0.5, 0.7), h = ρc - ρr = (-0.5, -1.2). The prompt
# token's entries (100, -50) would dominate everything if they were counted.


def _loss_fns(reference, **loss_kw):
    config = _config(**loss_kw)
    return driver.make_loss_fns(config, table_logps, table_logps if reference == "in_step" else None)


def _params_and_batch(reference):
    params = {"policy": {"table": jnp.asarray(POLICY_TABLE)}}
    batch = _two_pairs()
    if reference == "in_step":
        params["reference"] = {"table": jnp.asarray(REF_TABLE)}
    else:
        batch["ref_chosen_logps"] = np.array([-3.0, -1.0], np.float32)
        batch["ref_rejected_logps"] = np.array([-1.0, -2.2], np.float32)
    return params, batch


@pytest.mark.parametrize("reference", ["precomputed", "in_step"])
def test_step0_accuracy_is_zero_when_policy_equals_reference(reference):
    """Step 0 of DPO (policy = reference): both implicit rewards of each pair are
    exactly 0, a tie, so `rewards/accuracies` is 0.0, as TRL's DPOTrainer
    ((chosen_rewards > rejected_rewards).float()); it read 0.5 when a tie counted half."""
    params, batch = _params_and_batch(reference)
    params["policy"]["table"] = jnp.asarray(REF_TABLE)
    # precomputed reference logps are those of REF_TABLE: c = (-3, -1), r = (-1, -2.2) (see above)
    loss_fn, metrics_fn, _ = _loss_fns(reference, loss="dpo", beta=0.5)
    _, out = loss_fn(params, batch, None)
    metrics = metrics_fn(out, batch)
    np.testing.assert_allclose(metrics["rewards/chosen"], 0.0, atol=1e-7)
    np.testing.assert_allclose(metrics["rewards/rejected"], 0.0, atol=1e-7)
    assert float(metrics["rewards/accuracies"]) == 0.0


@pytest.mark.parametrize("reference", ["precomputed", "in_step"])
def test_dpo_ipo_simpo_values_by_hand(reference):
    params, batch = _params_and_batch(reference)
    # DPO, β = 0.5: mean_i log(1 + exp(-β h_i)) = (log(1 + e^0.25) + log(1 + e^0.6)) / 2
    #             = (0.8259394 + 1.0374880) / 2 = 0.9317137
    loss_fn, metrics_fn, _ = _loss_fns(reference, loss="dpo", beta=0.5)
    value, out = loss_fn(params, batch, None)
    np.testing.assert_allclose(value, 0.9317137, rtol=1e-6)
    metrics = metrics_fn(out, batch)
    np.testing.assert_allclose(metrics["rewards/chosen"], 0.5 * (0.0 - 0.5) / 2, atol=1e-6)      # -0.125
    np.testing.assert_allclose(metrics["rewards/rejected"], 0.5 * (0.5 + 0.7) / 2, atol=1e-6)    # 0.3
    np.testing.assert_allclose(metrics["rewards/margins"], -0.425, atol=1e-6)
    np.testing.assert_allclose(metrics["rewards/accuracies"], 0.0)
    np.testing.assert_allclose(metrics["logps/chosen"], (-3.0 - 1.5) / 2, atol=1e-6)             # -2.25
    np.testing.assert_allclose(metrics["logps/rejected"], (-0.5 - 1.5) / 2, atol=1e-6)           # -1.0
    # IPO, τ = β = 0.5: mean_i (h_i - 1/(2τ))² = ((-1.5)² + (-2.2)²) / 2 = (2.25 + 4.84) / 2 = 3.545
    loss_fn, _, _ = _loss_fns(reference, loss="ipo", beta=0.5)
    np.testing.assert_allclose(loss_fn(params, batch, None)[0], 3.545, rtol=1e-6)
    # IPO length-normalized (lengths c = (2, 1), r = (1, 2)): h = (0/2 - 0.5/1, -0.5/1 - 0.7/2)
    # = (-0.5, -0.85); ((-1.5)² + (-1.85)²) / 2 = (2.25 + 3.4225) / 2 = 2.83625
    loss_fn, _, _ = _loss_fns(reference, loss="ipo", beta=0.5, length_normalize=True)
    np.testing.assert_allclose(loss_fn(params, batch, None)[0], 2.83625, rtol=1e-6)


def test_simpo_uses_response_token_counts():
    params, batch = _params_and_batch("precomputed")
    # SimPO β = 1, γ = 0.5, lengths c = (2, 1), r = (1, 2):
    # pair 1: -3/2 - (-0.5)/1 - 0.5 = -1.5 -> log(1 + e^1.5) = 1.7014133
    # pair 2: -1.5/1 - (-1.5)/2 - 0.5 = -1.25 -> log(1 + e^1.25) = 1.5019291; mean 1.6016712
    loss_fn, _, loss = _loss_fns("precomputed", loss="simpo", beta=1.0, gamma=0.5)
    assert not loss.uses_reference
    value, out = loss_fn(params, batch, None)
    np.testing.assert_allclose(value, 1.6016712, rtol=1e-6)
    assert "ref_chosen_logps" not in out
    np.testing.assert_array_equal(out["chosen_lengths"], [2, 1])
    np.testing.assert_array_equal(out["rejected_lengths"], [1, 2])


@pytest.mark.parametrize("name,kw", [("dpo", {}), ("ipo", {}), ("simpo", {"gamma": 0.5}),
                                     ("orpo", {}), ("cdpo", {"label_smoothing": 0.1})])
def test_prompt_tokens_never_enter_the_loss(name, kw):
    params, batch = _params_and_batch("in_step")
    loss_fn, _, _ = _loss_fns("in_step", loss=name, beta=0.5, **kw)
    grad_fn = jax.value_and_grad(lambda p: loss_fn(p, batch, None)[0])
    value, grads = grad_fn(params)
    assert grads["policy"]["table"][5] == 0.0  # the prompt token's log-prob gets no gradient
    np.testing.assert_array_equal(grads["reference"]["table"], 0.0)  # the reference never trains
    moved = jax.tree.map(lambda x: x, params)
    moved["policy"]["table"] = params["policy"]["table"].at[5].set(-7.0)
    moved["reference"]["table"] = params["reference"]["table"].at[5].set(3.0)
    np.testing.assert_array_equal(loss_fn(moved, batch, None)[0], value)


def test_all_masked_responses_give_zero_loss_and_gradients():
    config = _config()
    model, base, _ = driver.load_model("", config, 0)
    loss_fn, metrics_fn, _ = driver.make_loss_fns(config, pref.decoder_logps_fn(model),
                                                  pref.decoder_logps_fn(model))
    batch = _two_pairs()
    for side in ("chosen", "rejected"):
        batch[f"{side}_loss_mask"][:] = False
    params = {"policy": base, "reference": base}

    @jax.jit
    def loss_grads_metrics(params, batch):
        loss, out, grads = step_lib.loss_and_grad(loss_fn, params, batch, jax.random.PRNGKey(0))
        return loss, grads, metrics_fn(out, batch)
    loss, grads, metrics = loss_grads_metrics(params, batch)
    assert float(loss) == 0.0
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(g)) and np.all(np.asarray(g) == 0) for g in leaves)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["valid_pairs"]) == 0.0


# ---------------------------------------------------------------------------
# Tabular check of the DPO optimum: π* = π_ref · exp(r/β) / Z


# The tabular task of the DPO and KTO checks: one-token responses over V = 6 tokens with a
# known reward r, from a reference softmax(REF_LOGITS) that ignores the prompt.
TAB_R = np.array([1.2, 0.6, 0.0, -0.5, -1.0, 0.3])
TAB_REF_LOGITS = np.array([0.3, -0.2, 0.5, 0.0, -0.4, 0.1], np.float32)


def _bt_pairs(r, per_pair):
    """For every unordered {a, b}: per_pair pairs of which round(per_pair·σ(r_a − r_b))
    prefer a (the Bradley–Terry label frequencies, stratified instead of drawn)."""
    chosen, rejected = [], []
    for a in range(len(r)):
        for b in range(a + 1, len(r)):
            n_a = int(round(per_pair / (1.0 + math.exp(-(r[a] - r[b])))))
            chosen += [a] * n_a + [b] * (per_pair - n_a)
            rejected += [b] * n_a + [a] * (per_pair - n_a)
    return chosen, rejected


def _tabular_logps(V):
    """Policy = softmax(logits), the same for every prompt: log π(token t+1)."""
    def fn(params, tokens_BT, attention_mask_BT, positions_BT):
        logp = jax.nn.log_softmax(params["logits"])
        nxt = jnp.concatenate([tokens_BT[:, 1:], jnp.zeros_like(tokens_BT[:, :1])], axis=1)
        return logp[jnp.minimum(nxt, V - 1)].at[:, -1].set(0.0)
    return fn


def _train_tabular(loss_fn, batch, tx, steps):
    """Adam on the policy logits (from the reference's) with the driver's loss_fn; float64 logits."""
    ref = {"logits": jnp.asarray(TAB_REF_LOGITS)}

    @jax.jit
    def train(policy):
        def body(carry, _):
            p, opt = carry
            g = jax.grad(lambda q: loss_fn({"policy": q, "reference": ref}, batch, None)[0])(p)
            updates, opt = tx.update(g, opt, p)
            return (optax.apply_updates(p, updates), opt), None
        (p, _), _ = jax.lax.scan(body, (policy, tx.init(policy)), None, length=steps)
        return p
    return np.asarray(train({"logits": jnp.asarray(TAB_REF_LOGITS)})["logits"], np.float64)


def test_tabular_dpo_recovers_the_tilted_reference():
    """One-token responses over 6 tokens with a known reward r; pairs labelled by
    the Bradley–Terry model σ(r_a − r_b): for every unordered pair {a, b}, 1000
    rows of which round(1000·σ(r_a − r_b)) prefer a (the BT label frequencies,
    stratified instead of drawn). DPO's population optimum then has
    β(ρ_a − ρ_b) = r_a − r_b, i.e. π = π_ref·exp(r/β)/Z; we train a logits
    vector with the driver's loss function and check both."""
    V, beta, r, ref_logits = 6, 0.5, TAB_R, TAB_REF_LOGITS
    chosen, rejected = _bt_pairs(r, 1000)
    N = len(chosen)

    def rows(responses):
        tokens = np.stack([np.full(N, V, np.int32), np.asarray(responses, np.int32)], axis=1)  # [prompt, y]
        return tokens, np.ones((N, 2), bool), np.array([[False, True]] * N), np.tile([0, 1], (N, 1))
    batch = {}
    for side, resp in (("chosen", chosen), ("rejected", rejected)):
        for k, v in zip(("tokens", "attention_mask", "loss_mask", "positions"), rows(resp)):
            batch[f"{side}_{k}"] = jnp.asarray(v)

    tabular = _tabular_logps(V)
    loss_fn, _, _ = driver.make_loss_fns(_config(loss="dpo", beta=beta), tabular, tabular)
    steps = 3000
    logits = _train_tabular(loss_fn, batch, optax.adam(optax.cosine_decay_schedule(0.05, steps, alpha=0.0)), steps)
    rho = jax.nn.log_softmax(logits) - jax.nn.log_softmax(ref_logits.astype(np.float64))
    implied = beta * (rho[:, None] - rho[None, :])
    true = r[:, None] - r[None, :]
    off = ~np.eye(V, dtype=bool)
    rel = np.abs(implied - true)[off] / np.abs(true)[off]
    assert rel.max() < 0.05, rel.max()
    pi = np.exp(jax.nn.log_softmax(logits))
    target = np.exp(ref_logits) * np.exp(r / beta)
    target /= target.sum()
    tv = 0.5 * np.abs(pi - target).sum()
    assert tv < 0.05, tv
    # It really moved: the reference is far from the target.
    ref_pi = np.exp(ref_logits) / np.exp(ref_logits).sum()
    assert 0.5 * np.abs(ref_pi - target).sum() > 0.3


def test_tabular_kto_from_pairs_moves_mass_to_the_net_winners_in_reward_order():
    """KTO through the driver's pieces (`driver.kto_examples`: chosen -> desirable,
    rejected -> undesirable; `make_loss_fns`) on the tabular task of the DPO test:
    one-token responses, BT-labelled pairs for every unordered {a, b}, two prompts.

    With z_0 shared by all examples and σ' even, ∂loss/∂ρ_y ∝ (u_y − d_y): a
    token gains exactly when it is desirable more often than undesirable, i.e.
    when its net wins Σ_b (2σ(r_y − r_b) − 1) are positive. For r below:
      token 0 (1.2): +2.47   token 1 (0.6): +0.91   token 5 (0.3): +0.05
      token 2 (0.0): −0.64   token 3 (−0.5): −1.91  token 4 (−1.0): −2.88
    (token 2: 2·(σ(−1.2)+σ(−0.6)+σ(0.5)+σ(1.0)+σ(−0.3)) − 5 = 2·2.364 − 5).
    The paper gives no closed-form optimum here, so the claim checked is that
    sign and order: the winners take the mass, ordered as r (the ρ gaps follow
    the gradient's weights d_y·σ'), and the losers are driven out. Labels read
    the wrong way round would reverse all of it."""
    V, beta = 6, 0.5
    chosen, rejected = _bt_pairs(TAB_R, 200)
    N = len(chosen)
    prompts = V + np.arange(N) % 2  # two prompt tokens: z_0's rows borrow the other prompt's completions
    arrays = {}
    for side, resp in (("chosen", chosen), ("rejected", rejected)):
        arrays[f"{side}_tokens"] = np.stack([prompts, np.asarray(resp)], 1).astype(np.int32)
        arrays[f"{side}_attention_mask"] = np.ones((N, 2), bool)
        arrays[f"{side}_loss_mask"] = np.tile([False, True], (N, 1))
    examples = driver.kto_examples(arrays, seed=0, pad_id=0)
    np.testing.assert_array_equal(examples["desirable"], np.tile([True, False], N))
    np.testing.assert_array_equal(examples["chosen_tokens"][0::2], arrays["chosen_tokens"])
    np.testing.assert_array_equal(examples["chosen_tokens"][1::2], arrays["rejected_tokens"])
    batch = {k: jnp.asarray(v) for k, v in examples.items()}

    tabular = _tabular_logps(V)
    loss_fn, _, _ = driver.make_loss_fns(_config(loss="kto", beta=beta), tabular, tabular)
    logits = _train_tabular(loss_fn, batch, optax.adam(0.05), 500)
    logp = np.asarray(jax.nn.log_softmax(logits))
    rho = logp - np.asarray(jax.nn.log_softmax(TAB_REF_LOGITS.astype(np.float64)))
    winners, losers = [0, 1, 5], [2, 3, 4]
    assert rho[0] > rho[1] > rho[5], rho  # the order of r among the winners
    assert rho[winners].min() > rho[losers].max() + 3.0, rho
    assert np.exp(logp[winners]).sum() > 0.99, np.exp(logp)


# ---------------------------------------------------------------------------
# Driver runs: mesh, micro-batches, resume, reference cache, reference-free losses


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 2, 2), (2, 1, 4)])
def test_mesh_shape_does_not_change_training(tmp_path, baseline, mesh):
    out = _run(tmp_path / "mesh", _config(mesh=mesh))
    assert len(out["mesh"].devices.ravel()) == 8
    if mesh[2] > 1:
        kernel = out["state"].params["policy"]["layers_0"]["mlp"]["up_proj"]["kernel"]
        assert "tensor" in str(kernel.sharding.spec)
    _assert_params_close(out["state"].params, baseline["state"].params, 1e-5)
    _assert_metrics_close(_train_metrics(out), _train_metrics(baseline))
    for k, v in baseline["eval"].items():
        np.testing.assert_allclose(out["eval"][k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_prefix_sharing_off_gives_the_same_training(tmp_path, baseline, capsys):
    """The baseline packs [prompt | chosen | rejected] into one row per pair
    (reference precompute and training); two rows per pair train the same."""
    config = _config()
    config.model.prefix_sharing = False
    out = _run(tmp_path / "unpacked", config)
    _assert_params_close(out["state"].params, baseline["state"].params, 1e-5)
    # Attention sums over other row lengths: round-off grows to ~1e-5 by step 5 (grad_norm).
    _assert_metrics_close(_train_metrics(out), _train_metrics(baseline), rtol=5e-5)
    for k, v in baseline["eval"].items():
        np.testing.assert_allclose(out["eval"][k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert "prefix sharing" not in capsys.readouterr().out


def test_micro_batches_match_one_shot(tmp_path, baseline):
    out = _run(tmp_path / "micro", _config(micro_batches=4))
    _assert_params_close(out["state"].params, baseline["state"].params, 1e-5)
    _assert_metrics_close(_train_metrics(out), _train_metrics(baseline))


def test_resume_gives_identical_params_and_metrics_and_reuses_the_reference_cache(
        tmp_path, baseline, capsys):
    first = _config()
    first.train.stop_after_steps = 3
    half = _run(tmp_path / "resumed", first)
    assert half["stopped_at"] == 3
    assert "cached in reference_logps.npz" in capsys.readouterr().out
    pref.FORWARDS.clear()
    resumed = _run(tmp_path / "resumed", _config())
    assert int(resumed["state"].step) == 6
    assert pref.FORWARDS["reference"] == 0  # the cached reference log-probs were reused
    assert "reused reference_logps.npz" in capsys.readouterr().out
    np.testing.assert_array_equal(_flat(resumed["state"].params), _flat(baseline["state"].params))

    def lines(workdir):
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return [{k: v for k, v in json.loads(l).items() if k != "train/tokens/s"} for l in f]
    a, b = lines(baseline["workdir"]), lines(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6, 6]  # train rows, then the final eval
    assert a == b  # every metric of every step, bit for bit (tokens/s is wall-clock)


def test_first_step_margins_are_rounding_when_the_policy_is_the_reference(baseline):
    # The first logged step scores the initial policy (= the reference) against
    # precomputed log-probs from another program: margins are float32 rounding.
    first = baseline["history"][0]
    assert abs(first["rewards/margins"]) < 1e-5 and abs(first["loss"] - math.log(2)) < 1e-5


def test_a_stale_reference_cache_is_refused(baseline):
    workdir = baseline["workdir"]
    assert baseline["forwards"]["reference"] >= 1
    assert os.path.exists(workdir / driver.CACHE_FILE)
    stale = _config()
    stale.synthetic.label_beta = 0.5  # other labels: other pair arrays, same file name
    # Beside checkpoints, other data is refused first (data_sha256.txt) ...
    with pytest.raises(UserError, match="holds checkpoints trained on other data"):
        driver.run(stale, str(workdir))
    # ... and the cache alone, copied into a fresh workdir, is refused as stale.
    fresh = workdir.parent / (workdir.name + "_cache_only")
    os.makedirs(fresh, exist_ok=True)
    shutil.copy(workdir / driver.CACHE_FILE, fresh / driver.CACHE_FILE)
    with pytest.raises(pref.StaleCacheError, match="delete the file to recompute"):
        driver.run(stale, str(fresh))
    # The same data without prefix sharing: unpacked forwards round differently
    # (~1e-5 nats), so the packed run's cache is not theirs either.
    unpacked = _config()
    unpacked.model.prefix_sharing = False
    with pytest.raises(pref.StaleCacheError, match=r"or packing \(model.prefix_sharing\).*delete the file"):
        driver.run(unpacked, str(workdir))


def test_cache_key_covers_data_and_reference_weights():
    arrays = _two_pairs()
    params = {"table": jnp.asarray(REF_TABLE)}
    key = pref.reference_cache_key({"train": arrays}, "tok", params, "cfg", {"temperature": 1.0})
    assert key == pref.reference_cache_key({"train": dict(arrays)}, "tok", params, "cfg",
                                           {"temperature": 1.0})
    other_params = {"table": params["table"].at[2].add(1e-6)}
    other_data = dict(arrays, chosen_loss_mask=arrays["chosen_loss_mask"].copy())
    other_data["chosen_loss_mask"][0, 2] = False
    for changed in (pref.reference_cache_key({"train": arrays}, "tok", other_params, "cfg", {}),
                    pref.reference_cache_key({"train": other_data}, "tok", params, "cfg", {}),
                    pref.reference_cache_key({"train": arrays}, "tok2", params, "cfg", {})):
        assert changed != key


def test_reference_free_losses_run_no_reference(tmp_path):
    # SimPO through the whole driver: no reference pass, no cache, no reference params.
    pref.FORWARDS.clear()
    out = _run(tmp_path / "simpo", _config(num_steps=2, loss="simpo", beta=2.0, gamma=0.5))
    assert pref.FORWARDS["reference"] == 0 and pref.FORWARDS["policy"] >= 2  # step + eval
    assert not os.path.exists(tmp_path / "simpo" / driver.CACHE_FILE)
    assert "reference" not in out["state"].params
    assert np.isfinite(out["eval"]["loss"])
    # ORPO (and SimPO, and DPO for contrast) through the driver's loss function, traced with
    # a reference available in the params: only the reference-based loss runs it.
    config = _config()
    model, base, _ = driver.load_model("", config, 0)
    batch = _two_pairs()
    for name, kw, forwards in [("orpo", {"beta": 0.2}, 0), ("simpo", {"gamma": 0.5}, 0), ("dpo", {}, 1)]:
        loss_fn, _, _ = driver.make_loss_fns(_config(loss=name, **kw), pref.decoder_logps_fn(model),
                                             pref.decoder_logps_fn(model))
        pref.FORWARDS.clear()
        jax.eval_shape(jax.grad(lambda p: loss_fn(p, batch, None)[0]), {"policy": base, "reference": base})
        assert (pref.FORWARDS["policy"], pref.FORWARDS["reference"]) == (1, forwards), name


def test_in_step_reference_matches_precomputed_then_generation_eval_and_hf_export(tmp_path, baseline):
    """reference.precompute=False (reference forward inside the step) trains the same
    params; this run also does the generation eval and exports the policy."""
    config = _config()
    config.reference.precompute = False
    config.eval.generate = True
    config.export = True
    pref.FORWARDS.clear()
    out = _run(tmp_path / "instep", config)
    assert pref.FORWARDS["reference"] >= 1 and not os.path.exists(tmp_path / "instep" / driver.CACHE_FILE)
    _assert_params_close(out["state"].params["policy"], baseline["state"].params["policy"], 1e-5)
    np.testing.assert_array_equal(_flat(out["state"].params["reference"]),
                                  _flat(driver.load_model("", config, config.seed)[1]))
    # Generation eval: gold reward, win rate and KL with standard errors; best-of-N table; plot.
    gen = out["generate"]
    for k in ("reward", "ref_reward", "win_rate", "kl_k1", "kl_k3"):
        assert np.isfinite(gen[k]) and gen[f"{k}_se"] >= 0
    assert gen["kl_k3"] >= 0
    curve = out["best_of_n"]
    assert [r["N"] for r in curve] == [1, 2, 4]
    # log N − (N−1)/N: 0, log 2 − 1/2 = 0.193147, log 4 − 3/4 = 0.636294
    np.testing.assert_allclose([r["kl_bound"] for r in curve], [0.0, 0.193147, 0.636294], atol=1e-6)
    assert all(b["reward"] >= a["reward"] - 1e-9 for a, b in zip(curve, curve[1:]))  # nested maxima
    assert os.path.getsize(tmp_path / "instep" / "reward_vs_kl.png") > 1000
    with open(tmp_path / "instep" / "dpo.json") as f:
        summary = json.load(f)
    assert [p["step"] for p in summary["generate_points"]] == [0, 6]
    # HF export: transformers loads it and gives our logits.
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tests.models.helpers import rel_err
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "instep" / driver.EXPORT_DIR))
    hf.eval()
    model, _, _ = driver.load_model("", config, config.seed)
    params = jax.device_get(out["state"].params["policy"])
    tokens = np.random.default_rng(0).integers(1, 32, (3, 10)).astype(np.int32)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    assert rel_err(ours, theirs) < 1e-4


def test_tr_dpo_soft_update_arithmetic():
    # π_ref <- α·π_θ + (1 − α)·π_ref at α = 0.6: 0.6·1 + 0.4·3 = 1.8, 0.6·2 + 0.4·(−1) = 0.8,
    # 0.6·(−5) + 0.4·5 = −1.0; α = 1 copies the policy exactly.
    params = {"policy": {"w": jnp.array([1.0, 2.0]), "b": jnp.array(-5.0)},
              "reference": {"w": jnp.array([3.0, -1.0]), "b": jnp.array(5.0)}}
    out = pref.soft_update_reference(params, 0.6)
    np.testing.assert_allclose(out["reference"]["w"], [1.8, 0.8], rtol=1e-6)
    np.testing.assert_allclose(out["reference"]["b"], -1.0, rtol=1e-6)
    assert out["policy"] is params["policy"]
    hard = pref.soft_update_reference(params, 1.0)
    np.testing.assert_array_equal(hard["reference"]["w"], params["policy"]["w"])
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"):
        pref.soft_update_reference(params, 0.0)
    other = {"policy": params["policy"], "reference": {"w": jnp.zeros(3), "b": jnp.zeros(())}}
    with pytest.raises(ValueError, match="another architecture"):
        pref.soft_update_reference(other, 0.5)


def _tr_dpo_config(num_steps, sync_every, alpha=0.6, mesh=(1, 1, 1)):
    config = _config(num_steps=num_steps, mesh=mesh)
    config.reference.update(precompute=False, sync_every=sync_every, sync_alpha=alpha)
    return config


def test_tr_dpo_syncs_the_in_step_reference_every_k_steps_and_resumes(tmp_path, capsys):
    # Two steps, then a sync at the start of step 3: its reference is α·policy_2 +
    # (1 − α)·initial reference with α = 0.6 (not 0.5, where α and 1 − α are the same), and
    # it stays so through step 4 (the next sync would be at step 5).
    first_two = _tr_dpo_config(4, 0)  # the 4-step schedule, stopped after 2
    first_two.train.stop_after_steps = 2
    plain = _run(tmp_path / "plain", first_two)
    straight = _run(tmp_path / "straight", _tr_dpo_config(4, 2))
    p, r = plain["state"].params, straight["state"].params
    np.testing.assert_allclose(_flat(r["reference"]), 0.6 * _flat(p["policy"]) + 0.4 * _flat(p["reference"]),
                               rtol=1e-6, atol=1e-7)
    assert np.abs(_flat(r["reference"]) - _flat(p["reference"])).max() > 1e-4  # it moved
    # Steps 1-2 train against the initial reference, step 3 against the synced one.
    plain4 = _run(tmp_path / "plain4", _tr_dpo_config(4, 0))
    assert straight["history"][1]["loss"] == plain4["history"][1]["loss"]
    assert abs(straight["history"][2]["loss"] - plain4["history"][2]["loss"]) > 1e-6
    # A sync period that the run never reaches is said so.
    capsys.readouterr()
    _run(tmp_path / "never", _tr_dpo_config(2, 2))
    assert "warning: reference.sync_every=2 is not below train.num_steps=2: the reference is never " \
           "synced" in capsys.readouterr().out
    # Stop after step 3 (the checkpoint holds the synced reference) or after step 2 (the
    # resumed run's first step is the one that syncs), resume to 4: bit for bit.
    for stop in (3, 2):
        first = _tr_dpo_config(4, 2)
        first.train.stop_after_steps = stop
        assert _run(tmp_path / f"resumed{stop}", first)["stopped_at"] == stop
        resumed = _run(tmp_path / f"resumed{stop}", _tr_dpo_config(4, 2))
        np.testing.assert_array_equal(_flat(resumed["state"].params), _flat(straight["state"].params))


def test_tr_dpo_on_a_2x2x2_mesh_and_in_micro_batches_matches_one_device(tmp_path):
    # The sync is a jitted update of sharded, donated params: on a data x fsdp x tensor mesh
    # and split into micro-batches it gives the one-device run's reference and policy.
    one = _run(tmp_path / "one", _tr_dpo_config(4, 2))
    mesh = _run(tmp_path / "mesh", _tr_dpo_config(4, 2, mesh=(2, 2, 2)))
    _assert_params_close(mesh["state"].params, one["state"].params, 1e-5)
    micro = _tr_dpo_config(4, 2)
    micro.train.micro_batches = 4
    _assert_params_close(_run(tmp_path / "micro", micro)["state"].params, one["state"].params, 1e-5)


def test_tr_dpo_is_refused_with_precomputed_or_no_reference():
    config = _config(mesh=(-1, 1, 1))
    config.reference.sync_every = 4
    with pytest.raises(ValueError, match="reference.sync_every=4 updates the reference during training "
                                         r"\(TR-DPO\), so its log-probs cannot be precomputed"):
        cli.check_config(config)
    config = _config(mesh=(-1, 1, 1), loss="simpo", gamma=0.5)
    config.reference.update(precompute=False, sync_every=4)
    with pytest.raises(ValueError, match="loss 'simpo' uses no reference, so there is nothing to sync"):
        cli.check_config(config)
    config = _config(mesh=(-1, 1, 1))
    config.reference.update(precompute=False, sync_every=4, sync_alpha=1.5)
    with pytest.raises(ValueError, match="reference.sync_alpha"):
        cli.check_config(config)


# ---------------------------------------------------------------------------
# KTO: unpaired examples stored as pair rows


def test_kto_examples_layout_by_hand():
    # Pair 0: prompt [7, 8], chosen [1, 2], rejected [3]; pair 1: prompt [9], chosen [4], rejected [5, 6].
    arrays = {}
    rows = {"chosen": [([7, 8], [1, 2]), ([9], [4])], "rejected": [([7, 8], [3]), ([9], [5, 6])]}
    for side, rs in rows.items():
        tok, attn, loss = np.zeros((2, 5), np.int32), np.zeros((2, 5), bool), np.zeros((2, 5), bool)
        for b, (p, r) in enumerate(rs):
            tok[b, :len(p) + len(r)] = p + r
            attn[b, :len(p) + len(r)] = True
            loss[b, len(p):len(p) + len(r)] = True
        arrays.update({f"{side}_tokens": tok, f"{side}_attention_mask": attn, f"{side}_loss_mask": loss})
    out = pref.kto_examples(arrays, {"chosen": np.ones(2, bool), "rejected": np.zeros(2, bool)}, seed=0,
                            pad_id=63)
    # Examples in order: pair 0 chosen, pair 0 rejected, pair 1 chosen, pair 1 rejected.
    np.testing.assert_array_equal(out["desirable"], [True, False, True, False])
    np.testing.assert_array_equal(out["pair_index"], [0, 0, 1, 1])
    completions = [[1, 2], [3], [4], [5, 6]]
    prompts = [[7, 8], [7, 8], [9], [9]]
    # z_0's row of example e borrows the completion of an example with ANOTHER prompt: with
    # two prompts of two examples each, pair 0's examples borrow pair 1's completions and back,
    # each completion once (a permutation).
    partner = pref.mismatched_partners([bytes(p) for p in prompts], seed=0)
    assert sorted(partner) == [0, 1, 2, 3]
    for e in range(4):
        p, c = prompts[e], completions[e]
        row = out["chosen_tokens"][e]
        assert list(row[:len(p) + len(c)]) == p + c and all(row[len(p) + len(c):] == 63)
        assert list(np.flatnonzero(out["chosen_loss_mask"][e])) == list(range(len(p), len(p) + len(c)))
        kl = completions[partner[e]]
        assert prompts[partner[e]] != p
        assert list(out["rejected_tokens"][e][:len(p) + len(kl)]) == p + kl
        assert out["rejected_attention_mask"][e].sum() == len(p) + len(kl)
        np.testing.assert_array_equal(out["rejected_positions"][e][:len(p) + len(kl)], np.arange(len(p) + len(kl)))
    # Feedback lines: the chosen side only, their labels, no pairs.
    fb = pref.kto_examples(arrays, {"chosen": np.array([False, True])}, seed=0)
    np.testing.assert_array_equal(fb["desirable"], [False, True])
    np.testing.assert_array_equal(fb["pair_index"], [-1, -1])
    # The generation eval's prompts: each distinct prompt once (rows 0 and 2 here).
    np.testing.assert_array_equal(driver.first_row_per_prompt(out), [0, 2])
    # A left-padded row is refused, naming the row.
    bad = dict(arrays, chosen_attention_mask=np.roll(arrays["chosen_attention_mask"], 1, axis=1))
    with pytest.raises(ValueError, match="chosen row 0 is not"):
        pref.kto_examples(bad, {"chosen": np.ones(2, bool)}, seed=0)


def _right_padded(rows, T, pad=0):
    """chosen_* arrays of `(prompt, completion)` rows, right-padded to T with `pad`."""
    tok, attn, loss = np.full((len(rows), T), pad, np.int32), np.zeros((len(rows), T), bool), np.zeros((len(rows), T), bool)
    for b, (p, r) in enumerate(rows):
        tok[b, :len(p) + len(r)] = p + r
        attn[b, :len(p) + len(r)] = True
        loss[b, len(p):len(p) + len(r)] = True
    return {"chosen_tokens": tok, "chosen_attention_mask": attn, "chosen_loss_mask": loss}


def test_prompt_keys_see_only_the_prompt_tokens():
    # Rows 0 and 2 share the prompt [5, 6] under other completions, other padding ids and another
    # width; row 1's prompt [5] is a prefix of it and row 3's [6, 5] a permutation: both differ.
    narrow = _right_padded([([5, 6], [1]), ([5], [6, 1])], T=4, pad=0)
    wide = _right_padded([([5, 6], [2, 3, 4]), ([6, 5], [1])], T=9, pad=99)
    keys = pref.prompt_keys(narrow) + pref.prompt_keys(wide)
    assert keys[0] == keys[2] and len(set(keys)) == 3
    merged = {k: np.concatenate([np.pad(narrow[k], ((0, 0), (0, 5))), wide[k]]) for k in narrow}
    np.testing.assert_array_equal(driver.first_row_per_prompt(merged), [0, 1, 3])


def test_kto_examples_cut_a_borrowed_completion_to_the_row_width():
    # Width 5: example 0 = [1 | 2], example 1 = [3, 3 | 4, 4, 4] (full). Example 0's z_0 row borrows
    # [4, 4, 4] after its 1-token prompt: [1, 4, 4, 4] fits. Example 1's borrows [2] after its
    # 2-token prompt: [3, 3, 2]. With a 4-token completion [4, 4, 4, 4] on a 1-token prompt
    # (width 5), example 0 takes all 4; a 3-token prompt borrowing it keeps 5 − 3 = 2 tokens.
    arrays = _right_padded([([1], [2]), ([3, 3], [4, 4, 4])], T=5, pad=9)
    out = pref.kto_examples(arrays, {"chosen": np.array([True, False])}, seed=0, pad_id=9)
    np.testing.assert_array_equal(out["rejected_tokens"], [[1, 4, 4, 4, 9], [3, 3, 2, 9, 9]])
    np.testing.assert_array_equal(out["rejected_loss_mask"].astype(int), [[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]])
    arrays = _right_padded([([7, 7, 7], [2]), ([3], [4, 4, 4, 4])], T=5, pad=9)
    out = pref.kto_examples(arrays, {"chosen": np.array([True, False])}, seed=0, pad_id=9)
    np.testing.assert_array_equal(out["rejected_tokens"], [[7, 7, 7, 4, 4], [3, 2, 9, 9, 9]])
    np.testing.assert_array_equal(out["rejected_attention_mask"].sum(axis=1), [5, 2])
    np.testing.assert_array_equal(out["rejected_positions"], [[0, 1, 2, 3, 4], [0, 1, 1, 1, 1]])


def _kto_pairs(chosen, rejected, prompt_lengths, chosen_width, rejected_width,
               chosen_dtype=np.int32, rejected_dtype=np.int32):
    """Pair arrays from whole rows and their prompt lengths; each side of its own width and token dtype."""
    out = {}
    for side, rows, width, dtype in (("chosen", chosen, chosen_width, chosen_dtype),
                                     ("rejected", rejected, rejected_width, rejected_dtype)):
        arrays = _right_padded([(row[:p], row[p:]) for row, p in zip(rows, prompt_lengths)], width)
        out.update({k.replace("chosen", side): v.astype(dtype) if k.endswith("tokens") else v
                    for k, v in arrays.items()})
    return out


_PAIRED = lambda n: {"chosen": np.ones(n, bool), "rejected": np.zeros(n, bool)}


def test_prompt_keys_of_the_same_prompt_agree_across_token_dtypes():
    # Observed: prompt_keys keys a prompt by the raw bytes of its tokens, so the prompt
    # [5, 6] in an int32 chosen array and in an int64 rejected array gets two different
    # keys (b'\x05\x00\x00\x00\x06\x00\x00\x00' vs 16 bytes). Its docstring promises
    # "two rows share a key exactly when they hold the same prompt token sequence".
    # Expected: the same token sequence gives the same key whatever the integer dtype.
    a = _kto_pairs([[5, 6, 1], [7, 8, 2]], [[5, 6, 3], [7, 8, 4]], [2, 2], 4, 4, np.int32, np.int64)
    assert pref.prompt_keys(a, "chosen") == pref.prompt_keys(a, "rejected")


def test_kto_z0_row_never_borrows_a_completion_of_its_own_prompt_with_mixed_token_dtypes():
    # Observed: with chosen tokens int32 and rejected tokens int64 (two prompts, two pairs),
    # kto_examples treats the two sides of one prompt as two prompts, so with seed=1 the
    # rejected example of pair 0 (prompt [5, 6]) gets as its z_0 row [5, 6 | 1]: the
    # completion of pair 0's own chosen side, which KTO's mismatched pairs must never do
    # (mismatched_partners: "never lands in e's own group" when no prompt holds over half).
    # Expected: every z_0 row holds a completion written for the other prompt.
    a = _kto_pairs([[5, 6, 1], [7, 8, 2]], [[5, 6, 3], [7, 8, 4]], [2, 2], 4, 4, np.int32, np.int64)
    own = {(5, 6): {1, 3}, (7, 8): {2, 4}}
    for seed in range(5):
        out = pref.kto_examples(a, _PAIRED(2), seed, 0)
        for e in range(4):
            prompt = tuple(out["rejected_tokens"][e, :2].tolist())
            borrowed = int(out["rejected_tokens"][e, 2])
            assert borrowed not in own[prompt], (seed, e, out["rejected_tokens"].tolist())


def test_kto_examples_with_a_chosen_side_wider_than_the_rejected_side():
    # Observed: chosen arrays of width 6 and rejected arrays of width 4 (the same pairs)
    # raise numpy's "ValueError: all input arrays must have the same shape" from np.stack
    # inside kto_examples, which names neither side nor the widths (the per-row version
    # before it gave correct rows of width 6).
    # Expected: correct rows (the narrower side right-padded to the widest).
    a = _kto_pairs([[5, 6, 1], [7, 8, 2]], [[5, 6, 3], [7, 8, 4]], [2, 2], 6, 4)
    out = pref.kto_examples(a, _PAIRED(2), 0, 0)  # the narrower side is right-padded
    assert out["chosen_tokens"].tolist() == [[5, 6, 1, 0, 0, 0], [5, 6, 3, 0, 0, 0],
                                             [7, 8, 2, 0, 0, 0], [7, 8, 4, 0, 0, 0]]


def test_kto_examples_with_labels_of_the_wrong_length_is_one_clear_error():
    # Observed: 3 feedback labels for 2 rows (sides={"chosen": [True]*3}) raise numpy's
    # "ValueError: cannot reshape array of size 3 into shape (2,)" (1 label: "size 1 into
    # shape (2,)"), which says nothing of labels; the per-row version before it accepted 3
    # labels for 2 rows silently.
    a = _kto_pairs([[5, 6, 1], [7, 8, 2]], [[5, 6, 1], [7, 8, 2]], [2, 2], 4, 4)
    for n in (3, 1):
        with pytest.raises(ValueError, match=rf"side 'chosen' has 2 rows and labels of shape \({n},\); "
                                             r"every side needs 2 rows and 2 labels"):
            pref.kto_examples(a, {"chosen": np.ones(n, bool)}, 0, 0)


@pytest.mark.parametrize("sizes", [(2, 2), (3, 3, 3), (1, 4, 2, 1), (5, 1, 1), (6, 1), (3,), (1,)])
def test_mismatched_partners_take_another_prompts_completion(sizes):
    # Prompt groups of the given sizes (a pair gives two examples of one prompt; feedback data
    # rate several completions per prompt). Before the fix the partner was the next example of
    # a seeded permutation, ignoring prompts: seeds 1, 2, 4 of (2, 2) paired an example with its
    # own pair's other completion, the matched log-ratio KTO pushes the other way.
    keys = [bytes([g]) for g, n in enumerate(sizes) for _ in range(n)]
    E, M = len(keys), max(sizes)
    for seed in range(8):
        partner = pref.mismatched_partners(keys, seed)
        if len(sizes) == 1:  # one prompt: no mismatched completion exists; the next example's
            assert sorted(partner) == list(range(E)) and (E == 1 or all(partner != np.arange(E)))
            continue
        assert all(keys[m] != keys[e] for e, m in enumerate(partner)), (seed, partner)
        if E >= 2 * M:  # no prompt holds more than half: each completion borrowed exactly once
            assert sorted(partner) == list(range(E)), (seed, partner)
    # Seeded: the same seed gives the same pairing (reference log-probs are cached on it).
    np.testing.assert_array_equal(pref.mismatched_partners(keys, 3), pref.mismatched_partners(keys, 3))


def test_kto_examples_from_feedback_with_repeated_prompts_never_borrow_their_own_prompt():
    # 3 prompts x 3 rated completions, through kto_examples: every z_0 row holds prompt x_e and a
    # completion written for another prompt (a random next-in-permutation partner shared the
    # prompt with probability 2/8 per example).
    prompts, completions = [[10 + i // 3] for i in range(9)], [[20 + i] for i in range(9)]
    tok, attn, loss = np.zeros((9, 3), np.int32), np.zeros((9, 3), bool), np.zeros((9, 3), bool)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        tok[b, :2], attn[b, :2], loss[b, 1] = p + c, True, True
    arrays = {"chosen_tokens": tok, "chosen_attention_mask": attn, "chosen_loss_mask": loss}
    for seed in range(8):
        out = pref.kto_examples(arrays, {"chosen": np.arange(9) % 2 == 0}, seed=seed)
        borrowed = out["rejected_tokens"][:, 1] - 20  # the completion's source line
        assert all(borrowed // 3 != np.arange(9) // 3), (seed, borrowed)
        assert sorted(borrowed) == list(range(9))


@pytest.mark.parametrize("reference", ["precomputed", "in_step"])
def test_kto_loss_by_hand_and_micro_batches_use_the_whole_batch_reference_point(reference):
    loss_fn, _, loss = _loss_fns(reference, loss="kto", beta=1.0)
    params, batch = _params_and_batch(reference)
    batch["desirable"] = np.array([True, False])
    # Policy/ref from the tables: examples ρ = (−3 − (−3), −1.5 − (−1)) = (0, −0.5);
    # mismatched rows ρ' = (−0.5 − (−1), −1.5 − (−2.2)) = (0.5, 0.7), z_0 = max(0, 0.6) = 0.6.
    # desirable:   1 − σ(β(0 − 0.6))    = σ(0.6)  = 0.6456563
    # undesirable: 1 − σ(β(0.6 + 0.5)) = σ(−1.1) = 0.2497399;  mean 0.4476981
    value, out = loss_fn(params, batch, None)
    np.testing.assert_allclose(float(value), (0.6456563 + 0.2497399) / 2, rtol=1e-6)
    _, m = pref.apply_loss(loss, out)
    np.testing.assert_allclose(float(m["kl"]), 0.6, rtol=1e-6)
    # Two micro-batches of one row each: with the step's whole-batch z_0 they give the
    # one-shot loss and gradient; each part's own z_0 (0.5, then 0.7) would not.
    policy_fn, ref_fn = table_logps, (table_logps if reference == "in_step" else None)
    totals_fn = pref.make_totals_fn(policy_fn, loss, ref_fn, micro_batches=2)
    key = jax.random.PRNGKey(0)
    one, _, g1 = step_lib.loss_and_grad(loss_fn, params, batch, key, 1)
    two, _, g2 = step_lib.loss_and_grad(loss_fn, params, batch, key, 2, totals_fn=totals_fn)
    np.testing.assert_allclose(float(two), float(one), rtol=1e-6)
    np.testing.assert_allclose(_flat(g2), _flat(g1), rtol=1e-6, atol=1e-8)
    per_part, _, _ = step_lib.loss_and_grad(loss_fn, params, batch, key, 2)
    # σ(0.5)/2 + σ(−1.2)/2 = (0.6224593 + 0.2314752) / 2 = 0.4269672
    np.testing.assert_allclose(float(per_part), 0.4269672, rtol=1e-6)
    # A fixed z_0 needs no whole-batch pass.
    assert pref.make_totals_fn(policy_fn, pref.resolve_loss({"name": "kto", "beta": 1.0,
                                                              "reference_point": 0.0}), ref_fn, 2) is None


@pytest.fixture(scope="module")
def kto_baseline(tmp_path_factory):
    parallel_make_mesh = parallel.make_mesh
    parallel.make_mesh = lambda d, f, t: parallel_make_mesh(d, f, t, devices=jax.devices()[:d * f * t])
    try:
        return driver.run(_config(loss="kto", beta=0.5), str(tmp_path_factory.mktemp("kto")))
    finally:
        parallel.make_mesh = parallel_make_mesh


@pytest.mark.parametrize("mesh,micro_batches", [((2, 2, 2), 1), ((1, 1, 1), 4)])
def test_kto_mesh_and_micro_batches_do_not_change_training(tmp_path, kto_baseline, mesh, micro_batches):
    out = _run(tmp_path / "kto", _config(mesh=mesh, micro_batches=micro_batches, loss="kto", beta=0.5))
    _assert_params_close(out["state"].params, kto_baseline["state"].params, 1e-5)
    _assert_metrics_close(_train_metrics(out), _train_metrics(kto_baseline))
    for k, v in kto_baseline["eval"].items():
        np.testing.assert_allclose(out["eval"][k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_kto_through_the_driver_reports_pair_accuracy_and_trl_names(kto_baseline):
    ev = kto_baseline["eval"]
    # 16 held-out pairs -> 32 examples; each pair scored once by its two examples.
    assert ev["num_examples"] == 32 and ev["num_scored_pairs"] == 16 and "num_pairs" not in ev
    assert 0 <= ev["rewards/pair_accuracies"] <= 1 and ev["kl"] >= 0
    last = kto_baseline["history"][-1]
    for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
              "logps/rejected", "kl", "grad_norm", "learning_rate"):
        assert np.isfinite(last[k]), k
    np.testing.assert_allclose(last["rewards/margins"], last["rewards/chosen"] - last["rewards/rejected"],
                               rtol=1e-5, atol=1e-7)


def test_kto_on_feedback_lines(tmp_path, monkeypatch, capsys):
    """data.format=feedback: TRL's unpaired lines, a bad line counted and skipped,
    labels kept for the lines that survive, trained through the driver."""
    from jaxreward.data.tokenizer import Tokenizer
    from tests.data.conftest import CHATML, build_hf_bpe
    tok = Tokenizer(build_hf_bpe(), bos_id=1, eos_id=4, pad_id=0, add_bos=True, chat_template=CHATML)
    lines = [{"prompt": f"q{i} ", "completion": "yes" * (1 + i % 3), "label": i % 2 == 0} for i in range(40)]
    path = tmp_path / "feedback.jsonl"
    with open(path, "w") as f:
        for i, line in enumerate(lines):
            f.write(json.dumps(line) + "\n")
            if i == 5:
                f.write('{"prompt": "q", "completion": "c", "label": "yes"}\n')  # label not a bool
    config = _config(num_steps=2, loss="kto", beta=0.5)
    config.model.arch.vocab_size = 128
    config.synthetic.update(prompt_length=4, response_length=28)  # the random decoder: 32 positions
    config.data.update(source="jsonl", format="feedback", train_path=str(path), num_eval_pairs=8,
                       max_length=32, batch_size=8, eval_batch_size=8)
    real_load = driver.load_model
    monkeypatch.setattr(driver, "load_model", lambda p, c, s: (*real_load("", c, s)[:2], tok))
    out = _run(tmp_path / "wd", config)
    printed = capsys.readouterr().out
    assert "kept 40, skipped 1" in printed and "label" in printed
    assert "kto: 32 train examples (16 desirable), 8 held out" in printed
    assert "rewards/pair_accuracies" not in out["eval"] and np.isfinite(out["eval"]["loss"])
    train, _ = driver.read_pairs(config, tok, str(tmp_path / "wd"))
    labels = {l["prompt"]: l["label"] for l in lines}
    prompts = [tok.decode([t for t, m in zip(row, keep) if m])
               for row, keep in zip(train["chosen_tokens"], train["chosen_attention_mask"] & ~train["chosen_loss_mask"])]
    np.testing.assert_array_equal(train["desirable"],
                                  [labels[next(k for k in labels if p.endswith(k))] for p in prompts])


def test_kto_config_errors():
    config = _config(mesh=(-1, 1, 1))
    config.data.format = "feedback"
    with pytest.raises(ValueError, match="data.format='feedback' reads unpaired examples .* loss 'dpo' trains "
                                         "on pairs: use loss.name='kto'"):
        cli.check_config(config)
    with pytest.raises(ValueError, match="config.loss.gamma is not a hyper-parameter of loss 'kto', which "
                                         "takes beta, desirable_weight, undesirable_weight, reference_point"):
        cli.check_config(_config(mesh=(-1, 1, 1), loss="kto", gamma=0.5))
    with pytest.raises(ValueError, match="known names: apo_down.*; unpaired .*: kto"):
        cli.check_config(_config(mesh=(-1, 1, 1), loss="ktoo"))
    with pytest.raises(ValueError, match="config.loss .'kto'.: desirable_weight"):
        cli.check_config(_config(mesh=(-1, 1, 1), loss="kto", desirable_weight=-1.0))


def test_kto_pair_accuracy_and_balance_warning_by_hand(capsys):
    from jaxreward.train import evaluate
    # Examples of pairs 0, 0, 1, 1, 2, 2 and one feedback row (−1); ρ = logps − ref:
    # pair 0: desirable 0.5 > undesirable −0.5 (a win); pair 1: 0.2 = 0.2 (a tie: 0);
    # pair 2: its undesirable row is invalid (not counted); the −1 row is no pair.
    out = {"chosen_logps": jnp.array([-1.0, -2.0, -1.0, -1.3, -1.0, -1.0, -1.0]),
           "ref_chosen_logps": jnp.array([-1.5, -1.5, -1.2, -1.5, -1.0, -1.0, -1.0]),
           "valid": jnp.array([True, True, True, True, True, False, True]),
           "desirable": jnp.array([True, False, True, False, True, False, True])}
    got = pref._kto_pair_accuracy(out, np.array([0, 0, 1, 1, 2, 2, -1]))
    assert got["rewards/pair_accuracies"] == 0.5 and got["num_scored_pairs"] == 2  # 1 win of 2
    low, high = evaluate.wilson_interval(1, 2)
    assert (got["rewards/pair_accuracies_ci_low"], got["rewards/pair_accuracies_ci_high"]) == (low, high)
    # 24 desirable, 8 undesirable, λ = 1: λ_D·n_D / (λ_U·n_U) = 3, outside [1, 4/3]. In range:
    # λ_D in [8/24, (4/3)·8/24] = [0.333, 0.444], or λ_U in [(3/4)·3, 3] = [2.25, 3].
    kto = pref.resolve_loss({"name": "kto", "beta": 0.1})
    driver.check_kto_balance(kto, np.arange(32) % 4 != 0)
    assert "= 1·24 / (1·8) = 3, outside the KTO paper's [1, 4/3]: use loss.desirable_weight in " \
           "[0.333, 0.444] or loss.undesirable_weight in [2.25, 3]" in capsys.readouterr().out
    driver.check_kto_balance(pref.resolve_loss({"name": "kto", "beta": 0.1, "desirable_weight": 0.4}),
                             np.arange(32) % 4 != 0)  # 0.4·24 / 8 = 1.2: in range, silent
    assert capsys.readouterr().out == ""


def test_mixture_refuses_a_shared_hyper_parameter_no_component_takes():
    # label_smoothing=0.3 is taken by neither dpo nor ipo: each component would drop it
    # silently and train plain DPO + IPO while the config (and dpo.json) said ε = 0.3.
    cfg = {"name": "mixture", "beta": 0.1, "label_smoothing": 0.3, "components": (("dpo", 1.0), ("ipo", 0.5))}
    with pytest.raises(ValueError, match="config.loss.label_smoothing is not a hyper-parameter of any "
                                         r"component of the mixture \(dpo, ipo\)"):
        pref.resolve_loss(cfg)
    # Taken by one component (cdpo): accepted.
    pref.resolve_loss({**cfg, "components": (("dpo", 1.0), ("cdpo", 0.5))})


def test_generation_eval_of_the_reference_itself_is_exact():
    """Policy = reference: every KL estimate is exactly 0, the win rate 0.5."""
    config = _config()
    model, params, _ = driver.load_model("", config, 0)
    prompts = np.random.default_rng(0).integers(1, 32, (8, 4)).astype(np.int32)  # the driver's shapes
    reward = lambda b: np.asarray(b.response_tokens_RM).sum(axis=1).astype(np.float32)
    stats, ref_rewards = pref.generation_eval(
        model, params, model, params, prompts, np.ones_like(prompts, bool), reward,
        rng=jax.random.PRNGKey(1), num_samples=2,
        sampling=dict(max_new_tokens=6, temperature=1.0, top_k=0, top_p=1.0, stop_ids=(), pad_id=0))
    assert stats["kl_k1"] == stats["kl_k3"] == 0.0
    assert stats["win_rate"] == 0.5 and stats["reward"] == stats["ref_reward"]
    assert stats["response_length"] == 6.0
    assert ref_rewards.shape == (16,)


def test_generation_eval_over_an_8_way_mesh_splits_the_prompts_and_gives_the_same_stats():
    """With `mesh`, the policy's and the reference's samples are drawn with the 8
    prompts split over the 8 data shards (each shard decodes its own), and every
    statistic is that of the unsplit call: tokens are per-sample keyed, so the
    rewards, win rate and lengths are equal and the KLs agree to round-off."""
    from jaxreward import parallel
    from jaxreward.train import rollout
    config = _config()
    model, params, _ = driver.load_model("", config, 0)
    ref_params = jax.tree.map(lambda x: x * 0.9, params)   # another reference: KL > 0
    prompts = np.random.default_rng(0).integers(1, 32, (8, 4)).astype(np.int32)
    reward = lambda b: np.asarray(b.response_tokens_RM).sum(axis=1).astype(np.float32)
    kw = dict(rng=jax.random.PRNGKey(1), num_samples=2,
              sampling=dict(max_new_tokens=6, temperature=1.0, top_k=0, top_p=1.0, stop_ids=(), pad_id=0))
    seen = []
    real = rollout.generate

    def spy(m, p, tokens_BP, mask_BP, **k):
        seen.append(getattr(tokens_BP, "sharding", None))
        return real(m, p, tokens_BP, mask_BP, **k)
    whole, _ = pref.generation_eval(model, params, model, ref_params, prompts, np.ones_like(prompts, bool),
                                    reward, **kw)
    rollout.generate = spy
    try:
        split, _ = pref.generation_eval(model, params, model, ref_params, prompts, np.ones_like(prompts, bool),
                                        reward, mesh=parallel.make_mesh(8, 1, 1), **kw)
    finally:
        rollout.generate = real
    assert len(seen) == 2 and all(len(s.device_set) == 8 and not s.is_fully_replicated for s in seen)
    assert whole["kl_k3"] > 0
    for k in ("reward", "ref_reward", "win_rate", "response_length"):
        assert split[k] == whole[k], k
    for k in ("kl_k1", "kl_k3"):
        np.testing.assert_allclose(split[k], whole[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_sequence_kl_by_hand():
    # x = log π − log π_ref = (0.5, −0.2) on the two response tokens; the prompt
    # token (column 0 of the grid) is not counted.
    logps = jnp.array([[9.0, -1.0, -2.2, 0.0]])
    ref = jnp.array([[-9.0, -1.5, -2.0, 0.0]])
    loss_mask = jnp.array([[False, False, True, True]])  # tokens 2, 3 are the response
    k1, k3 = pref.sequence_kl(logps, ref, loss_mask)
    np.testing.assert_allclose(k1, [0.3], rtol=1e-6)
    # k3 = Σ e^{−x} − 1 + x = (e^{−0.5} − 0.5) + (e^{0.2} − 1.2) = 0.1065307 + 0.0214028
    np.testing.assert_allclose(k3, [math.exp(-0.5) - 0.5 + math.exp(0.2) - 1.2], rtol=1e-6)


# ---------------------------------------------------------------------------
# Config errors, before any model loads


@pytest.mark.parametrize("field,value,message", [
    ("loss.name", "dpoo", "config.loss.name: unknown 'preference' objective 'dpoo'; known names: apo_down"),
    ("loss.gamma", 0.5, "config.loss.gamma is not a hyper-parameter of loss 'dpo'"),
    ("loss.beta", -1.0, "config.loss ('dpo'): beta"),
    ("data.source", "tfds", "config field data.source must be one of synthetic, jsonl"),
    ("reference.path", "/no/such/model", "config field reference.path: '/no/such/model' is neither an existing path"),
    ("eval.reward_model_dir", "/tmp", "has neither reward_model.json nor ensemble.json"),
    ("ensemble.aggregate", "median", "config field ensemble.aggregate must be one of mean, min, mean_minus_std"),
    # The best-of-N curve doubles N from 1: 12 would be silently cut to 8.
    ("eval.best_of_n_max_n", 12, "config field eval.best_of_n_max_n=12: best-of-N runs N = 1, 2, 4, …; use 0 "
                                 "(off) or a power of two (e.g. 8)"),
])
def test_bad_config_values_are_refused_by_name(field, value, message):
    config = _config(mesh=(-1, 1, 1))
    node = config
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError) as e:
        cli.check_config(config)
    assert message in str(e.value), str(e.value)


def test_missing_required_hyper_parameter_and_missing_file():
    config = _config(mesh=(-1, 1, 1), loss="simpo")
    with pytest.raises(ValueError, match="loss 'simpo' needs config.loss.gamma"):
        cli.check_config(config)
    config = _config(mesh=(-1, 1, 1))
    config.data.update(source="jsonl", train_path="/no/such/pairs.jsonl.gz")
    with pytest.raises(ValueError, match="data.train_path: '/no/such/pairs.jsonl.gz' does not exist"):
        cli.check_config(config)
    config = _config(mesh=(-1, 1, 1), loss="mixture", components=(("dpo", 1.0), ("simpo", 0.5)))
    with pytest.raises(ValueError, match="gamma"):  # simpo inside the mixture needs gamma
        cli.check_config(config)
    config = _config(loss="mixture", components=(("simpo", 1.0), ("orpo", 0.5)), gamma=0.5)
    assert not pref.resolve_loss(config.loss).uses_reference


def test_a_reward_model_of_another_vocabulary_is_refused_before_the_reference_pass(tmp_path):
    """eval.reward_model_dir with a vocabulary of 48 against the policy's 32: one
    UserError, raised before the reference log-probs are computed (no cache file)."""
    from jaxreward.errors import UserError
    from jaxreward.models.heads import RewardModel
    from jaxreward.models.llama import LlamaConfig
    from jaxreward.models.reward_io import export_reward_model
    rm_cfg = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_layers=1,
                         num_heads=2, num_kv_heads=1)
    rm = RewardModel(rm_cfg)
    rm_params = step_lib.unbox(rm.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"])
    rm_dir = str(tmp_path / "rm48")
    export_reward_model(rm_dir, rm, rm_params, "random")
    config = _config()
    config.eval.update(generate=True, reward_model_dir=rm_dir)
    with pytest.raises(UserError, match="has vocabulary 48, the policy 32: they must share one tokenizer"):
        _run(tmp_path / "wd", config)
    assert not os.path.exists(tmp_path / "wd" / driver.CACHE_FILE)


def test_smollm2_dpo_on_real_hh_small(tmp_path, hh_file):
    """configs/dpo.py:smollm2_hh on the real HH file, a small version
    through the CLI: reads, precomputes the reference, trains, evaluates."""
    pytest.importorskip("gguf")
    from tests.experiments.test_cli import _cli
    wd = tmp_path / "dpo_hh"
    out = _cli("--config=configs/dpo.py:smollm2_hh", f"--workdir={wd}",
               f"--config.data.train_path={hh_file}", "--config.data.max_train_pairs=8",
               "--config.data.max_eval_pairs=4", "--config.data.max_length=48",
               "--config.data.max_prompt_length=24",
               "--config.data.batch_size=4", "--config.data.eval_batch_size=4",
               "--config.reference.batch_size=4", "--config.policy.trainable_blocks=1",
               "--config.train.num_steps=2", "--config.train.eval_every=0",
               "--config.eval.num_prompts=2", "--config.eval.samples_per_prompt=1",
               "--config.eval.best_of_n_max_n=0", "--config.sampling.max_new_tokens=4",
               "--config.export=False")
    assert "kept 2303, skipped 9" in out.stdout
    assert os.path.exists(wd / "reference_logps.npz")
    rows = [json.loads(l) for l in open(wd / "metrics.jsonl")]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train][-1] == 2
    assert all(np.isfinite(r["train/loss"]) for r in train)


def test_an_eval_file_without_usable_pairs_names_the_file(tmp_path, monkeypatch):
    # The message said "set data.eval_path" to a user who had set it (every line was skipped).
    from jaxreward.data import pipeline, synthetic
    from jaxreward.errors import UserError
    c = _config()
    task = synthetic.CountingTask(32, 4, 6, seed=0)
    train, _ = synthetic.random_pairs(task, 32, seed=1)
    empty = {k: v[:0] for k, v in train.items()}
    monkeypatch.setattr(driver, "read_pairs", lambda config, tokenizer, workdir: (train, empty))
    monkeypatch.setattr(pipeline, "tokenizer_fingerprint", lambda tokenizer: "test")
    c.data.update(source="jsonl", train_path="train.jsonl", eval_path="bad_eval.jsonl")
    with pytest.raises(UserError, match=r"^data.eval_path='bad_eval.jsonl' gave no usable eval pairs"):
        driver.run(c, str(tmp_path))
