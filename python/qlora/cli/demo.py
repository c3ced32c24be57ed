"""``qlora demo``: quantize one layer and report its size and accuracy against fp32."""

from __future__ import annotations

import argparse
import time

import numpy as np

from .._layer import QLoraLinear
from .common import nonneg_int, parse_shape, positive_float, positive_int

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="quantize a layer and report size and error against fp32",
        description="Quantize a layer (default: 4096x4096 of N(0, 0.02) weights), then print "
        "its fp32 and NF4 sizes, the memory saved, the relative reconstruction error and the "
        "relative error of forward against the fp32 layer on a random batch.",
    )
    p.add_argument("--shape", type=parse_shape, default=(4096, 4096),
                   help="OUTxIN (default 4096x4096)")
    p.add_argument("--weights", metavar="FILE.npy", help="a 2-D .npy weight instead of random")
    p.add_argument("--rank", type=positive_int, default=16, help="LoRA rank (16)")
    p.add_argument("--alpha", type=positive_float, default=32.0, help="LoRA alpha (32)")
    p.add_argument("--group-size", type=positive_int, default=64,
                   help="elements per absmax group (64)")
    p.add_argument("--batch", type=positive_int, default=8, help="rows of the test input (8)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed (0)")
    p.set_defaults(func=run)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run(args: argparse.Namespace) -> int:
    rng = np.random.default_rng(args.seed)
    if args.weights:
        w = np.load(args.weights, allow_pickle=False)
        source = args.weights
    else:
        w = rng.normal(0.0, 0.02, size=args.shape).astype(np.float32)
        source = f"random N(0, 0.02) {args.shape[0]}x{args.shape[1]}"

    t0 = time.perf_counter()
    layer = QLoraLinear.from_weight(w, rank=args.rank, alpha=args.alpha,
                                    group_size=args.group_size, seed=args.seed)
    t_quant = time.perf_counter() - t0
    # B starts at zero; give it values so the fused LoRA term is exercised and compared too.
    b = rng.normal(0.0, 0.01, size=(layer.out_features, layer.rank)).astype(np.float32)
    layer.set_lora_b(b)

    w64 = np.asarray(w, dtype=np.float64)
    deq = layer.dequantize_weight().astype(np.float64)
    x = rng.standard_normal((args.batch, layer.in_features)).astype(np.float32)
    x64 = x.astype(np.float64)
    lora = layer.scaling * (x64 @ layer.lora_a.astype(np.float64).T) @ b.astype(np.float64).T
    y_fp32_layer = x64 @ w64.T + lora
    y = layer(x)

    fp32_bytes = 4 * layer.out_features * layer.in_features
    stored = fp32_bytes - layer.memory_saved_bytes()
    print(f"weights            {source}")
    print(f"layer              {layer!r}")
    print(f"fp32 weight        {fp32_bytes:,} bytes")
    print(f"nf4 weight         {stored:,} bytes ({8 * stored / w64.size:.3f} bits/parameter)")
    print(f"memory saved       {layer.memory_saved_bytes():,} bytes")
    print(f"quantize time      {t_quant * 1e3:.1f} ms")
    print(f"reconstruction     relative error {_rel(deq, w64):.4f} (||deq(W) - W|| / ||W||)")
    print(f"forward, batch {args.batch:<3} relative error {_rel(y.astype(np.float64), y_fp32_layer):.4f}"
          " against the fp32 layer")
    return 0
