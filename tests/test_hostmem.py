"""Host allocator settings (jaxreward/hostmem.py): when the re-execution
happens (opt-in, once, never over the user's own tunables), and that it
stops XLA on CPU from faulting its temporary buffer in again on every run
of a jitted function."""
import os
import platform
import subprocess
import sys

import pytest

from jaxreward import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC_LINUX = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC_LINUX, reason="glibc tunables exist on Linux with glibc only")
def test_wanted_only_when_asked_and_never_over_user_settings():
    assert hostmem.wanted({"JAXREWARD_MALLOC": "heap"})
    assert not hostmem.wanted({})                                                  # opt-in
    assert not hostmem.wanted({"JAXREWARD_MALLOC": "default"})
    assert not hostmem.wanted({"JAXREWARD_MALLOC": "heap",
                               "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})      # the user's win
    assert not hostmem.wanted({"JAXREWARD_MALLOC": "heap", "JAXREWARD_MALLOC_REEXEC": "1"})  # never twice


_PROBE = """
import os, resource, sys
from jaxreward import hostmem
hostmem.reexec_with_tunables()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.tanh(jnp.tanh(x @ x) @ x).sum())  # two 64 MB temporaries
x = jnp.ones((4096, 4096), jnp.float32) * 1e-3
for _ in range(3):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f(x).block_until_ready()
print(os.environ.get("GLIBC_TUNABLES"), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(**env):
    e = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXREWARD_MALLOC_REEXEC")}
    e.update(env, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=e, capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not GLIBC_LINUX, reason="glibc tunables exist on Linux with glibc only")
def test_the_tunables_stop_per_run_page_faults():
    """A jitted function with ~128 MB of temporaries: re-executed with the
    tunables (`JAXREWARD_MALLOC=heap`), a warm run faults almost no pages;
    under glibc's defaults each run faults them in again (128 MB / 4 KiB =
    32,768 pages; the test asks for half of that)."""
    tunables, faults = _probe(JAXREWARD_MALLOC="heap")
    assert tunables == hostmem.TUNABLES
    assert faults < 2000, faults
    tunables, faults = _probe()
    assert tunables == "None"
    assert faults > 16000, faults
