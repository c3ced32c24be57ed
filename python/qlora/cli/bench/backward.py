"""``qlora bench --backward``: a training step (forward + backward, rank 16) of qlora beside
torch autograd through a bitsandbytes ``Linear4bit`` wrapped by PEFT LoRA and through a torch
fp32 ``nn.Linear`` wrapped by PEFT LoRA, on the same inputs and thread count.

qlora's rows: ``forward`` (``layer.forward``, the reference of every ratio), ``input grad``
(the base part ``G deq(W)`` alone, ``_core.input_grad``), ``backward`` (``layer.backward``:
input, A and B gradients) and ``fwd+bwd`` (``forward_train`` + ``backward``, what a training
step costs), and the torch bridge (``qlora.torch.QLoraTorchLinear``, forward + ``backward()``
through autograd). The torch rows time ``y = m(x); y.backward(g)`` with ``x.requires_grad``
(the input gradient included, as in qlora's), PEFT dropout 0. Everything fp32 (bitsandbytes'
training path dequantizes the weight and runs torch's fp32 GEMM). Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from ... import _core
from ..._layer import layer_from_state
from ..._runtime import get_num_threads, set_num_threads
from ..._state import make_state, new_adapter, quantize_weight
from .machine import cpu_name, machine_cpu_seconds, own_cpu_seconds
from .methods import GROUP_SIZE, import_optional
from .timing import Budget, measure

__all__ = ["DEFAULT_SHAPES", "DEFAULT_BATCHES", "run_backward"]

DEFAULT_SHAPES = [(4096, 4096), (14336, 4096)]
DEFAULT_BATCHES = [1, 32, 128, 512]


def _median_ms(fn, budget: Budget) -> float:
    times, _ = measure(fn, budget)
    return statistics.median(times) * 1e3


def _torch_peft(torch, w: np.ndarray, rank: int, kind: str):
    """A PEFT LoRA (rank, alpha 2 * rank, dropout 0) around a bnb Linear4bit or an nn.Linear."""
    import peft  # noqa: PLC0415

    out_f, in_f = w.shape
    if kind == "bnb":
        import bitsandbytes as bnb  # noqa: PLC0415

        lin = bnb.nn.Linear4bit(in_f, out_f, bias=False, quant_type="nf4",
                                compute_dtype=torch.float32)
        lin.weight = bnb.nn.Params4bit(torch.from_numpy(w), requires_grad=False,
                                       blocksize=GROUP_SIZE, quant_type="nf4")
        lin = lin.to("cpu")
    else:
        lin = torch.nn.Linear(in_f, out_f, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w))

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x)

    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["lin"], lora_dropout=0.0)
    model = peft.get_peft_model(Holder(), cfg)
    model.train()
    return model


def _torch_step(torch, model, x: np.ndarray, g: np.ndarray):
    xt = torch.from_numpy(x).requires_grad_(True)
    gt = torch.from_numpy(g)

    def step():
        xt.grad = None
        model.zero_grad(set_to_none=True)
        model(xt).backward(gt)

    return step


def _shape_rows(out_f: int, in_f: int, batches: list[int], rank: int, budget: Budget, opt,
                rng: np.random.Generator, out) -> list[dict]:
    w = rng.normal(0.0, 0.02, size=(out_f, in_f)).astype(np.float32)
    adapter = new_adapter(rank, 2.0, 0, out_f, in_f)
    adapter = adapter._replace(b=rng.normal(0, 0.01, (out_f, rank)).astype(np.float32))
    state = make_state(quantize_weight(w, GROUP_SIZE, False), adapter, None)
    layer = layer_from_state(state)
    peers = {}
    if opt.torch is not None:
        torch = opt.torch
        from ...torch import QLoraTorchLinear  # noqa: PLC0415

        peers["qlora torch bridge"] = QLoraTorchLinear(layer)
        try:
            peers["torch fp32 + PEFT"] = _torch_peft(torch, w, rank, "fp32")
            if opt.bnb is not None:
                peers["bnb + PEFT"] = _torch_peft(torch, w, rank, "bnb")
        except ImportError as exc:
            print(f"   peft not usable: {exc}", file=out)
    rows = []
    for b in batches:
        x = rng.standard_normal((b, in_f)).astype(np.float32)
        g = rng.standard_normal((b, out_f)).astype(np.float32)
        dx = np.empty_like(x)
        _, saved = layer.forward_train(x)
        row = {"shape": f"{out_f}x{in_f}", "batch": b,
               "forward": _median_ms(lambda: layer.forward(x), budget),
               "input grad": _median_ms(lambda: _core.input_grad(state.tensor, g, dx), budget),
               "backward": _median_ms(lambda: layer.backward(saved, g), budget),
               "fwd+bwd": _median_ms(lambda: layer.backward(layer.forward_train(x)[1], g),
                                     budget),
               "saved bytes": int(saved.u.nbytes)}
        for name, model in peers.items():
            row[name] = _median_ms(_torch_step(opt.torch, model, x, g), budget)
        rows.append(row)
        _print_row(row, out)
        out.flush()
    return rows


_PEERS = ["qlora torch bridge", "bnb + PEFT", "torch fp32 + PEFT"]


def _print_header(out) -> None:
    print(f"{'shape':>11} {'batch':>5} {'fwd ms':>8} {'igrad ms':>8} {'ig/fwd':>6} "
          f"{'bwd ms':>8} {'bwd/fwd':>7} {'f+b ms':>8} {'bridge':>8} {'bnb+PEFT':>9} "
          f"{'vs bnb':>6} {'fp32+PEFT':>9} {'vs fp32':>7} {'saved':>8}", file=out)


def _print_row(r: dict, out) -> None:
    def ms(key):
        return f"{r[key]:8.2f}" if key in r else f"{'-':>8}"

    def ratio(key):
        return f"{r[key] / r['fwd+bwd']:5.2f}x" if key in r else f"{'-':>6}"

    print(f"{r['shape']:>11} {r['batch']:>5} {r['forward']:8.2f} {r['input grad']:8.2f} "
          f"{r['input grad'] / r['forward']:6.2f} {r['backward']:8.2f} "
          f"{r['backward'] / r['forward']:7.2f} {r['fwd+bwd']:8.2f} {ms(_PEERS[0])} "
          f"{ms(_PEERS[1]):>9} {ratio(_PEERS[1])} {ms(_PEERS[2]):>9} {ratio(_PEERS[2]):>7} "
          f"{r['saved bytes']:>8}", file=out)


def run_backward(args: argparse.Namespace, out=None) -> int:
    """The ``--backward`` mode of ``qlora bench`` (shapes, batches, rank, threads from args)."""
    out = out or sys.stdout
    shapes = args.shape or DEFAULT_SHAPES
    batches = sorted({b for grp in args.batch for b in grp}) if args.batch else DEFAULT_BATCHES
    budget = Budget(min_reps=args.min_reps or 3, min_time=0.25 if args.min_time is None
                    else args.min_time, max_cell_time=3.0)
    threads = get_num_threads() if args.threads is None else args.threads
    opt = import_optional()
    set_num_threads(threads)
    if opt.torch is not None:
        opt.torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits  # noqa: PLC0415

        limiter = threadpool_limits(limits=threads)
    except ImportError:
        limiter = None
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"qlora {_core.__version__} bench --backward ({date})\ncpu {cpu_name()}, isa {_core.active_isa()}, {threads} threads for every method; "
          f"rank {args.rank}, group {GROUP_SIZE}, fp32; torch "
          f"{getattr(opt.torch, '__version__', '-')}, bitsandbytes "
          f"{getattr(opt.bnb, '__version__', '-')}", file=out)
    print("columns: median ms; ig/fwd = input grad / forward; bwd/fwd = full backward / "
          "forward; f+b = forward_train + backward; bridge = qlora.torch module fwd + "
          "autograd bwd; vs X = X's fwd+bwd / qlora's (>1: qlora faster); saved = bytes the "
          "step keeps besides a reference to x (u; the dropout mask is a seed)", file=out)
    _print_header(out)
    t0, machine0, own0 = time.perf_counter(), machine_cpu_seconds(), own_cpu_seconds()
    rng = np.random.default_rng(args.seed)
    try:
        for o, i in shapes:
            _shape_rows(o, i, batches, args.rank, budget, opt, rng, out)
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
    seconds = time.perf_counter() - t0
    machine1 = machine_cpu_seconds()
    print(f"total {seconds:.1f} s", file=out)
    if machine0 is not None and machine1 is not None:
        others = max(0.0, (machine1 - machine0) - (own_cpu_seconds() - own0))
        share = others / max(seconds * (os.cpu_count() or 1), 1e-9)
        print(f"other processes used {others:.1f} CPU-s ({100 * share:.0f}% of the machine) "
              "during the run" + ("; figures are NOISY" if share > 0.05 else ""), file=out)
    return 0
