"""train/proxy.py: the proxy reward model is reused only for the same task, settings and base policy."""
import jax
import jax.numpy as jnp

from jaxreward.data import synthetic
from jaxreward.models.llama import Decoder, LlamaConfig
from jaxreward.train import proxy
from jaxreward.train.step import unbox


def _policy(hidden=16):
    cfg = LlamaConfig(vocab_size=12, hidden_size=hidden, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, max_position_embeddings=16)
    model = Decoder(cfg)
    return model, unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"])


def test_proxy_is_reused_only_under_the_same_task_settings_and_policy(tmp_path, monkeypatch, capsys):
    task = synthetic.CountingTask(vocab_size=12, prompt_length=3, response_length=4)
    policy, params = _policy()
    kw = dict(num_pairs=16, num_steps=2, seed=0, batch_size=8, num_eval_pairs=16)
    directory = str(tmp_path / "proxy")
    _, _, first = proxy.train_proxy(directory, task, policy, params, **kw)
    trained = []
    real = proxy.sample_pairs
    monkeypatch.setattr(proxy, "sample_pairs", lambda *a, **k: trained.append(1) or real(*a, **k))
    assert proxy.train_proxy(directory, task, policy, params, **kw)[2] == first and not trained   # reused
    # Each of these once reused the old proxy: another base architecture, other base weights,
    # another task seed (other gold weights, other labels).
    wider, wider_params = _policy(hidden=32)
    changed = [(task, wider, wider_params),
               (task, policy, jax.tree.map(lambda x: x * 1.5, params)),
               (synthetic.CountingTask(vocab_size=12, prompt_length=3, response_length=4, seed=1), policy, params)]
    for t, p, w in changed:
        trained.clear()
        proxy.train_proxy(directory, t, p, w, **kw)
        assert trained, t
    # A damaged proxy.json (a cache) is trained again, said in one line, not a traceback.
    with open(directory + "/proxy.json", "w") as f:
        f.write('{"settings": {"num_')
    trained.clear()
    proxy.train_proxy(directory, task, policy, params, **kw)
    assert trained and "proxy.json is damaged; training the proxy reward model again" in capsys.readouterr().out


def test_the_query_chunk_does_not_retrain_the_proxy(tmp_path, monkeypatch):
    """attention_query_chunk changes speed and rounding only: a policy that
    differs in it alone reuses the cached proxy (and caches written before
    the field existed keep their key)."""
    import dataclasses
    task = synthetic.CountingTask(vocab_size=12, prompt_length=3, response_length=4)
    policy, params = _policy()
    kw = dict(num_pairs=16, num_steps=2, seed=0, batch_size=8, num_eval_pairs=16)
    directory = str(tmp_path / "proxy")
    proxy.train_proxy(directory, task, policy, params, **kw)
    trained = []
    real = proxy.sample_pairs
    monkeypatch.setattr(proxy, "sample_pairs", lambda *a, **k: trained.append(1) or real(*a, **k))
    unchunked = Decoder(dataclasses.replace(policy.config, attention_query_chunk=0))
    proxy.train_proxy(directory, task, unchunked, params, **kw)
    assert not trained
    assert "attention_query_chunk" not in proxy._architecture(policy.config)
    assert proxy._architecture(policy.config)["hidden_size"] == 16
