"""qlora's own file format: layer states (:mod:`qlora._state`) in one safetensors file, and back.

Tensors of a layer named ``NAME`` (any string; dots allowed):

``NAME.codes``          uint8 (out_features, packed_row_bytes)   qlora's packed rows
``NAME.scales``         float32 (num_groups,)                    plain scales, or
``NAME.qscales``        uint8 (num_groups,)                      double-quantized scales with
``NAME.nested_scales``  float32 (ceil(num_groups / 256),)
``NAME.nested_map``     float32 (256,)
``NAME.lora_a``         float32 (rank, in_features)
``NAME.lora_b``         float32 (out_features, rank)
``NAME.bias``           float32 (out_features,)                  optional
``NAME.lora_a.SLOT``    float32 (rank, in_features)              named adapter of slot SLOT
``NAME.lora_b.SLOT``    float32 (out_features, rank)             (none for a rank-0 placeholder)

(A key ends in a fixed word or in ``lora_a.``/``lora_b.`` and digits, so the keys of two
layers never collide whatever their names.)

``__metadata__`` (string values): ``format = "qlora"``, ``format_version`` (``"1"``, or ``"2"``
when a layer holds named adapters, so a qlora that predates them refuses such a file instead of
silently dropping the adapters; both are read),
``codes_layout`` (a fingerprint of the core's packing, so a file written with another layout is
refused rather than misread), and ``layers``: JSON
``{NAME: {out_features, in_features, group_size, rank, alpha, scaling, double_quant,
nested_offset, bias, adapters, next_slot}}`` where the version-2-only ``adapters`` is a list of
``{name, slot, rank, scaling}`` and ``next_slot`` the slot the layer gives its next new adapter.
Other tensors may share the file (``qlora quantize`` carries the
checkpoint's non-matrix tensors over); the loader ignores them after validating them.

This module converts :class:`qlora._state.LayerState` values; ``qlora.save_layers`` and
``qlora.load_layers`` (in the layer module) wrap them in ``QLoraLinear``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Mapping

import numpy as np

from .. import _core
from .._state import Adapter, AdapterSet, LayerState, Nf4Weight, frozen, make_state
from .._validate import check_f32_range
from .safetensors import SafetensorsFile, no_duplicates, write_safetensors

__all__ = ["ADAPTERS_VERSION", "CODES_LAYOUT", "FORMAT_NAME", "FORMAT_VERSION", "SUFFIXES", "layer_tensors",
           "layers_metadata", "read_layers", "read_layers_metadata", "write_layers"]

FORMAT_NAME = "qlora"
FORMAT_VERSION = "1"  # written when no layer holds named adapters
ADAPTERS_VERSION = "2"  # written when one does
READ_VERSIONS = (FORMAT_VERSION, ADAPTERS_VERSION)


def _codes_layout() -> str:
    """A name for the core's packing that changes whenever the packing does: the digest of a
    fixed code pattern packed by the core itself (so a file written with another layout is
    refused instead of being decoded into garbage)."""
    out_f, in_f = 3, 2 * int(_core.BLOCK_COLS) + 7
    n = out_f * in_f
    codes = (np.arange(n) * 7 + 3) % 16
    if n % 2:
        codes = np.append(codes, 7)
    flat = ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)
    packed = np.empty(_core.packed_bytes(out_f, in_f), dtype=np.uint8)
    _core.codes_from_bnb(flat, out_f, in_f, packed)
    digest = hashlib.sha256(packed.tobytes()).hexdigest()[:12]
    return f"rows-blocks{int(_core.BLOCK_COLS)}-{digest}"


CODES_LAYOUT = _codes_layout()
SUFFIXES = ("codes", "scales", "qscales", "nested_scales", "nested_map", "lora_a", "lora_b",
            "bias")
# Dimensions above this are refused before anything is computed from them.
MAX_DIM = 1 << 31


def layer_tensors(name: str, state: LayerState) -> list[tuple[str, np.ndarray, None]]:
    """The (key, array, None) tensors of one layer, for :func:`write_safetensors`."""
    w, lora = state.weight, state.lora
    row_bytes = w.codes.size // w.out_features
    out = [(f"{name}.codes", np.asarray(w.codes).reshape(w.out_features, row_bytes), None)]
    if w.qscales is None:
        out.append((f"{name}.scales", np.asarray(w.scales), None))
    else:
        out += [(f"{name}.qscales", np.asarray(w.qscales), None),
                (f"{name}.nested_scales", np.asarray(w.nested_scales), None),
                (f"{name}.nested_map", np.asarray(w.nested_map), None)]
    out += [(f"{name}.lora_a", lora.a, None), (f"{name}.lora_b", lora.b, None)]
    if state.bias is not None:
        out.append((f"{name}.bias", state.bias, None))
    named = state.adapters
    for ad_name, ad in named.items():
        if ad.rank:
            slot = named.slot(ad_name)
            out += [(f"{name}.lora_a.{slot}", ad.a, None), (f"{name}.lora_b.{slot}", ad.b, None)]
    return out


def layers_metadata(states: Mapping[str, LayerState]) -> dict[str, str]:
    """The ``__metadata__`` describing the layers ``states``."""
    info = {}
    for name, state in states.items():
        w, lora = state.weight, state.lora
        info[name] = {
            "out_features": w.out_features, "in_features": w.in_features,
            "group_size": w.group_size, "rank": lora.rank, "alpha": lora.scaling * lora.rank,
            "scaling": lora.scaling, "double_quant": w.qscales is not None,
            "nested_offset": float(w.nested_offset), "bias": state.bias is not None,
        }
        if state.adapters:
            named = state.adapters
            info[name]["adapters"] = [{"name": n, "slot": named.slot(n), "rank": ad.rank,
                                       "scaling": ad.scaling} for n, ad in named.items()]
            info[name]["next_slot"] = named.next_slot
    version = (ADAPTERS_VERSION if any(s.adapters for s in states.values())
               else FORMAT_VERSION)
    return {"format": FORMAT_NAME, "format_version": version,
            "codes_layout": CODES_LAYOUT, "layers": json.dumps(info)}


def write_layers(path: str | os.PathLike, states: Mapping[str, LayerState]) -> None:
    """Write layer states (names already checked) to one safetensors file, atomically."""
    tensors = [t for name, state in states.items() for t in layer_tensors(name, state)]
    write_safetensors(path, tensors, layers_metadata(states))


class _Reader:
    """Checks one layer's metadata and tensors against each other before building it."""

    def __init__(self, st: SafetensorsFile) -> None:
        self.st = st

    def fail(self, field: str, msg: str) -> ValueError:
        return self.st.error(field, msg)

    def meta_int(self, name: str, info: dict, key: str, lo: int, hi: int) -> int:
        v = info.get(key)
        if type(v) is not int or not lo <= v <= hi:
            raise self.fail(f"layers[{name!r}].{key}", f"must be an integer in {lo}..{hi}, "
                            f"got {v!r}")
        return v

    def meta_float(self, name: str, info: dict, key: str, positive: bool) -> float:
        v = info.get(key)
        try:
            finite = (not isinstance(v, bool) and isinstance(v, (int, float))
                      and math.isfinite(v))
        except OverflowError:  # a JSON integer beyond the float range
            finite = False
        if not finite or (positive and v <= 0):
            need = "a finite float32 number" + (" > 0" if positive else "")
            raise self.fail(f"layers[{name!r}].{key}", f"must be {need}, got {v!r:.40}")
        try:  # the core computes with it in float32
            return check_f32_range(float(v), key, zero_ok=not positive)
        except (ValueError, OverflowError) as exc:
            raise self.fail(f"layers[{name!r}].{key}", str(exc)) from None

    def meta_bool(self, name: str, info: dict, key: str) -> bool:
        v = info.get(key)
        if type(v) is not bool:
            raise self.fail(f"layers[{name!r}].{key}", f"must be true or false, got {v!r}")
        return v

    def tensor(self, key: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        t = self.st.tensors.get(key)
        if t is None:
            raise self.fail(f"tensor {key!r}", "missing")
        if t.dtype != dtype:
            raise self.fail(f"tensor {key!r} dtype", f"must be {dtype}, got {t.dtype}")
        if t.shape != shape:
            raise self.fail(f"tensor {key!r} shape", f"must be {shape} to match the "
                            f"metadata, got {t.shape}")
        return self.st.array(key)

    def finite(self, key: str, arr: np.ndarray) -> np.ndarray:
        if arr.size and not np.isfinite(arr).all():
            raise self.fail(f"tensor {key!r}", "holds NaN or Inf")
        return arr

    def layer(self, name: str, info: object) -> LayerState:
        if not isinstance(info, dict):
            raise self.fail(f"layers[{name!r}]", "must be a JSON object")
        out_f = self.meta_int(name, info, "out_features", 1, MAX_DIM)
        in_f = self.meta_int(name, info, "in_features", 1, MAX_DIM)
        gs = self.meta_int(name, info, "group_size", 1, 1 << 62)
        rank = self.meta_int(name, info, "rank", 1, MAX_DIM)
        scaling = self.meta_float(name, info, "scaling", positive=True)
        if "alpha" in info:  # informative only (alpha = scaling * rank), but never nonsense
            self.meta_float(name, info, "alpha", positive=True)
        dq = self.meta_bool(name, info, "double_quant")
        has_bias = self.meta_bool(name, info, "bias")
        offset = self.meta_float(name, info, "nested_offset", positive=False) if dq else 0.0
        # Python ints: nothing here can overflow; every shape is then checked against the
        # header, which was checked against the file size.
        n = out_f * in_f
        groups = -(-n // gs)
        row_bytes = -(-in_f // int(_core.BLOCK_COLS)) * (int(_core.BLOCK_COLS) // 2)

        codes = self.tensor(f"{name}.codes", "U8", (out_f, row_bytes))
        if dq:
            qs = self.tensor(f"{name}.qscales", "U8", (groups,))
            ns = self.finite(f"{name}.nested_scales",
                             self.tensor(f"{name}.nested_scales", "F32", (-(-groups // 256),)))
            nm = self.finite(f"{name}.nested_map",
                             self.tensor(f"{name}.nested_map", "F32", (256,)))
            scales = None
        else:
            scales = self.finite(f"{name}.scales", self.tensor(f"{name}.scales", "F32", (groups,)))
            qs = ns = nm = None
        a = self.finite(f"{name}.lora_a", self.tensor(f"{name}.lora_a", "F32", (rank, in_f)))
        b = self.finite(f"{name}.lora_b", self.tensor(f"{name}.lora_b", "F32", (out_f, rank)))
        bias = None
        if has_bias:
            bias = self.finite(f"{name}.bias", self.tensor(f"{name}.bias", "F32", (out_f,)))
        present = {"codes", "lora_a", "lora_b"} | ({"qscales", "nested_scales", "nested_map"}
                                                   if dq else {"scales"})
        if has_bias:
            present.add("bias")
        for s in SUFFIXES:
            if s not in present and f"{name}.{s}" in self.st.tensors:
                key = f"{name}.{s}"
                raise self.fail(f"tensor {key!r}", "is present but the metadata of layer "
                                f"{name!r} does not call for it")
        weight = Nf4Weight(out_f, in_f, gs, codes, scales, qs, ns, nm, float(np.float32(offset)))
        if dq and not np.isfinite(weight.decoded_scales()).all():
            raise self.fail(f"tensor {name + '.nested_map'!r}", "nested_map * nested_scales + "
                            "nested_offset overflows float32: the decoded scales hold inf")
        named = self.adapters(name, info, out_f, in_f)
        try:
            return make_state(weight, Adapter(a, b, scaling), bias, named)
        except ValueError as exc:  # the core's own checks; should not trigger after ours
            raise self.fail(f"layers[{name!r}]", str(exc)) from None


    def adapters(self, name: str, info: dict, out_f: int, in_f: int) -> AdapterSet | None:
        """The named adapters of a layer (None when the metadata lists none)."""
        if "adapters" not in info:
            return None
        field = f"layers[{name!r}].adapters"
        listed = info["adapters"]
        if not isinstance(listed, list):
            raise self.fail(field, f"must be a JSON list, got {type(listed).__name__}")
        items: dict = {}
        for i, entry in enumerate(listed):
            if not isinstance(entry, dict):
                raise self.fail(f"{field}[{i}]", "must be a JSON object")
            ad_name = entry.get("name")
            if not isinstance(ad_name, str) or not ad_name or ad_name == "default":
                raise self.fail(f"{field}[{i}].name", f"must be a non-empty string other than "
                                f"'default', got {ad_name!r:.80}")
            where = f"{name}.adapters[{ad_name!r}]"
            slot = self.meta_int(where, entry, "slot", 1, 1 << 62)
            rank = self.meta_int(where, entry, "rank", 0, MAX_DIM)
            scaling = self.meta_float(where, entry, "scaling", positive=True)
            if ad_name in items or slot in {s for s, _ in items.values()}:
                raise self.fail(f"{field}[{i}]", f"repeats the name {ad_name!r} or the slot "
                                f"{slot}")
            keys = (f"{name}.lora_a.{slot}", f"{name}.lora_b.{slot}")
            if rank:
                a = self.finite(keys[0], self.tensor(keys[0], "F32", (rank, in_f)))
                b = self.finite(keys[1], self.tensor(keys[1], "F32", (out_f, rank)))
            else:
                if any(k in self.st.tensors for k in keys):
                    raise self.fail(f"tensor {keys[0]!r}", "is present but the adapter has "
                                    "rank 0")
                a = frozen(np.zeros((0, in_f), np.float32))
                b = frozen(np.zeros((out_f, 0), np.float32))
            items[ad_name] = (slot, Adapter(a, b, scaling))
        next_slot = self.meta_int(name, info, "next_slot", 1, 1 << 62)
        return AdapterSet(items, next_slot)


def read_layers_metadata(st: SafetensorsFile) -> dict:
    """Validate the qlora metadata of an opened file; returns the ``layers`` mapping."""
    meta = st.metadata
    fmt = meta.get("format")
    if fmt != FORMAT_NAME:
        raise st.error("__metadata__.format", f"must be {FORMAT_NAME!r} (a file written by "
                       f"qlora), got {fmt!r}")
    version = meta.get("format_version")
    if version not in READ_VERSIONS:
        raise st.error("__metadata__.format_version", f"version {version!r} is not supported "
                       f"(this qlora reads versions {', '.join(READ_VERSIONS)})")
    layout = meta.get("codes_layout")
    if layout != CODES_LAYOUT:
        raise st.error("__metadata__.codes_layout", f"must be {CODES_LAYOUT!r}, got {layout!r}")
    try:
        layers = json.loads(meta.get("layers", ""), object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise st.error("__metadata__.layers", f"not valid JSON ({exc})") from None
    if not isinstance(layers, dict) or not layers:
        raise st.error("__metadata__.layers", "must be a non-empty JSON object")
    return layers


def read_layers(path: str | os.PathLike, *, mmap: bool = True) -> dict[str, LayerState]:
    """Read every layer state of a file written by ``qlora.save_layers`` or ``qlora quantize``.

    Every count, size, dtype and shape is checked against the metadata and the file size
    before any data is touched; nothing is unpickled.

    Parameters
    ----------
    path : str or os.PathLike
    mmap : bool, default True
        Use the packed codes and scales straight from a read-only shared mapping of the file
        (no copy). The file must not be modified or truncated while the layers are alive.
        With ``False`` the file is read into memory once.

    Returns
    -------
    dict of str to LayerState
        In the order the metadata lists them.

    Raises
    ------
    OSError
        If the file cannot be opened or read.
    ValueError
        If it is not a valid qlora safetensors file; the message names the file and the
        field (header length, a tensor's offsets or shape, a layer's group size, ...).
    """
    st = SafetensorsFile(path, mmap=bool(mmap))
    reader = _Reader(st)
    return {name: reader.layer(name, info)
            for name, info in read_layers_metadata(st).items()}
