"""argparse value types shared by the ``qlora`` subcommands."""

from __future__ import annotations

import argparse


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
