"""The methods ``qlora bench`` times side by side: qlora (active ISA and forced scalar), NumPy fp32,
torch fp32/bf16 and bitsandbytes (its ``matmul_4bit`` and, through its private CPU repacking, the
fused bf16 kernel), each on the same weight and inputs; and the plan of weight copies per method
for ``--cold``."""

from __future__ import annotations

import copy
import itertools
import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ... import _core
from ..._layer import QLoraLinear

__all__ = ["COLD_CACHE_FACTOR", "COLD_MAX_COPIES", "COLD_MEM_SHARE", "ColdPlan", "GROUP_SIZE",
           "METHOD_NAMES", "Method", "Optional_", "build_methods", "import_optional",
           "plan_copies", "to_f64"]

GROUP_SIZE = 64  # bitsandbytes' default blocksize, so both store the same bytes per weight


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


METHOD_NAMES = ["qlora", "qlora-scalar", "numpy", "torch-fp32", "torch-bf16", "bnb-fp32",
                 "bnb-fused"]


@dataclass
class Optional_:
    torch: object = None
    bnb: object = None
    torch_reason: str = ""
    bnb_reason: str = ""
    bnb_fused_reason: str = ""


def import_optional() -> Optional_:
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


def build_methods(w: np.ndarray, layer: QLoraLinear, xs: dict[int, np.ndarray], opt: Optional_,
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
COLD_CACHE_FACTOR = 2  # copies of a method together exceed this many last-level caches
COLD_MEM_SHARE = 0.4  # of MemTotal, for the copies of all methods of one shape together
# A tiny weight would need ~10^5 copies; each is a Python object and a setup step, and its call
# is dominated by fixed cost anyway, so there "cold" stops short of the cache target.
COLD_MAX_COPIES = 4096


@dataclass
class ColdPlan:
    llc_bytes: int
    llc_source: str
    mem_cap_bytes: int | None


def plan_copies(methods: list[Method], plan: ColdPlan) -> tuple[dict[str, int], str]:
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


def to_f64(y: object) -> np.ndarray:
    if not isinstance(y, np.ndarray):  # a torch tensor (bf16 included)
        y = y.float().numpy()
    return np.asarray(y, dtype=np.float64)
