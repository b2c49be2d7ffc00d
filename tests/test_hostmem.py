"""Host allocator settings (jaxreward/hostmem.py): when they apply (opt-in,
never over the user's own tunables, refused after JAX has started, a typo
named in one line), and that they stop XLA on CPU from faulting its
temporary buffer in again on every run of a jitted function."""
import os
import platform
import subprocess
import sys

import pytest

from jaxreward import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC_LINUX = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC_LINUX, reason="mallopt settings exist on Linux with glibc only")

# A child process: hostmem from the environment (or a direct call), then a
# jitted function with two 64 MB temporaries; prints the allocator line and
# the minor page faults of one warm run.
_PROBE = """
import os, resource, sys
from jaxreward import hostmem
hostmem.from_environment()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.tanh(jnp.tanh(x @ x) @ x).sum())
x = jnp.ones((4096, 4096), jnp.float32) * 1e-3
for _ in range(3):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f(x).block_until_ready()
print(hostmem.applied(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(code, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostmem.OPT_IN)}
    e.update(env, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,
                          timeout=300)


@needs_glibc
def test_the_settings_stop_per_run_page_faults():
    """With `JAXREWARD_MALLOC=heap` a warm run faults almost no pages; under
    glibc's defaults each run faults the temporaries in again (128 MB /
    4 KiB = 32,768 pages; the test asks for half of that)."""
    r = _run(_PROBE, JAXREWARD_MALLOC="heap")
    assert r.returncode == 0, r.stderr[-2000:]
    applied, faults = r.stdout.split()
    assert applied == "True" and int(faults) < 2000, r.stdout
    r = _run(_PROBE)
    applied, faults = r.stdout.split()
    assert applied == "False" and int(faults) > 16000, r.stdout


@needs_glibc
def test_a_typo_is_named_in_one_line_and_changes_nothing():
    r = _run(_PROBE, JAXREWARD_MALLOC="heep")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[0] == "False"
    lines = [l for l in r.stderr.splitlines() if "JAXREWARD_MALLOC" in l]
    assert lines == ["jaxreward: JAXREWARD_MALLOC='heep' is not one of heap, default; "
                     "using glibc's default allocator"], r.stderr


@needs_glibc
def test_the_users_own_malloc_tunables_win():
    r = _run(_PROBE, JAXREWARD_MALLOC="heap", GLIBC_TUNABLES="glibc.malloc.arena_max=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[0] == "False"
    assert ("jaxreward: GLIBC_TUNABLES sets glibc.malloc.arena_max; keeping them, not "
            "JAXREWARD_MALLOC=heap") in r.stderr
    # A tunable that use_heap() does not set is no conflict.
    r = _run(_PROBE, JAXREWARD_MALLOC="heap", GLIBC_TUNABLES="glibc.malloc.tcache_count=0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[0] == "True" and "keeping them" not in r.stderr


@needs_glibc
def test_after_the_first_jax_computation_it_refuses_with_the_reason():
    code = ("import jax.numpy as jnp\nfrom jaxreward import hostmem\njnp.ones(2).block_until_ready()\n"
            "try:\n    hostmem.use_heap()\nexcept RuntimeError as e:\n    print('refused:', e)\n"
            "print(hostmem.applied())")
    r = _run(code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "refused: hostmem.use_heap() must run before the first JAX computation" in r.stdout
    assert r.stdout.split()[-1] == "False"


def test_values_are_read_exactly(capsys):
    for typo in ("HEAP", " heap", "heap ", " "):
        assert not hostmem.from_environment({"JAXREWARD_MALLOC": typo})
        assert capsys.readouterr().err == (f"jaxreward: JAXREWARD_MALLOC={typo!r} is not one of heap, "
                                           "default; using glibc's default allocator\n")
    assert not hostmem.applied()


def test_default_and_unset_leave_the_allocator_alone():
    assert not hostmem.from_environment({})
    assert not hostmem.from_environment({"JAXREWARD_MALLOC": "default"})
    assert not hostmem.from_environment({"JAXREWARD_MALLOC": ""})
    assert not hostmem.applied()
