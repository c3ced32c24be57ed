"""bitsandbytes interoperability and double quantization, in NumPy only.

- :func:`create_dynamic_map` reimplements ``bitsandbytes.functional.create_dynamic_map`` bit
  for bit (the 8-bit "dynamic" table the second quantization level uses).
- :func:`double_quantize` stores per-group absmax as 8-bit codes over that table, one float32
  scale per 256 groups and a float32 offset: the ``compress_statistics=True`` layout.
- :func:`layer_from_bnb` / :func:`layer_to_bnb` read and write the state dict of a
  ``bnb.nn.Linear4bit`` (keys and formats in ``shared/REFERENCE.md``), converting the flat
  bitsandbytes nibble packing to qlora's packed rows and back, bit-exactly.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import numpy as np

from . import _core
from ._validate import check_int, check_positive_float

__all__ = ["create_dynamic_map", "double_quantize", "layer_from_bnb", "layer_to_bnb"]

_F32 = np.dtype(np.float32)
NESTED_BLOCK = int(_core.NESTED_BLOCK)
NF4_CODEBOOK = np.array(_core.NF4_CODEBOOK, dtype=np.float32)
NF4_CODEBOOK.setflags(write=False)
# Block sizes bitsandbytes' quantize_4bit / dequantize_4bit accept.
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


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


DYNAMIC_MAP = create_dynamic_map()
DYNAMIC_MAP.setflags(write=False)


def dequantize_scales(qscales: np.ndarray, nested_scales: np.ndarray, nested_map: np.ndarray,
                      offset: float) -> np.ndarray:
    """``nested_map[q] * nested_scales[i // 256] + offset`` with two float32 roundings."""
    rep = np.repeat(nested_scales, NESTED_BLOCK)[: qscales.size]
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
    if type(v) is not int or v < 1:
        raise _err(prefix, f"quant_state[{name!r}]", f"must be a positive integer, got {v!r}")
    return v


def layer_from_bnb(cls: type, state_dict: Mapping[str, Any], prefix: str, rank: int,
                   alpha: float, seed: int) -> Any:
    """Implementation of :meth:`QLoraLinear.from_bnb` (see there)."""
    from ._layer import _frozen, _Nf4Parts, _new_lora

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
    rank = check_int(rank, "rank", minimum=1, maximum=min(out_features, in_features))
    alpha = check_positive_float(alpha, "alpha")
    seed = check_int(seed, "seed", minimum=0)
    num_groups = -(-n // group_size)

    weight = _get(state_dict, prefix, "weight")
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
        if isinstance(offset, bool) or not isinstance(offset, (int, float)) \
                or not math.isfinite(offset):
            raise _err(prefix, "quant_state['nested_offset']",
                       f"must be a finite number, got {offset!r}")
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
        return None if a is None else _frozen(np.array(a, copy=True))

    parts = _Nf4Parts(out_features, in_features, group_size, _frozen(codes), own(scales),
                      own(qscales), own(nested_absmax), own(nmap),
                      float(np.float32(offset)))
    bias = _get(state_dict, prefix, "bias", required=False)
    bias_arr = None if bias is None else cls._check_bias(bias, out_features)
    lora = _new_lora(rank, alpha, seed, out_features, in_features)
    return cls._from_parts(parts, lora, bias_arr)


def layer_to_bnb(layer: Any, prefix: str) -> dict[str, np.ndarray]:
    """Implementation of :meth:`QLoraLinear.to_bnb` (see there)."""
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    w = layer._w
    if w.group_size not in BNB_BLOCKSIZES:
        raise ValueError(f"group_size {w.group_size} cannot be exported: bitsandbytes accepts "
                         f"block sizes {BNB_BLOCKSIZES}")
    n = w.out_features * w.in_features
    flat = np.empty((n + 1) // 2, dtype=np.uint8)
    _core.codes_to_bnb(w.codes, w.out_features, w.in_features, flat)
    sd: dict[str, np.ndarray] = {prefix + "weight": flat.reshape(-1, 1)}
    if layer._bias is not None:
        sd[prefix + "bias"] = layer._bias.copy()
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
