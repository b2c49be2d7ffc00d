"""train/evaluate.py: the all-rows evaluator and the Wilson interval."""
import jax
import numpy as np
import pytest

from jaxreward import parallel
from jaxreward.train import evaluate


def test_wilson_interval_hand_values():
    # p = 0.6, n = 100, z = 1.96: denom = 1 + 3.8415/100 = 1.038415;
    # center = (0.6 + 0.019207) / 1.038415 = 0.596307;
    # half = 1.96 * sqrt(0.0024 + 0.00009604) / 1.038415 = 1.96 * 0.049960 / 1.038415 = 0.094300
    low, high = evaluate.wilson_interval(60, 100)
    np.testing.assert_allclose([low, high], [0.596307 - 0.094300, 0.596307 + 0.094300], atol=2e-5)
    assert evaluate.wilson_interval(0, 0) == (0.0, 1.0)
    low, high = evaluate.wilson_interval(10, 10)  # all successes: upper end is 1, lower < 1
    # p = 1, n = 10: center = (1 + 0.192073) / 1.38415 = 0.86123;
    # half = 1.96 * sqrt(3.8415 / 400) / 1.38415 = 0.13877; low = 0.72247
    assert abs(high - 1.0) < 1e-9 and abs(low - 0.72247) < 1e-4


def test_wilson_interval_always_holds_its_own_proportion():
    # At p = 1 the upper end is exactly 1 in exact arithmetic; float rounding
    # gave 0.9999999999999999 for n = 4, 10, 14, ... (a negative error bar that
    # crashed the evaluate_rm plot). Same at p = 0 for the lower end.
    for n in range(1, 120):
        for k in (0, n // 3, n / 2, n - 0.5, n):
            low, high = evaluate.wilson_interval(k, n)
            assert 0.0 <= low <= k / n <= high <= 1.0, (k, n, low, high)
        assert evaluate.wilson_interval(n, n)[1] == 1.0 and evaluate.wilson_interval(0, n)[0] == 0.0


def test_score_all_rows_counts_every_row_once():
    mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    arrays = {"x": np.arange(10, dtype=np.float32)}
    calls = []

    def score(params, batch):
        calls.append(batch["x"].shape)
        return batch["x"] * params
    out = evaluate.score_all_rows(score, 2.0, arrays, batch_size=4, mesh=mesh)
    np.testing.assert_array_equal(out, np.arange(10) * 2.0)  # 4 + 4 + 2 rows, padding dropped
    assert calls == [(4,), (4,), (4,)]  # one fixed shape


def test_score_all_rows_keeps_groups_whole_on_a_mesh():
    """Batches of packed groups on 8 devices: 12 rows asked, groups of 4.

    The batch is rounded up to lcm(8 shards, 4) = 8 · 2 = 16 rows (12 does
    not shard over 8 devices: that was a crash of the RL driver), every
    call holds whole groups, and the padding is copies of row 0.
    """
    mesh = parallel.make_mesh(8, 1, 1)
    group = np.repeat(np.arange(5), 4)  # 20 rows = 5 groups of 4
    seen = []

    def score(params, batch):
        g = np.asarray(batch["group"])
        seen.append(g)
        return batch["group"] * 1.0
    out = evaluate.score_all_rows(score, None, {"group": group}, batch_size=12, mesh=mesh, multiple_of=4)
    np.testing.assert_array_equal(out, group)
    assert [len(g) for g in seen] == [16, 16]
    # Second call: rows 16..19 (group 4), then 12 padding rows, all row 0 (group 0).
    np.testing.assert_array_equal(seen[1], [4] * 4 + [0] * 12)
    for g in seen:  # whole groups: each aligned block of 4 is one group
        assert (g.reshape(-1, 4) == g.reshape(-1, 4)[:, :1]).all()
    with pytest.raises(ValueError, match="not whole groups of 4"):
        evaluate.score_all_rows(score, None, {"group": group[:18]}, 12, mesh, multiple_of=4)
