"""Machine probes for ``qlora bench``: the last-level cache and memory sizes, the CPU's name, the
thread pools of NumPy's BLAS and OpenMP, and CPU time used by this process and the machine."""

from __future__ import annotations

import os
import platform

__all__ = ["LLC_FALLBACK", "blas_info", "cpu_name", "llc_bytes", "machine_cpu_seconds",
           "mem_total_bytes", "own_cpu_seconds", "parse_size"]

LLC_FALLBACK = 64 * 2**20


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(text.rstrip("KMGB") or 0) * mult


def llc_bytes() -> tuple[int, str]:
    """The size of cpu0's highest cache level and where it came from."""
    root = "/sys/devices/system/cpu/cpu0/cache"
    best: tuple[int, int] | None = None
    try:
        for entry in sorted(os.listdir(root)):
            if not entry.startswith("index"):
                continue
            d = os.path.join(root, entry)
            with open(os.path.join(d, "level"), encoding="utf-8") as f:
                level = int(f.read())
            with open(os.path.join(d, "size"), encoding="utf-8") as f:
                size = parse_size(f.read())
            if size > 0 and (best is None or (level, size) > best):
                best = (level, size)
    except (OSError, ValueError):
        best = None
    if best is None:
        return LLC_FALLBACK, f"fallback: {root} not readable"
    return best[1], f"L{best[0]} of cpu0, {root}"


def mem_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def blas_info() -> list[dict]:
    try:
        from threadpoolctl import threadpool_info  # noqa: PLC0415
    except ImportError:
        return []
    keys = ("user_api", "internal_api", "prefix", "version", "num_threads", "threading_layer",
            "architecture")
    return [{k: d.get(k) for k in keys if k in d} for d in threadpool_info()]


def machine_cpu_seconds() -> float | None:
    """Busy CPU-seconds of the whole machine so far (user+nice+system+irq+softirq+steal)."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            fields = f.readline().split()
        ticks = sum(int(fields[i]) for i in (1, 2, 3, 6, 7, 8))
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
