"""Named adapters on one layer and mixed-adapter batches.

:class:`AdapterMethods` gives :class:`qlora.QLoraLinear` its ``add_adapter``,
``remove_adapter`` and ``adapters``; :func:`forward_mixed` runs a forward whose rows name
different adapters: it groups the rows by adapter (each group's rows ascending, int64) and
calls ``_core.forward_adapters`` once, which computes the base product for the whole batch
and adds each adapter's LoRA term to its rows in the same parallel loop.

Concurrency: a layer's state is immutable and replaced whole. A mutation builds the new
adapter set (a copy of the small name tables, the new adapter's arrays; never the base
weight) and stores it with one write, under :data:`WRITE_LOCK` so two mutations cannot lose
each other's update. A forward reads the state once and passes the arrays it uses to the core
as arguments, which the binding holds for the whole call: an adapter removed meanwhile stays
alive until that forward returns. No lock is taken by a forward.
"""

from __future__ import annotations

import dataclasses
import numbers
import threading
import types
from typing import Callable, Mapping

import numpy as np

from . import _core
from ._state import DEFAULT_ADAPTER, Adapter, AdapterSet, LayerState
from ._validate import (F32_MAX, F32_MIN_NORMAL, as_float32, check_alpha, check_bool,
                        check_scaling, float32_matrix)

__all__ = ["AdapterInfo", "AdapterMethods", "BASE_ONLY", "WRITE_LOCK", "check_adapter_name",
           "forward_mixed"]

# Taken by every change of a layer's state; never by a forward.
WRITE_LOCK = threading.RLock()
# The slot code of a base-only row in an integer array of slots.
BASE_ONLY = -1
_NONE = type(None)
_PLAIN_KEYS = frozenset((str, int, _NONE))


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """What a layer holds for one named adapter.

    Attributes
    ----------
    name : str
    slot : int
        The adapter's integer slot (>= 1), usable in place of its name in
        ``forward(adapters=...)``; fixed from the first ``add_adapter`` of the name until it is
        removed, and never given to another adapter of the layer afterwards.
    rank : int
        Rows of its ``A``; 0 for a placeholder that :func:`qlora.add_peft_adapter` registers on
        layers the PEFT adapter does not target (their rows get the base only).
    scaling : float
        The factor of its LoRA term.
    nbytes : int
        Bytes of its ``A`` and ``B``.
    """

    name: str
    slot: int
    rank: int
    scaling: float
    nbytes: int


def check_adapter_name(name: object, arg: str = "name") -> str:
    """``name`` if it is a non-empty str other than the reserved ``"default"``."""
    if not isinstance(name, str):
        raise TypeError(f"{arg} must be a str, got {type(name).__name__}")
    if not name:
        raise ValueError(f"{arg} must be a non-empty str, got ''")
    if name == DEFAULT_ADAPTER:
        raise ValueError(f"{arg} must not be {DEFAULT_ADAPTER!r}: that name is reserved for the "
                         "default adapter (set_lora)")
    return name


