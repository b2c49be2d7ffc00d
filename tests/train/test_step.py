"""Micro-batch split/merge and gradient accumulation in `jaxreward.train.step`, with and without
whole-batch totals (every aggregation mode), on 1 and 8 simulated devices."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxreward import parallel
from jaxreward.objectives import policy_gradient as pg, registry
from jaxreward.train import state as state_lib, step as step_lib


def test_split_takes_consecutive_rows_and_merge_inverts_it():
    batch = {"tokens": np.arange(6 * 3).reshape(6, 3), "w": np.arange(6.0)}
    parts = step_lib._split(batch, 3)
    assert parts["tokens"].shape == (3, 2, 3) and parts["w"].shape == (3, 2)
    np.testing.assert_array_equal(parts["tokens"][1], batch["tokens"][2:4])  # rows i*b .. i*b+b-1
    np.testing.assert_array_equal(parts["w"][2], [4.0, 5.0])
    merged = step_lib._merge(parts)
    for k in batch:
        np.testing.assert_array_equal(merged[k], batch[k])


def test_split_rejects_a_batch_that_does_not_divide():
    with pytest.raises(ValueError, match="batch size 6 does not split into 4 micro-batches"):
        step_lib._split({"x": np.zeros((6, 2))}, 4)


def test_micro_batched_gradient_equals_one_shot():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)}
    batch = {"x": jnp.asarray(rng.standard_normal((8, 5)), jnp.float32),
             "y": jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)}

    def loss_fn(p, b, r):
        per = jnp.sum((b["x"] @ p["w"] - b["y"]) ** 2, axis=1)
        return per.mean(), {"per": per}

    key = jax.random.PRNGKey(0)
    loss1, out1, g1 = step_lib.loss_and_grad(loss_fn, params, batch, key, 1)
    for k in (2, 4):
        loss, out, g = jax.jit(lambda p, b: step_lib.loss_and_grad(loss_fn, p, b, key, k))(
            params, batch)
        np.testing.assert_allclose(loss, loss1, rtol=1e-6)
        np.testing.assert_allclose(out["per"], out1["per"], rtol=1e-6)  # merged back in order
        np.testing.assert_allclose(g["w"], g1["w"], rtol=1e-5, atol=1e-6)


# --- Whole-batch totals: micro-batches in every aggregation mode ------------------------------
#
# A "policy" that is a table of bigram logits W[V, V]: the next token after token v is drawn
# from softmax(W[v]), so logps_BT[b, t] = log softmax(W[tokens[b, t]])[tokens[b, t + 1]].
# Rows have ragged response masks, and the k parts get different token counts:
#   lengths n_b        = 1 5 | 2 0 | 3 5 | 1 4
#   k = 4: tokens/part = 6, 2, 8, 5;  non-empty rows/part = 2, 1, 2, 2
#   k = 2: tokens/part = 8, 13
V, T = 5, 6
LENGTHS = (1, 5, 2, 0, 3, 5, 1, 4)


def _policy_batch(seed=0, lengths=LENGTHS):
    rng = np.random.default_rng(seed)
    B = len(lengths)
    w = jnp.asarray(rng.standard_normal((V, V)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    mask = jnp.asarray(np.arange(T)[None, :] < np.asarray(lengths)[:, None])
    old = _table_logps({"W": w + 0.3 * jnp.asarray(rng.standard_normal((V, V)), jnp.float32)}, tokens)
    batch = {"tokens": tokens, "mask": mask, "old_logps": old,
             "advantages": jnp.asarray(rng.standard_normal(B), jnp.float32)}
    return {"W": w}, batch


def _table_logps(params, tokens):
    logp_BTV = jax.nn.log_softmax(params["W"][tokens[:, :-1]], axis=-1)
    lp = jnp.take_along_axis(logp_BTV, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(lp, ((0, 0), (0, 1)))  # the last column has no next token: 0


def _ppo_loss_fn(mode, with_totals):
    def loss_fn(params, b, rng, totals=None):
        kw = {} if totals is None else dict(num_tokens=totals["num_tokens"], num_seqs=totals["num_seqs"])
        lp = _table_logps(params, b["tokens"])
        loss, _ = pg.ppo_policy_loss(lp, b["old_logps"], b["advantages"], b["mask"], loss_agg_mode=mode, **kw)
        return loss, {"logps": lp}
    return loss_fn if with_totals else (lambda p, b, r: loss_fn(p, b, r))


def _totals(b):
    return pg.aggregation_normalizers(b["mask"])


@pytest.mark.parametrize("mode", registry.names("aggregation"))
def test_micro_batches_with_whole_batch_totals_equal_one_shot_in_every_aggregation_mode(mode):
    params, batch = _policy_batch()
    key = jax.random.PRNGKey(0)
    # The one-shot reference: the plain loss on the whole batch (its own N and S).
    loss1, out1, g1 = step_lib.loss_and_grad(_ppo_loss_fn(mode, False), params, batch, key, 1)
    assert float(jnp.abs(g1["W"]).max()) > 1e-3  # a gradient worth comparing
    for k in (1, 2, 4):
        loss, out, g = jax.jit(lambda p, b: step_lib.loss_and_grad(
            _ppo_loss_fn(mode, True), p, b, key, k, totals_fn=_totals))(params, batch)
        np.testing.assert_allclose(loss, loss1, rtol=1e-6, atol=1e-6, err_msg=f"{mode} k={k}")
        np.testing.assert_allclose(g["W"], g1["W"], rtol=1e-6, atol=1e-6, err_msg=f"{mode} k={k}")
        np.testing.assert_array_equal(out["logps"], out1["logps"])


def test_averaging_micro_batches_gets_token_mean_wrong():
    """Without totals each part normalizes by its own token count, and averaging the parts is
    not the whole-batch token mean: the regression `totals_fn` exists to prevent."""
    params, batch = _policy_batch()
    key = jax.random.PRNGKey(0)
    plain = _ppo_loss_fn("token-mean", False)
    loss1, _, g1 = step_lib.loss_and_grad(plain, params, batch, key, 1)
    for k in (2, 4):  # parts of 8 and 13 tokens; of 6, 2, 8 and 5 tokens
        loss, _, g = step_lib.loss_and_grad(plain, params, batch, key, k)
        assert abs(float(loss - loss1)) > 1e-3, k
        assert float(jnp.abs(g["W"] - g1["W"]).max()) > 1e-3, k


def test_token_mean_micro_batches_hand_values():
    # Per-token loss l = w·x with w = 1. Row 0 has 1 token (x = 3), row 1 has 3 tokens (x = 1).
    #   one shot:               (3 + 1 + 1 + 1) / 4       = 1.5  (dl/dw = 1.5)
    #   2 parts, averaged:      (3/1 + (1 + 1 + 1)/3) / 2 = 2.0  (wrong)
    #   2 parts, summed with N: 3/4 + 3/4                 = 1.5
    batch = {"x": jnp.array([[3.0, 9.0, 9.0, 9.0], [1.0, 1.0, 1.0, 9.0]]),
             "mask": jnp.array([[True, False, False, False], [True, True, True, False]])}
    params = {"w": jnp.float32(1.0)}

    def loss_fn(p, b, rng, totals=None):
        n = None if totals is None else totals["num_tokens"]
        return pg.aggregate_loss(p["w"] * b["x"], b["mask"], "token-mean", num_tokens=n), {}

    key = jax.random.PRNGKey(0)
    loss, _, g = step_lib.loss_and_grad(lambda p, b, r: loss_fn(p, b, r), params, batch, key, 1)
    np.testing.assert_allclose([loss, g["w"]], [1.5, 1.5], rtol=1e-6)
    loss, _, g = step_lib.loss_and_grad(lambda p, b, r: loss_fn(p, b, r), params, batch, key, 2)
    np.testing.assert_allclose([loss, g["w"]], [2.0, 2.0], rtol=1e-6)
    loss, _, g = step_lib.loss_and_grad(loss_fn, params, batch, key, 2, totals_fn=_totals)
    np.testing.assert_allclose([loss, g["w"]], [1.5, 1.5], rtol=1e-6)


def test_train_step_with_totals_on_8_devices_equals_one_device_one_shot():
    """make_train_step with totals: 8 simulated devices × 2 micro-batches vs 1 device, one shot.
    Each device holds 2 of the 16 rows, so the totals must be global counts to agree."""
    params, batch = _policy_batch(seed=1, lengths=LENGTHS + (0, 2, 5, 1, 1, 3, 4, 5))
    tx, schedule = optax.sgd(0.5), optax.constant_schedule(0.5)
    metrics_fn = lambda out, b: {"logp_sum": jnp.sum(jnp.where(b["mask"], out["logps"], 0.0))}
    results = []
    for n_dev, k in ((1, 1), (8, 2)):
        mesh = parallel.make_mesh(n_dev, 1, 1, devices=jax.devices()[:n_dev])
        shardings = step_lib.state_shardings(mesh, params, tx)
        step = step_lib.make_train_step(_ppo_loss_fn("token-mean", True), metrics_fn, tx, schedule, mesh,
                                        shardings, micro_batches=k, totals_fn=_totals)
        state = jax.jit(lambda p: state_lib.init_state(p, tx, 0), out_shardings=shardings)(params)
        state, metrics = step(state, parallel.shard_batch(jax.device_get(batch), mesh))
        results.append(jax.device_get((state.params, metrics)))
    (p1, m1), (p8, m8) = results
    # The same loss as the unsharded one-shot loss_and_grad, and the same update.
    loss_ref, _, g_ref = step_lib.loss_and_grad(_ppo_loss_fn("token-mean", False), params, batch,
                                                jax.random.PRNGKey(0), 1)
    for m in (m1, m8):
        np.testing.assert_allclose(m["loss"], loss_ref, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(m["grad_norm"], optax.tree.norm(g_ref), rtol=1e-5)
    np.testing.assert_allclose(m8["logp_sum"], m1["logp_sum"], rtol=1e-6)
    np.testing.assert_allclose(p8["W"], p1["W"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(p1["W"], params["W"] - 0.5 * g_ref["W"], rtol=1e-6, atol=1e-6)


class _FakeMesh:
    """A mesh's `devices` and `axis_names` over stand-in devices of given process indices."""

    def __init__(self, process_of_device, shape):
        from types import SimpleNamespace
        self.axis_names = parallel.MESH_AXES
        self.devices = np.asarray([SimpleNamespace(process_index=p) for p in process_of_device],
                                  object).reshape(shape)
        self.shape = dict(zip(self.axis_names, shape))


