"""The state of a QLoRA layer as immutable values, and the builders that make them; no I/O.

A layer holds one :class:`LayerState`: the NF4 weight (:class:`Nf4Weight`), its default LoRA
adapter (:class:`Adapter`), its named adapters (:class:`AdapterSet`, a read-only mapping of
name to :class:`Adapter` that also gives each adapter its slot) and the bias. Every array in a state is read-only and every value is replaced
whole, never changed: a setter of the layer builds a new state and stores it with one
attribute write, so a forward in another thread reads one consistent state.

Builders: :func:`quantize_weight` (NF4 quantization by the core, optionally double-quantized
by :func:`double_quantize` over bitsandbytes' dynamic map, :func:`create_dynamic_map`) and
:func:`new_adapter` (PEFT's Kaiming-uniform ``A`` and zero ``B``). The file-format converters
(``qlora.formats``) translate between these values and their formats.
"""

from __future__ import annotations

import math
from typing import Iterator, Mapping, NamedTuple

import numpy as np

from . import _core

__all__ = ["Adapter", "AdapterSet", "DEFAULT_ADAPTER", "DYNAMIC_MAP", "LayerState", "NESTED_BLOCK", "NF4_CODEBOOK", "Nf4Weight",
           "create_dynamic_map", "dequantize_scales", "double_quantize", "frozen", "loftq_init",
           "make_state", "new_adapter", "quantize_weight"]

NESTED_BLOCK = int(_core.NESTED_BLOCK)
NF4_CODEBOOK = np.array(_core.NF4_CODEBOOK, dtype=np.float32)
NF4_CODEBOOK.setflags(write=False)
# The default adapter (``set_lora``) is addressed as this name or slot 0 in mixed batches.
DEFAULT_ADAPTER = "default"


def frozen(arr: np.ndarray) -> np.ndarray:
    """Mark ``arr`` read-only and return it."""
    arr.setflags(write=False)
    return arr


class Nf4Weight(NamedTuple):
    """The quantized weight: packed codes and either plain or double-quantized scales."""

    out_features: int
    in_features: int
    group_size: int
    codes: np.ndarray  # uint8, qlora's packed rows (see csrc/include/qlora/nf4.h)
    scales: np.ndarray | None  # float32 absmax per group
    qscales: np.ndarray | None = None  # uint8 per group (double quantization)
    nested_scales: np.ndarray | None = None  # float32 per 256 groups
    nested_map: np.ndarray | None = None  # float32 (256,)
    nested_offset: float = 0.0

    @property
    def double_quant(self) -> bool:
        return self.qscales is not None

    def tensor(self) -> _core.Nf4Tensor:
        """The core's view of this weight (it checks every size against the shape)."""
        return _core.Nf4Tensor(
            self.codes, self.scales, self.qscales, self.nested_scales, self.nested_map,
            float(self.nested_offset), self.out_features, self.in_features, self.group_size,
        )

    def nbytes(self) -> int:
        """Bytes stored for the quantized weight (codes, scales, tables, the offset)."""
        arrays = (self.codes, self.scales, self.qscales, self.nested_scales, self.nested_map)
        extra = 4 if self.qscales is not None else 0  # the offset
        return sum(a.nbytes for a in arrays if a is not None) + extra

    def decoded_scales(self) -> np.ndarray:
        """The per-group absmax the kernels use, as a new float32 array."""
        if self.scales is not None:
            return self.scales.copy()
        return dequantize_scales(self.qscales, self.nested_scales, self.nested_map,
                                 self.nested_offset)

    def owned(self) -> "Nf4Weight":
        """The same weight with every array copied (no memory shared with this one)."""
        return self._replace(codes=_own(self.codes), scales=_own(self.scales),
                             qscales=_own(self.qscales), nested_scales=_own(self.nested_scales),
                             nested_map=_own(self.nested_map))


class Adapter(NamedTuple):
    """One LoRA adapter: ``scaling * (x @ a.T) @ b.T``."""

    a: np.ndarray  # float32 (rank, in_features), read-only
    b: np.ndarray  # float32 (out_features, rank), read-only
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def owned(self) -> "Adapter":
        return self._replace(a=_own(self.a), b=_own(self.b))


