"""``qlora bench --adapters N[,N...]``: serving many adapters over one base, side by side.

For each shape, batch and adapter count N (rank ``--rank`` each, and a mixed-rank case with
ranks spread over 8..64), the batch's rows are spread evenly over the N adapters and shuffled,
then timed as:

- ``qlora single``: the same batch with one adapter on every row (``layer.forward(x)``), the
  cost a mixed batch is measured against;
- ``qlora mixed``: one call, ``layer.forward(x, adapters=slots)`` (a NumPy array of slots);
- ``qlora split``: the rows grouped by adapter, one ``forward`` per adapter, results scattered
  back (what a server without mixed batches does; the base is decoded once per adapter);
- ``peft mixed``: PEFT's ``model(x, adapter_names=...)`` over a bitsandbytes ``Linear4bit``
  holding the same weight and adapters (when torch, bitsandbytes and peft are installed).

Then the cost of ``add_adapter`` / ``remove_adapter`` at rank ``--rank`` next to one copy of
the base's NF4 codes, and the Python-side cost of preparing a mixed batch (64 rows, 8 adapters).
Timing reuses :mod:`.timing` (a pause and a warm-up before each timed block). Nothing here
asserts a speed.
"""

from __future__ import annotations

import statistics
import warnings

import numpy as np

from ... import _core
from ..._layer import QLoraLinear
from .methods import GROUP_SIZE, Optional_
from .timing import Budget, measure, per_call

__all__ = ["ADAPTER_BATCHES", "ADAPTER_SHAPES", "bench_adapters"]

ADAPTER_SHAPES = [(4096, 4096), (14336, 4096)]
ADAPTER_BATCHES = [8, 64, 256]
MIXED_RANKS = (8, 16, 32, 64)


