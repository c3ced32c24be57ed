"""The figures ``qlora bench`` reports and how it prints them: one :class:`Cell` per (shape,
batch, method), the :class:`Report` of a run, its header, its tables and its JSON encoding."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .methods import COLD_CACHE_FACTOR, COLD_MEM_SHARE

__all__ = ["Cell", "Report", "json_default", "print_cells", "print_header"]


@dataclass
class Cell:
    shape: str
    batch: int
    method: str
    median_ms: float | None
    best_ms: float | None
    gflops: float | None
    weight_gbs: float | None
    vs_numpy: float | None
    rel_diff: float | None
    reps: int
    note: str = ""
    copies: int = 1  # weight copies the calls cycled through (--cold), 1 when hot


@dataclass
class Report:
    meta: dict = field(default_factory=dict)
    forward: list[Cell] = field(default_factory=list)
    quantize: list[dict] = field(default_factory=list)
    overhead: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def print_header(report: Report, out) -> None:
    m = report.meta
    print(f"qlora {m['qlora_version']} bench  ({m['date']})", file=out)
    print(f"cpu      {m['cpu']}  ({m['cpus_affinity']} CPUs usable)", file=out)
    print(f"python   {m['python']}  numpy {m['numpy']}  torch {m['torch'] or '-'}  "
          f"bitsandbytes {m['bitsandbytes'] or '-'}", file=out)
    print(f"isa      active {m['active_isa']}; compiled {', '.join(m['compiled_isas'])}; "
          f"available {', '.join(m['available_isas'])}", file=out)
    print(f"threads  {m['threads']} for every method ({', '.join(m['thread_controls'])})",
          file=out)
    if m["threadpools"]:
        for d in m["threadpools"]:
            extra = "".join(f" {k}={d[k]}" for k in ("threading_layer", "architecture") if d.get(k))
            print(f"  pool   {d.get('user_api')}: {d.get('internal_api')} "
                  f"{d.get('version') or ''} ({d.get('prefix')}) threads={d.get('num_threads')}"
                  f"{extra}", file=out)
    else:
        print("  pool   threadpoolctl not installed: NumPy's BLAS threads NOT limited; "
              "pip install threadpoolctl", file=out)
    if m["cold"]:
        cap = m["cold_mem_cap_bytes"]
        print(f"mode     COLD: each method gets K copies of its weight, K the fewest whose bytes "
              f"exceed {COLD_CACHE_FACTOR}x the last-level cache, and call i uses copy i % K, so "
              f"each call reads its weight from DRAM; LLC {m['llc_bytes'] / 2**20:.0f} MiB "
              f"({m['llc_source']}); copies capped at "
              + (f"{cap / 2**30:.1f} GiB ({100 * COLD_MEM_SHARE:.0f}% of MemTotal)" if cap
                 else "nothing (MemTotal unknown)")
              + "; K per method is printed with each shape", file=out)
    else:
        print(f"mode     HOT: one weight per method timed in a loop, so a weight smaller than the "
              f"last-level cache ({m['llc_bytes'] / 2**20:.0f} MiB) is read from cache; "
              f"--cold streams weights from DRAM as a model's layers do", file=out)
    print(f"timing   median of >= {m['min_reps']} calls and >= {m['min_time']} s per cell after a "
          f"{m['settle']} s pause (other libraries' spinning threads) and one warm-up call; "
          f"scalar-kernel cells predicted over {m['max_call_seconds']} s per call are skipped",
          file=out)


def _fmt(v: float | None, spec: str) -> str:
    if v is None:
        width = int(spec.split(".")[0] or 0)
        return "-".rjust(width)
    return format(v, spec)


def print_cells(cells: list[Cell], out, cold: bool) -> None:
    k_head = f" {'K':>4}" if cold else ""
    print(f"{'batch':>5}  {'method':<22} {'median ms':>10} {'best ms':>9} {'GFLOP/s':>9} "
          f"{'wt GB/s':>8} {'vs numpy':>8} {'rel.diff':>8} {'reps':>4}{k_head}  note", file=out)
    for c in cells:
        ratio = "-" if c.vs_numpy is None else f"{c.vs_numpy:.2f}x"
        k = f" {c.copies:>4}" if cold else ""
        print(f"{c.batch:>5}  {c.method:<22} {_fmt(c.median_ms, '10.3f')} "
              f"{_fmt(c.best_ms, '9.3f')} {_fmt(c.gflops, '9.1f')} {_fmt(c.weight_gbs, '8.2f')} "
              f"{ratio:>8} "
              f"{_fmt(c.rel_diff, '8.1e')} {c.reps:>4}{k}  {c.note}", file=out)


def json_default(v: object) -> object:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return str(v)
