"""Grain loading of tokenized arrays, and a tokenized-array cache.

`GrainLoader` is a drop-in for `batching.PairBatcher` (same iteration,
`state()`/`restore()` and attributes) that adds per-process sharding:

    arrays, report = cached_tokenize(pairs_or_source, tokenizer, max_length=T, cache_dir=...)
    loader = GrainLoader(arrays, batch_size=defaults.per_process_batch(config), seed=seed)  # B / processes
    batch = next(loader)             # {key: array[batch_size, ...]}, this process's rows
    checkpointer.save(step, state, loader.state())    # {"epoch": int, "index": int}
    loader.restore(saved)            # continues on exactly the next batch

Epoch e visits the N rows in one grain shuffle seeded by (seed, e), the same
on every process, in global batches of P × `batch_size` rows (P processes);
process p takes rows [p × batch_size, (p + 1) × batch_size) of each global
batch. The global batches are thus the same whatever the process count, so a
pod trains on exactly the batches of a one-process run (tested with two
processes against one). The last partial global batch of each epoch is
dropped, so every batch has the same shape and every process the same
batches per epoch.
"""
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import tempfile

import grain.python as grain
import jax
import numpy as np

from jaxreward.data.batching import TruncationReport, tokenize_pairs
from jaxreward.errors import UserError


class GrainLoader:
    """Endless, seeded, sharded, resumable fixed-shape batches from a dict of arrays.

    Args:
      arrays: {key: array[N, ...]} with one N (e.g. what `tokenize_pairs` returns).
      batch_size: rows per batch on this process.
      seed: shuffle seed, the same on every process.
      shard_index, shard_count: this process's shard; default
        `jax.process_index()`, `jax.process_count()`.

    Raises:
      ValueError: arrays of different lengths or a bad shard.
      UserError (a ValueError): fewer rows than one global batch (as
        `PairBatcher`: the data is too small for the configured batch).
    """

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int, *,
                 shard_index: int | None = None, shard_count: int | None = None):
        sizes = {len(v) for v in arrays.values()}
        if len(sizes) != 1:
            raise ValueError(f"arrays must have one leading size, got {sorted(sizes)}")
        self.shard_index = jax.process_index() if shard_index is None else int(shard_index)
        self.shard_count = jax.process_count() if shard_count is None else int(shard_count)
        if not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"bad shard {self.shard_index} of {self.shard_count}")
        self.arrays, self.batch_size, self.seed = arrays, batch_size, seed
        self.num_rows = sizes.pop()
        self.global_batch_size = batch_size * self.shard_count
        self.batches_per_epoch = self.num_rows // self.global_batch_size
        if self.batches_per_epoch == 0:
            raise UserError(f"{self.num_rows} rows make no batch of {batch_size}" + (
                f" rows on each of {self.shard_count} processes" if self.shard_count > 1 else ""))
        self._rows = grain.MapDataset.range(0, self.num_rows)  # row indices
        self._epoch, self._index, self._dataset = 0, 0, None

    def epoch_dataset(self, epoch: int) -> grain.MapDataset:
        """Epoch `epoch` on this process: a grain MapDataset of `batches_per_epoch`
        batches, each this process's slice of a global batch."""
        seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        return self._rows.shuffle(seed=seed).batch(self.global_batch_size, drop_remainder=True,
                                                   batch_fn=self._gather)

    def _gather(self, rows) -> dict[str, np.ndarray]:
        start = self.shard_index * self.batch_size
        rows = np.asarray(rows)[start:start + self.batch_size]
        return {key: value[rows] for key, value in self.arrays.items()}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._dataset is None or self._dataset[0] != self._epoch:
            self._dataset = (self._epoch, self.epoch_dataset(self._epoch))
        batch = self._dataset[1][self._index]
        self._index += 1
        if self._index == self.batches_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0
        return batch

    def state(self) -> dict[str, int]:
        """Position of the next batch, JSON-able and the same on every process:
        {"epoch": int, "index": batch within the epoch}."""
        return {"epoch": self._epoch, "index": self._index}

    def restore(self, state: dict[str, int]) -> None:
        """Continue from a `state()`. Raises ValueError if the index is past the epoch."""
        epoch, index = int(state["epoch"]), int(state["index"])
        if not 0 <= index < self.batches_per_epoch or epoch < 0:
            raise ValueError(f"bad loader state {state} ({self.batches_per_epoch} batches per epoch)")
        self._epoch, self._index = epoch, index


