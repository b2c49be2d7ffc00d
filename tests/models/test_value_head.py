"""ValueModel: zero init, causality, padding invariance, init from a reward model or a policy."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreward.models.heads import (RewardModel, ValueModel, value_params_from_policy,
                                    value_params_from_reward_model)
from jaxreward.models.llama import Decoder, LlamaConfig, last_token_index
from jaxreward.train.step import unbox

from tests.models.helpers import pad_batch

CFG = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, rope_theta=1000.0)
ROWS = [[3, 9, 4], [12, 5, 6, 7, 8, 30, 2], [41], [1, 2, 3, 4, 5]]


def _init(model, seed=0):
    return unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))["params"])


@pytest.fixture(scope="module")
def vm_and_params():
    """A ValueModel with a random (non-zero) head, so the value tests are not trivially 0."""
    vm = ValueModel(CFG)
    params = _init(vm)
    head = jax.random.normal(jax.random.PRNGKey(1), params["head"]["kernel"].shape)
    return vm, {"backbone": params["backbone"], "head": {"kernel": head}}


def test_values_are_zero_at_init_and_the_head_gets_a_gradient():
    vm = ValueModel(CFG)
    params = _init(vm)
    assert params["head"]["kernel"].shape == (CFG.hidden_size, 1)
    tokens, mask = pad_batch(ROWS, "right", 0)
    values = vm.apply({"params": params}, tokens, mask)
    assert values.shape == tokens.shape and values.dtype == jnp.float32
    np.testing.assert_array_equal(values, 0.0)
    g = jax.grad(lambda p: vm.apply({"params": p}, tokens, mask).sum())(params)
    assert float(jnp.abs(g["head"]["kernel"]).max()) > 1e-3  # d Σ V / d w = Σ_attended h ≠ 0


def test_value_at_t_does_not_depend_on_later_tokens(vm_and_params):
    vm, params = vm_and_params
    tokens = np.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (3, 8)), np.int32)
    apply = jax.jit(lambda t: vm.apply({"params": params}, t))
    ref = np.asarray(apply(tokens))
    assert np.abs(ref).min() > 0  # a real value everywhere
    for t in range(7):
        changed = tokens.copy()
        changed[:, t + 1:] = (changed[:, t + 1:] + 1 + t) % CFG.vocab_size
        got = np.asarray(apply(changed))
        np.testing.assert_allclose(got[:, :t + 1], ref[:, :t + 1], rtol=1e-6, atol=1e-6, err_msg=f"t={t}")
        assert np.abs(got[:, t + 1:] - ref[:, t + 1:]).max() > 1e-4  # later values do change


def test_left_and_right_padding_give_the_same_values_at_real_tokens(vm_and_params):
    vm, params = vm_and_params
    apply = jax.jit(lambda t, m: vm.apply({"params": params}, t, m))
    alone = [np.asarray(apply(*pad_batch([r], "right", 0)))[0] for r in ROWS]  # no padding
    for side in ("right", "left"):
        # pad with a real token id (7): only the mask tells padding apart
        tokens, mask = pad_batch(ROWS, side, 7)
        values = np.asarray(apply(tokens, mask))
        np.testing.assert_array_equal(values[~mask], 0.0)
        for b, row in enumerate(ROWS):
            np.testing.assert_allclose(values[b][mask[b]], alone[b], rtol=1e-5, atol=1e-5,
                                       err_msg=f"{side} row {b}")


@pytest.mark.parametrize("side", ["right", "left"])
def test_value_from_reward_model_equals_reward_at_the_last_token(side):
    rm = RewardModel(CFG, num_objectives=1, pooling="last")
    rm_params = _init(rm, seed=3)
    vparams = value_params_from_reward_model(rm_params)
    # the same tree as a fresh ValueModel's
    fresh = _init(ValueModel(CFG))
    assert jax.tree.structure(vparams) == jax.tree.structure(fresh)
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), vparams, fresh)
    tokens, mask = pad_batch(ROWS, side, 0)
    rewards = np.asarray(rm.apply({"params": rm_params}, tokens, mask))[:, 0]
    values = np.asarray(ValueModel(CFG).apply({"params": vparams}, tokens, mask))
    last = np.asarray(last_token_index(jnp.asarray(mask)))
    np.testing.assert_allclose(values[np.arange(len(ROWS)), last], rewards, rtol=1e-5, atol=1e-5)
    assert np.abs(rewards).min() > 1e-3


def test_value_from_multi_objective_reward_model_picks_one_column():
    rm = RewardModel(CFG, num_objectives=3)
    rm_params = _init(rm, seed=4)
    tokens, mask = pad_batch(ROWS, "left", 0)
    rewards = np.asarray(rm.apply({"params": rm_params}, tokens, mask))
    values = ValueModel(CFG).apply({"params": value_params_from_reward_model(rm_params, objective=2)},
                                   tokens, mask)
    np.testing.assert_allclose(np.asarray(values)[:, -1], rewards[:, 2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"K = 3 objectives: pass objective in \[0, 3\)"):
        value_params_from_reward_model(rm_params)
    with pytest.raises(ValueError, match=r"objective must be in \[0, 3\), got 3"):
        value_params_from_reward_model(rm_params, objective=3)
    with pytest.raises(ValueError, match="keys \\['backbone', 'head'\\]"):
        value_params_from_reward_model(rm_params["backbone"])


def test_value_params_from_policy_drop_the_lm_head_and_start_at_zero():
    cfg = dataclasses.replace(CFG, tie_embeddings=False)
    dec_params = _init(Decoder(cfg), seed=5)
    assert "lm_head" in dec_params
    vparams = value_params_from_policy(dec_params)
    fresh = _init(ValueModel(cfg))
    assert jax.tree.structure(vparams) == jax.tree.structure(fresh)
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), vparams, fresh)
    assert vparams["backbone"]["embed_tokens"]["embedding"] is dec_params["embed_tokens"]["embedding"]
    tokens, mask = pad_batch(ROWS, "right", 0)
    np.testing.assert_array_equal(ValueModel(cfg).apply({"params": vparams}, tokens, mask), 0.0)
    with pytest.raises(ValueError, match="embed_tokens.embedding"):
        value_params_from_policy({"layers_0": {}})


def test_frozen_blocks_stop_the_backbone_gradient(vm_and_params):
    _, params = vm_and_params
    vm = ValueModel(CFG, frozen_blocks=1)
    tokens, mask = pad_batch(ROWS, "left", 0)
    g = jax.grad(lambda p: vm.apply({"params": p}, tokens, mask).sum())(params)
    for name in ("embed_tokens", "layers_0"):
        assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g["backbone"][name])), name
    for tree in (g["backbone"]["layers_1"], g["head"]):
        assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(tree)) > 0