@pytest.mark.parametrize("shape, expected", [
    ((8, 1, 1), (4, 4)),   # data=8 over 2 processes × 4 devices: 4 rows of the batch shards each
    ((2, 2, 2), (2, 2)),   # data×fsdp = 4 shards, each over 2 tensor devices of one process
    ((2, 1, 4), (1, 1)),   # one data row per process
    ((1, 8, 1), (4, 4)),   # fsdp shards split the batch as data does
])
def test_local_batch_shards_counts_the_batch_shards_holding_a_device_of_the_process(shape, expected):
    # Devices 0-3 belong to process 0 and 4-7 to process 1, laid out in order as make_mesh does.
    mesh = _FakeMesh([0, 0, 0, 0, 1, 1, 1, 1], shape)
    assert tuple(parallel.local_batch_shards(mesh, p) for p in (0, 1)) == expected


def test_local_batch_shards_when_the_tensor_axis_spans_processes():
    # data=2 × tensor=4 with each data row over devices of both processes (0,1,0,1 | 0,1,0,1):
    # both processes hold both shards, so each must pass both shards' rows.
    mesh = _FakeMesh([0, 1, 0, 1, 0, 1, 0, 1], (2, 1, 4))
    assert (parallel.local_batch_shards(mesh, 0), parallel.local_batch_shards(mesh, 1)) == (2, 2)


