"""What several ``qlora`` subcommands share: argparse value types, input-file checks, byte
formatting and the choice of tensors ``qlora quantize`` takes (``inspect`` shows it too)."""

from __future__ import annotations

import argparse
import math
import os
import re

from ..formats.safetensors import SafetensorsFile

__all__ = ["DEFAULT_SKIP", "FLOAT_DTYPES", "check_input", "human", "nonneg_float", "nonneg_int",
           "parse_shape", "positive_float", "positive_int", "select"]

# Matched (re.search, case-insensitive) against tensor names.
DEFAULT_SKIP = r"embed|norm|lm_head|(^|\.)(wte|wpe|ln_[^.]*|ln)(\.|$)"
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def parse_shape(text: str) -> tuple[int, int]:
    """An ``OUTxIN`` weight shape, both positive."""
    try:
        out_s, in_s = text.lower().split("x")
        value = (int(out_s), int(in_s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 4096x4096, got {text!r}") from None
    if min(value) < 1:
        raise argparse.ArgumentTypeError(f"shape must be positive, got {text!r}")
    return value


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _float_above(low: float, inclusive: bool):
    need = f"a finite number {'>=' if inclusive else '>'} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {need}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {need}, got {text!r}")
        return value

    parse.__name__ = need
    return parse


# argparse value types: a bad value exits with status 2 and "argument --NAME: must be ...,
# got 'TEXT'".
positive_int = _int_at_least(1)
nonneg_int = _int_at_least(0)
positive_float = _float_above(0.0, inclusive=False)
nonneg_float = _float_above(0.0, inclusive=True)


def check_input(path: str) -> None:
    """Raise a clear OSError/ValueError for a missing file, a directory or a non-file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a directory, expected a .safetensors file")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not a regular file, expected a .safetensors file")


def human(n: float) -> str:
    """A byte count as ``123 B``, ``1.5 KB``, ... ``2.0 TB`` (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def select(st: SafetensorsFile, include: re.Pattern | None, exclude: re.Pattern | None,
           default_skip: bool) -> list[str]:
    """Names of the tensors ``qlora quantize`` quantizes, in file order: 2-D floating tensors
    with no empty dimension that pass ``include``, ``exclude`` and (if ``default_skip``)
    :data:`DEFAULT_SKIP`."""
    skip = re.compile(DEFAULT_SKIP, re.IGNORECASE) if default_skip else None
    chosen = []
    for name, info in sorted(st.tensors.items(), key=lambda kv: kv[1].begin):
        if len(info.shape) != 2 or info.dtype not in FLOAT_DTYPES or 0 in info.shape:
            continue
        if include is not None and not include.search(name):
            continue
        if exclude is not None and exclude.search(name):
            continue
        if skip is not None and skip.search(name):
            continue
        chosen.append(name)
    return chosen