class AdapterMethods:
    """The named-adapter methods of :class:`qlora.QLoraLinear` (a mixin: the layer module
    provides ``_read_state`` and ``_update_state``)."""

    __slots__ = ()

    def _read_state(self) -> LayerState:  # pragma: no cover - provided by the layer
        raise NotImplementedError

    def _update_state(self, change: Callable[[LayerState], LayerState]) -> LayerState:
        raise NotImplementedError  # pragma: no cover - provided by the layer

    def add_adapter(self, name: str, a: object, b: object, *, alpha: float | None = None,
                    scaling: float | None = None, replace: bool = False) -> int:
        """Add a named LoRA adapter; rows of a mixed batch select it by name or slot.

        Parameters
        ----------
        name : str
            Non-empty, not ``"default"`` (reserved for the default adapter of ``set_lora``).
        a : array_like, shape (r, in_features)
        b : array_like, shape (out_features, r)
            Finite real numbers, copied to float32; ``r >= 1`` and may differ from the
            layer's ``rank`` and from other adapters' ranks (no padding).
        alpha : float, optional
            ``scaling = alpha / r``.
        scaling : float, optional
            A normal float32 number > 0. Give exactly one of ``alpha`` and ``scaling``.
        replace : bool, default False
            Replace an adapter of the same name (it keeps its slot). Without it a name that is
            already there is an error.

        Returns
        -------
        int
            The adapter's slot: new names get 1, 2, 3, ... in order of addition; a slot is
            never reused within the layer's life (a removed adapter's slot stays unused).

        Raises
        ------
        TypeError
            If ``name`` is not a str, an array is not real numeric, or not exactly one of
            ``alpha`` and ``scaling`` is given.
        ValueError
            If ``name`` is empty, ``"default"`` or already present without ``replace``, a shape
            does not fit the layer, a value is not finite, or the scaling is out of range. The
            layer is then unchanged.
        """
        name = check_adapter_name(name)
        replace = check_bool(replace, "replace")
        w = self._read_state().weight
        a_arr = as_float32(a, "a", ndim=2)
        r = int(a_arr.shape[0])
        if r < 1:
            raise ValueError(f"a must have at least one row (rank >= 1), got shape {a_arr.shape}")
        a_arr = float32_matrix(a_arr, "a", (r, w.in_features))
        b_arr = float32_matrix(b, "b", (w.out_features, r))
        if (alpha is None) == (scaling is None):
            got = "neither" if alpha is None else f"both (alpha={alpha!r}, scaling={scaling!r})"
            raise TypeError(f"add_adapter takes exactly one of alpha and scaling, got {got}")
        s = check_alpha(alpha, r) / r if alpha is not None else check_scaling(scaling, "scaling")
        return self._put_adapter(name, Adapter(a_arr, b_arr, s), replace)

    def _put_adapter(self, name: str, adapter: Adapter, replace: bool) -> int:
        """Store a validated adapter (read-only arrays of this layer's shapes) under ``name``."""
        def put(state: LayerState) -> LayerState:
            if not replace and name in state.adapters:
                raise ValueError(f"name: adapter {name!r} is already present (slot "
                                 f"{state.adapters.slot(name)}); pass replace=True to replace "
                                 f"it or call remove_adapter({name!r}) first")
            return state._replace(adapters=state.adapters.put(name, adapter))

        return self._update_state(put).adapters.slot(name)

    def remove_adapter(self, name: str) -> None:
        """Remove the named adapter; its slot is not given to any later adapter.

        A forward already running with it finishes with it (its arrays stay alive until then).

        Raises
        ------
        TypeError
            If ``name`` is not a str.
        KeyError
            If the layer has no adapter ``name`` (the default adapter is not removable).
        """
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")

        def drop(state: LayerState) -> LayerState:
            if name not in state.adapters:
                raise KeyError(f"name: no adapter {name!r} on this layer (it holds "
                               f"{sorted(state.adapters)})")
            return state._replace(adapters=state.adapters.without(name))

        self._update_state(drop)

    @property
    def adapters(self) -> Mapping[str, AdapterInfo]:
        """The named adapters: a read-only mapping of name to :class:`qlora.AdapterInfo`
        (slot, rank, scaling, bytes), in slot order. The default adapter (``set_lora``,
        ``"default"`` or slot 0 in a mixed batch) is not listed."""
        named = self._read_state().adapters
        infos = sorted((named.slot(n), n, ad) for n, ad in named.items())
        return types.MappingProxyType({
            n: AdapterInfo(n, slot, ad.rank, ad.scaling, int(ad.a.nbytes + ad.b.nbytes))
            for slot, n, ad in infos})


# ---------------------------------------------------------------------- mixed batches
def _unknown(row: int, value: object, named: AdapterSet) -> KeyError:
    return KeyError(f"adapters[{row}]: no adapter {value!r} on this layer (names "
                    f"{sorted(named)}, their slots, {DEFAULT_ADAPTER!r} or 0 for the default "
                    "adapter, None or -1 for the base only)")


def _codes_from_sequence(adapters: object, batch: int, named: AdapterSet) -> np.ndarray:
    if not isinstance(adapters, (list, tuple)):
        if not isinstance(adapters, np.ndarray) or adapters.dtype != object:
            raise TypeError(f"adapters must be a str, an int, a list or tuple of str/int/None, "
                            f"or a 1-D integer ndarray, got {type(adapters).__name__}")
        adapters = adapters.tolist()
    if len(adapters) != batch:
        raise ValueError(f"adapters must have one entry per row of x ({batch}), got "
                         f"{len(adapters)}")
    keys = named.keys
    if not set(map(type, adapters)) <= _PLAIN_KEYS:
        for row, e in enumerate(adapters):
            if isinstance(e, (bool, np.bool_)) or not isinstance(
                    e, (str, numbers.Integral, _NONE)):
                raise TypeError(f"adapters[{row}] must be a str, an int or None, got "
                                f"{type(e).__name__} ({e!r:.40})")
        adapters = [e if isinstance(e, (str, _NONE)) else int(e) for e in adapters]
    get = keys.get
    codes = [get(e, -2) for e in adapters]
    if -2 in codes:
        row = codes.index(-2)
        raise _unknown(row, adapters[row], named)
    return np.array(codes, dtype=np.int64)


