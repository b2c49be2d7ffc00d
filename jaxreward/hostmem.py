"""Host allocator settings that keep XLA on CPU from re-faulting its memory every step.

XLA's CPU client allocates each execution's temporary buffer with
`posix_memalign`: one block per run of a jitted function, 2.6 GB for a
six-block SmolLM2 DPO step at length 256 and 128 MB for the 4.5M-param
Llama's. glibc serves blocks that large with `mmap` and gives them back with
`munmap` when the step ends (always from the worker threads' arenas,
whatever `M_MMAP_THRESHOLD` says). The next step then faults the whole
buffer in again, page by page, zero-filled by the kernel. Measured on the
2-core CPU machine (`strace`, `getrusage`): ~675,000 minor faults and 2.5 s
of kernel time per six-block step, with some steps at 14 s when the
hypervisor was slow to back the pages; with the settings below, none.

`use_heap()` sets three glibc malloc parameters with `mallopt(3)`: one
arena for all threads (`M_ARENA_MAX`), no `mmap` (`M_MMAP_MAX = 0`, so
every block comes from the heap), and no trimming of the heap's top
(`M_TRIM_THRESHOLD` = the largest size_t, so freed blocks stay mapped and
are reused). They must be set before XLA's worker threads first allocate,
that is before the first JAX computation: threads that already have an
arena keep it. The price is memory: the process keeps its heap's
high-water mark, and the heap fragments. On the SmolLM2-135M DPO step at
length 256 (30 blocks, `benchmarks/bench_dpo_step.py`, back to back), the
step took 20.3 s instead of 30.4 s. Peak RSS was 11.7 GiB, as without the
settings (11.9), but an earlier run peaked at 20.4 GiB: how much the heap
fragments depends on the threads' timing. That is too close to a 24 GiB
machine's limit for a default, so they are opt-in: set
`JAXREWARD_MALLOC=heap` for `python -m jaxreward.main` and the benchmarks
(`from_environment()`), or call `use_heap()` first thing in a notebook.

(Until 2026-12-03 this module re-executed the command with the same
settings as `GLIBC_TUNABLES`; `mallopt` needs no second start and works in
a notebook too.)
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys

OPT_IN = "JAXREWARD_MALLOC"   # "heap": use_heap(); "default" or unset: glibc's defaults
MODES = ("heap", "default")

# mallopt(3) parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
SETTINGS = {"M_ARENA_MAX": 1, "M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": -1}
# M_TRIM_THRESHOLD takes an int that glibc converts to size_t: -1 is the
# largest size_t, so the heap's top is never trimmed. (2**31 - 1, the
# largest positive int, would still trim a freed 3 GB block.)

_applied = False


def _glibc() -> bool:
    return sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


# The tunables that set what `use_heap()` sets: a user's own value of one wins.
_TUNABLE_NAMES = ("glibc.malloc.arena_max", "glibc.malloc.mmap_max", "glibc.malloc.trim_threshold",
                  "glibc.malloc.mmap_threshold")


def _own_tunables() -> list[str]:
    """The malloc parameters that this process's `GLIBC_TUNABLES` sets and `use_heap()` would."""
    given = [t.split("=", 1)[0].strip() for t in os.environ.get("GLIBC_TUNABLES", "").split(":")]
    return [name for name in _TUNABLE_NAMES if name in given]


def _jax_backends_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):   # a JAX without this private helper: cannot tell
        return False


def use_heap() -> bool:
    """Sets glibc's malloc to one arena, no `mmap` and no trimming (`SETTINGS`).

    Call it before the first JAX computation in the process (importing jax
    is fine). Returns True when the settings are in force, False (with a
    one-line note on stderr) where they cannot apply: not Linux with glibc,
    or a `GLIBC_TUNABLES` of the user's own that sets the arena count, mmap
    count or threshold, or the trim threshold (theirs win; other tunables
    do not matter). Calling it again is a no-op.

    Raises:
      RuntimeError: when a JAX backend has already started, because its
        worker threads keep the arenas they have and the settings would only
        half apply.
    """
    global _applied
    if _applied:
        return True
    if not _glibc():
        print(f"jaxreward: {OPT_IN}=heap needs Linux with glibc; using the platform's allocator",
              file=sys.stderr)
        return False
    own = _own_tunables()
    if own:
        print(f"jaxreward: GLIBC_TUNABLES sets {', '.join(own)}; keeping them, not {OPT_IN}=heap",
              file=sys.stderr)
        return False
    if _jax_backends_started():
        raise RuntimeError("hostmem.use_heap() must run before the first JAX computation "
                           "(XLA's threads already hold their malloc arenas); call it first "
                           "thing, or restart the kernel")
    libc = ctypes.CDLL(None)
    for number, value in ((_M_ARENA_MAX, SETTINGS["M_ARENA_MAX"]),
                          (_M_MMAP_MAX, SETTINGS["M_MMAP_MAX"]),
                          (_M_TRIM_THRESHOLD, SETTINGS["M_TRIM_THRESHOLD"])):
        if libc.mallopt(ctypes.c_int(number), ctypes.c_int(value)) != 1:
            raise RuntimeError(f"mallopt({number}, {value}) failed")
    _applied = True
    return True


def applied() -> bool:
    """Whether `use_heap()` has set its parameters in this process."""
    return _applied


def from_environment(environ=None) -> bool:
    """Applies `JAXREWARD_MALLOC`: "heap" calls `use_heap()`; "default" or unset leaves glibc's defaults.

    Any other value (also "HEAP" or " heap") is a typo: one line on stderr
    names it and the allowed values, and the defaults stay. Returns whether the heap
    settings are in force.
    """
    env = os.environ if environ is None else environ
    mode = env.get(OPT_IN, "")
    if mode in ("", "default"):
        return False
    if mode != "heap":
        print(f"jaxreward: {OPT_IN}={mode!r} is not one of {', '.join(MODES)}; "
              "using glibc's default allocator", file=sys.stderr)
        return False
    return use_heap()


def describe() -> str:
    """One line for logs and benchmark tables: which allocator settings this process runs."""
    if _applied:
        return "mallopt " + " ".join(f"{k}={v}" for k, v in SETTINGS.items())
    if _own_tunables():
        return f"GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}"
    return "glibc defaults" if _glibc() else "platform defaults"