class AdapterSet(Mapping[str, Adapter]):
    """The named adapters of a layer: an immutable mapping of name to :class:`Adapter`, with
    the integer slot of each (1, 2, 3, ... in the order they were first added; slot 0 is the
    default adapter). ``next_slot`` is the slot the next new name gets: slots are never reused,
    so a slot a server cached can never come to mean another adapter.

    :meth:`put` and :meth:`without` return a new set (a copy of the small name tables; the
    adapters' arrays are shared, never copied)."""

    __slots__ = ("_by_name", "_slots", "next_slot", "keys", "by_slot")

    def __init__(self, adapters: Mapping[str, tuple[int, Adapter]] | None = None,
                 next_slot: int = 1) -> None:
        items = dict(adapters or {})
        self._by_name = {name: ad for name, (_, ad) in items.items()}
        self._slots = {name: slot for name, (slot, _) in items.items()}
        self.next_slot = max([next_slot, *(s + 1 for s in self._slots.values())])
        # For a mixed batch: what each row may say (a name, a slot, "default" or 0 for the
        # default adapter, None or -1 for the base only) -> slot, and slot -> adapter.
        keys: dict = {None: -1, -1: -1, DEFAULT_ADAPTER: 0, 0: 0}
        keys.update(self._slots)
        keys.update({s: s for s in self._slots.values()})
        self.keys = keys
        self.by_slot = {s: self._by_name[n] for n, s in self._slots.items()}

    def __getitem__(self, name: str) -> Adapter:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def slot(self, name: str) -> int:
        """The slot of adapter ``name`` (KeyError if there is none)."""
        return self._slots[name]

    def slots(self) -> dict[str, int]:
        """A new dict of name to slot."""
        return dict(self._slots)

    def put(self, name: str, adapter: Adapter) -> "AdapterSet":
        """A set with ``adapter`` under ``name``: a replaced name keeps its slot, a new name
        takes ``next_slot``."""
        items = {n: (self._slots[n], a) for n, a in self._by_name.items()}
        slot = self._slots.get(name, self.next_slot)
        items[name] = (slot, adapter)
        return AdapterSet(items, max(self.next_slot, slot + 1))

    def without(self, name: str) -> "AdapterSet":
        """A set without ``name`` (KeyError if absent); ``next_slot`` is kept."""
        self._by_name[name]
        items = {n: (self._slots[n], a) for n, a in self._by_name.items() if n != name}
        return AdapterSet(items, self.next_slot)

    def owned(self) -> "AdapterSet":
        """The same set with every array copied."""
        return AdapterSet({n: (self._slots[n], a.owned()) for n, a in self._by_name.items()},
                          self.next_slot)


NO_ADAPTERS = AdapterSet()


class LayerState(NamedTuple):
    """Everything a layer computes with. ``tensor`` is the core's view of ``weight``."""

    weight: Nf4Weight
    tensor: _core.Nf4Tensor
    lora: Adapter
    adapters: AdapterSet
    bias: np.ndarray | None


