"""Test-session setup: 8 simulated CPU devices, float32 matmuls, shared paths.

XLA_FLAGS must be set before jax is imported, so it is set here, at the top
of the first module pytest loads. Tests that compare meshes build a 1-device
mesh from `jax.devices()[:1]` and an 8-device mesh from all of them.
"""
import os
import pathlib

# --xla_backend_optimization_level=0: the tests check what our programs
# compute, not how well LLVM compiles them, and about 70% of the suite's time
# is compiling. Level 0 cut the suite's time by ~14% (796 tests passed with
# it). Benchmarks and real runs keep XLA's default.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS on purpose)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
HH_TEST_FILE = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"


@pytest.fixture
def hh_file():
    """The real HH-RLHF harmless-base test file; skips when ../shared is absent."""
    if not HH_TEST_FILE.exists():
        pytest.skip(f"real data not found at {HH_TEST_FILE} (needs ../shared/data)")
    return HH_TEST_FILE
