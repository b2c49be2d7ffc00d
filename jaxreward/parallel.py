"""Mesh, logical-axis rules and shard helpers.

One rule table maps the logical axis names that parameters and activations
carry (`embed`, `mlp`, `heads`, `kv_heads`, `kv`, `vocab`, `batch`, `length`)
to the mesh axes (`data`, `fsdp`, `tensor`). The same code then runs on one
CPU, 8 simulated CPU devices, a GPU or a pod: only the mesh shape changes.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or axes, or None for replicated). flax resolves
# each logical name with the first rule whose mesh axes are still unused in
# that array, so `batch` and `embed` may both name `fsdp`.
AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("length", None),
    ("objectives", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a `(data, fsdp, tensor)` mesh.

    Args:
      data, fsdp, tensor: mesh axis sizes; one of them may be -1 to take all
        remaining devices.
      devices: devices to use (default: all of `jax.devices()`).

    Raises:
      ValueError: if the product of the sizes does not equal the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        if len(devices) % known:
            raise ValueError(f"mesh {shape} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"mesh data×fsdp×tensor = {shape} needs {int(np.prod(shape))} devices, "
            f"have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None]) -> NamedSharding:
    """NamedSharding for one array from its logical axis names."""
    spec = nn.logical_to_mesh_axes(tuple(logical_axes), AXIS_RULES)
    return NamedSharding(mesh, spec)


def param_shardings(mesh: Mesh, boxed_params: Any) -> Any:
    """Shardings for a (possibly `nn.LogicallyPartitioned`-boxed) param tree.

    Leaves without logical names are replicated. A dimension whose size does
    not divide by its mesh axes (e.g. 1 KV head on a 2-way `tensor` axis) is
    replicated along that dimension instead of failing.
    """
    specs = nn.get_partition_spec(boxed_params)
    specs = nn.logical_to_mesh(specs, AXIS_RULES)
    shapes = jax.tree.map(lambda x: x.value.shape if hasattr(x, "value") else x.shape,
                          boxed_params, is_leaf=lambda x: hasattr(x, "names"))
    return jax.tree.map(lambda s, shape: NamedSharding(mesh, fit_spec(mesh, s, shape)),
                        specs, shapes, is_leaf=lambda x: isinstance(x, P))


def fit_spec(mesh: Mesh, spec: P, shape: Sequence[int]) -> P:
    """Drops mesh axes from `spec` where they do not divide the dimension."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        out.append(axes if dim % size == 0 else None)
    return P(*out)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch array: leading axis over `data` and `fsdp`."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Places a host batch (numpy dict) on the mesh, split along the batch axis.

    Multi-host: each process passes its process-local rows; the global batch
    is their concatenation.

    Raises:
      ValueError: if this process's rows do not divide among the data×fsdp
        batch shards its devices hold (`local_batch_shards`; on one process,
        all data×fsdp of them), or a batch shard spans the devices of two
        processes (it would get rows from neither in full).
    """
    local, n = local_batch_shards(mesh), mesh.shape["data"] * mesh.shape["fsdp"]
    if local * jax.process_count() != n:
        raise ValueError(f"the mesh's data×fsdp = {n} batch shards do not split among the {jax.process_count()} "
                         f"processes (this one's devices are in {local} of them): each process feeds its own "
                         "rows, so each batch shard must lie within one process (a mesh.tensor that divides "
                         "the devices per process)")
    out = {}
    for k, v in _checked_rows(batch, mesh, local):
        # Each process passes its own slice; on one host that is the batch.
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh) if v.ndim else replicated(mesh), v)
    return out


def local_batch_shards(mesh: Mesh, process_index: int | None = None) -> int:
    """How many of the mesh's data×fsdp batch shards hold a device of this
    process (`jax.process_index()`, or `process_index`): the number its
    process-local rows must split into. On one process, data×fsdp; on a pod
    whose processes each own a block of the mesh, data×fsdp / processes
    (a global batch of 8 over data = 8 on 2 processes: 4 rows, 4 shards each).
    """
    me = jax.process_index() if process_index is None else process_index
    axes = [mesh.axis_names.index(a) for a in ("data", "fsdp")]
    rest = [i for i in range(len(mesh.axis_names)) if i not in axes]
    devices = np.transpose(np.asarray(mesh.devices), axes + rest)
    per_shard = devices.reshape(devices.shape[0] * devices.shape[1], -1)
    return sum(any(d.process_index == me for d in shard) for shard in per_shard)


def _checked_rows(batch: dict[str, Any], mesh: Mesh, shards: int | None = None):
    """(key, numpy value) of `batch`; ValueError where a leading size does not
    divide into `shards` (default: all of the mesh's data×fsdp)."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    shards = n if shards is None else shards
    into = (f"data×fsdp = {n}" if shards == n else
            f"the {shards} of the data×fsdp = {n} batch shards that this process's devices hold")
    for k, v in batch.items():
        v = np.asarray(v)
        if v.ndim and v.shape[0] % shards:
            raise ValueError(f"batch field {k!r} has leading size {v.shape[0]}, not divisible by {into}")
        yield k, v


def shard_global_batch(batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Places a batch that every process holds in full (numpy dict) on the
    mesh, split along the batch axis: each process copies in only the rows of
    its own devices (`jax.make_array_from_callback`). On one process this is
    `shard_batch`. For work every process does over the same rows (scoring a
    whole eval set, a rollout): the per-process loaders use `shard_batch`.

    Raises:
      ValueError: if the batch size does not divide by data×fsdp.
    """
    if jax.process_count() == 1:
        return shard_batch(batch, mesh)
    out = {}
    for k, v in _checked_rows(batch, mesh):
        sharding = batch_sharding(mesh) if v.ndim else replicated(mesh)
        out[k] = jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
    return out


def to_host(tree: Any) -> Any:
    """numpy copies of the arrays of `tree`, whole on every process: on a pod
    an array split over several processes' devices is gathered first
    (`fetch_global`), since no process can read the others' shards
    directly. On one process it is `jax.device_get`.
    """
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                return fetch_global(x)
            # Replicated over both processes' devices, as a jit with a replicated output leaves
            # it: every local copy, or the other devices may still be in that jit's collective.
            x.block_until_ready()
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)
    return jax.tree.map(fetch, tree)


def fetch_global(x: jax.Array) -> np.ndarray:
    """The whole of the global array `x` (shape and dtype kept) as numpy, on
    every process: a jitted identity to a replicated sharding, an
    all-gather over the processes (gloo on CPU, NCCL or ICI elsewhere).

    It returns once every local device has finished its part of that
    collective, not only the device whose copy is read. jax's
    `multihost_utils.process_allgather` (and `sync_global_devices`, built on
    it) reads device 0's copy and returns while the other devices can still
    be inside the all-gather; a process that then exits destroys its runtime
    under them, and both processes hang in teardown (seen about once in 130
    two-process runs: PjRtCpuClient's destructor joining threads that wait in
    gloo::allgather).
    """
    if isinstance(x.sharding, NamedSharding):
        everywhere = x.sharding.update(spec=P())
    else:
        devices = sorted(x.sharding.device_set, key=lambda d: d.id)
        everywhere = NamedSharding(Mesh(np.asarray(devices), ("all",)), P())
    out = jax.jit(_identity, out_shardings=everywhere)(x)
    out.block_until_ready()  # every local copy: no device is left inside the collective
    return np.asarray(out.addressable_data(0))


def _identity(x):  # one module-level function: gathers of one shape compile once
    return x


def gather_processes(x: Any) -> np.ndarray:
    """Every process's value of the host array `x` (each process passes its
    own; same shape and dtype on all), stacked: `[jax.process_count(),
    *x.shape]`, same dtype, the same on every process. The bytes travel, so
    no dtype is narrowed (int64 and float64 stay whole without jax's x64
    mode) and fixed-width byte strings work. The shapes and dtypes are
    compared first, so a mismatch is an error on every process, not a
    gloo abort, a hang or reinterpreted bits. Returns after every local
    device has finished the exchange (`fetch_global`). On one process,
    `x[None]`.

    Raises:
      TypeError: `x` holds Python objects (dtype object), which have no bytes
        to send.
      ValueError: the processes passed different shapes or dtypes (raised on
        every process, naming each one's).
    """
    x = np.asarray(x)
    if x.dtype.hasobject:
        raise TypeError(f"gather_processes: an array of dtype {x.dtype} has no fixed-size bytes to send")
    if jax.process_count() == 1:
        return x[None]
    kinds = _exchange_labelled(f"{x.dtype.str} {x.shape}")
    if kinds is not None:
        raise ValueError("gather_processes: the processes passed different arrays: "
                         + ", ".join(f"process {p} dtype and shape {k}" for p, k in enumerate(kinds)))
    if x.size == 0:  # every process passed this empty shape: nothing to send
        return np.zeros((jax.process_count(), *x.shape), x.dtype)
    rows = _exchange(np.ascontiguousarray(x).reshape(-1).view(np.uint8))
    return np.ascontiguousarray(rows).view(x.dtype).reshape(jax.process_count(), *x.shape)


def _exchange(raw: np.ndarray) -> np.ndarray:
    """uint8 `[n]` from each process (n the same on all) -> `[processes, n]`."""
    mesh = Mesh(np.asarray(jax.devices()).reshape(jax.process_count(), jax.local_device_count()),
                ("processes", "local"))
    sharding = NamedSharding(mesh, P("processes"))
    local = [jax.device_put(raw[None], d) for d in jax.local_devices()]
    return fetch_global(jax.make_array_from_single_device_arrays((jax.process_count(), raw.size), sharding, local))


def _exchange_labelled(text: str) -> list[str] | None:
    """Compares `text` across the processes in one fixed-size exchange (the
    whole text's sha256 decides; its first 200 bytes label it): None where
    all agree, else each process's label (a text cut at 200 bytes ends with
    "…" and its digest's first 8 hex digits)."""
    import hashlib
    data = text.encode()
    digest = hashlib.sha256(data).digest()
    head = data[:200]
    sent = digest + len(data).to_bytes(8, "little") + head.ljust(200, b"\0")
    rows = _exchange(np.frombuffer(sent, np.uint8))
    if (rows[:, :32] == rows[0, :32]).all():
        return None
    labels = []
    for row in rows:
        n = int.from_bytes(bytes(row[32:40]), "little")
        label = repr(bytes(row[40:40 + min(n, 200)]).decode(errors="replace"))
        labels.append(label if n <= 200 else f"{label}… (sha256 {bytes(row[:4]).hex()})")
    return labels


def barrier(name: str) -> None:
    """Waits until every process reaches `barrier(name)` (with the same
    name), and until this process's devices have finished the exchange. A
    no-op on one process.

    Raises:
      RuntimeError: the processes passed different names (they are running
        different code paths), naming each process's.
    """
    if jax.process_count() == 1:
        return
    names = _exchange_labelled(name)
    if names is not None:
        raise RuntimeError(f"barrier {name!r}: the processes reached different barriers: "
                           + ", ".join(f"process {p} at {n}" for p, n in enumerate(names)))


def finish_processes() -> None:
    """The end of a pod's run: waits for this process's work, then a barrier
    (`barrier`), so that no process exits while a collective is still
    running on its own or another process's devices (both processes then
    hung in teardown), then `jax.distributed.shutdown()` while Python is
    whole, rather than from jax's exit hook after the backends are gone
    (once, process 0 aborted there with gRPC's `Check failed: queue.Pop() ==
    nullptr`). Call it once all work is done; a no-op on one process.
    `jaxreward.main` calls it after a run that succeeded; a script of your
    own that initializes `jax.distributed` should end with it.
    """
    if jax.process_count() == 1:
        return
    jax.block_until_ready(jax.live_arrays())  # this process's own work, collectives included
    barrier("jaxreward: end of run")
    jax.distributed.shutdown()

