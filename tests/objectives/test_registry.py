"""Registry kinds: one signature each, every member callable on the same arguments, all documented."""
import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest

import jaxreward.objectives  # noqa: F401  (registers every objective)
from jaxreward.objectives import registry

README = pathlib.Path(registry.__file__).with_name("README.md")
MEMBERS = [(kind, name) for kind in registry.KIND_SIGNATURES for name in registry.names(kind)]

# One tiny example per kind: (positional inputs, the kind's keyword arguments,
# member-specific keyword arguments offered to every member of the kind).
# Every member gets the same three; the last is filtered with
# `registry.accepted_kwargs`, as a driver does with its pool.
B, T = 3, 4
MASK_B = jnp.array([True, True, False])
MASK_BT = jnp.array([[True, True, True, False], [True, True, False, False], [True, False, False, False]])
LOGPS_BT = -jnp.linspace(0.5, 2.0, B * T).reshape(B, T)
SUMMED = dict(c=jnp.array([-1.0, -2.0, -3.0]), r=jnp.array([-3.0, -1.0, -2.0]),
              rc=jnp.array([-1.5, -1.5, -2.0]), rr=jnp.array([-2.5, -2.0, -2.5]))
PAIR_METRICS = {"loss", "accuracy", "margin_mean", "chosen_reward_mean", "chosen_reward_std",
                "rejected_reward_mean", "rejected_reward_std"}

EXAMPLES = {
    "pairwise_reward_loss": (
        (jnp.array([[1.0, 0.0], [0.5, 2.0], [0.0, 0.0]]), jnp.array([[0.0, 1.0], [0.5, 1.0], [1.0, 0.0]]),
         jnp.array([1.0, 2.0, 1.0]), MASK_B),
        dict(objective_weights_K=(1.0, 0.5)),
        {},
    ),
    "rated_reward_loss": (
        (jnp.array([[1.0, 0.0], [0.5, 2.0], [0.0, 0.0]]), jnp.array([[2.0, 1.0], [0.5, 1.0], [1.0, 0.0]]), MASK_B),
        dict(objective_weights_K=(1.0, 0.5)),
        {},
    ),
    "preference": (
        (SUMMED["c"], SUMMED["r"], SUMMED["rc"], SUMMED["rr"]),
        dict(beta=0.5, example_mask_B=MASK_B),
        dict(chosen_lengths_B=jnp.array([2.0, 4.0, 3.0]), rejected_lengths_B=jnp.array([3.0, 1.0, 2.0]),
             label_smoothing=0.1, gamma=0.3, alpha=0.5, consistency=0.8,
             components=(("dpo", 1.0), ("ipo", 0.5), ("simpo", 0.25))),
    ),
    "token_preference": (
        (LOGPS_BT, LOGPS_BT[:, :3] - 0.5, LOGPS_BT + 0.25, LOGPS_BT[:, :3], MASK_BT, MASK_BT[:, :3]),
        dict(beta=0.5, example_mask_B=MASK_B),
        dict(alpha=0.5, chosen_token_rewards_BT=jnp.ones((B, T)), rejected_token_rewards_BT=-jnp.ones((B, 3))),
    ),
    "unpaired_preference": (
        (SUMMED["c"], SUMMED["rc"], jnp.array([True, False, True]), SUMMED["r"], SUMMED["rr"]),
        dict(beta=0.5, example_mask_B=MASK_B),
        dict(desirable_weight=1.0, undesirable_weight=1.5),
    ),
    "group_advantage": (
        (jnp.array([1.0, 2.0, 4.0, 0.0, 1.0, 0.5]),),
        dict(group_size=3, valid_B=jnp.array([True, True, True, True, False, True])),
        dict(scale_by_std=True, eps=1e-6),
    ),
    "baseline_advantage": (
        (jnp.array([1.0, 0.5, 2.0]), jnp.array([0.5, 1.0, 2.0])),
        dict(valid_B=MASK_B),
        {},
    ),
    "token_advantage": (
        (jnp.zeros((B, T)).at[:, 2].set(1.0), 0.1 * LOGPS_BT, MASK_BT),
        dict(gamma=0.9),
        dict(lam=0.95),
    ),
    "policy_loss": (
        (LOGPS_BT, LOGPS_BT + 0.05, jnp.array([1.0, -0.5, 2.0]), MASK_BT),
        dict(clip_eps=0.2, loss_agg_mode="seq-mean-token-mean", max_len=T),
        dict(clip_eps_high=0.28),
    ),
    "aggregation": ((MASK_BT,), dict(max_len=T), {}),
    "kl": ((LOGPS_BT, LOGPS_BT + 0.1), {}, {}),
}