# ------------------------------------------------------------------ caching


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of a `Tokenizer`'s serialized vocabulary/merges and its BOS/EOS/pad policy."""
    digest = hashlib.sha256(tokenizer.hf_tokenizer.to_str().encode())
    # "plain-v1": special-token strings in user text encode as plain text (tokenizer.py).
    policy = [tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.add_bos, "plain-v1"]
    digest.update(json.dumps(policy).encode())
    return digest.hexdigest()


def records_fingerprint(records) -> str:
    """sha256 identifying a sequence of preference pairs, in order.

    A TFDS data source from `tfds_builders.load` is identified by the records
    hash stored at build time plus its split and file layout (no pass over
    the data); any other sequence by hashing prompt/chosen/rejected of each
    record.
    """
    info = getattr(records, "dataset_info", None)
    if info is not None and "read_report" in (info.metadata or {}):
        identity = [info.metadata["read_report"]["records_sha256"], str(records.split), info.full_name,
                    [list(s.shard_lengths) for s in info.splits.values()]]
        return hashlib.sha256(json.dumps(identity).encode()).hexdigest()
    digest = hashlib.sha256()
    for pair in _pairs(records):
        digest.update(json.dumps([pair.prompt, pair.chosen, pair.rejected]).encode() + b"\n")
    return digest.hexdigest()


def cached_tokenize(records, tokenizer, *, max_length: int, cache_dir, max_prompt_length: int | None = None,
                    append_eos: bool = True, padding_side: str = "right",
                    fingerprint: str | None = None) -> tuple[dict[str, np.ndarray], TruncationReport]:
    """`tokenize_pairs` with its output cached as `.npz` under `cache_dir`.

    The cache key hashes the records (`fingerprint`, default
    `records_fingerprint(records)`), `tokenizer_fingerprint(tokenizer)` and the
    lengths/options; a hit loads the arrays and report without calling the
    tokenizer. Files are written atomically (safe when processes share `cache_dir`).

    Args:
      records: preference pairs (`.prompt/.chosen/.rejected`), or a TFDS pairs
        data source (decoded with `tfds_builders.decode`).
      (the rest as `tokenize_pairs`.)

    Returns:
      (arrays, report) exactly as `tokenize_pairs` returns them.
    """
    options = [max_length, max_prompt_length, append_eos, padding_side]
    key = hashlib.sha256(json.dumps([fingerprint or records_fingerprint(records),
                                     tokenizer_fingerprint(tokenizer), options]).encode()).hexdigest()
    path = pathlib.Path(cache_dir) / f"pairs-{key[:24]}.npz"
    if path.exists():
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files if not k.startswith("__")}
            report = TruncationReport(**json.loads(str(data["__report__"])), kept_indices=data["__kept_indices__"])
        return arrays, report
    arrays, report = tokenize_pairs(_pairs(records), tokenizer, max_length=max_length,
                                    max_prompt_length=max_prompt_length, append_eos=append_eos,
                                    padding_side=padding_side)
    fields = {f.name: getattr(report, f.name) for f in dataclasses.fields(report) if f.name != "kept_indices"}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, __report__=np.array(json.dumps(fields)), __kept_indices__=report.kept_indices)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
        f.write(buffer.getvalue())
    os.replace(f.name, path)
    return arrays, report


def _pairs(records) -> list:
    if hasattr(records, "dataset_info"):  # a TFDS data source
        from jaxreward.data.tfds_builders import decode_all
        return decode_all(records)
    return list(records)