def test_shard_batch_checks_the_rows_against_the_shards_of_this_process():
    # One process holds all 8 shards of data=8: 4 rows do not split, 8 do.
    mesh = parallel.make_mesh(8, 1, 1)
    assert parallel.local_batch_shards(mesh) == 8
    with pytest.raises(ValueError, match=r"batch field 'x' has leading size 4, not divisible by data×fsdp = 8"):
        parallel.shard_batch({"x": np.zeros((4, 2))}, mesh)
    assert parallel.shard_batch({"x": np.zeros((8, 2))}, mesh)["x"].shape == (8, 2)


def test_fetch_global_returns_the_whole_array_with_every_local_copy_ready(monkeypatch):
    # jax's process_allgather read device 0's copy of its all-gather and returned while the
    # other devices could still be inside the collective; a pod process that then exited hung
    # in teardown. fetch_global returns only once every local copy is ready.
    from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    host = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    x = jax.device_put(host, NamedSharding(mesh, P(("data", "fsdp"), "tensor")))
    outs, jit = [], jax.jit

    def recording_jit(*a, **kw):
        f = jit(*a, **kw)

        def call(*args):
            outs.append(f(*args))
            return outs[-1]
        return call
    monkeypatch.setattr(parallel.jax, "jit", recording_jit)
    got = parallel.fetch_global(x)
    np.testing.assert_array_equal(got, host)
    assert got.dtype == np.float32 and isinstance(got, np.ndarray)
    (out,) = outs
    assert out.is_fully_replicated and len(out.addressable_shards) == 8
    assert all(s.data.is_ready() for s in out.addressable_shards)
    # Any other sharding (here one device's) is gathered over its own devices.
    one = jax.device_put(host, SingleDeviceSharding(jax.devices()[3]))
    np.testing.assert_array_equal(parallel.fetch_global(one), host)


def test_gather_processes_barrier_and_finish_on_one_process():
    # One process: gather_processes stacks this process's value alone (shape [1, ...]); a
    # barrier and finish_processes have nobody to wait for and leave jax as it was.
    got = parallel.gather_processes(np.array([3, 4], np.int64))
    assert got.shape == (1, 2) and got.dtype == np.int64 and got.tolist() == [[3, 4]]
    parallel.barrier("anything")
    parallel.finish_processes()
    assert float(jax.jit(lambda a: a + 1)(1.0)) == 2.0  # the backend still works
