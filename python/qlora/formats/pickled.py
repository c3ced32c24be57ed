"""The pickle state of a layer: a :class:`qlora._state.LayerState` as a dict of builtins and
NumPy arrays under a format version, and back.

Version 1: ``version, out_features, in_features, group_size, codes, scales, qscales,
nested_scales, nested_map, nested_offset, lora_a, lora_b, scaling, bias``. Version 2 (written
only when the layer holds named adapters, so older qlora refuses such a pickle instead of
dropping them) adds ``adapters`` (a list of ``{name, slot, a, b, scaling}``) and ``next_slot``.
A dict of another version is refused with the versions this qlora reads; an old pickle is kept
as a test fixture (``tests/data/layer_v1.pkl``) so every version stays readable.
"""

from __future__ import annotations

import numpy as np

from .._state import Adapter, AdapterSet, LayerState, Nf4Weight, frozen, make_state
from .._validate import check_f32_range, check_scaling

__all__ = ["PICKLE_VERSION", "state_from_dict", "state_to_dict"]

PICKLE_VERSION = 1
ADAPTERS_VERSION = 2
_F32 = np.dtype(np.float32)
_U8 = np.dtype(np.uint8)


def state_to_dict(state: LayerState) -> dict:
    """The version-1 pickle dict of ``state`` (arrays shared, not copied: they are read-only)."""
    w, lora = state.weight, state.lora

    def plain(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.asarray(a)

    out = {
        "version": ADAPTERS_VERSION if state.adapters else PICKLE_VERSION,
        "out_features": w.out_features,
        "in_features": w.in_features,
        "group_size": w.group_size,
        "codes": plain(w.codes),
        "scales": plain(w.scales),
        "qscales": plain(w.qscales),
        "nested_scales": plain(w.nested_scales),
        "nested_map": plain(w.nested_map),
        "nested_offset": float(w.nested_offset),
        "lora_a": lora.a,
        "lora_b": lora.b,
        "scaling": lora.scaling,
        "bias": state.bias,
    }
    if state.adapters:
        named = state.adapters
        out["adapters"] = [{"name": n, "slot": named.slot(n), "a": ad.a, "b": ad.b,
                            "scaling": ad.scaling} for n, ad in named.items()]
        out["next_slot"] = named.next_slot
    return out


def state_from_dict(state: dict) -> LayerState:
    """Rebuild a state from a pickle dict, with owning copies of every array.

    Raises
    ------
    ValueError
        If the version is not one this qlora reads, the arrays do not fit the shape, or the
        scaling or offset is not a float32 the core can compute with.
    """
    version = state.get("version")
    if version not in (PICKLE_VERSION, ADAPTERS_VERSION):
        raise ValueError(
            f"cannot unpickle QLoraLinear: format version {version!r} is not supported "
            f"(this qlora reads versions {PICKLE_VERSION} and {ADAPTERS_VERSION})"
        )

    def arr(key: str, dtype: np.dtype) -> np.ndarray | None:
        v = state[key]
        return None if v is None else frozen(np.array(v, dtype=dtype, copy=True))

    weight = Nf4Weight(
        int(state["out_features"]), int(state["in_features"]), int(state["group_size"]),
        arr("codes", _U8), arr("scales", _F32), arr("qscales", _U8),
        arr("nested_scales", _F32), arr("nested_map", _F32),
        check_f32_range(float(state["nested_offset"]), "nested_offset", zero_ok=True),
    )
    lora = Adapter(arr("lora_a", _F32), arr("lora_b", _F32),
                   check_scaling(state["scaling"], "scaling"))
    named = None
    if version == ADAPTERS_VERSION:
        items = {}
        listed = state.get("adapters")
        if not isinstance(listed, list) or type(state.get("next_slot")) is not int:
            raise ValueError("cannot unpickle QLoraLinear: a version-2 state needs a list "
                             "'adapters' and an int 'next_slot'")
        for entry in listed:
            a = frozen(np.array(entry["a"], dtype=_F32, copy=True))
            b = frozen(np.array(entry["b"], dtype=_F32, copy=True))
            if a.ndim != 2 or b.shape != (weight.out_features, a.shape[0]) or (
                    a.shape[1] != weight.in_features) or str(entry["name"]) in items:
                raise ValueError(f"cannot unpickle QLoraLinear: adapter {entry['name']!r} has "
                                 f"shapes {a.shape} and {b.shape} or is repeated")
            items[str(entry["name"])] = (int(entry["slot"]),
                                         Adapter(a, b, check_scaling(entry["scaling"], "scaling")))
        named = AdapterSet(items, int(state["next_slot"]))
    return make_state(weight, lora, arr("bias", _F32), named)
