"""This process's memory high-water mark, for the benchmarks' peak-memory columns (Linux ``/proc``; rough elsewhere)."""

from __future__ import annotations

from pathlib import Path


def peak_rss_gb() -> float:
    """This process's peak resident memory in GB: ``VmHWM`` of ``/proc/self/status`` (Linux), the high-water mark of
    this process's own address space. Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux keeps that across ``execve``,
    so a process spawned from a 3 GB parent reports the parent's 3 GB (measured: every row read 3.00 GB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB -> GB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # elsewhere (macOS: bytes; rough)


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current resident memory (Linux >= 4.0: ``5`` written to
    ``/proc/self/clear_refs``), so that :func:`peak_rss_gb` then measures one step. Returns whether it was reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
