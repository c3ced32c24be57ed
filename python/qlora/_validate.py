"""Argument checks shared by the public API: every message names the argument, what was
expected and what was given. Nothing here touches the C++ core."""

from __future__ import annotations

import numbers
import operator

import numpy as np

__all__ = [
    "as_float32",
    "check_finite",
    "check_int",
    "check_positive_float",
    "describe_dtype",
]


def describe_dtype(value: object) -> str:
    dtype = getattr(value, "dtype", None)
    return str(dtype) if dtype is not None else type(value).__name__


def as_float32(value: object, name: str, *, ndim: int | None = None) -> np.ndarray:
    """Return `value` as a float32 C-contiguous array (a copy unless it already is one).

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
        return np.asarray(arr, dtype=np.float32, order="C")
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