def _peft_model(w: np.ndarray, adapters: list[tuple[str, np.ndarray, np.ndarray, float]],
                opt: Optional_):
    """PEFT over a bitsandbytes Linear4bit with ``w`` and the given adapters, or a reason."""
    if opt.torch is None or opt.bnb is None:
        return None, opt.torch_reason or opt.bnb_reason or "torch/bitsandbytes missing"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import peft  # noqa: PLC0415
    except Exception as exc:  # an optional comparison
        return None, f"peft not usable ({type(exc).__name__}: {exc})"
    torch, bnb = opt.torch, opt.bnb
    out_f, in_f = w.shape

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = bnb.nn.Linear4bit(in_f, out_f, bias=False, quant_type="nf4",
                                        compute_dtype=torch.float32)
            self.fc.weight = bnb.nn.Params4bit(torch.from_numpy(w), requires_grad=False,
                                               blocksize=GROUP_SIZE, quant_type="nf4")

        def forward(self, x):
            return self.fc(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = Net().to("cpu")
        model = None
        for name, a, b, scaling in adapters:
            r = a.shape[0]
            cfg = peft.LoraConfig(r=r, lora_alpha=scaling * r, target_modules=["fc"],
                                  lora_dropout=0.0)
            if model is None:
                model = peft.get_peft_model(net, cfg, adapter_name=name)
            else:
                model.add_adapter(name, cfg)
        fc = model.base_model.model.fc
        with torch.no_grad():
            for name, a, b, _ in adapters:
                fc.lora_A[name].weight.copy_(torch.from_numpy(a))
                fc.lora_B[name].weight.copy_(torch.from_numpy(b))
        model.eval()
    return model, ""


def _cases(counts: list[int], rank: int) -> list[tuple[int, list[int]]]:
    cases = []
    for n in counts:
        cases.append((n, [rank] * n))
        if n > 1:
            cases.append((n, [MIXED_RANKS[i % len(MIXED_RANKS)] for i in range(n)]))
    return cases


def bench_adapters(shapes: list[tuple[int, int]], batches: list[int], counts: list[int],
                   rank: int, budget: Budget, opt: Optional_, rng: np.random.Generator,
                   out) -> dict:
    """Run the adapter benchmark; prints tables and returns the figures for ``--json``."""
    rows: list[dict] = []
    mutations: list[dict] = []
    print(f"\n== serving many adapters: rows spread evenly over N adapters and shuffled; "
          f"ratios of medians (single/mixed <= 1.15 targeted at 64 rows, 8 adapters)", file=out)
    for out_f, in_f in shapes:
        shape = f"{out_f}x{in_f}"
        w = rng.normal(0.0, 0.02, size=(out_f, in_f)).astype(np.float32)
        layer = QLoraLinear.from_weight(w, rank=rank, alpha=2.0 * rank, group_size=GROUP_SIZE)
        layer.set_lora_b(rng.normal(0.0, 0.01, (out_f, rank)).astype(np.float32))
        print(f"\n-- {shape}, isa {_core.active_isa()}, group {GROUP_SIZE}", file=out)
        print(f"{'batch':>5} {'N':>3} {'ranks':>6}  {'single ms':>9} {'mixed ms':>9} "
              f"{'split ms':>9} {'peft ms':>9}  {'mixed/single':>12} {'split/mixed':>11} "
              f"{'peft/mixed':>10}  note", file=out)
        for n, ranks in _cases(counts, rank):
            adapters = []
            for i, r in enumerate(ranks):
                a = rng.uniform(-1, 1, (r, in_f)).astype(np.float32) / np.sqrt(in_f)
                b = rng.normal(0.0, 0.01, (out_f, r)).astype(np.float32)
                adapters.append((f"ad{i}", a, b, 2.0))
            for name, a, b, s in adapters:
                layer.add_adapter(name, a, b, scaling=s)
            slot_of = {name: info.slot for name, info in layer.adapters.items()}
            model, why = _peft_model(w, adapters, opt)
            for batch in batches:
                x = rng.standard_normal((batch, in_f)).astype(np.float32)
                which = np.arange(batch) % n
                rng.shuffle(which)
                slots = np.array([slot_of[f"ad{k}"] for k in which], dtype=np.int64)
                groups = [(slot_of[f"ad{k}"], np.flatnonzero(which == k)) for k in range(n)]
                y_split = np.empty((batch, out_f), np.float32)

                def split() -> np.ndarray:
                    for slot, rows in groups:
                        if rows.size:
                            y_split[rows] = layer.forward(x[rows], adapters=slot)
                    return y_split

                t_single, _ = measure(lambda: layer.forward(x), budget)
                t_mixed, y_mixed = measure(lambda: layer.forward(x, adapters=slots), budget)
                t_split, y_sp = measure(split, budget)
                note = ""
                diff = float(np.abs(y_sp - y_mixed).max() / max(np.abs(y_mixed).max(), 1e-30))
                if diff > 1e-4:
                    note = f"split differs from mixed by {diff:.1e}"
                t_peft = None
                if model is not None:
                    torch = opt.torch
                    names = [f"ad{k}" for k in which]
                    xt = torch.from_numpy(x)

                    def peft_mixed():
                        with torch.no_grad():
                            return model(xt, adapter_names=names)

                    t_peft, y_peft = measure(peft_mixed, budget)
                    y_peft = y_peft.float().numpy()
                    rel = float(np.linalg.norm(y_peft - y_mixed) / np.linalg.norm(y_mixed))
                    note = (note + "; " if note else "") + f"peft rel.diff {rel:.1e}"
                elif why:
                    note = (note + "; " if note else "") + f"peft: {why}"
                med = {k: None if t is None else statistics.median(t) * 1e3 for k, t in
                       (("single", t_single), ("mixed", t_mixed), ("split", t_split),
                        ("peft", t_peft))}
                rk = str(ranks[0]) if len(set(ranks)) == 1 else "8..64"
                row = {"shape": shape, "batch": batch, "adapters": n, "ranks": rk,
                       **{f"{k}_ms": v for k, v in med.items()},
                       "mixed_vs_single": med["mixed"] / med["single"],
                       "split_vs_mixed": med["split"] / med["mixed"],
                       "peft_vs_mixed": None if med["peft"] is None
                       else med["peft"] / med["mixed"], "note": note}
                rows.append(row)
                peft_ms = "-" if med["peft"] is None else f"{med['peft']:9.2f}"
                peft_x = "-" if row["peft_vs_mixed"] is None else f"{row['peft_vs_mixed']:.2f}x"
                print(f"{batch:>5} {n:>3} {rk:>6}  {med['single']:9.2f} {med['mixed']:9.2f} "
                      f"{med['split']:9.2f} {peft_ms:>9}  {row['mixed_vs_single']:11.3f}x "
                      f"{row['split_vs_mixed']:10.2f}x {peft_x:>10}  {note}", file=out)
                out.flush()
            for name, *_ in adapters:
                layer.remove_adapter(name)
            del model
        mutations.append(_mutation_costs(layer, shape, rank, rng, out))
    overhead = _prep_overhead(rng, out)
    return {"adapters": rows, "add_remove": mutations, "prep_overhead": overhead}


def _mutation_costs(layer: QLoraLinear, shape: str, rank: int, rng: np.random.Generator,
                    out) -> dict:
    """add_adapter / remove_adapter at ``rank`` next to a copy of the base's codes."""
    a = rng.standard_normal((rank, layer.in_features)).astype(np.float32)
    b = rng.standard_normal((layer.out_features, rank)).astype(np.float32)
    count = [0]

    def add_remove() -> None:
        count[0] += 1
        layer.add_adapter(f"m{count[0]}", a, b, scaling=1.0)
        layer.remove_adapter(f"m{count[0]}")

    add_s, _ = per_call(add_remove, target=0.05, rounds=5)
    codes = np.empty(layer.in_features * layer.out_features // 2, np.uint8)
    copy_s, _ = per_call(lambda: codes.copy(), target=0.05, rounds=5)
    adapter_mb = (a.nbytes + b.nbytes) / 2**20
    print(f"   add_adapter + remove_adapter (rank {rank}, {adapter_mb:.2f} MiB): "
          f"{add_s * 1e3:.3f} ms; one copy of the base's NF4 codes "
          f"({codes.nbytes / 2**20:.1f} MiB): {copy_s * 1e3:.3f} ms (not done by add)",
          file=out)
    return {"shape": shape, "rank": rank, "add_remove_ms": add_s * 1e3,
            "adapter_bytes": a.nbytes + b.nbytes, "base_codes_copy_ms": copy_s * 1e3,
            "base_codes_bytes": codes.nbytes}


def _prep_overhead(rng: np.random.Generator, out) -> dict:
    """Per-call cost of a 64-row, 8-adapter mixed forward on a 64x64 layer (the Python work
    dominates there), by how the rows name their adapters, beside the plain forward."""
    layer = QLoraLinear.from_weight(rng.normal(0, 0.1, (64, 64)).astype(np.float32), rank=16)
    for i in range(8):
        layer.add_adapter(f"ad{i}", rng.normal(0, 0.1, (16, 64)), rng.normal(0, 0.1, (64, 16)),
                          scaling=1.0)
    x = rng.standard_normal((64, 64)).astype(np.float32)
    names = [f"ad{i % 8}" for i in range(64)]
    rng.shuffle(names)
    slots = np.array([layer.adapters[n].slot for n in names])
    figures = {
        "forward(x)": per_call(lambda: layer.forward(x)),
        "forward(x, adapters=slot array)": per_call(lambda: layer.forward(x, adapters=slots)),
        "forward(x, adapters=names)": per_call(lambda: layer.forward(x, adapters=names)),
        "forward(x, adapters=slots, adapter_scales=...)": per_call(
            lambda: layer.forward(x, adapters=slots, adapter_scales=0.5)),
    }
    print("\n== mixed-batch calling cost, 64x64 layer, 64 rows over 8 adapters of rank 16",
          file=out)
    print(f"   {'call':<48} {'wall us':>8} {'cpu us':>8}", file=out)
    for k, (wall, cpu) in figures.items():
        print(f"   {k:<48} {wall * 1e6:8.1f} {cpu * 1e6:8.1f}", file=out)
    return {k: {"wall_us": v[0] * 1e6, "cpu_us": v[1] * 1e6} for k, v in figures.items()}