def _check_loss(out, required_metrics):
    loss, metrics = out
    assert jnp.shape(loss) == () and np.isfinite(loss)
    assert required_metrics <= set(metrics), sorted(required_metrics - set(metrics))
    for key, value in metrics.items():
        assert jnp.shape(value) == () and np.isfinite(value), key
    assert metrics["loss"] == loss


def _check_array(out, shape):
    assert jnp.shape(out) == shape and np.isfinite(out).all()


def _check_pair_of_arrays(out, shape):
    advantages, returns = out
    _check_array(advantages, shape)
    _check_array(returns, shape)


CHECKS = {
    "pairwise_reward_loss": lambda out: _check_loss(out, PAIR_METRICS | {"accuracy_k0", "accuracy_k1"}),
    "rated_reward_loss": lambda out: _check_loss(out, {"loss"}),
    "preference": lambda out: _check_loss(out, PAIR_METRICS),
    "token_preference": lambda out: _check_loss(out, PAIR_METRICS),
    "unpaired_preference": lambda out: _check_loss(out, PAIR_METRICS),
    "group_advantage": lambda out: _check_array(out, (6,)),
    "baseline_advantage": lambda out: _check_array(out, (B,)),
    "token_advantage": lambda out: _check_pair_of_arrays(out, (B, T)),
    "policy_loss": lambda out: _check_loss(out, {"loss", "clipfrac", "ppo_kl"}),
    "aggregation": lambda out: _check_array(out, (B, T)),
    "kl": lambda out: _check_array(out, (B, T)),
}


def test_examples_cover_every_kind():
    assert set(EXAMPLES) == set(registry.KIND_SIGNATURES) == set(CHECKS)


def test_every_kind_of_the_package_is_declared_and_nonempty():
    ours = {k for k in registry.kinds()
            if any(registry.get(k, n).__module__.startswith("jaxreward.objectives") for n in registry.names(k))}
    assert ours == set(registry.KIND_SIGNATURES)
    for kind, (alias, description) in registry.KIND_SIGNATURES.items():
        assert registry.names(kind), kind
        assert callable(getattr(alias, "__call__", None)) and description and "\n" not in description


@pytest.mark.parametrize("kind, name", MEMBERS)
def test_member_has_the_signature_of_its_kind(kind, name):
    assert registry.signature_mismatch(kind, registry.get(kind, name)) is None


@pytest.mark.parametrize("kind, name", MEMBERS)
def test_every_member_runs_on_the_same_arguments(kind, name):
    # A driver picks the member by name and calls it exactly like this.
    args, kind_kwargs, pool = EXAMPLES[kind]
    fn = registry.get(kind, name)
    out = fn(*args, **kind_kwargs, **registry.accepted_kwargs(fn, pool))
    CHECKS[kind](out)


def _readme_sections():
    """{kind: text of its `### \\`kind\\`` section} of the README."""
    sections = {}
    for block in re.split(r"^### ", README.read_text(), flags=re.M)[1:]:
        heading = block.splitlines()[0]
        match = re.match(r"`([a-z_]+)`", heading)
        if match:
            sections[match.group(1)] = block
    return sections


def test_readme_lists_every_kind_alias_and_name():
    sections = _readme_sections()
    for kind, (alias, _) in registry.KIND_SIGNATURES.items():
        assert kind in sections, f"README.md has no section ### `{kind}`"
        assert f"`registry.{alias.__name__}`" in sections[kind], (kind, alias.__name__)
        for name in registry.names(kind):
            assert f"| `{name}` |" in sections[kind], f"README.md: {kind!r} section does not list `{name}`"


