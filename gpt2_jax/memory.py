"""Fitting work into memory: what is free, how many rows of a compiled call fit, what an OOM error is.

XLA states what a compiled function will allocate (``memory_analysis``) before it runs, so a batch
too large is split before it starts instead of failing halfway. On CPU this also keeps the process
from asking for memory the kernel would grant but cannot back (overcommit): that ends in the OOM
killer, not in an error anyone can catch.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any, Callable, Sequence

import jax

DEVICE_SHARE = 0.9  # of an accelerator's free pool: the allocator fragments
HOST_SHARE = 0.5  # of free host memory: it also holds this process's own arrays and other programs'


class OutOfMemory(MemoryError):
    """Even the smallest piece of the work needs more memory than is free."""


def is_out_of_memory(e: BaseException) -> bool:
    """A host ``MemoryError``, or an XLA allocation failure (RESOURCE_EXHAUSTED) on any device."""
    if isinstance(e, MemoryError):
        return True
    if not isinstance(e, jax.errors.JaxRuntimeError):
        return False
    return "RESOURCE_EXHAUSTED" in str(e) or "Out of memory" in str(e)


def size(n: float) -> str:
    """Bytes for people: 38.2 GiB, 512.0 MiB, 900 bytes."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def _host_free_bytes() -> int | None:
    """MemAvailable, or what is left under this container's cgroup limit if that is less (Linux)."""
    try:
        meminfo = pathlib.Path("/proc/meminfo").read_text()
    except OSError:
        return None
    available = [line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable:")]
    free = int(available[0]) * 1024 if available else None
    cgroup = pathlib.Path("/sys/fs/cgroup")
    for limit, usage in (("memory.max", "memory.current"),  # cgroup v2, then v1
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            left = int((cgroup / limit).read_text()) - int((cgroup / usage).read_text())
        except (OSError, ValueError):  # no such file, or "max" (no limit)
            continue
        free = left if free is None else min(free, left)
        break
    return free


def free_bytes(devices: Sequence[jax.Device]) -> int | None:
    """Bytes one call may allocate on EACH of ``devices`` (None: unknown, do not limit); CPU devices
    share the host's memory."""
    if all(d.platform == "cpu" for d in devices):
        free = _host_free_bytes()
        return None if free is None else int(HOST_SHARE * free) // len(devices)
    stats = [d.memory_stats() or {} for d in devices]
    if not all("bytes_limit" in s for s in stats):
        return None
    return int(DEVICE_SHARE * min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats))


def bytes_needed(compiled: Any) -> int:
    """What running ``compiled`` (a ``jax.stages.Compiled``) allocates beyond its inputs, per device."""
    analysis = compiled.memory_analysis()
    if analysis is None:  # a backend that does not say: assume it fits
        return 0
    return analysis.temp_size_in_bytes + analysis.output_size_in_bytes


def rows_that_fit(compile_for: Callable[[int], Any], rows: int, devices: Sequence[jax.Device], *,
                  multiple: int = 1) -> int:
    """Rows per call (at most ``rows``, a multiple of ``multiple``) so each call fits in free memory.

    ``compile_for(n)`` compiles for ``n`` rows (jit caches it for the call that follows). Memory is
    about linear in the rows, so a misfit shrinks along the line through the last two sizes tried;
    the rows are then spread evenly over the calls. ``OutOfMemory`` if even ``multiple`` rows do not fit.
    """
    free = free_bytes(devices)
    n, tried = rows, []
    while free is not None:
        need = bytes_needed(compile_for(n))
        if need <= free:
            break
        if n <= multiple:
            raise OutOfMemory(f"{n} {'row needs' if n == 1 else 'rows need'} {size(need)}, "
                              f"more than the {size(free)} that can be used")
        tried.append((n, need))
        (n1, need1), (n2, need2) = tried[-2:] if len(tried) > 1 else ((0, 0), tried[-1])
        per_row = (need2 - need1) / (n2 - n1)
        guess = n2 - (need2 - free) / per_row if per_row > 0 else n2 * free / need2  # < n2: need2 > free
        n = max(multiple, int(guess) // multiple * multiple)
    calls = math.ceil(rows / n)
    return math.ceil(math.ceil(rows / calls) / multiple) * multiple


def report(e: BaseException, advice: str) -> str:
    """The one line a CLI prints for an out-of-memory error ``e``."""
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"out of memory ({detail}); {advice}"

