"""``qlora bench``: qlora's forward beside NumPy, torch and bitsandbytes on the same inputs.

Every method of one cell (shape, batch) gets the same float32 input and the same thread count:
``qlora.set_num_threads(T)``, threadpoolctl limits NumPy's BLAS and any OpenMP runtime to T, and
``torch.set_num_threads(T)``. Timing is the median of repeated calls after a warm-up, with a
minimum number of calls and a minimum time per cell; a scalar-kernel call predicted (from the
previous batch) to take longer than ``--max-call-seconds`` is skipped and says so. Nothing here
asserts a speed.

By default ("hot") each method times one weight in a loop, so a weight smaller than the
last-level cache is read from cache. ``--cold`` gives every method K independent copies of its
weight, K chosen so the copies exceed twice the last-level cache, and call i uses copy i % K:
each call then streams its weight from DRAM, as the layers of a real model do.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from . import _core
from ._cli_args import parse_shape
from ._layer import QLoraLinear
from ._runtime import get_num_threads, set_num_threads

__all__ = ["register", "run", "main"]

DEFAULT_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]
DEFAULT_BATCHES = [1, 8, 32, 128, 512]
QUICK_SHAPES = [(1024, 1024)]
QUICK_BATCHES = [1, 8]
GROUP_SIZE = 64  # bitsandbytes' default blocksize, so both store the same bytes per weight


def _batch_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch must look like 1,8,32, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return values


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time forward, quantize and dequantize beside NumPy / torch / bitsandbytes",
        description="Time qlora's fused forward (active ISA and forced scalar) beside NumPy fp32 "
        "x @ W.T, torch fp32/bf16 F.linear and bitsandbytes' CPU matmul_4bit when installed, on "
        "the same inputs and thread count; then quantize/dequantize throughput and the calling "
        "overhead of a 64x64 layer. Prints a table; --json writes the same figures.",
    )
    p.add_argument("--shape", type=parse_shape, action="append", metavar="OUTxIN",
                   help="weight shape, repeatable (default 4096x4096 11008x4096 4096x11008 "
                   "14336x4096)")
    p.add_argument("--batch", type=_batch_list, action="append", metavar="B[,B...]",
                   help="batch sizes, comma-separated or repeated (default 1,8,32,128,512)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for every method (default qlora.get_num_threads())")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke preset: one 1024x1024 shape, batches 1,8, short timing")
    p.add_argument("--min-reps", type=int, default=None, help="calls per cell at least (default 5)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds per cell at least, once min-reps are done (default 0.2)")
    p.add_argument("--max-call-seconds", type=float, default=None,
                   help="skip a scalar-kernel cell whose single call is predicted to exceed "
                   "this (default 1)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of: " + ", ".join(_METHOD_NAMES))
    p.add_argument("--cold", action="store_true",
                   help="give every method enough copies of its weight to exceed 2x the "
                   "last-level cache and cycle through them, so each call reads its weight "
                   "from DRAM (default: one weight per method, timed hot)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------- timing
@dataclass
class Budget:
    min_reps: int = 3
    min_time: float = 0.25
    max_cell_time: float = 1.5  # stop repeating a slow cell after this, even below min_reps
    max_call_seconds: float = 1.0
    floor_reps: int = 2  # timed calls a cell always gets, whatever its budget
    warmup: bool = True
    # Pause before each method's warm-up. OpenBLAS' pthreads and libgomp's workers spin for tens
    # of milliseconds after a call; on a machine with as many threads as cores, the next library
    # then competes with them and a batch-8 call measured 5-30x slower (0.19 ms alone, 5.8 ms
    # 1 ms after NumPy, back to normal after ~0.1 s of idling). qlora's pool sleeps at once.
    settle: float = 0.1


def _measure(fn: Callable[[], object], budget: Budget) -> tuple[list[float], object]:
    """Warm up once, then time calls until min_reps and min_time are both met (or the cell
    budget runs out, keeping at least 2 timed calls). Returns the call times and the last result."""
    time.sleep(budget.settle)
    result = fn() if budget.warmup else None
    times: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        if len(times) >= budget.min_reps and elapsed >= budget.min_time:
            break
        if elapsed >= budget.max_cell_time and len(times) >= budget.floor_reps:
            break
    return times, result


def _per_call(fn: Callable[[], object], target: float = 0.05,
              rounds: int = 7) -> tuple[float, float]:
    """Median (wall, thread-CPU) seconds per call of a very fast function, over `rounds` loops
    of ~target s. Thread-CPU time does not count time the thread spent descheduled, so it is
    the steadier figure on a shared machine; wall time is what a caller waits."""
    fn()
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt >= target / 4:
            break
        n *= 4
    n = max(1, int(n * target / max(dt, 1e-9)))
    wall, cpu = [], []
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(n):
            fn()
        cpu.append((time.thread_time() - c0) / n)
        wall.append((time.perf_counter() - t0) / n)
    return statistics.median(wall), statistics.median(cpu)


# ---------------------------------------------------------------------------- methods
@dataclass
class Method:
    """One way of computing y = x @ W.T for a shape; `prepare(batch)` returns a no-argument
    callable that runs one forward on that batch's input and returns a NumPy float32 result."""

    name: str
    weight_bytes: int
    prepare: Callable[[int], Callable[[], np.ndarray]]
    note: str = ""
    # Skipped at a batch whose call is predicted over --max-call-seconds. Only the scalar
    # kernel: a baseline's cost is not linear in the batch (bitsandbytes' generic path
    # dequantizes all of W first), so predicting it would skip baselines on a noisy reading.
    may_skip: bool = False
    # Makes an independent copy of the weight and returns that copy's `prepare` (for --cold).
    replicate: Callable[[], Callable[[int], Callable[[], np.ndarray]]] | None = None
    copies: list[Callable[[int], Callable[[], np.ndarray]]] = field(default_factory=list)

    def prepare_cycle(self, batch: int) -> Callable[[], np.ndarray]:
        """One forward per call on this batch's input, call i on weight copy i % K."""
        if len(self.copies) <= 1:
            return self.prepare(batch)
        fns = [p(batch) for p in self.copies]
        k = len(fns)
        # The warm-up call takes copy 0, so the first timed call already reads a copy that
        # more than a cache's worth of other copies were written after.
        counter = itertools.count()
        return lambda: fns[next(counter) % k]()


