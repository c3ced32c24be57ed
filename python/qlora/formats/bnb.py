"""bitsandbytes ``Linear4bit`` state dicts <-> qlora's NF4 weight and bias, in NumPy only.

:func:`weight_from_bnb` / :func:`weight_to_bnb` read and write the state dict of a
``bnb.nn.Linear4bit`` (keys and formats in ``shared/REFERENCE.md``), converting the flat
bitsandbytes nibble packing to qlora's packed rows and back, bit-exactly. They take and return
:mod:`qlora._state` values (the double-quantization tables are built there); the layer wraps
them.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import numpy as np

from .. import _core
from .._state import NESTED_BLOCK, NF4_CODEBOOK, Nf4Weight, frozen
from .._validate import check_f32_range, float32_matrix

__all__ = ["BNB_BLOCKSIZES", "weight_from_bnb", "weight_to_bnb"]

_F32 = np.dtype(np.float32)
# Block sizes bitsandbytes' quantize_4bit / dequantize_4bit accept.
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


# ---------------------------------------------------------------------- bitsandbytes state dicts
def _err(prefix: str, key: str, msg: str) -> ValueError:
    return ValueError(f"bitsandbytes state dict: {prefix}{key}: {msg}")


def _get(sd: Mapping[str, Any], prefix: str, key: str, required: bool = True) -> Any:
    full = prefix + key
    if full not in sd:
        if required:
            raise _err(prefix, key, "missing")
        return None
    value = sd[full]
    try:
        return np.asarray(value)
    except Exception as exc:  # e.g. a CUDA torch tensor
        raise _err(prefix, key, f"cannot be read as a NumPy array ({exc})") from None


def _expect(arr: np.ndarray, prefix: str, key: str, dtype: np.dtype, size: int) -> np.ndarray:
    if arr.dtype != dtype:
        raise _err(prefix, key, f"must have dtype {np.dtype(dtype)}, got {arr.dtype}")
    if arr.size != size or arr.ndim > 2:
        raise _err(prefix, key, f"must hold {size} elements, got shape {arr.shape}")
    return np.ascontiguousarray(arr.reshape(size))


def _read_quant_state(sd: Mapping[str, Any], prefix: str) -> dict:
    base = prefix + "weight.quant_state.bitsandbytes__"
    keys = [k for k in sd if isinstance(k, str) and k.startswith(base)]
    if not keys:
        raise _err(prefix, "weight.quant_state.bitsandbytes__nf4", "missing (is this a "
                   "bitsandbytes 4-bit Linear4bit state dict? is the prefix right?)")
    if len(keys) > 1:
        raise _err(prefix, "weight.quant_state", f"several quant states: {sorted(keys)}")
    kind = keys[0][len(base):]
    if kind == "fp4":
        raise _err(prefix, keys[0][len(prefix):], "FP4 states are not supported; qlora "
                   "implements NF4 only (quantize with quant_type='nf4')")
    if kind != "nf4":
        raise _err(prefix, keys[0][len(prefix):], f"unknown quant type {kind!r}; only 'nf4' "
                   "is supported")
    raw = np.asarray(sd[keys[0]])
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise _err(prefix, keys[0][len(prefix):], f"must be a 1-D uint8 array of UTF-8 JSON, "
                   f"got {raw.dtype} {raw.shape}")
    try:
        qs = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _err(prefix, keys[0][len(prefix):], f"not valid UTF-8 JSON ({exc})") from None
    if not isinstance(qs, dict):
        raise _err(prefix, keys[0][len(prefix):], "must hold a JSON object")
    return qs


def _int_field(qs: dict, prefix: str, name: str) -> int:
    v = qs.get(name)
    if type(v) is not int or not 1 <= v < 2 ** 62:  # the core takes int64
        raise _err(prefix, f"quant_state[{name!r}]", f"must be a positive integer below "
                   f"2**62, got {v!r:.40}")
    return v


def weight_from_bnb(state_dict: Mapping[str, Any],
                    prefix: str) -> tuple[Nf4Weight, np.ndarray | None]:
    """Read the NF4 weight and the bias of one ``Linear4bit`` from its state dict.

    Parameters
    ----------
    state_dict : mapping of str to array_like
    prefix : str
        Prefix of the layer's keys.

    Returns
    -------
    weight : Nf4Weight
        Owning copies of the codes (converted to qlora's packed rows) and scales.
    bias : numpy.ndarray or None
        float32 (out_features,), read-only.

    Raises
    ------
    TypeError
        If ``state_dict`` is not a mapping or ``prefix`` not a str.
    ValueError
        If a key is missing, a shape or dtype disagrees with the quant state, or the state is
        FP4, of an unknown quant type, or uses a codebook other than NF4.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to arrays, got "
                        f"{type(state_dict).__name__}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    qs = _read_quant_state(state_dict, prefix)
    if qs.get("quant_type") != "nf4":
        raise _err(prefix, "quant_state['quant_type']",
                   f"only 'nf4' is supported, got {qs.get('quant_type')!r}")
    group_size = _int_field(qs, prefix, "blocksize")
    shape = qs.get("shape")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(type(d) is int and d >= 1 for d in shape)):
        raise _err(prefix, "quant_state['shape']", f"must be [out_features, in_features] of "
                   f"positive integers, got {shape!r}")
    out_features, in_features = shape
    n = out_features * in_features
    if n >= 2 ** 62:
        raise _err(prefix, "quant_state['shape']", f"{shape} is too large")
    num_groups = -(-n // group_size)

    weight = _get(state_dict, prefix, "weight")
    if weight.dtype.kind not in "biuf":
        raise _err(prefix, "weight", f"must be packed 4-bit codes (uint8), got dtype "
                   f"{weight.dtype}")
    if weight.dtype != np.uint8:
        # bitsandbytes may store the packed bytes in another dtype (quant_storage).
        weight = np.ascontiguousarray(weight).reshape(-1).view(np.uint8)
    flat = _expect(weight, prefix, "weight", np.dtype(np.uint8), (n + 1) // 2)
    qmap = _get(state_dict, prefix, "weight.quant_map")
    qmap = _expect(qmap, prefix, "weight.quant_map", _F32, 16)
    if not np.array_equal(qmap.view(np.uint32), NF4_CODEBOOK.view(np.uint32)):
        raise _err(prefix, "weight.quant_map", "is not the NF4 table; qlora cannot use a "
                   "custom 4-bit codebook")
    absmax = _get(state_dict, prefix, "weight.absmax")
    nested_absmax = _get(state_dict, prefix, "weight.nested_absmax", required=False)
    nested = nested_absmax is not None or "nested_offset" in qs
    if nested:
        nb = qs.get("nested_blocksize")
        if nb != NESTED_BLOCK:
            raise _err(prefix, "quant_state['nested_blocksize']",
                       f"must be {NESTED_BLOCK}, got {nb!r}")
        if qs.get("nested_dtype", "float32") != "float32":
            raise _err(prefix, "quant_state['nested_dtype']",
                       f"must be 'float32', got {qs.get('nested_dtype')!r}")
        offset = qs.get("nested_offset")
        try:
            finite = (not isinstance(offset, bool) and isinstance(offset, (int, float))
                      and math.isfinite(offset))
        except OverflowError:  # a JSON integer beyond the float range
            finite = False
        if not finite:
            raise _err(prefix, "quant_state['nested_offset']",
                       f"must be a finite number, got {offset!r:.40}")
        try:  # the core adds it to every scale in float32
            check_f32_range(float(offset), "nested_offset", zero_ok=True)
        except ValueError as exc:
            raise _err(prefix, "quant_state['nested_offset']", str(exc)) from None
        if nested_absmax is None:
            raise _err(prefix, "weight.nested_absmax", "missing (the quant state says "
                       "double quantization)")
        nmap = _get(state_dict, prefix, "weight.nested_quant_map")
        nmap = _expect(nmap, prefix, "weight.nested_quant_map", _F32, 256)
        nested_absmax = _expect(nested_absmax, prefix, "weight.nested_absmax", _F32,
                                -(-num_groups // NESTED_BLOCK))
        qscales = _expect(absmax, prefix, "weight.absmax", np.dtype(np.uint8), num_groups)
        for key, arr in (("weight.nested_absmax", nested_absmax),
                         ("weight.nested_quant_map", nmap)):
            if not np.isfinite(arr).all():
                raise _err(prefix, key, "holds NaN or Inf")
        scales = None
    else:
        scales = _expect(absmax, prefix, "weight.absmax", _F32, num_groups)
        if not np.isfinite(scales).all():
            raise _err(prefix, "weight.absmax", "holds NaN or Inf")
        qscales = nmap = None
        offset = 0.0

    codes = np.empty(_core.packed_bytes(out_features, in_features), dtype=np.uint8)
    _core.codes_from_bnb(flat, out_features, in_features, codes)

    def own(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else frozen(np.array(a, copy=True))

    weight = Nf4Weight(out_features, in_features, group_size, frozen(codes), own(scales),
                       own(qscales), own(nested_absmax), own(nmap), float(np.float32(offset)))
    if nested and not np.isfinite(weight.decoded_scales()).all():
        raise _err(prefix, "weight.nested_quant_map", "nested_quant_map * nested_absmax + "
                   "nested_offset overflows float32: the decoded absmax hold inf")
    bias = _get(state_dict, prefix, "bias", required=False)
    if bias is not None:
        try:
            bias = float32_matrix(bias, "bias", (out_features,))
        except (TypeError, ValueError) as exc:  # a state dict's content: always ValueError
            raise _err(prefix, "bias", str(exc)) from None
    return weight, bias


def weight_to_bnb(w: Nf4Weight, bias: np.ndarray | None, prefix: str) -> dict[str, np.ndarray]:
    """The ``Linear4bit`` state dict of an NF4 weight and bias (new arrays).

    Raises
    ------
    TypeError
        If ``prefix`` is not a str.
    ValueError
        If the group size is not a block size bitsandbytes accepts.
    """
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    if w.group_size not in BNB_BLOCKSIZES:
        raise ValueError(f"group_size {w.group_size} cannot be exported: bitsandbytes accepts "
                         f"block sizes {BNB_BLOCKSIZES}")
    n = w.out_features * w.in_features
    flat = np.empty((n + 1) // 2, dtype=np.uint8)
    _core.codes_to_bnb(w.codes, w.out_features, w.in_features, flat)
    sd: dict[str, np.ndarray] = {prefix + "weight": flat.reshape(-1, 1)}
    if bias is not None:
        sd[prefix + "bias"] = np.array(bias, dtype=np.float32, copy=True)
    qs: dict[str, Any] = {"quant_type": "nf4", "blocksize": w.group_size, "dtype": "float32",
                          "shape": [w.out_features, w.in_features]}
    if w.qscales is None:
        sd[prefix + "weight.absmax"] = np.array(w.scales, dtype=np.float32, copy=True)
        sd[prefix + "weight.quant_map"] = NF4_CODEBOOK.copy()
    else:
        sd[prefix + "weight.absmax"] = np.array(w.qscales, dtype=np.uint8, copy=True)
        sd[prefix + "weight.quant_map"] = NF4_CODEBOOK.copy()
        sd[prefix + "weight.nested_absmax"] = np.array(w.nested_scales, np.float32, copy=True)
        sd[prefix + "weight.nested_quant_map"] = np.array(w.nested_map, np.float32, copy=True)
        qs.update({"nested_blocksize": NESTED_BLOCK, "nested_dtype": "float32",
                   "nested_offset": float(np.float32(w.nested_offset))})
    packed = np.frombuffer(json.dumps(qs).encode("utf-8"), dtype=np.uint8).copy()
    sd[prefix + "weight.quant_state.bitsandbytes__nf4"] = packed
    return sd
