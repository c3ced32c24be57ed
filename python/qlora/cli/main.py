"""Assembles the ``qlora`` command line. Each subcommand lives in its own module with
``register(sub)`` adding its parser and setting ``func``; this file only assembles them and
turns a TypeError/ValueError/OSError into exit status 2 with a message."""

from __future__ import annotations

import argparse
import sys

from . import bench, demo, finetune, inspect, quantize

__all__ = ["main"]

_COMMANDS = [demo, bench, quantize, inspect, finetune]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora", description="NF4 QLoRA linear layers on the CPU."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in _COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError) as exc:
        print(f"qlora {args.command}: error: {exc}", file=sys.stderr)
        return 2