_METHOD_NAMES = ["qlora", "qlora-scalar", "numpy", "torch-fp32", "torch-bf16", "bnb-fp32",
                 "bnb-fused"]


@dataclass
class Optional_:
    torch: object = None
    bnb: object = None
    torch_reason: str = ""
    bnb_reason: str = ""
    bnb_fused_reason: str = ""


def _import_optional() -> Optional_:
    opt = Optional_()
    try:
        import torch  # noqa: PLC0415

        opt.torch = torch
    except ImportError as exc:
        opt.torch_reason = f"torch not installed ({exc})"
        opt.bnb_reason = "bitsandbytes needs torch"
        return opt
    # bitsandbytes logs warnings at import about optional GPU / hub kernels; they are not ours.
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes  # noqa: PLC0415
            import bitsandbytes.functional  # noqa: PLC0415

        opt.bnb = bitsandbytes
        if not hasattr(bitsandbytes.functional, "_convert_weight_packed_for_cpu"):
            opt.bnb_fused_reason = "this bitsandbytes has no CPU packed-weight fused kernel"
        elif not bitsandbytes.functional.has_avx512bf16():
            opt.bnb_fused_reason = "bitsandbytes' fused CPU kernel needs AVX512-BF16"
    except Exception as exc:  # any import failure of an optional comparison
        opt.bnb_reason = f"bitsandbytes not usable ({type(exc).__name__}: {exc})"
    finally:
        logger.setLevel(level)
    return opt


def _qlora_prepare(layer: QLoraLinear, xs: dict[int, np.ndarray],
                   isa: str | None) -> Callable[[int], Callable[[], np.ndarray]]:
    def prepare(batch: int) -> Callable[[], np.ndarray]:
        x = xs[batch]
        if isa is None:
            return lambda: layer.forward(x)

        def call() -> np.ndarray:
            previous = _core.active_isa()
            _core.set_isa(isa)
            try:
                return layer.forward(x)
            finally:
                _core.set_isa(previous)

        return call

    return prepare


