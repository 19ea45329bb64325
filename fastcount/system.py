"""Probes of the machine and the running process (peak resident memory, CPU flags)."""
from __future__ import annotations

try:
    import resource
except ImportError:  # not on Windows
    resource = None

__all__ = ["reset_peak_rss", "peak_rss_mb", "cpu_flags"]


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory (MiB) since the last reset (process lifetime where reset is unsupported)."""
    line = _proc_line("/proc/self/status", "VmHWM:")
    if line is not None:
        return int(line.split()[1]) / 1024.0
    if resource is None:
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_flags() -> frozenset:
    """The CPU's feature flags as the kernel lists them (Linux; empty elsewhere)."""
    line = _proc_line("/proc/cpuinfo", "flags")
    return frozenset(line.split(":", 1)[1].split()) if line else frozenset()


def _proc_line(path: str, prefix: str) -> str | None:
    """The first line of a /proc file that starts with ``prefix``."""
    try:
        with open(path) as f:
            return next((line for line in f if line.startswith(prefix)), None)
    except OSError:
        return None
