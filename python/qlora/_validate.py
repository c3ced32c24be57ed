"""Argument checks shared by the public API: every message names the argument, what was
expected and what was given. Nothing here touches the C++ core."""

from __future__ import annotations

import numbers
import operator
import os

import numpy as np

__all__ = [
    "F32_MAX",
    "F32_MIN_NORMAL",
    "as_float32",
    "check_alpha",
    "check_bool",
    "check_f32_range",
    "check_finite",
    "check_int",
    "check_out",
    "check_path",
    "check_positive_float",
    "check_scaling",
    "describe_dtype",
    "float32_matrix",
]

# The float32 range: the core multiplies by scalings and offsets in float32, so a value outside
# it overflows to infinity and one below the smallest normal number loses precision or
# becomes 0 (an adapter scaled by 1e-46 would silently vanish).
F32_MAX = float(np.finfo(np.float32).max)
F32_MIN_NORMAL = float(np.finfo(np.float32).tiny)


def describe_dtype(value: object) -> str:
    dtype = getattr(value, "dtype", None)
    return str(dtype) if dtype is not None else type(value).__name__


def as_float32(value: object, name: str, *, ndim: int | None = None) -> np.ndarray:
    """Return `value` as an aligned float32 C-contiguous array (a copy unless it is one).

    Real numeric dtypes (floats, signed and unsigned integers) are accepted; bool, complex,
    object, string and structured dtypes raise TypeError. `ndim` checks the dimensionality.
    """
    if isinstance(value, np.ndarray):
        arr = value
    else:
        try:
            arr = np.asarray(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"{name} must be an array of real numbers, got {type(value).__name__} ({exc})"
            ) from None
    kind = arr.dtype.kind
    if kind not in "fiu":
        what = {"b": "bool", "c": "complex"}.get(kind, str(arr.dtype))
        raise TypeError(
            f"{name} must have a real numeric dtype (float or integer), got {what}"
            + ("" if isinstance(value, np.ndarray) else f" from {type(value).__name__}")
        )
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got {arr.ndim}-D with shape {arr.shape}")
    # Not np.ascontiguousarray: it turns a 0-d array into shape (1,), hiding a 0-d input.
    try:
        out = np.asarray(arr, dtype=np.float32, order="C")
        # A float32 view at an odd byte offset is C-contiguous but misaligned: the core reads
        # it as float*, so it is copied like any other layout the core does not take.
        return out if out.flags.aligned else out.copy()
    except MemoryError:
        raise MemoryError(
            f"{name} of shape {arr.shape} is too large to convert to float32 "
            f"({arr.size * 4:,} bytes)"
        ) from None
    except ValueError as exc:  # NumPy refuses sizes it cannot even index
        raise ValueError(f"{name} of shape {arr.shape} is too large: {exc}") from None


def check_finite(arr: np.ndarray, name: str) -> None:
    """Raise ValueError naming the first NaN or infinite element of `arr` (float32)."""
    if arr.size and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        where = tuple(int(i) for i in bad)
        value = arr[where] if arr.ndim else arr[()]
        label = "NaN" if np.isnan(value) else "an infinite value"
        hint = ""
        if np.isinf(value):
            hint = " (a value too large for float32 also becomes infinite)"
        raise ValueError(f"{name} must be finite, but it holds {label} at index {where}{hint}")


def check_int(value: object, name: str, *, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """Return `value` as a Python int; bools and non-integers raise TypeError."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        result = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if minimum is not None and result < minimum:
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name} must be {bound}, got {result}")
    if maximum is not None and result > maximum:
        raise ValueError(f"{name} must be between {minimum} and {maximum}, got {result}")
    return result


def check_positive_float(value: object, name: str) -> float:
    """Return `value` as a float that is finite and > 0."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        result = float(value)
    except OverflowError:  # an int beyond the float range: as infinite as it gets
        raise ValueError(f"{name} must be a finite number > 0, got an integer of "
                         f"{len(str(abs(int(value))))} digits") from None
    if not np.isfinite(result) or result <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {result}")
    return result


def check_path(value: object, name: str) -> str:
    """Return `value` (a str or os.PathLike of str) as a str path; anything else raises
    TypeError naming the argument."""
    if isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        path = os.fspath(value)
        if isinstance(path, str):
            return path
    raise TypeError(f"{name} must be a str or os.PathLike, got {type(value).__name__}")


def check_bool(value: object, name: str) -> bool:
    """Return `value` as a bool; anything but a bool (or NumPy bool) raises TypeError."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_f32_range(value: float, name: str, *, zero_ok: bool) -> float:
    """Raise ValueError unless the finite float `value` is a normal float32 number in
    magnitude (|value| in [1.18e-38, 3.40e38]), or 0 when `zero_ok`."""
    mag = abs(value)
    if mag > F32_MAX or (mag < F32_MIN_NORMAL and not (zero_ok and mag == 0.0)):
        what = "overflows float32 (max 3.4028235e+38)" if mag > F32_MAX else (
            "underflows float32 (it would become 0 or a subnormal number below "
            "1.1754944e-38)")
        raise ValueError(f"{name} must be representable as a normal float32 number, got "
                         f"{value!r}, which {what}")
    return value


def check_scaling(value: object, name: str) -> float:
    """A LoRA scaling: a finite real > 0 that float32 represents as a normal number."""
    return check_f32_range(check_positive_float(value, name), name, zero_ok=False)


def float32_matrix(value: object, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """`value` as a new read-only float32 array of exactly `shape`, finite.

    Always a copy: a conversion may return a view of the caller's memory (a torch tensor, an
    np.matrix, anything with __array__), which the caller could then change.
    """
    arr = as_float32(value, name)
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    arr = arr.copy()
    check_finite(arr, name)
    arr.setflags(write=False)
    return arr


def check_alpha(alpha: object, rank: int) -> float:
    """``alpha`` (finite, > 0) whose ``alpha / rank`` float32 holds as a normal number."""
    alpha = check_positive_float(alpha, "alpha")
    # The core multiplies by scaling in float32: a finite alpha whose alpha / rank
    # overflows (or underflows to 0) there would silently give NaN (or drop the adapter).
    try:
        check_f32_range(alpha / rank, "alpha / rank", zero_ok=False)
    except ValueError:
        raise ValueError(
            f"alpha / rank must be a normal float32 number (the core computes in float32), "
            f"got alpha={alpha!r} and rank={rank} (alpha / rank = {alpha / rank!r})"
        ) from None
    return alpha


def check_out(out: object, shape: tuple[int, ...], name: str) -> np.ndarray:
    """`out` if it is a writable, aligned float32 C-contiguous ndarray of exactly `shape`."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.dtype != np.float32:
        raise TypeError(f"{name} must have dtype float32, got {out.dtype}")
    if out.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {out.shape}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if not out.flags.aligned:
        raise ValueError(f"{name} must be aligned to 4 bytes (float32), got a view at a "
                         "misaligned address")
    if not out.flags.writeable:
        raise ValueError(f"{name} must be writable")
    return out