def _qlora_method(name: str, layer: QLoraLinear, xs: dict[int, np.ndarray], isa: str | None,
                  nf4_bytes: int, note: str = "") -> Method:
    slow = (isa or _core.active_isa()) == "scalar"
    return Method(name, nf4_bytes, _qlora_prepare(layer, xs, isa), note, may_skip=slow,
                  replicate=lambda: _qlora_prepare(copy.deepcopy(layer), xs, isa))


def _build_methods(w: np.ndarray, layer: QLoraLinear, xs: dict[int, np.ndarray], opt: Optional_,
                   wanted: list[str], notes: dict[str, str],
                   bnb_q: tuple | None = None) -> list[Method]:
    """The methods to time for weight `w`; `bnb_q` is bitsandbytes' (codes, QuantState) of `w`
    when already quantized (the fused path converts a deep copy)."""
    out_f, in_f = w.shape
    nf4_bytes = 4 * out_f * in_f - layer.memory_saved_bytes()
    active = _core.active_isa()
    methods: list[Method] = []
    if "qlora" in wanted:
        methods.append(_qlora_method(f"qlora[{active}]", layer, xs, None, nf4_bytes))
    if "qlora-scalar" in wanted and active != "scalar":
        methods.append(_qlora_method("qlora[scalar]", layer, xs, "scalar", nf4_bytes))
    if "numpy" in wanted:
        def numpy_prep(wc: np.ndarray) -> Callable[[int], Callable[[], np.ndarray]]:
            return lambda b: (lambda x=xs[b]: x @ wc.T)

        methods.append(Method("numpy fp32", 4 * w.size, numpy_prep(w),
                              replicate=lambda: numpy_prep(w.copy())))

    torch = opt.torch
    if torch is not None and ("torch-fp32" in wanted or "torch-bf16" in wanted):
        import torch.nn.functional as F  # noqa: PLC0415

        wt = torch.from_numpy(w)
        if "torch-fp32" in wanted:
            def prep32(wc) -> Callable[[int], Callable[[], np.ndarray]]:
                def prep(b: int) -> Callable[[], np.ndarray]:
                    xt = torch.from_numpy(xs[b])
                    return lambda: F.linear(xt, wc).numpy()

                return prep

            methods.append(Method("torch fp32", 4 * w.size, prep32(wt),
                                  replicate=lambda: prep32(wt.clone())))
        if "torch-bf16" in wanted:
            wb = wt.to(torch.bfloat16)

            def prep16(wc) -> Callable[[int], Callable[[], np.ndarray]]:
                def prep(b: int) -> Callable[[], np.ndarray]:
                    xb = torch.from_numpy(xs[b]).to(torch.bfloat16)
                    return lambda: F.linear(xb, wc)

                return prep

            methods.append(Method("torch bf16", 2 * w.size, prep16(wb),
                                  "input pre-converted to bf16, output left in bf16",
                                  replicate=lambda: prep16(wb.clone())))

    bnb = opt.bnb
    if bnb is not None and ("bnb-fp32" in wanted or "bnb-fused" in wanted):
        if bnb_q is None:
            bnb_q = bnb.functional.quantize_4bit(torch.from_numpy(w), blocksize=GROUP_SIZE,
                                                 quant_type="nf4", compress_statistics=False)
        if "bnb-fp32" in wanted:
            qw, state = bnb_q
            bytes_ = qw.numel() * qw.element_size() + state.absmax.numel() * 4

            def prep_b32(q: tuple) -> Callable[[int], Callable[[], np.ndarray]]:
                qw, state = q

                def prep(b: int) -> Callable[[], np.ndarray]:
                    xt = torch.from_numpy(xs[b])
                    return lambda: bnb.matmul_4bit(xt, qw.t(), state).numpy()

                return prep

            methods.append(Method("bnb matmul_4bit fp32", bytes_, prep_b32(bnb_q),
                                  replicate=lambda: prep_b32(copy.deepcopy(bnb_q))))
        if "bnb-fused" in wanted:
            reason = opt.bnb_fused_reason or (
                "" if out_f % 32 == 0 and in_f % 2 == 0
                else f"bitsandbytes' fused CPU kernel needs out % 32 == 0, got {out_f}x{in_f}")
            if reason:
                notes.setdefault("bnb fused (bf16)", reason)
            else:
                # The conversion rewrites the QuantState in place: give it a copy.
                qw, state = copy.deepcopy(bnb_q)
                packed, pstate = bnb.functional._convert_weight_packed_for_cpu(qw, state)
                bytes_ = packed.numel() + state.absmax.numel() * 2

                def prep_fused(fq: tuple) -> Callable[[int], Callable[[], np.ndarray]]:
                    packed, pstate = fq

                    def prep(b: int) -> Callable[[], np.ndarray]:
                        xb = torch.from_numpy(xs[b]).to(torch.bfloat16)
                        return lambda: bnb.matmul_4bit(xb, packed.t(), pstate)

                    return prep

                fused = (packed, pstate)
                methods.append(Method("bnb fused (bf16)", bytes_, prep_fused(fused),
                                      "gemv_4bit CPU kernel, bf16 activations and absmax",
                                      replicate=lambda: prep_fused(copy.deepcopy(fused))))
    return methods


