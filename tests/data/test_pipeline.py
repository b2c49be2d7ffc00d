"""GrainLoader (resume, epochs, sharding) and the tokenized-array cache."""
import json

import numpy as np
import pytest

from jaxreward.data import tfds_builders
from jaxreward.data.batching import PairBatcher, tokenize_pairs
from jaxreward.data.pipeline import GrainLoader, cached_tokenize, records_fingerprint
from jaxreward.data.preference import PreferencePair
from tests.data.test_records import write


def arrays(n):
    """Row i holds i in every field; shapes like tokenized pairs."""
    return {"id": np.arange(n), "tokens": np.arange(n * 4, dtype=np.int32).reshape(n, 4) // 4,
            "mask": np.ones([n, 4], bool)}


def test_resume_continues_on_the_exact_next_batch():
    # 10 rows, batch 3: 3 batches per epoch (1 row dropped each epoch), so batch 3 starts epoch 1.
    straight = GrainLoader(arrays(10), batch_size=3, seed=7, shard_index=0, shard_count=1)
    assert straight.batches_per_epoch == 3
    expected = [next(straight) for _ in range(6)]
    first = GrainLoader(arrays(10), batch_size=3, seed=7, shard_index=0, shard_count=1)
    got = [next(first) for _ in range(3)]
    state = json.loads(json.dumps(first.state()))  # what JsonSave writes
    assert state == {"epoch": 1, "index": 0}
    resumed = GrainLoader(arrays(10), batch_size=3, seed=7, shard_index=0, shard_count=1)
    resumed.restore(state)
    got += [next(resumed) for _ in range(3)]
    for a, b in zip(expected, got):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
            assert a[k].shape == (3,) + arrays(1)[k].shape[1:] and a[k].dtype == arrays(1)[k].dtype
    epochs = [np.concatenate([b["id"] for b in expected[e * 3:e * 3 + 3]]) for e in (0, 1)]
    assert all(len(set(e)) == 9 for e in epochs)  # no row twice within an epoch
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled per epoch
    with pytest.raises(ValueError, match="bad loader state"):
        resumed.restore({"epoch": 0, "index": 3})


def test_same_interface_as_pair_batcher():
    loader, batcher = GrainLoader(arrays(8), 2, seed=0), PairBatcher(arrays(8), 2, seed=0)
    for attr in ("batch_size", "seed", "num_rows", "batches_per_epoch", "arrays"):
        assert getattr(loader, attr) is not None and hasattr(batcher, attr)
    assert (loader.shard_index, loader.shard_count) == (0, 1)  # jax.process_index/count here
    assert loader.state() == batcher.state() == {"epoch": 0, "index": 0}
    assert iter(loader) is loader


def test_two_shards_split_the_one_process_batches():
    """13 rows, 2 processes × 3 rows: global batches of 6, 2 per epoch (one
    row of each epoch's shuffle left over). Process p's batch k is rows
    [3p, 3p + 3) of the one-process loader's batch k of 6, so a pod trains on
    the batches of a one-process run, epoch after epoch."""
    shards = [GrainLoader(arrays(13), batch_size=3, seed=1, shard_index=i, shard_count=2) for i in (0, 1)]
    whole = GrainLoader(arrays(13), batch_size=6, seed=1, shard_index=0, shard_count=1)
    assert shards[0].batches_per_epoch == shards[1].batches_per_epoch == whole.batches_per_epoch == 2
    for epoch in range(2):
        rows = []
        for _ in range(2):
            parts = [next(s)["id"] for s in shards]
            np.testing.assert_array_equal(np.concatenate(parts), next(whole)["id"])
            rows.append(parts)
        mine = [np.concatenate([r[p] for r in rows]) for p in (0, 1)]
        assert set(mine[0]).isdisjoint(mine[1]) and len(set(mine[0]) | set(mine[1])) == 12
    with pytest.raises(ValueError, match="no batch"):
        GrainLoader(arrays(5), batch_size=3, seed=0, shard_index=0, shard_count=2)
    with pytest.raises(ValueError, match="bad shard"):
        GrainLoader(arrays(5), batch_size=1, seed=0, shard_index=2, shard_count=2)


PAIRS = [PreferencePair(f"hi {i}", f" cat {i}", " the", f"t:{i}") for i in range(5)]


def _count_encodes(monkeypatch, tokenizer):
    calls = []
    original = tokenizer.encode_batch
    monkeypatch.setattr(tokenizer, "encode_batch", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_cached_tokenize_skips_the_tokenizer_on_a_hit(tmp_path, tiny_tok, tiny_tok_nobos, monkeypatch):
    calls = _count_encodes(monkeypatch, tiny_tok)
    expected, expected_report = tokenize_pairs(PAIRS, tiny_tok, max_length=8)
    calls.clear()
    first, report = cached_tokenize(PAIRS, tiny_tok, max_length=8, cache_dir=tmp_path)
    assert calls and len(list(tmp_path.glob("*.npz"))) == 1
    calls.clear()
    second, second_report = cached_tokenize(PAIRS, tiny_tok, max_length=8, cache_dir=tmp_path)
    assert calls == []  # loaded, not re-tokenized
    for got in (first, second):
        assert got.keys() == expected.keys()
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k])
            assert got[k].dtype == expected[k].dtype
    assert second_report.summary() == report.summary() == expected_report.summary()
    np.testing.assert_array_equal(second_report.kept_indices, expected_report.kept_indices)
    # Another length, tokenizer or data set is another entry.
    cached_tokenize(PAIRS, tiny_tok, max_length=9, cache_dir=tmp_path)
    cached_tokenize(PAIRS, tiny_tok_nobos, max_length=8, cache_dir=tmp_path)
    cached_tokenize(PAIRS[:4], tiny_tok, max_length=8, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 4


def test_cached_tokenize_from_a_tfds_source_feeds_the_loader(tmp_path, tiny_tok, monkeypatch):
    path = write(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(6)])
    tfds_builders.build("pairs", path, tmp_path / "tfds", name="six")
    source = tfds_builders.load("pairs/six", tmp_path / "tfds")
    assert records_fingerprint(source) == records_fingerprint(tfds_builders.load("pairs/six", tmp_path / "tfds"))
    calls = _count_encodes(monkeypatch, tiny_tok)
    tokens, _ = cached_tokenize(source, tiny_tok, max_length=8, cache_dir=tmp_path / "cache")
    calls.clear()
    again, _ = cached_tokenize(source, tiny_tok, max_length=8, cache_dir=tmp_path / "cache")
    assert calls == [] and np.array_equal(tokens["chosen_tokens"], again["chosen_tokens"])
    batch = next(GrainLoader(again, batch_size=2, seed=0))
    assert batch["chosen_tokens"].shape == (2, 8) and batch["chosen_tokens"].dtype == np.int32


def test_too_few_rows_for_a_batch_is_a_user_error():
    """Like PairBatcher's, so a driver prints one `error:` line; before, a plain
    ValueError (a traceback from the quickstart or a proxy reward model)."""
    from jaxreward.errors import UserError
    with pytest.raises(UserError, match="^4 rows make no batch of 32$"):
        GrainLoader({"x": np.arange(4)}, batch_size=32, seed=0)
    with pytest.raises(UserError, match="^5 rows make no batch of 2 rows on each of 3 processes$"):
        GrainLoader({"x": np.arange(5)}, batch_size=2, seed=0, shard_index=0, shard_count=3)