def _row_scales(scales: object, n: int) -> np.ndarray:
    if isinstance(scales, numbers.Real) and not isinstance(scales, (bool, np.bool_)):
        arr = np.full(n, float(scales), dtype=np.float64)
    else:
        try:
            arr = np.asarray(scales)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"adapter_scales must be real numbers, got "
                            f"{type(scales).__name__} ({exc})") from None
        if arr.dtype.kind not in "fiu":
            raise TypeError(f"adapter_scales must be real numbers, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
        if arr.ndim != 1 or arr.shape[0] != n:
            raise ValueError(f"adapter_scales must be a number or have shape ({n},) (one per "
                             f"row), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        row = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"adapter_scales[{row}] must be finite, got {arr[row]}")
    return arr


def _scaled(prod: np.ndarray, rows: np.ndarray | None, scales: np.ndarray) -> np.ndarray:
    """``prod`` (float64 scaling times multiplier of each of ``rows``) as float32, each a normal
    float32 number or 0."""
    mag = np.abs(prod)
    if mag.size and not (mag.max() <= F32_MAX and mag.min() >= F32_MIN_NORMAL):
        bad = (mag > F32_MAX) | ((mag < F32_MIN_NORMAL) & (mag != 0))
    if mag.size and not (mag.max() <= F32_MAX and mag.min() >= F32_MIN_NORMAL) and bad.any():
        j = int(np.flatnonzero(bad)[0])
        row = j if rows is None else int(rows[j])
        raise ValueError(f"adapter_scales[{row}] = {scales[row]!r} times its adapter's scaling "
                         f"is {prod[j]!r}, which is not a normal float32 number "
                         "(1.1754944e-38 to 3.4028235e+38 in magnitude) or 0")
    return prod.astype(np.float32)


def forward_mixed(state: LayerState, x: np.ndarray, y: np.ndarray, adapters: object,
                  scales: object, precision: str) -> None:
    """``y = x @ deq(W).T + bias`` plus, on each row, the LoRA term of the adapter it names.

    ``x`` and ``y`` are checked float32 arrays; ``adapters`` and ``scales`` are the user's
    arguments of ``QLoraLinear.forward``. The layer's state is not touched.
    """
    named = state.adapters
    if isinstance(adapters, (str, numbers.Integral)) and not isinstance(adapters,
                                                                         (bool, np.bool_)):
        n = x.size // x.shape[-1] if x.ndim else 0
        keys, by_slot = named.keys, named.by_slot
        key = adapters if isinstance(adapters, str) else int(adapters)
        slot = keys.get(key, -2)
        if slot == -2:
            raise KeyError(f"adapters: no adapter {adapters!r} on this layer (names "
                           f"{sorted(named)}, their slots, {DEFAULT_ADAPTER!r} or 0 for the "
                           "default adapter)")
        ad = state.lora if slot == 0 else by_slot.get(slot)
        segments = []
        if ad is not None and ad.rank:
            rs = None
            if scales is not None:
                rows_s = _row_scales(scales, n)
                rs = _scaled(rows_s * ad.scaling, None, rows_s)
            segments.append((ad.a, ad.b, ad.scaling, None, rs))
        _core.forward_adapters(state.tensor, x, segments, state.bias, y, precision)
        return
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (batch, in_features) when adapters names one adapter "
                         f"per row, got shape {x.shape}")
    batch = x.shape[0]
    if type(adapters) is np.ndarray and adapters.dtype.kind in "iu":
        if adapters.ndim != 1 or adapters.shape[0] != batch:
            raise ValueError(f"adapters must have shape ({batch},) (one slot per row of x), got "
                             f"shape {adapters.shape}")
        codes = adapters.astype(np.int64, copy=False)
    else:
        codes = _codes_from_sequence(adapters, batch, named)
    row_scales = None if scales is None else _row_scales(scales, batch)
    by_slot, lora = named.by_slot, state.lora
    segments = []
    if batch:
        order = np.argsort(codes, kind="stable")  # each adapter's rows stay ascending
        ordered = codes[order]
        cuts = (np.flatnonzero(ordered[1:] != ordered[:-1]) + 1).tolist()
        bounds = [0, *cuts, batch]
        picked = []  # (slot, lo, hi, adapter) of the segments that add a LoRA term
        for slot, lo, hi in zip(ordered[bounds[:-1]].tolist(), bounds[:-1], bounds[1:]):
            if slot == BASE_ONLY:
                continue
            ad = lora if slot == 0 else by_slot.get(slot)
            if ad is None:
                raise _unknown(int(order[lo]), slot, named)
            if ad.rank:
                picked.append((slot, lo, hi, ad))
        if row_scales is not None and picked:
            # Every row's scaling times its multiplier, in the sorted order, checked at once.
            sel = np.concatenate([order[lo:hi] for _, lo, hi, _ in picked])
            mult = np.repeat([ad.scaling for *_, ad in picked], [hi - lo for _, lo, hi, _ in
                                                                 picked])
            prod = _scaled(row_scales[sel] * mult, sel, row_scales)
            at = 0
        for slot, lo, hi, ad in picked:
            rows = None if hi - lo == batch else order[lo:hi]
            rs = None
            if row_scales is not None:
                rs, at = prod[at:at + hi - lo], at + hi - lo
            segments.append((ad.a, ad.b, ad.scaling, rows, rs))
    _core.forward_adapters(state.tensor, x, segments, state.bias, y, precision)