# ---------------------------------------------------------------------------- --cold
LLC_FALLBACK = 64 * 2**20
COLD_CACHE_FACTOR = 2  # copies of a method together exceed this many last-level caches
COLD_MEM_SHARE = 0.4  # of MemTotal, for the copies of all methods of one shape together
# A tiny weight would need ~10^5 copies; each is a Python object and a setup step, and its call
# is dominated by fixed cost anyway, so there "cold" stops short of the cache target.
COLD_MAX_COPIES = 4096


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(text.rstrip("KMGB") or 0) * mult


def _llc_bytes() -> tuple[int, str]:
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
                size = _parse_size(f.read())
            if size > 0 and (best is None or (level, size) > best):
                best = (level, size)
    except (OSError, ValueError):
        best = None
    if best is None:
        return LLC_FALLBACK, f"fallback: {root} not readable"
    return best[1], f"L{best[0]} of cpu0, {root}"


def _mem_total_bytes() -> int | None:
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


@dataclass
class ColdPlan:
    llc_bytes: int
    llc_source: str
    mem_cap_bytes: int | None


def _plan_copies(methods: list[Method], plan: ColdPlan) -> tuple[dict[str, int], str]:
    """K per method (the fewest copies whose bytes exceed COLD_CACHE_FACTOR x LLC), lowered in
    proportion when all methods' copies together would exceed the memory cap; and a note."""
    target = COLD_CACHE_FACTOR * plan.llc_bytes
    ks = {m.name: target // max(m.weight_bytes, 1) + 1 for m in methods}
    notes = []
    if max(ks.values()) > COLD_MAX_COPIES:
        ks = {name: min(k, COLD_MAX_COPIES) for name, k in ks.items()}
        notes.append(f"K capped at {COLD_MAX_COPIES} copies: the smaller weights' copies stay "
                     f"under {target / 2**20:.0f} MiB and are partly timed from cache")
    total = sum(ks[m.name] * m.weight_bytes for m in methods)
    if plan.mem_cap_bytes is not None and total > plan.mem_cap_bytes:
        scale = plan.mem_cap_bytes / total
        ks = {name: max(1, int(k * scale)) for name, k in ks.items()}
        lowered = sum(ks[m.name] * m.weight_bytes for m in methods)
        notes.append(f"K lowered: the copies would take {total / 2**30:.1f} GiB, over "
                     f"{100 * COLD_MEM_SHARE:.0f}% of MemTotal "
                     f"({plan.mem_cap_bytes / 2**30:.1f} GiB); now {lowered / 2**30:.1f} GiB, "
                     f"so methods whose copies stay under {target / 2**20:.0f} MiB are partly "
                     f"timed from cache")
    return ks, "; ".join(notes)


def _to_f64(y: object) -> np.ndarray:
    if not isinstance(y, np.ndarray):  # a torch tensor (bf16 included)
        y = y.float().numpy()
    return np.asarray(y, dtype=np.float64)


# ---------------------------------------------------------------------------- runs
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


def _blas_info() -> list[dict]:
    try:
        from threadpoolctl import threadpool_info  # noqa: PLC0415
    except ImportError:
        return []
    keys = ("user_api", "internal_api", "prefix", "version", "num_threads", "threading_layer",
            "architecture")
    return [{k: d.get(k) for k in keys if k in d} for d in threadpool_info()]


def _header(report: Report, out) -> None:
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


def _print_cells(cells: list[Cell], out, cold: bool) -> None:
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


def _bench_shape(out_f: int, in_f: int, batches: list[int], args: argparse.Namespace,
                 budget: Budget, opt: Optional_, wanted: list[str], report: Report,
                 rng: np.random.Generator, out, cold: ColdPlan | None = None) -> None:
    shape = f"{out_f}x{in_f}"
    w = rng.normal(0.0, 0.02, size=(out_f, in_f)).astype(np.float32)

    # Quantize: from_weight as users call it (validation, LoRA init and all).
    # Every quantize call allocates fresh outputs, so a warm-up buys nothing; a slow one
    # (seconds at these shapes for a scalar or Python quantizer) is timed once.
    q_budget = Budget(min_reps=budget.min_reps, min_time=budget.min_time,
                      max_cell_time=budget.max_cell_time, settle=budget.settle, floor_reps=1,
                      warmup=False)
    times, layer = _measure(
        lambda: QLoraLinear.from_weight(w, rank=args.rank, alpha=2.0 * args.rank,
                                        group_size=GROUP_SIZE, seed=args.seed), q_budget)
    layer.set_lora_b(rng.normal(0.0, 0.01, size=(out_f, args.rank)).astype(np.float32))
    fp32_gb = w.nbytes / 1e9
    med = statistics.median(times)
    report.quantize.append({"shape": shape, "op": f"qlora from_weight [{_core.active_isa()}]",
                            "median_ms": med * 1e3, "fp32_gbs": fp32_gb / med,
                            "reps": len(times)})
    deq_out = np.empty_like(w)
    times, _ = _measure(lambda: layer.dequantize_weight(out=deq_out), budget)
    med = statistics.median(times)
    report.quantize.append({"shape": shape, "op": f"qlora dequantize [{_core.active_isa()}]",
                            "median_ms": med * 1e3, "fp32_gbs": fp32_gb / med,
                            "reps": len(times)})
    bnb_q = None
    if opt.bnb is not None and ("bnb-fp32" in wanted or "bnb-fused" in wanted):
        torch, bnb = opt.torch, opt.bnb
        wt = torch.from_numpy(w)
        times, (qw, st) = _measure(lambda: bnb.functional.quantize_4bit(
            wt, blocksize=GROUP_SIZE, quant_type="nf4", compress_statistics=False), q_budget)
        med = statistics.median(times)
        report.quantize.append({"shape": shape, "op": "bnb quantize_4bit nf4",
                                "median_ms": med * 1e3, "fp32_gbs": fp32_gb / med,
                                "reps": len(times)})
        times, _ = _measure(lambda: bnb.functional.dequantize_4bit(qw, st), budget)
        med = statistics.median(times)
        report.quantize.append({"shape": shape, "op": "bnb dequantize_4bit nf4 (fp32)",
                                "median_ms": med * 1e3, "fp32_gbs": fp32_gb / med,
                                "reps": len(times)})
        bnb_q = (qw, st)
        del wt

    xs = {b: rng.standard_normal((b, in_f)).astype(np.float32) for b in batches}
    notes: dict[str, str] = {}
    methods = _build_methods(w, layer, xs, opt, wanted, notes, bnb_q)
    nf4_bytes = 4 * w.size - layer.memory_saved_bytes()
    mode = "COLD (weights from DRAM)" if cold else "HOT (one weight per method, looped)"
    print(f"\n== forward {shape} (out x in), rank {args.rank}, group {GROUP_SIZE}, {mode}: fp32 "
          f"weight {w.nbytes / 2**20:.1f} MiB, nf4 {nf4_bytes / 2**20:.1f} MiB", file=out)
    for name, why in notes.items():
        print(f"   {name}: not run: {why}", file=out)
    if cold is not None:
        ks, k_note = _plan_copies(methods, cold)
        for m in methods:
            m.copies = [m.prepare] + [m.replicate() for _ in range(ks[m.name] - 1)]
        print("   cold: K copies per method: " + ", ".join(
            f"{m.name} {ks[m.name]} ({ks[m.name] * m.weight_bytes / 2**20:.0f} MiB)"
            for m in methods), file=out)
        if k_note:
            print(f"   cold: {k_note}", file=out)
    last: dict[str, tuple[int, float]] = {}
    cells: list[Cell] = []
    for b in batches:
        flops = 2.0 * b * out_f * in_f
        row: list[Cell] = []
        ys: dict[str, np.ndarray] = {}
        reference = None
        numpy_ms = None
        for m in methods:
            prev = last.get(m.name)
            if prev is not None and m.may_skip:
                predicted = prev[1] * b / prev[0]
                if predicted > budget.max_call_seconds:
                    row.append(Cell(shape, b, m.name, None, None, None, None, None, None, 0,
                                    f"skipped: ~{predicted:.1f} s/call predicted "
                                    f"(--max-call-seconds {budget.max_call_seconds:g})",
                                    copies=max(1, len(m.copies))))
                    continue
            fn = m.prepare_cycle(b)
            times, y = _measure(fn, budget)
            med = statistics.median(times)
            last[m.name] = (b, med)
            y64 = _to_f64(y)
            if m.name == "numpy fp32":
                reference, numpy_ms = y64, med * 1e3
            note = m.note
            if len(times) < budget.min_reps:
                note = (note + "; " if note else "") + f"slow: only {len(times)} timed calls"
            row.append(Cell(shape, b, m.name, med * 1e3, min(times) * 1e3, flops / med / 1e9,
                            m.weight_bytes / med / 1e9, None, None, len(times), note,
                            copies=max(1, len(m.copies))))
            ys[m.name] = y64
        for c in row:
            y64 = ys.get(c.method)
            if y64 is not None:
                if reference is not None:
                    c.rel_diff = float(np.linalg.norm(y64 - reference) /
                                       max(np.linalg.norm(reference), 1e-30))
            if numpy_ms is not None and c.median_ms is not None:
                c.vs_numpy = numpy_ms / c.median_ms
        cells.extend(row)
    _print_cells(cells, out, cold is not None)
    report.forward.extend(cells)


def _overhead(report: Report, out) -> None:
    rng = np.random.default_rng(1)

    def small_layer(o: int, i: int, r: int) -> QLoraLinear:
        layer = QLoraLinear.from_weight(rng.normal(0, 0.1, (o, i)).astype(np.float32), rank=r)
        layer.set_lora_b(rng.normal(0, 0.1, (o, r)).astype(np.float32))
        return layer

    layer, tiny = small_layer(64, 64, 16), small_layer(1, 1, 1)
    x, x1 = rng.standard_normal((1, 64)).astype(np.float32), np.ones((1, 1), np.float32)
    y, y1 = np.empty((1, 64), np.float32), np.empty((1, 1), np.float32)
    t, lora = layer._tensor, layer._lora
    t1, lora1 = tiny._tensor, tiny._lora
    figures = {
        "64x64 layer.forward(x)": _per_call(lambda: layer.forward(x)),
        "64x64 layer.forward(x, out=y)": _per_call(lambda: layer.forward(x, out=y)),
        "64x64 _core.forward direct": _per_call(
            lambda: _core.forward(t, x, lora.a, lora.b, lora.scaling, None, y)),
        "1x1 layer.forward(x)": _per_call(lambda: tiny.forward(x1)),
        "1x1 _core.forward direct": _per_call(
            lambda: _core.forward(t1, x1, lora1.a, lora1.b, lora1.scaling, None, y1)),
        "np.empty((1, 64), float32)": _per_call(lambda: np.empty((1, 64), np.float32)),
    }
    report.overhead = {"shape": "64x64", "batch": 1, "rank": 16, "target_us": 3.0,
                       "isa": _core.active_isa(),
                       "us_per_call_wall": {k: v[0] * 1e6 for k, v in figures.items()},
                       "us_per_call_thread_cpu": {k: v[1] * 1e6 for k, v in figures.items()}}
    main_us = figures["64x64 layer.forward(x)"][0] * 1e6
    verdict = "within" if main_us <= 3.0 else "ABOVE"
    print(f"\n== calling overhead: batch 1, rank 16 (1x1: rank 1), isa {_core.active_isa()} "
          f"(target: 64x64 layer.forward <= 3 us)", file=out)
    print(f"   {'call':<32} {'wall us':>8} {'cpu us':>8}", file=out)
    for k, (wall, cpu) in figures.items():
        print(f"   {k:<32} {wall * 1e6:8.2f} {cpu * 1e6:8.2f}", file=out)
    fixed = figures["1x1 layer.forward(x)"][1]
    kernel = figures["64x64 _core.forward direct"][1] - figures["1x1 _core.forward direct"][1]
    print(f"   64x64 layer.forward(x) is {verdict} the 3 us target; of its thread-CPU time, "
          f"~{kernel * 1e6:.2f} us is the 64x64 kernel work and ~{fixed * 1e6:.2f} us the fixed "
          f"cost of a call (the 1x1 layer)", file=out)


def run(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    shapes = args.shape or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    batches = sorted({b for group in args.batch for b in group}) if args.batch else (
        QUICK_BATCHES if args.quick else DEFAULT_BATCHES)
    if args.rank < 1:
        raise ValueError(f"--rank must be >= 1, got {args.rank}")
    for o, i in shapes:
        if args.rank > min(o, i):
            raise ValueError(f"--rank must be <= min(out, in) = {min(o, i)} for shape {o}x{i}, "
                             f"got {args.rank}")
    wanted = _METHOD_NAMES if args.methods is None else [
        s.strip() for s in args.methods.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(_METHOD_NAMES))
    if unknown:
        raise ValueError(f"--methods must name some of {', '.join(_METHOD_NAMES)}, got "
                         f"{', '.join(unknown)}")
    if "numpy" not in wanted:
        wanted = [*wanted, "numpy"]  # the reference of every ratio and rel.diff
    budget = Budget()
    if args.quick:
        budget = Budget(min_reps=3, min_time=0.05, max_cell_time=1.0, max_call_seconds=1.0)
    if args.min_reps is not None:
        budget.min_reps = max(1, args.min_reps)
    if args.min_time is not None:
        budget.min_time = max(0.0, args.min_time)
    if args.max_call_seconds is not None:
        budget.max_call_seconds = args.max_call_seconds

    threads = get_num_threads() if args.threads is None else args.threads
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    opt = _import_optional()  # before threadpoolctl looks, so torch's OpenMP is seen and limited
    set_num_threads(threads)
    if opt.torch is not None:
        opt.torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits  # noqa: PLC0415

        limiter = threadpool_limits(limits=threads)
    except ImportError:
        limiter = None

    llc, llc_source = _llc_bytes()
    mem_total = _mem_total_bytes()
    cold = ColdPlan(llc, llc_source, None if mem_total is None
                    else int(COLD_MEM_SHARE * mem_total)) if args.cold else None
    report = Report()
    report.meta = {
        "qlora_version": _core.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "cpu": _cpu_name(),
        "cpus_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": getattr(opt.torch, "__version__", None),
        "bitsandbytes": getattr(opt.bnb, "__version__", None),
        "active_isa": _core.active_isa(),
        "compiled_isas": list(_core.compiled_isas()),
        "available_isas": list(_core.available_isas()),
        "threads": threads,
        "thread_controls": ["qlora.set_num_threads"]
        + (["threadpoolctl.threadpool_limits"] if limiter is not None else [])
        + (["torch.set_num_threads"] if opt.torch is not None else []),
        "threadpools": _blas_info(),
        "rank": args.rank,
        "group_size": GROUP_SIZE,
        "min_reps": budget.min_reps,
        "min_time": budget.min_time,
        "max_call_seconds": budget.max_call_seconds,
        "settle": budget.settle,
        "cold": bool(args.cold),
        "llc_bytes": llc,
        "llc_source": llc_source,
        "cold_cache_factor": COLD_CACHE_FACTOR if args.cold else None,
        "cold_mem_cap_bytes": None if cold is None else cold.mem_cap_bytes,
        "argv": sys.argv,
    }
    for reason in (opt.torch_reason, opt.bnb_reason):
        if reason:
            report.notes.append(reason)
    if _core.active_isa() == "scalar" and "qlora-scalar" in wanted:
        report.notes.append("the active ISA is scalar, so qlora[scalar] is the qlora row "
                            "(measured once)")
    report.notes.append("best ms = fastest timed call (less sensitive to other processes than "
                        "the median); GFLOP/s counts 2*batch*out*in (the LoRA term's work is "
                        "not counted); "
                        "wt GB/s = weight bytes stored by that method / median time; "
                        "vs numpy = numpy ms / method ms (>1 faster); rel.diff = "
                        "||y - y_numpy|| / ||y_numpy|| (NF4 rounding gives ~0.1)")
    _header(report, out)
    for n in report.notes:
        print(f"note     {n}", file=out)

    t_start = time.perf_counter()
    machine0, own0 = _machine_cpu_seconds(), _own_cpu_seconds()
    rng = np.random.default_rng(args.seed)
    try:
        for o, i in shapes:
            _bench_shape(o, i, batches, args, budget, opt, wanted, report, rng, out, cold)
            out.flush()
        print("\n== quantize / dequantize throughput (GB/s of fp32 weight)", file=out)
        print(f"{'shape':>11}  {'op':<36} {'median ms':>10} {'GB/s':>7} {'reps':>4}", file=out)
        for q in report.quantize:
            print(f"{q['shape']:>11}  {q['op']:<36} {q['median_ms']:10.2f} "
                  f"{q['fp32_gbs']:7.2f} {q['reps']:>4}", file=out)
        _overhead(report, out)
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
    report.meta["seconds"] = time.perf_counter() - t_start
    print(f"\ntotal {report.meta['seconds']:.1f} s", file=out)
    machine1 = _machine_cpu_seconds()
    if machine0 is not None and machine1 is not None:
        # Other processes' CPU time during the run: on a 2-core machine shared with other
        # jobs, any of it competes with our threads and makes the figures noisy.
        others = max(0.0, (machine1 - machine0) - (_own_cpu_seconds() - own0))
        ncpu = os.cpu_count() or 1
        share = others / max(report.meta["seconds"] * ncpu, 1e-9)
        report.meta["other_processes_cpu_seconds"] = others
        report.meta["other_processes_cpu_share"] = share
        print(f"other processes used {others:.1f} CPU-s ({100 * share:.0f}% of the machine) "
              f"during the run" + ("; figures are NOISY, rerun on an idle machine"
                                   if share > 0.05 else ""), file=out)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"meta": report.meta, "notes": report.notes,
                       "forward": [asdict(c) for c in report.forward],
                       "quantize": report.quantize, "overhead": report.overhead},
                      f, indent=1, default=_json_default)
        print(f"wrote {args.json}", file=out)
    return 0


def _json_default(v: object) -> object:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return str(v)


def _machine_cpu_seconds() -> float | None:
    """Busy CPU-seconds of the whole machine so far (user+nice+system+irq+softirq+steal)."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            fields = f.readline().split()
        ticks = sum(int(fields[i]) for i in (1, 2, 3, 6, 7, 8))
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    """Run ``qlora bench`` with `argv` (default: sys.argv[1:])."""
    from .cli import main as cli_main  # noqa: PLC0415

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])
