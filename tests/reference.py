"""An independent NumPy reference of NF4 quantization, dequantization and the QLoRA forward.

Written from ``/work/shared/REFERENCE.md`` (bitsandbytes semantics), not from qlora's sources:

* groups ("blocks") run over the flattened row-major weight; the last one may be partial;
* ``absmax`` is the float32 max |w| of a group; for the partial last group bitsandbytes clamps it
  to ``1e-38`` (float32) and stores the clamped value; a full all-zero group stores 0;
* full groups scale by the float32 reciprocal ``w * float32(1 / max(absmax, 1e-38))``, the
  partial last group divides ``w / max(absmax, 1e-38)``; both in float32, then clamp to [-1, 1];
* the code is the nearest NF4 value; a value exactly on a float32 midpoint goes to the lower
  code;
* dequantization is ``code_value * absmax`` (one float32 multiply, which equals the float64
  product rounded to float32 because a product of two float32 values is exact in float64);
* the forward pass is evaluated in float64.

Every float32 step above is a single correctly rounded IEEE operation, so NumPy float32
arithmetic reproduces it bit for bit.
"""

from __future__ import annotations

import numpy as np

# The NF4 codebook as printed in REFERENCE.md, checked below against its float32 bit patterns.
NF4 = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)
NF4_BITS = (
    "bf800000 bf3239b1 bf066b30 beca32a0 be91a24d be3d353f bdba7871 00000000 "
    "3da2faff 3e24cae3 3e7c04dd 3ead033a 3ee1a4b8 3f1007ab 3f3913b3 3f800000"
).split()
assert [format(int(b), "08x") for b in NF4.view(np.uint32)] == NF4_BITS

# Midpoints between neighbouring codes, computed in float32 as bitsandbytes does.
MIDPOINTS = ((NF4[:-1] + NF4[1:]) * np.float32(0.5)).astype(np.float32)

MIN_ABSMAX = np.float32(1e-38)
ZERO_CODE = 7

BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def num_groups(n: int, group_size: int) -> int:
    return -(-n // group_size)


def quantize(weight: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(codes, absmax)``: uint8 codes (one per element, shape of ``weight``) and the
    float32 absmax stored per group, with bitsandbytes' semantics."""
    w = np.ascontiguousarray(weight, dtype=np.float32)
    flat = w.reshape(-1)
    n = flat.size
    g = num_groups(n, group_size)
    pad = g * group_size - n
    # Pad with zeros: they change neither a group's max |w| nor the real elements' codes.
    blocks = np.concatenate([flat, np.zeros(pad, np.float32)]).reshape(g, group_size)
    absmax = np.abs(blocks).max(axis=1).astype(np.float32)
    partial = n % group_size != 0
    if partial:
        absmax[-1] = max(absmax[-1], MIN_ABSMAX)
    m = np.maximum(absmax, MIN_ABSMAX)
    recip = (np.float32(1.0) / m).astype(np.float32)
    scaled = (blocks * recip[:, None]).astype(np.float32)
    if partial:
        scaled[-1] = (blocks[-1] / m[-1]).astype(np.float32)
    scaled = np.clip(scaled, np.float32(-1.0), np.float32(1.0))
    # code = number of midpoints strictly below the value: ties go to the lower code.
    codes = np.searchsorted(MIDPOINTS, scaled.reshape(-1)[:n], side="left").astype(np.uint8)
    return codes.reshape(w.shape), absmax


def dequantize(codes: np.ndarray, absmax: np.ndarray, group_size: int) -> np.ndarray:
    """float32 ``code_value * absmax`` in the shape of ``codes``."""
    flat = codes.reshape(-1)
    groups = np.arange(flat.size) // group_size
    w = NF4[flat].astype(np.float64) * absmax[groups].astype(np.float64)
    return w.astype(np.float32).reshape(codes.shape)


def pack_bnb(codes: np.ndarray) -> np.ndarray:
    """bitsandbytes' flat packing: byte j = code[2j] << 4 | code[2j + 1], odd tail padded with
    code 7; returned flat, uint8, length (n + 1) // 2."""
    flat = codes.reshape(-1).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.array([ZERO_CODE], np.uint8)])
    return ((flat[0::2] << 4) | flat[1::2]).astype(np.uint8)


def forward(x, deq_w, a, b, scaling, bias=None) -> np.ndarray:
    """float64 ``x @ W.T + scaling * (x @ A.T) @ B.T + bias`` for x of shape (..., in)."""
    x64 = np.asarray(x, dtype=np.float64)
    y = x64 @ np.asarray(deq_w, np.float64).T
    y = y + float(scaling) * ((x64 @ np.asarray(a, np.float64).T) @ np.asarray(b, np.float64).T)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y


def forward_abs(x, deq_w, a, b, scaling, bias=None) -> np.ndarray:
    """The sum of the absolute values of every term of the forward, for the error bound."""
    ax = np.abs(np.asarray(x, dtype=np.float64))
    s = ax @ np.abs(np.asarray(deq_w, np.float64)).T
    s = s + abs(float(scaling)) * (
        (ax @ np.abs(np.asarray(a, np.float64)).T) @ np.abs(np.asarray(b, np.float64)).T
    )
    if bias is not None:
        s = s + np.abs(np.asarray(bias, np.float64))
    return s


def forward_bound(x, deq_w, a, b, scaling, bias=None) -> np.ndarray:
    """Bound on |float32 forward - float64 forward| for any summation order, FMA or not.

    A float32 sum of n products accumulated in any order is within gamma_n * sum|terms| of the
    exact value (Higham, Accuracy and Stability, 3.1), gamma_n = n*u / (1 - n*u), u = 2**-24.
    The chain is: dot over in_features (x @ W.T, and x @ A.T), dot over rank, the product with
    ``scaling`` (itself rounded to float32), two additions (LoRA term, bias) -- at most
    in + rank + 4 roundings along any path. ``1.01`` covers 1 / (1 - n*u) for n < 160000.
    """
    x = np.asarray(x)
    n = x.shape[-1] + np.asarray(a).shape[0] + 4
    return n * 2.0**-24 * forward_abs(x, deq_w, a, b, scaling, bias) * 1.01



def forward_ieee(x, deq_w, a, b, scaling, bias=None) -> np.ndarray:
    """``forward`` with every product formed explicitly (no BLAS), for inputs holding NaN/Inf:
    which outputs are NaN or +-Inf then follows IEEE rules term by term (Inf * 0 = NaN,
    Inf - Inf = NaN) independent of summation order. Small shapes only."""
    x64 = np.atleast_2d(np.asarray(x, dtype=np.float64))
    with np.errstate(invalid="ignore", over="ignore"):
        y = (x64[:, None, :] * np.asarray(deq_w, np.float64)[None, :, :]).sum(-1)
        xa = (x64[:, None, :] * np.asarray(a, np.float64)[None, :, :]).sum(-1)
        lora = (xa[:, None, :] * np.asarray(b, np.float64)[None, :, :]).sum(-1)
        y = y + float(scaling) * lora
        if bias is not None:
            y = y + np.asarray(bias, np.float64)
    return y.reshape(np.shape(x)[:-1] + y.shape[-1:])
