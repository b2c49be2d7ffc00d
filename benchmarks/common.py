"""Shared helpers for benchmarks: timing, peak memory, table + JSON output."""
from __future__ import annotations

import json
import os
import platform
import resource
import time
from typing import Callable

import jax

# Stated peaks for MFU (FLOP/s), float32 unless noted. CPU: the best float32
# matmul throughput bench_matmul_peak.py measured on the 2-core dev/CI machine
# (about 200 GFLOP/s with both cores; see benchmarks/README.md). GPU: H100/H200
# dense TF32 tensor-core peak (494 TFLOP/s); TPU v5e bf16. Override with
# JAXREWARD_PEAK_FLOPS.
PEAKS = {"cpu": 200e9, "gpu": 494e12, "tpu": 197e12}


def peak_flops() -> tuple[float, str]:
    if "JAXREWARD_PEAK_FLOPS" in os.environ:
        return float(os.environ["JAXREWARD_PEAK_FLOPS"]), "JAXREWARD_PEAK_FLOPS"
    backend = jax.default_backend()
    return PEAKS.get(backend, float("nan")), f"default peak for {backend}"


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
            "platform": platform.platform(), "jax": jax.__version__}


def report(name: str, rows: list[dict], out_dir: str, extra: dict | None = None) -> str:
    """Prints a table and writes `<out_dir>/<name>.json`; returns the path."""
    from jaxreward.train.metrics import format_table
    print(format_table(rows, floatfmt=".3f"))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"benchmark": name, "machine": machine(), "rows": rows, **(extra or {})}, f,
                  indent=2)
    print(f"wrote {path}")
    return path
