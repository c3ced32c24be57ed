"""``qlora quantize IN.safetensors OUT.safetensors``: quantize the weight matrices of a checkpoint
to NF4 QLoRA layers, carrying every other tensor over unchanged.

Which tensors become layers: every 2-D floating tensor (F32, F16, BF16, F64) whose name matches
``--include`` (default: all), does not match ``--exclude``, and, unless ``--all-matrices`` is
given, does not match :data:`DEFAULT_SKIP` (embeddings, norms, the output head). A layer named
``X`` is made from ``X.weight`` (or from a tensor not ending in ``.weight``, under its own name);
``X.bias``, when it is 1-D of length out_features, becomes the layer's bias.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import numpy as np

from .._layer import QLoraLinear, layer_states
from ..formats.files import SUFFIXES, layer_tensors, layers_metadata
from ..formats.safetensors import SafetensorsFile, bf16_to_float32, write_safetensors
from .common import (DEFAULT_SKIP, FLOAT_DTYPES, check_input, human, nonneg_int, positive_float,
                     positive_int, select)

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize the weight matrices of a safetensors checkpoint to NF4",
        description="Quantize every 2-D floating weight of a safetensors checkpoint to an NF4 "
        "QLoRA layer (embeddings, norms and lm_head are skipped by default) and write a qlora "
        "safetensors file that qlora.load_layers reads; all other tensors are carried over "
        "unchanged. Progress goes to stderr, a summary table to stdout.",
    )
    p.add_argument("input", metavar="IN.safetensors")
    p.add_argument("output", metavar="OUT.safetensors")
    p.add_argument("--group-size", type=positive_int, default=64,
                   help="elements per absmax group (64)")
    p.add_argument("--double-quant", action="store_true",
                   help="double-quantize the group scales (~4.13 instead of 4.5 bits/param)")
    p.add_argument("--rank", type=positive_int, default=8,
                   help="LoRA rank (8; lowered to min(out, in) for smaller matrices)")
    p.add_argument("--alpha", type=positive_float, default=16.0, help="LoRA alpha (16)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the LoRA A initialisation")
    p.add_argument("--include", metavar="REGEX", help="only quantize tensors whose name matches")
    p.add_argument("--exclude", metavar="REGEX", help="never quantize tensors whose name matches")
    p.add_argument("--all-matrices", action="store_true",
                   help=f"do not apply the default skip rule /{DEFAULT_SKIP}/")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.set_defaults(func=run)


def _regex(text: str | None, option: str) -> re.Pattern | None:
    if text is None:
        return None
    try:
        return re.compile(text)
    except re.error as exc:
        raise ValueError(f"{option} {text!r} is not a valid regular expression ({exc})") from None


def as_float32(st: SafetensorsFile, name: str) -> np.ndarray:
    arr = st.array(name)
    if st.tensors[name].dtype == "BF16":
        return bf16_to_float32(arr)
    return np.ascontiguousarray(arr, dtype=np.float32)


def run(args: argparse.Namespace) -> int:
    check_input(args.input)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if os.path.isdir(args.output):
        raise IsADirectoryError(f"{args.output}: is a directory, expected an output file path")
    if os.path.exists(args.output) and not args.force:
        raise FileExistsError(f"{args.output}: already exists (use --force to overwrite)")
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"{out_dir}: output directory does not exist")
    include = _regex(args.include, "--include")
    exclude = _regex(args.exclude, "--exclude")

    st = SafetensorsFile(args.input, mmap=True)
    names = select(st, include, exclude, not args.all_matrices)
    if not names:
        raise ValueError(f"{args.input}: no tensor to quantize (no 2-D floating tensor passes "
                         "--include/--exclude and the default skip rule; see --all-matrices)")
    total_bytes = sum(st.tensors[n].nbytes for n in names)
    layers: dict[str, QLoraLinear] = {}
    rows = []
    consumed: set[str] = set()
    done_bytes = 0
    t0 = time.perf_counter()
    for i, name in enumerate(names, 1):
        info = st.tensors[name]
        layer_name = name[: -len(".weight")] if name.endswith(".weight") else name
        if layer_name in layers:
            raise ValueError(f"{args.input}: two tensors would both become layer "
                             f"{layer_name!r}; exclude one of them")
        bias = None
        bias_name = layer_name + ".bias"
        b_info = st.tensors.get(bias_name)
        if (bias_name != name and b_info is not None and b_info.shape == (info.shape[0],)
                and b_info.dtype in FLOAT_DTYPES):
            bias = as_float32(st, bias_name)
            consumed.add(bias_name)
        w = as_float32(st, name)
        rank = min(args.rank, *info.shape)
        try:
            layer = QLoraLinear.from_weight(w, rank=rank, alpha=args.alpha,
                                            group_size=args.group_size, bias=bias,
                                            seed=args.seed, double_quant=args.double_quant)
        except ValueError as exc:
            raise ValueError(f"tensor {name!r}: {exc}") from None
        deq = layer.dequantize_weight()
        rel = float(np.linalg.norm((deq - w).astype(np.float64)) /
                    max(float(np.linalg.norm(w.astype(np.float64))), 1e-30))
        del deq, w
        layers[layer_name] = layer
        consumed.add(name)
        state = layer_states({layer_name: layer})[layer_name]
        after = sum(a.nbytes for _, a, _ in layer_tensors(layer_name, state))
        before = info.nbytes + (b_info.nbytes if bias is not None else 0)
        rows.append((layer_name, f"{info.shape[0]}x{info.shape[1]}", info.dtype, rel, before,
                     after))
        done_bytes += info.nbytes
        pct = 100.0 * done_bytes / total_bytes if total_bytes else 100.0
        print(f"[{i}/{len(names)}] {pct:5.1f}% {human(done_bytes)}/{human(total_bytes)}  "
              f"{layer_name} {info.shape[0]}x{info.shape[1]} {info.dtype}  "
              f"rel.err {rel:.4f}", file=sys.stderr, flush=True)

    states = layer_states(layers)
    tensors: list[tuple] = []
    for name, state in states.items():
        tensors += layer_tensors(name, state)
    # Every key a layer may own: a carried-over tensor under one of them would be misread.
    taken = {f"{name}.{s}" for name in layers for s in SUFFIXES}
    carried = []
    for name, info in st.tensors.items():
        if name in consumed:
            continue
        if name in taken:
            raise ValueError(f"{args.input}: tensor {name!r} would collide with a tensor of a "
                             "quantized layer; exclude that layer or rename the tensor")
        # Raw bytes under the original dtype name and shape: BF16, 8-, 6- and 4-bit floats
        # and complex64 included, byte-exact.
        tensors.append((name, st.raw(name), info.dtype, info.shape))
        carried.append(name)
    meta = layers_metadata(states)
    if st.metadata:
        meta["source_metadata"] = json.dumps(st.metadata)
    print(f"writing {args.output} ...", file=sys.stderr, flush=True)
    size = write_safetensors(args.output, tensors, meta)
    elapsed = time.perf_counter() - t0

    _summary(rows, carried, st, size, elapsed, args)
    return 0


def _summary(rows, carried, st, size, elapsed, args) -> None:
    width = max([len(r[0]) for r in rows] + [5])
    print(f"{'layer':<{width}}  {'shape':>11}  {'dtype':>5}  {'rel.err':>7}  "
          f"{'before':>10}  {'after':>10}")
    for name, shape, dtype, rel, before, after in rows:
        print(f"{name:<{width}}  {shape:>11}  {dtype:>5}  {rel:7.4f}  {human(before):>10}  "
              f"{human(after):>10}")
    q_before = sum(r[4] for r in rows)
    q_after = sum(r[5] for r in rows)
    print(f"quantized {len(rows)} matrices ({human(q_before)} -> {human(q_after)}, "
          f"group size {args.group_size}{', double quant' if args.double_quant else ''}); "
          f"carried over {len(carried)} tensors unchanged")
    ratio = size / st.file_size if st.file_size else 0.0
    print(f"file: {human(st.file_size)} -> {human(size)} ({ratio:.1%}) in {elapsed:.1f} s")
