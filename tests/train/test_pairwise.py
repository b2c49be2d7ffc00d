"""train/pairwise.py: cached frozen-backbone features give the full forward's rewards."""
import jax
import numpy as np
import pytest

from jaxreward import parallel
from jaxreward.data import synthetic
from jaxreward.models.heads import RewardModel
from jaxreward.models.llama import LlamaConfig
from jaxreward.train import pairwise
from jaxreward.train.step import unbox

CFG = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, rope_theta=500.0)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_cached_features_give_the_full_forward_rewards(pooling):
    task = synthetic.CountingTask(CFG.vocab_size, prompt_length=4, response_length=20, seed=0)
    arrays, _ = synthetic.random_pairs(task, 37, seed=1)  # ragged: 2..20 response tokens
    model = RewardModel(CFG, num_objectives=2, pooling=pooling)
    params = unbox(model.init(jax.random.PRNGKey(0), arrays["chosen_tokens"][:1])["params"])
    mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    full_c, full_r = pairwise.pair_rewards(model, params, arrays)
    cached = pairwise.cache_features(model, params, arrays, batch_size=8, mesh=mesh)
    assert cached["chosen_features"].shape == (37, CFG.hidden_size)
    head_c, head_r = pairwise.pair_rewards(model, params, cached)  # head only
    np.testing.assert_allclose(head_c, full_c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(head_r, full_r, rtol=1e-5, atol=1e-6)


def test_mean_pooling_reads_only_response_tokens():
    """Mean pooling averages the final hidden states of exactly the pool-mask
    (response) tokens: prompt and padding positions get no weight."""
    task = synthetic.CountingTask(CFG.vocab_size, prompt_length=4, response_length=6, seed=0)
    arrays, _ = synthetic.random_pairs(task, 4, seed=2)
    model = RewardModel(CFG, pooling="mean")
    params = unbox(model.init(jax.random.PRNGKey(0), arrays["chosen_tokens"][:1])["params"])
    t, m, p, lm = (arrays[f"chosen_{k}"] for k in ("tokens", "attention_mask", "positions", "loss_mask"))
    feats = model.apply({"params": params}, t, m, p, lm, method=model.features)
    from jaxreward.models.llama import Decoder
    h = Decoder(CFG).apply({"params": params["backbone"]}, t, m, p, method=Decoder.hidden_states)
    w = lm.astype(np.float32)
    expected = (np.asarray(h) * w[..., None]).sum(1) / w.sum(1, keepdims=True)
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)
