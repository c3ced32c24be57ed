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

``--precision fp32,bf16,int8`` times qlora once per precision (each row names the kernel that
served it, from ``_core.gemm_choice``); ``--plot FILE.png`` draws GFLOP/s against batch.
"""


from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict

import numpy as np

from ... import _core
from ..._layer import QLoraLinear
from ..._precision import PRECISIONS, check_precision
from ..._runtime import get_num_threads, kernel_info, set_num_threads
from ..._state import make_state, new_adapter, quantize_weight
from ..common import nonneg_float, nonneg_int, parse_shape, positive_float, positive_int
from .machine import (blas_info, cpu_name, llc_bytes, machine_cpu_seconds, mem_total_bytes,
                      own_cpu_seconds)
from .methods import (COLD_CACHE_FACTOR, COLD_MEM_SHARE, GROUP_SIZE, METHOD_NAMES, ColdPlan,
                      Optional_, build_methods, import_optional, plan_copies, to_f64)
from .adapters import ADAPTER_BATCHES, ADAPTER_SHAPES, bench_adapters
from .plot import check_matplotlib, plot_cells
from .report import Cell, Report, json_default, print_cells, print_header
from .timing import Budget, measure, per_call

__all__ = ["register", "run"]

DEFAULT_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]
DEFAULT_BATCHES = [1, 8, 32, 128, 512]
QUICK_SHAPES = [(1024, 1024)]
QUICK_BATCHES = [1, 8]


def _batch_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch must look like 1,8,32, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return values


def _precision_list(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    if not names:
        raise argparse.ArgumentTypeError(f"precision must name some of {', '.join(PRECISIONS)}, "
                                         f"got {text!r}")
    for name in names:
        try:
            check_precision(name, "precision")
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return names


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
    p.add_argument("--rank", type=positive_int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="threads for every method (default qlora.get_num_threads())")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke preset: one 1024x1024 shape, batches 1,8, short timing")
    p.add_argument("--min-reps", type=positive_int, default=None,
                   help="calls per cell at least (default 5)")
    p.add_argument("--min-time", type=nonneg_float, default=None,
                   help="seconds per cell at least, once min-reps are done (default 0.2)")
    p.add_argument("--max-call-seconds", type=positive_float, default=None,
                   help="skip a scalar-kernel cell whose single call is predicted to exceed "
                   "this (default 1)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of: " + ", ".join(METHOD_NAMES))
    p.add_argument("--cold", action="store_true",
                   help="give every method enough copies of its weight to exceed 2x the "
                   "last-level cache and cycle through them, so each call reads its weight "
                   "from DRAM (default: one weight per method, timed hot)")
    p.add_argument("--backward", action="store_true",
                   help="time a training step instead (forward + backward, default 4096x4096 "
                   "and 14336x4096 at batch 1,32,128,512) beside torch autograd through "
                   "bitsandbytes Linear4bit + PEFT and fp32 nn.Linear + PEFT")
    p.add_argument("--adapters", type=_batch_list, nargs="?", const=[1, 8, 32], default=None,
                   metavar="N[,N...]",
                   help="instead: serving many adapters; N adapters of --rank (and a mixed-rank "
                   "8..64 case) per batch, rows spread evenly and shuffled: qlora single-adapter "
                   "vs mixed batch vs per-adapter split vs PEFT adapter_names over Linear4bit "
                   "(default N 1,8,32; shapes 4096x4096 14336x4096; batches 8,64,256)")
    p.add_argument("--precision", type=_precision_list, default=("fp32",),
                   metavar="P[,P...]",
                   help="qlora's compute precisions to time, a row each: some of "
                   f"{', '.join(PRECISIONS)} (default fp32); each row names its kernel")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument("--plot", metavar="FILE.png",
                   help="also draw GFLOP/s against batch per method, a panel per shape "
                   "(needs matplotlib: pip install 'qlora[plot]')")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.set_defaults(func=run)


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
    times, layer = measure(
        lambda: QLoraLinear.from_weight(w, rank=args.rank, alpha=2.0 * args.rank,
                                        group_size=GROUP_SIZE, seed=args.seed), q_budget)
    layer.set_lora_b(rng.normal(0.0, 0.01, size=(out_f, args.rank)).astype(np.float32))
    fp32_gb = w.nbytes / 1e9
    med = statistics.median(times)
    report.quantize.append({"shape": shape, "op": f"qlora from_weight [{_core.active_isa()}]",
                            "median_ms": med * 1e3, "fp32_gbs": fp32_gb / med,
                            "reps": len(times)})
    deq_out = np.empty_like(w)
    times, _ = measure(lambda: layer.dequantize_weight(out=deq_out), budget)
    med = statistics.median(times)
    report.quantize.append({"shape": shape, "op": f"qlora dequantize [{_core.active_isa()}]",
                            "median_ms": med * 1e3, "fp32_gbs": fp32_gb / med,
                            "reps": len(times)})
    bnb_q = None
    if opt.bnb is not None and ("bnb-fp32" in wanted or "bnb-fused" in wanted):
        torch, bnb = opt.torch, opt.bnb
        wt = torch.from_numpy(w)
        times, (qw, st) = measure(lambda: bnb.functional.quantize_4bit(
            wt, blocksize=GROUP_SIZE, quant_type="nf4", compress_statistics=False), q_budget)
        med = statistics.median(times)
        report.quantize.append({"shape": shape, "op": "bnb quantize_4bit nf4",
                                "median_ms": med * 1e3, "fp32_gbs": fp32_gb / med,
                                "reps": len(times)})
        times, _ = measure(lambda: bnb.functional.dequantize_4bit(qw, st), budget)
        med = statistics.median(times)
        report.quantize.append({"shape": shape, "op": "bnb dequantize_4bit nf4 (fp32)",
                                "median_ms": med * 1e3, "fp32_gbs": fp32_gb / med,
                                "reps": len(times)})
        bnb_q = (qw, st)
        del wt

    xs = {b: rng.standard_normal((b, in_f)).astype(np.float32) for b in batches}
    notes: dict[str, str] = {}
    methods = build_methods(w, layer, xs, opt, wanted, notes, bnb_q, args.precision)
    nf4_bytes = 4 * w.size - layer.memory_saved_bytes()
    mode = "COLD (weights from DRAM)" if cold else "HOT (one weight per method, looped)"
    print(f"\n== forward {shape} (out x in), rank {args.rank}, group {GROUP_SIZE}, {mode}: fp32 "
          f"weight {w.nbytes / 2**20:.1f} MiB, nf4 {nf4_bytes / 2**20:.1f} MiB", file=out)
    for name, why in notes.items():
        print(f"   {name}: not run: {why}", file=out)
    if cold is not None:
        ks, k_note = plan_copies(methods, cold)
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
            times, y = measure(fn, budget)
            med = statistics.median(times)
            last[m.name] = (b, med)
            y64 = to_f64(y)
            if m.name == "numpy fp32":
                reference, numpy_ms = y64, med * 1e3
            note = m.note
            if len(times) < budget.min_reps:
                note = (note + "; " if note else "") + f"slow: only {len(times)} timed calls"
            kernel, fallback = "", False
            if m.kernel is not None:
                choice = m.kernel(b)
                kernel, fallback = choice["kernel"], choice["precision"] != m.precision
                if fallback:
                    note = (note + "; " if note else "") + (
                        f"no {m.precision} kernel here: ran {choice['precision']}")
            row.append(Cell(shape, b, m.name, med * 1e3, min(times) * 1e3, flops / med / 1e9,
                            m.weight_bytes / med / 1e9, None, None, len(times), note,
                            copies=max(1, len(m.copies)), kernel=kernel, fallback=fallback))
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
    print_cells(cells, out, cold is not None)
    report.forward.extend(cells)


def _overhead(report: Report, out) -> None:
    rng = np.random.default_rng(1)

    def small_layer(o: int, i: int, r: int):
        """A layer and, for calling the core directly, an equal state built the same way."""
        w = rng.normal(0, 0.1, (o, i)).astype(np.float32)
        b = rng.normal(0, 0.1, (o, r)).astype(np.float32)
        layer = QLoraLinear.from_weight(w, rank=r)
        layer.set_lora_b(b)
        adapter = new_adapter(r, layer.scaling, 0, o, i)._replace(b=b)
        return layer, make_state(quantize_weight(w, layer.group_size, False), adapter, None)

    (layer, state), (tiny, tiny_state) = small_layer(64, 64, 16), small_layer(1, 1, 1)
    x, x1 = rng.standard_normal((1, 64)).astype(np.float32), np.ones((1, 1), np.float32)
    y, y1 = np.empty((1, 64), np.float32), np.empty((1, 1), np.float32)
    t, lora = state.tensor, state.lora
    t1, lora1 = tiny_state.tensor, tiny_state.lora
    figures = {
        "64x64 layer.forward(x)": per_call(lambda: layer.forward(x)),
        "64x64 layer.forward(x, out=y)": per_call(lambda: layer.forward(x, out=y)),
        "64x64 _core.forward direct": per_call(
            lambda: _core.forward(t, x, lora.a, lora.b, lora.scaling, None, y)),
        "1x1 layer.forward(x)": per_call(lambda: tiny.forward(x1)),
        "1x1 _core.forward direct": per_call(
            lambda: _core.forward(t1, x1, lora1.a, lora1.b, lora1.scaling, None, y1)),
        "np.empty((1, 64), float32)": per_call(lambda: np.empty((1, 64), np.float32)),
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
    if getattr(args, "backward", False):
        from .backward import run_backward  # noqa: PLC0415

        return run_backward(args, out)
    out = out or sys.stdout
    adapters = getattr(args, "adapters", None)
    shapes = args.shape or (QUICK_SHAPES if args.quick else
                            ADAPTER_SHAPES if adapters else DEFAULT_SHAPES)
    batches = sorted({b for group in args.batch for b in group}) if args.batch else (
        QUICK_BATCHES if args.quick else ADAPTER_BATCHES if adapters else DEFAULT_BATCHES)
    for o, i in shapes:
        if args.rank > min(o, i):
            raise ValueError(f"--rank must be <= min(out, in) = {min(o, i)} for shape {o}x{i}, "
                             f"got {args.rank}")
    wanted = METHOD_NAMES if args.methods is None else [
        s.strip() for s in args.methods.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(METHOD_NAMES))
    if unknown:
        raise ValueError(f"--methods must name some of {', '.join(METHOD_NAMES)}, got "
                         f"{', '.join(unknown)}")
    if "numpy" not in wanted:
        wanted = [*wanted, "numpy"]  # the reference of every ratio and rel.diff
    budget = Budget()
    if args.quick:
        budget = Budget(min_reps=3, min_time=0.05, max_cell_time=1.0, max_call_seconds=1.0)
    if args.min_reps is not None:
        budget.min_reps = args.min_reps
    if args.min_time is not None:
        budget.min_time = args.min_time
    if args.max_call_seconds is not None:
        budget.max_call_seconds = args.max_call_seconds

    threads = get_num_threads() if args.threads is None else args.threads
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise FileNotFoundError(f"--json {args.json}: its directory does not exist")
    if args.plot:
        if adapters:
            raise ValueError("--plot draws the forward grid, which --adapters does not run; "
                             "use one or the other")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
            raise FileNotFoundError(f"--plot {args.plot}: its directory does not exist")
        check_matplotlib()
    opt = import_optional()  # before threadpoolctl looks, so torch's OpenMP is seen and limited
    set_num_threads(threads)
    if opt.torch is not None:
        opt.torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits  # noqa: PLC0415

        limiter = threadpool_limits(limits=threads)
    except ImportError:
        limiter = None

    llc, llc_source = llc_bytes()
    mem_total = mem_total_bytes()
    cold = ColdPlan(llc, llc_source, None if mem_total is None
                    else int(COLD_MEM_SHARE * mem_total)) if args.cold else None
    report = Report()
    report.meta = {
        "qlora_version": _core.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "cpu": cpu_name(),
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
        "threadpools": blas_info(),
        "rank": args.rank,
        "group_size": GROUP_SIZE,
        "min_reps": budget.min_reps,
        "min_time": budget.min_time,
        "max_call_seconds": budget.max_call_seconds,
        "settle": budget.settle,
        "cold": bool(args.cold),
        "precisions": list(args.precision),
        "kernel_info": kernel_info(),
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
        report.notes.append("the active ISA is scalar, so qlora fp32 is the scalar row "
                            "(measured once)")
    report.notes.append("best ms = fastest timed call (less sensitive to other processes than "
                        "the median); GFLOP/s counts 2*batch*out*in (the LoRA term's work is "
                        "not counted); "
                        "wt GB/s = weight bytes stored by that method / median time; "
                        "vs numpy = numpy ms / method ms (>1 faster); rel.diff = "
                        "||y - y_numpy|| / ||y_numpy|| (NF4 rounding gives ~0.1)")
    print_header(report, out)
    for n in report.notes:
        print(f"note     {n}", file=out)

    t_start = time.perf_counter()
    machine0, own0 = machine_cpu_seconds(), own_cpu_seconds()
    rng = np.random.default_rng(args.seed)
    figures = None
    try:
        if adapters:
            figures = bench_adapters(shapes, batches, adapters, args.rank, budget, opt, rng,
                                     out)
            shapes = []
        for o, i in shapes:
            _bench_shape(o, i, batches, args, budget, opt, wanted, report, rng, out, cold)
            out.flush()
        if figures is None:
            print("\n== quantize / dequantize throughput (GB/s of fp32 weight)", file=out)
            print(f"{'shape':>11}  {'op':<36} {'median ms':>10} {'GB/s':>7} {'reps':>4}",
                  file=out)
            for q in report.quantize:
                print(f"{q['shape']:>11}  {q['op']:<36} {q['median_ms']:10.2f} "
                      f"{q['fp32_gbs']:7.2f} {q['reps']:>4}", file=out)
            _overhead(report, out)
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
    report.meta["seconds"] = time.perf_counter() - t_start
    print(f"\ntotal {report.meta['seconds']:.1f} s", file=out)
    machine1 = machine_cpu_seconds()
    if machine0 is not None and machine1 is not None:
        # Other processes' CPU time during the run: on a 2-core machine shared with other
        # jobs, any of it competes with our threads and makes the figures noisy.
        others = max(0.0, (machine1 - machine0) - (own_cpu_seconds() - own0))
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
                       "quantize": report.quantize, "overhead": report.overhead,
                       **({"serving_adapters": figures} if figures else {})},
                      f, indent=1, default=json_default)
        print(f"wrote {args.json}", file=out)
    if args.plot:
        m = report.meta
        plot_cells(report.forward, args.plot,
                   f"qlora bench, {m['cpu']}, {threads} threads, rank {args.rank}, group "
                   f"{GROUP_SIZE}, {'cold (weights from DRAM)' if args.cold else 'hot'}")
        print(f"wrote {args.plot}", file=out)
    return 0
