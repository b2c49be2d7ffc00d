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

The settings are glibc tunables (`TUNABLES`): one malloc arena for all
threads, no `mmap` (so every block comes from the heap), and no trimming of
the heap's top (so freed blocks stay mapped and are reused). The price is
memory: the process keeps its heap's high-water mark, and the heap
fragments. On the SmolLM2-135M DPO step at length 256 (30 blocks,
`benchmarks/bench_dpo_step.py`, back to back), the step took 20.3 s
instead of 30.4 s. Peak RSS was 11.7 GiB, as without the tunables (11.9),
but an earlier run with the same settings peaked at 20.4 GiB: how much the
heap fragments depends on the threads' timing. That is too close to a
24 GiB machine's limit for a default, so they are opt-in: set
`JAXREWARD_MALLOC=heap`.

Tunables are read when a process starts, so `reexec_with_tunables()`
re-executes the current command once with `GLIBC_TUNABLES` set, when asked
to (`JAXREWARD_MALLOC=heap`) on Linux with glibc and when `GLIBC_TUNABLES`
is not already set (a user's own settings win).
"""
from __future__ import annotations

import os
import platform
import sys

TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
            "glibc.malloc.trim_threshold=68719476736")
OPT_IN = "JAXREWARD_MALLOC"   # "heap": re-run with TUNABLES
_MARK = "JAXREWARD_MALLOC_REEXEC"


def wanted(environ=None) -> bool:
    """Whether this process asked for `TUNABLES` and does not run with them yet."""
    env = os.environ if environ is None else environ
    if env.get(OPT_IN) != "heap":
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    return "GLIBC_TUNABLES" not in env and _MARK not in env


def reexec_with_tunables() -> None:
    """Re-runs this exact command with `GLIBC_TUNABLES=TUNABLES` when `wanted()`.

    Call it first thing in an entry point, before any work: the process is
    replaced (same interpreter, same arguments, same environment plus the
    tunables), so nothing done before the call survives. Returns normally
    when no re-execution is wanted.
    """
    if not wanted():
        return
    env = dict(os.environ, GLIBC_TUNABLES=TUNABLES, **{_MARK: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
