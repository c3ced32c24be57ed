"""Compute precisions of the forward: their names, the process default (``QLORA_PRECISION``,
:func:`set_precision`) and the check of a per-call ``precision=`` value.

Like ``torch.set_float32_matmul_precision``, the default is exact (``"fp32"``) and a faster,
less exact product is asked for: ``"bf16"`` rounds activations and decoded weights to bfloat16,
``"int8"`` quantizes activations in blocks of 32 and uses an int8 codebook. The LoRA term and
the bias stay float32 in every precision. A precision this CPU cannot serve natively runs in
fp32 (:func:`qlora.kernel_info` says what serves each one).
"""

from __future__ import annotations

import os

__all__ = ["PRECISIONS", "check_precision", "get_precision", "set_precision"]

PRECISIONS = ("fp32", "bf16", "int8")


def check_precision(value: object, name: str = "precision") -> str:
    """Return ``value`` if it names a precision; raise naming ``name`` otherwise.

    Raises
    ------
    TypeError
        If ``value`` is not a str.
    ValueError
        If it is not one of ``PRECISIONS``.
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {', '.join(map(repr, PRECISIONS))}; "
                        f"got {type(value).__name__}")
    if value not in PRECISIONS:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, PRECISIONS))}, "
                         f"got {value!r}")
    return value


def _from_env() -> str:
    value = os.environ.get("QLORA_PRECISION", "")
    return "fp32" if value == "" else check_precision(value, "QLORA_PRECISION")


# Read by every forward that is not given precision=; a str assignment is atomic, so a
# set_precision() in another thread is seen by a forward entirely or not at all.
default: str = _from_env()


def set_precision(name: str) -> None:
    """Set the process-wide default precision of ``forward`` (``"fp32"``, ``"bf16"`` or
    ``"int8"``); a per-call ``precision=`` overrides it.

    Parameters
    ----------
    name : str

    Raises
    ------
    TypeError, ValueError
        If ``name`` is not one of the precisions.
    """
    global default
    default = check_precision(name, "name")


def get_precision() -> str:
    """The process-wide default precision: ``QLORA_PRECISION`` if set, else ``"fp32"``, unless
    changed by :func:`set_precision`.

    Returns
    -------
    str
    """
    return default
