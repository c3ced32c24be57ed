"""``qlora inspect FILE``: what a safetensors file holds, from its header.

- a qlora file (``qlora.save_layers`` / ``qlora quantize``): each layer's shape, group size,
  rank, alpha, double quantization, bias and bytes, plus the tensors carried alongside;
- a bitsandbytes 4-bit checkpoint: each ``Linear4bit``'s shape, quant type, block size, double
  quantization and bytes (the shape and block size live in a small JSON tensor per layer: those
  few bytes are the only data read);
- any other safetensors file: tensor count and bytes per dtype, and which matrices
  ``qlora quantize`` would quantize by default.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from ..formats.files import SUFFIXES, read_layers_metadata
from ..formats.safetensors import SafetensorsFile
from .common import check_input, human, select

__all__ = ["register"]

_QS = ".weight.quant_state.bitsandbytes__"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="show what a qlora, bitsandbytes or plain safetensors file holds",
        description="Show the layers, shapes, group sizes, double quantization and bytes of a "
        "qlora or bitsandbytes 4-bit safetensors file (or summarise any other safetensors "
        "file), reading the header only.",
    )
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=run)


def _table(header: tuple, rows: list[tuple]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))))


def run(args: argparse.Namespace) -> int:
    check_input(args.file)
    st = SafetensorsFile(args.file, header_only=True)
    print(f"{args.file}: {human(st.file_size)}, {len(st.tensors)} tensors")
    if st.metadata.get("format") == "qlora":
        _qlora(st)
    elif any(_QS in name for name in st.tensors):
        _bnb(st)
    else:
        _plain(st)
    return 0


def _qlora(st: SafetensorsFile) -> None:
    layers = read_layers_metadata(st)
    print(f"qlora file, format version {st.metadata['format_version']}, {len(layers)} layers")
    rows = []
    owned = set()
    for name, info in layers.items():
        keys = [f"{name}.{s}" for s in SUFFIXES if f"{name}.{s}" in st.tensors]
        owned.update(keys)
        nbytes = sum(st.tensors[k].nbytes for k in keys)
        if not isinstance(info, dict):
            info = {}
        rows.append((name, f"{info.get('out_features')}x{info.get('in_features')}",
                     info.get("group_size"), info.get("rank"), _number(info.get("alpha")),
                     "yes" if info.get("double_quant") else "no",
                     "yes" if info.get("bias") else "no", human(nbytes)))
    _table(("layer", "shape", "group", "rank", "alpha", "double_quant", "bias", "bytes"), rows)
    _others(st, owned)


def _number(v: object) -> str:
    """A metadata number for the table; anything else (a damaged file) as its repr."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"{v:g}"
    return repr(v)


def _bnb(st: SafetensorsFile) -> None:
    reader = SafetensorsFile(st.path, mmap=True)
    rows = []
    owned = set()
    for name in sorted(n for n in st.tensors if _QS in n):
        prefix = name[: name.index(_QS)]
        keys = [k for k in st.tensors if k.startswith(prefix + ".weight") or
                k == prefix + ".bias"]
        owned.update(keys)
        try:
            qs = json.loads(reader.raw(name).tobytes().decode("utf-8"))
            if not isinstance(qs, dict):
                raise ValueError("not an object")
        except (ValueError, RuntimeError) as exc:
            qs = {"quant_type": f"? (bad quant state: {exc})"}
        shape = qs.get("shape")
        shape_s = "x".join(str(d) for d in shape) if isinstance(shape, list) else "?"
        nested = prefix + ".weight.nested_absmax" in st.tensors
        rows.append((prefix, shape_s, qs.get("quant_type", name.rsplit("__", 1)[-1]),
                     qs.get("blocksize", "?"), "yes" if nested else "no",
                     "yes" if prefix + ".bias" in st.tensors else "no",
                     human(sum(st.tensors[k].nbytes for k in keys))))
    print(f"bitsandbytes 4-bit checkpoint, {len(rows)} Linear4bit layers "
          "(import one with QLoraLinear.from_bnb)")
    _table(("layer", "shape", "quant_type", "blocksize", "double_quant", "bias", "bytes"), rows)
    _others(st, owned)


def _plain(st: SafetensorsFile) -> None:
    by_dtype: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for info in st.tensors.values():
        by_dtype[info.dtype][0] += 1
        by_dtype[info.dtype][1] += info.nbytes
    fmt = st.metadata.get("format")
    print("plain safetensors file" + (f" (format {fmt!r})" if fmt else ""))
    _table(("dtype", "tensors", "bytes"),
           [(d, c, human(b)) for d, (c, b) in sorted(by_dtype.items())])
    chosen = select(st, None, None, True)
    nbytes = sum(st.tensors[n].nbytes for n in chosen)
    print(f"qlora quantize would quantize {len(chosen)} matrices ({human(nbytes)}) by default:")
    for n in chosen[:20]:
        info = st.tensors[n]
        print(f"  {n}  {'x'.join(map(str, info.shape))}  {info.dtype}")
    if len(chosen) > 20:
        print(f"  ... and {len(chosen) - 20} more")


def _others(st: SafetensorsFile, owned: set) -> None:
    rest = [n for n in st.tensors if n not in owned]
    if rest:
        nbytes = sum(st.tensors[n].nbytes for n in rest)
        print(f"other tensors: {len(rest)} ({human(nbytes)})")