def test_unknown_names_give_one_line_errors_listing_the_kind():
    with pytest.raises(KeyError) as err:
        registry.get("preference", "tgdpo")
    message = err.value.args[0]
    assert "\n" not in message
    assert "known names: apo_down, apo_zero," in message
    assert message.endswith("'tgdpo' is registered under 'token_preference'")
    with pytest.raises(KeyError, match=r"it was split into pairwise_reward_loss, rated_reward_loss"):
        registry.get("reward_loss", "bradley_terry")
    with pytest.raises(ValueError, match=re.escape(
            "config.loss.name: unknown 'pairwise_reward_loss' objective 'regression'; "
            "known names: bradley_terry, scaled_bradley_terry; 'regression' is registered under 'rated_reward_loss'")):
        registry.check_kind_member("pairwise_reward_loss", "regression", "config.loss.name")
    registry.check_kind_member("group_advantage", "grpo")   # a member: no error


def test_register_refuses_a_function_with_another_signature():
    def three_logps(chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, *, beta, example_mask_B=None):
        return 0.0, {}

    def no_mask(chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B, *, beta):
        return 0.0, {}

    def margin_required(rewards_chosen_B, rewards_rejected_B, margin_B, example_mask_B=None, *,
                        objective_weights_K=None):
        return 0.0, {}

    with pytest.raises(ValueError, match=re.escape(
            "cannot be registered as 'preference' 'bad': positional parameters ['chosen_logps_B', 'rejected_logps_B', "
            "'ref_chosen_logps_B'], expected ['chosen_logps_B', 'rejected_logps_B', 'ref_chosen_logps_B', "
            "'ref_rejected_logps_B'] (see registry.PreferenceLoss)")):
        registry.register("preference", "bad")(three_logps)
    with pytest.raises(ValueError, match="does not accept 'example_mask_B'"):
        registry.register("preference", "bad")(no_mask)
    with pytest.raises(ValueError, match="'margin_B' has no default"):
        registry.register("pairwise_reward_loss", "bad")(margin_required)
    assert "bad" not in registry.names("preference") + registry.names("pairwise_reward_loss")


def test_scaled_bradley_terry_without_margin_is_bradley_terry():
    # Interchangeable on a batch with no margin: strength 1 is the plain BT loss.
    rc, rr = jnp.array([1.0, 0.0, 2.0]), jnp.array([0.0, 1.0, 1.0])
    bt, m_bt = registry.get("pairwise_reward_loss", "bradley_terry")(rc, rr)
    sbt, m_sbt = registry.get("pairwise_reward_loss", "scaled_bradley_terry")(rc, rr)
    np.testing.assert_allclose(sbt, bt, rtol=1e-6)
    assert set(m_sbt) == set(m_bt)
    # with m = [2, 1, 0]: (2·(−log σ(1)) + (−log σ(−1)) + 0) / 3 = (0.626523 + 1.313262) / 3
    loss, _ = registry.get("pairwise_reward_loss", "scaled_bradley_terry")(rc, rr, jnp.array([2.0, 1.0, 0.0]))
    np.testing.assert_allclose(loss, (2 * np.log1p(np.exp(-1.0)) + np.log1p(np.exp(1.0))) / 3, rtol=1e-6)


def test_reinforce_pp_ignores_values():
    fn = registry.get("token_advantage", "reinforce_pp")
    assert fn.uses_values is False and getattr(registry.get("token_advantage", "gae"), "uses_values", True)
    rewards = jnp.zeros((B, T)).at[:, 2].set(1.0)
    a0, r0 = fn(rewards, None, MASK_BT)
    a1, r1 = fn(rewards, 5.0 + LOGPS_BT, MASK_BT)
    np.testing.assert_array_equal(a0, a1)
    np.testing.assert_array_equal(r0, r1)