def _own(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else frozen(np.array(a, copy=True))


def make_state(weight: Nf4Weight, lora: Adapter, bias: np.ndarray | None,
               adapters: AdapterSet | None = None) -> LayerState:
    """A :class:`LayerState`; builds the core's view of ``weight`` (ValueError if the arrays do
    not fit its shape)."""
    return LayerState(weight, weight.tensor(), lora,
                      NO_ADAPTERS if adapters is None else adapters, bias)


def quantize_weight(w: np.ndarray, group_size: int, double_quant: bool) -> Nf4Weight:
    """Quantize a float32 C-contiguous aligned (out, in) weight, already validated."""
    out_features, in_features = (int(d) for d in w.shape)
    codes = np.empty(_core.packed_bytes(out_features, in_features), dtype=np.uint8)
    scales = np.empty(_core.group_count(out_features * in_features, group_size), np.float32)
    _core.quantize_nf4(w, group_size, codes, scales)
    weight = Nf4Weight(out_features, in_features, group_size, frozen(codes), frozen(scales))
    if double_quant:
        qscales, nested, nested_map, offset = double_quantize(scales)
        weight = weight._replace(scales=None, qscales=frozen(qscales),
                                 nested_scales=frozen(nested), nested_map=nested_map,
                                 nested_offset=offset)
    return weight


def new_adapter(rank: int, scaling: float, seed: int, out_features: int,
                in_features: int) -> Adapter:
    """PEFT's default LoRA init: ``A`` Kaiming-uniform ``U(-1/sqrt(in), 1/sqrt(in))`` from a
    PCG64 stream of ``seed`` (the same on every platform), ``B`` zeros."""
    rng = np.random.Generator(np.random.PCG64(seed))
    bound = 1.0 / math.sqrt(in_features)
    a = rng.uniform(-bound, bound, size=(rank, in_features)).astype(np.float32)
    b = np.zeros((out_features, rank), dtype=np.float32)
    return Adapter(frozen(a), frozen(b), scaling)


# Below this many rows or columns (or for ranks near it) a full SVD is cheap enough and exact.
_FULL_SVD_DIM = 1024


def truncated_svd(m: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The leading ``rank`` singular triplets of a float64 matrix ``m``: ``(U_r, S_r, V_r^T)``.

    Small matrices use ``numpy.linalg.svd`` (exact). Larger ones use a randomized range finder
    (Halko, Martinsson and Tropp 2011) with ``rank + max(rank, 16)`` probe vectors from a fixed
    seed and 6 power iterations, each re-orthonormalized: the cost is a few dozen products with
    ``m`` instead of a cubic decomposition (4096 x 4096: about a second instead of minutes on two
    cores). A quantization residual has a flat spectrum, where the randomized subspace is not the
    exact top one: on a 2048 x 2048 Gaussian weight's NF4 residual it captures 95% of the exact
    top-16 energy, and the norm left after subtracting it is 0.98563 of the residual's against
    0.98490 for the exact truncation (0.07% apart). The result is deterministic for a given
    ``m``.
    """
    rows, cols = m.shape
    probes = rank + max(rank, 16)
    if min(rows, cols) <= _FULL_SVD_DIM or probes * 2 >= min(rows, cols):
        u, sv, vt = np.linalg.svd(m, full_matrices=False)
        return u[:, :rank], sv[:rank], vt[:rank]
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(m @ rng.standard_normal((cols, probes)))
    for _ in range(6):
        z, _ = np.linalg.qr(m.T @ q)
        q, _ = np.linalg.qr(m @ z)
    ub, sv, vt = np.linalg.svd(q.T @ m, full_matrices=False)
    return (q @ ub)[:, :rank], sv[:rank], vt[:rank]


def loftq_init(w: np.ndarray, rank: int, scaling: float, group_size: int, double_quant: bool,
               iters: int) -> tuple[Nf4Weight, Adapter]:
    """LoftQ initialization (Li et al., 2023): an NF4 base ``Q`` and an adapter ``B, A`` chosen
    so that ``deq(Q) + scaling * B @ A`` is close to ``w``.

    Starting from ``B A = 0``, each of ``iters`` rounds quantizes ``w - scaling * B A`` (float64,
    rounded once to float32) to ``Q``, takes the rank-``r`` truncated SVD ``U S V^T`` of the
    residual ``w - deq(Q)`` in float64 (:func:`truncated_svd`) and sets ``B = U_r sqrt(S_r) /
    sqrt(scaling)``, ``A = sqrt(S_r) V_r^T / sqrt(scaling)`` (rounded to float32). The stored
    base is the last ``Q``, not the quantization of ``w``.

    Parameters
    ----------
    w : numpy.ndarray
        float32 C-contiguous aligned (out, in), finite (already validated).
    rank, scaling, group_size, double_quant
        As validated by ``QLoraLinear.from_weight``.
    iters : int
        Rounds, >= 1.

    Returns
    -------
    weight : Nf4Weight
    lora : Adapter
    """
    w64 = w.astype(np.float64)
    ba = np.zeros_like(w64)
    root = math.sqrt(scaling)
    for _ in range(iters):
        target = np.ascontiguousarray(w64 - scaling * ba, dtype=np.float32)
        weight = quantize_weight(target, group_size, double_quant)
        deq = np.empty(w.shape, np.float32)
        _core.dequantize_nf4(weight.tensor(), deq)
        u, sv, vt = truncated_svd(w64 - deq, rank)
        del deq
        sq = np.sqrt(sv[:rank])
        b = (u[:, :rank] * sq) / root
        a = (sq[:, None] * vt[:rank]) / root
        del u, vt
        ba = b @ a
    return weight, Adapter(frozen(a.astype(np.float32)), frozen(b.astype(np.float32)), scaling)


# ---------------------------------------------------------------------- double quantization
def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """float32 ``torch.linspace`` as torch computes it on the CPU: a float32 step, the first
    half ``start + step * i`` and the second half ``end - step * (steps - 1 - i)``, each one
    fused multiply-add (emulated exactly in float64: the operands have few enough bits)."""
    s0, s1 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([s0], dtype=np.float32)
    step = np.float64((s1 - s0) / np.float32(steps - 1))
    idx = np.arange(steps, dtype=np.float64)
    lo = (np.float64(s0) + step * idx).astype(np.float32)
    hi = (np.float64(s1) - step * (steps - 1 - idx)).astype(np.float32)
    return np.where(idx < steps // 2, lo, hi).astype(np.float32)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7,
                       total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' dynamic 8-bit quantization map, bit for bit, without torch.

    For each exponent ``i`` in ``0 .. max_exponent_bits - 1`` the map holds the midpoints of
    a float32 linspace over [0.1, 1] (``2**(i + non_sign_bits - max_exponent_bits) + 1``
    points, twice as many when unsigned) scaled by ``10**(i - max_exponent_bits + 1)``, and
    their negatives when ``signed``; then 0 and 1; zero padding to 256 entries; sorted.

    Parameters
    ----------
    signed : bool, default True
    max_exponent_bits : int, default 7
    total_bits : int, default 8

    Returns
    -------
    numpy.ndarray
        float32, shape ``(max(256, 2**total_bits),)``, ascending (zero-padded to 256 entries,
        as bitsandbytes does).

    Raises
    ------
    ValueError
        If the arguments do not make ``2**total_bits`` entries.
    """
    data: list[np.float32] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    i = 0
    for i in range(max_exponent_bits):
        if signed:
            items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        else:
            items = 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        data += _scaled_means(items, max_exponent_bits, i, signed)
    if additional_items > 0:
        data += _scaled_means(additional_items + 1, max_exponent_bits, i, signed)
    data += [np.float32(0.0), np.float32(1.0)]
    if len(data) != 2 ** total_bits:
        raise ValueError(f"dynamic map has {len(data)} entries, expected {2 ** total_bits}")
    data += [np.float32(0.0)] * (256 - len(data))  # bitsandbytes pads to 256 entries
    return np.sort(np.array(data, dtype=np.float32))


def _scaled_means(items: int, max_exponent_bits: int, i: int, signed: bool) -> list:
    b = _linspace_f32(0.1, 1.0, items)
    means = (b[:-1] + b[1:]) / np.float32(2.0)
    v = (np.float32(10.0 ** (-(max_exponent_bits - 1) + i)) * means).astype(np.float32)
    out = list(v)
    if signed:
        out += list(-v)
    return out


DYNAMIC_MAP = frozen(create_dynamic_map())


def dequantize_scales(qscales: np.ndarray, nested_scales: np.ndarray, nested_map: np.ndarray,
                      offset: float) -> np.ndarray:
    """``nested_map[q] * nested_scales[i // 256] + offset`` with two float32 roundings."""
    rep = np.repeat(nested_scales, NESTED_BLOCK)[: qscales.size]
    with np.errstate(over="ignore"):  # an overflow gives inf, which the loaders report
        return (nested_map[qscales] * rep + np.float32(offset)).astype(np.float32)


def double_quantize(absmax: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Quantize per-group scales as bitsandbytes' ``compress_statistics`` does, rounding to the
    exactly nearest code.

    ``offset = mean(absmax)`` (accumulated in float64, rounded to float32); the centred
    ``absmax - offset`` (float32) is split into blocks of 256 whose float32 absmax is
    ``nested_scales``; each scale gets the code ``q`` of :data:`DYNAMIC_MAP` whose decoded value
    ``map[q] * nested + offset`` (float32, as the kernels decode it) is nearest to the original
    absmax (ties to the lower code). bitsandbytes' own CPU quantizer uses a lookup table that is
    off by one code on ~0.1% of values; importing its states stays exact, since the codes are
    taken as they are.

    Parameters
    ----------
    absmax : numpy.ndarray
        float32 per-group scales, finite, non-empty.

    Returns
    -------
    qscales : numpy.ndarray
        uint8, same length as ``absmax``.
    nested_scales : numpy.ndarray
        float32, ``ceil(len(absmax) / 256)``.
    nested_map : numpy.ndarray
        float32 (256,), the dynamic map (shared, read-only).
    offset : float
        A float32 value.
    """
    absmax = np.ascontiguousarray(absmax, dtype=np.float32)
    g = absmax.size
    offset = np.float32(np.mean(absmax, dtype=np.float64))
    centred = (absmax - offset).astype(np.float32)
    nblocks = (g + NESTED_BLOCK - 1) // NESTED_BLOCK
    padded = np.zeros(nblocks * NESTED_BLOCK, dtype=np.float32)
    padded[:g] = centred
    nested = np.abs(padded.reshape(nblocks, NESTED_BLOCK)).max(axis=1).astype(np.float32)
    rep = np.repeat(nested, NESTED_BLOCK)[:g]
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(rep > 0, centred.astype(np.float64) / rep, 0.0)
    table = DYNAMIC_MAP
    hi = np.clip(np.searchsorted(table, v, side="left"), 1, table.size - 1)
    lo = hi - 1
    dec_lo = (table[lo] * rep + offset).astype(np.float32).astype(np.float64)
    dec_hi = (table[hi] * rep + offset).astype(np.float32).astype(np.float64)
    target = absmax.astype(np.float64)
    q = np.where(np.abs(dec_hi - target) < np.abs(dec_lo - target), hi, lo).astype(np.uint8)
    return q, nested, DYNAMIC_MAP, float(offset)
