"""Shared helpers for benchmarks: the MFU denominator, timing, peak memory,
table + JSON output.

MFU = achieved model FLOP/s / peak FLOP/s, with the peak from `peak_flops`:

- GPU of a known kind (`STATED_PEAKS`, matched on `jax.devices()[0].device_kind`):
  the chip's stated dense tensor-core peak for the compute dtype
  (`peak_source` "stated <chip> <dtype>").
- Anything else (CPU, an unknown GPU or TPU): the best square-matmul
  throughput measured through XLA in this process, in the compute dtype,
  for about two seconds (`peak_source` "measured matmul"). A CPU's stated
  peak is rarely known, and the same VM type measured 200 and ~484 GFLOP/s
  float32 on two hosts, so a constant would mis-state MFU.
- `JAXREWARD_PEAK_FLOPS=<FLOP/s>` overrides both (`peak_source`
  "JAXREWARD_PEAK_FLOPS").

The result is cached per (process, dtype). Measured in the same process as
the benchmark, both numbers see the same machine and the same load.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from typing import Callable

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxreward import hostmem  # noqa: E402

# JAXREWARD_MALLOC=heap runs a benchmark under the allocator settings of
# jaxreward/hostmem.py, as it does `python -m jaxreward.main`.
hostmem.from_environment()

import jax  # noqa: E402
import jax.numpy as jnp

# Stated dense (no sparsity) peaks in FLOP/s, SXM parts unless named, by a
# substring of `device_kind`; first match wins, so "H100 PCIe" precedes
# "H100". "float32" is the TF32 tensor-core peak: XLA GPU runs float32 dots
# on TF32 at JAX's default matmul precision (with
# jax_default_matmul_precision="highest" the ceiling is the CUDA-core FP32
# peak, 67 TFLOP/s on H100/H200, 19.5 on A100, and this MFU reads high).
STATED_PEAKS = (
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 378e12}),
    ("H100", {"bfloat16": 989e12, "float32": 494e12}),
    ("H200", {"bfloat16": 989e12, "float32": 494e12}),
    ("A100", {"bfloat16": 312e12, "float32": 156e12}),
)


def _repeat_timed(fn, arg, seconds: float, min_reps: int) -> list[float]:
    """Seconds of each call `fn(arg)` after one compile-and-warm-up call,
    repeated until `seconds` have passed (at least `min_reps` times)."""
    jax.block_until_ready(fn(arg))
    times, start = [], time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(arg))
        times.append(time.perf_counter() - t0)
    return times


def measure_matmul_flops(n: int, dtype: str = "float32", seconds: float = 2.0,
                         min_reps: int = 3) -> dict:
    """Best FLOP/s of an `[n, n] @ [n, n]` matmul through XLA on the default device.

    One call to compile and warm up, then repetitions until `seconds` have
    passed (at least `min_reps`); the best one counts (2·n³ FLOPs), as the
    peak is what the machine can do, not what it does on average.
    """
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    times = _repeat_timed(jax.jit(lambda x: x @ x), a, seconds, min_reps)
    best = min(times)
    return {"n": n, "dtype": str(jnp.dtype(dtype)), "reps": len(times), "best_s": best,
            "median_s": sorted(times)[len(times) // 2], "flops_per_s": 2.0 * n ** 3 / best}


def measure_read_bandwidth(nbytes: int, seconds: float = 1.0, min_reps: int = 3) -> dict:
    """Best bytes/s of reading `nbytes` of float32 once (a jitted sum) on the default device.

    The floor of a decode step at small batch: every weight is read once per
    step, so a step cannot take less than (weight bytes) / (this). Measured
    the way `measure_matmul_flops` is: compile, repeat, keep the best.
    """
    x = jnp.ones((max(1, nbytes // 4),), jnp.float32)
    times = _repeat_timed(jax.jit(jnp.sum), x, seconds, min_reps)
    best = min(times)
    del x
    return {"bytes": nbytes, "reps": len(times), "best_s": best, "bytes_per_s": nbytes / best}


def stated_peak(dtype: str) -> tuple[str, float] | None:
    """(chip, FLOP/s) from `STATED_PEAKS` for the default device, or None."""
    if jax.default_backend() != "gpu":
        return None
    kind = jax.devices()[0].device_kind
    for chip, peaks in STATED_PEAKS:
        if chip in kind and str(jnp.dtype(dtype)) in peaks:
            return chip, peaks[str(jnp.dtype(dtype))]
    return None


_PEAKS: dict[str, dict] = {}  # dtype -> peak_flops() result, this process


def _peak(dtype: str) -> dict:
    if "JAXREWARD_PEAK_FLOPS" in os.environ:
        return {"peak_flops": float(os.environ["JAXREWARD_PEAK_FLOPS"]),
                "peak_source": "JAXREWARD_PEAK_FLOPS", "peak_method": "set by the user"}
    stated = stated_peak(dtype)
    if stated is not None:
        chip, flops = stated
        return {"peak_flops": flops, "peak_source": f"stated {chip} {dtype}",
                "peak_method": f"{chip} dense {dtype}{' (TF32)' if dtype == 'float32' else ''} "
                               "tensor-core peak from common.STATED_PEAKS"}
    n = 2048 if jax.default_backend() == "cpu" else 8192
    m = measure_matmul_flops(n, dtype)
    return {"peak_flops": m["flops_per_s"], "peak_source": "measured matmul",
            "peak_method": f"best of {m['reps']} {dtype} {n}x{n} matmuls through XLA on "
                           f"{jax.devices()[0].device_kind}, this process "
                           f"(median {2.0 * n ** 3 / m['median_s'] / 1e9:.0f} GFLOP/s)"}


def peak_flops(dtype: str = "float32") -> dict:
    """The MFU denominator for `dtype` (see the module docstring), cached per process.

    Returns: `{"peak_flops": FLOP/s, "peak_source": "measured matmul" |
    "stated <chip> <dtype>" | "JAXREWARD_PEAK_FLOPS", "peak_method": how}`.
    """
    dtype = str(jnp.dtype(dtype))
    if dtype not in _PEAKS:
        _PEAKS[dtype] = _peak(dtype)
    return dict(_PEAKS[dtype])


def mfu_fields(flops_per_s: float, dtype: str = "float32") -> dict:
    """Row fields `gflops_per_s`, `mfu`, `peak_gflops_per_s`, `peak_source`."""
    p = peak_flops(dtype)
    return {"gflops_per_s": flops_per_s / 1e9, "mfu": flops_per_s / p["peak_flops"],
            "peak_gflops_per_s": p["peak_flops"] / 1e9, "peak_source": p["peak_source"]}


def csv_choices(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """An argparse `type` for a comma-separated list drawn from `allowed`:
    `--reference precomputed,in_step` is refused naming the bad item and
    the choices (one line, exit 2), instead of running something else."""
    def parse(text: str) -> list[str]:
        items = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in items if v not in allowed]
        if not items:
            raise argparse.ArgumentTypeError(f"no choice given; pick from {', '.join(allowed)} (comma-separated)")
        if bad:
            raise argparse.ArgumentTypeError(
                f"{', '.join(map(repr, bad))} not among {', '.join(allowed)} (comma-separated)")
        return items
    return parse


def time_fn(fn: Callable[[], object], warmup: int = 1, iters: int = 3) -> tuple[float, float]:
    """(first-call seconds incl. compile, median steady seconds per call)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    times.sort()
    return first, times[len(times) // 2]


def peak_memory_bytes() -> tuple[int, str]:
    """Device peak bytes in use where the backend reports it, else host max RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host max RSS"


def machine() -> dict:
    return {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
            "num_devices": jax.device_count(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "jax": jax.__version__,
            "host_allocator": hostmem.describe()}


def _cell(v):
    """Table text of a value: 3 decimals, or 3 significant digits below 0.1 (small MFUs)."""
    if isinstance(v, float) and v == v and 0 < abs(v) < 0.1:
        return format(v, ".3g")
    return format(v, ".3f") if isinstance(v, float) else v


def report(name: str, rows: list[dict], out_dir: str, extra: dict | None = None) -> str:
    """Prints a table and writes `<out_dir>/<name>.json`; returns the path.

    The JSON holds the rows, the machine, `extra`, and `peaks`: every MFU
    denominator this process used, by dtype, with how it was obtained; the
    same is printed under the table.
    """
    from jaxreward.train.metrics import format_table
    print(format_table([{k: _cell(v) for k, v in r.items()} for r in rows]))
    peaks = {d: dict(p) for d, p in _PEAKS.items()}
    for d, p in peaks.items():
        print(f"MFU peak ({d}): {p['peak_flops'] / 1e9:,.0f} GFLOP/s, {p['peak_source']}: "
              f"{p['peak_method']}")
    print("host allocator: " + hostmem.describe())
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"benchmark": name, "machine": machine(), "peaks": peaks, "rows": rows,
                   **(extra or {})}, f, indent=2)
    print(f"wrote {path}")
    return path
