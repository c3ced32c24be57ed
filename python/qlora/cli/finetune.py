"""``qlora finetune``: train a layer's LoRA with Adam (NumPy, a few lines) on synthetic data so the
NF4 layer recovers the output of its fp32 original; prints the loss per step and the final error
beside the NF4-only and LoftQ starts.

The weight is heavy-tailed low-rank plus noise (as trained weights look); the inputs have a
few loud channels (as transformer activations do), so the training, which sees the data, can
beat LoftQ, which only sees the weight.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from .._layer import QLoraLinear
from .common import nonneg_int, parse_shape, positive_float, positive_int

__all__ = ["register", "run", "synthetic_weight"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="train a LoRA over an NF4 base with Adam to recover its fp32 layer (seconds)",
        description="Quantize a synthetic fp32 layer to NF4, then train the LoRA adapter with "
        "Adam (layer.forward_train / layer.backward) to match the fp32 layer's outputs on "
        "synthetic inputs, printing the loss per step; then the relative output error against "
        "the fp32 layer on held-out inputs for NF4 only, LoftQ, and both after training.",
    )
    p.add_argument("--shape", type=parse_shape, default=(1024, 1024),
                   help="OUTxIN (default 1024x1024)")
    p.add_argument("--rank", type=positive_int, default=16, help="LoRA rank (16)")
    p.add_argument("--alpha", type=positive_float, default=32.0, help="LoRA alpha (32)")
    p.add_argument("--steps", type=positive_int, default=20, help="Adam steps (20)")
    p.add_argument("--batch", type=positive_int, default=256, help="rows per step (256)")
    p.add_argument("--lr", type=positive_float, default=5e-3, help="Adam learning rate (5e-3)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (0)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed (0)")
    p.set_defaults(func=run)


def synthetic_weight(rng: np.random.Generator, shape: tuple[int, int], k: int = 32) -> np.ndarray:
    """Low rank ``k`` with decaying singular values plus Student-t noise, std about 0.02."""
    out_f, in_f = shape
    u = rng.standard_normal((out_f, k)) * np.geomspace(4.0, 0.5, k)
    w = (u @ rng.standard_normal((k, in_f))) / np.sqrt(k) + rng.standard_t(3, size=shape)
    return (w * (0.02 / w.std())).astype(np.float32)


def _inputs(rng: np.random.Generator, loud: np.ndarray, batch: int) -> np.ndarray:
    return (rng.standard_normal((batch, loud.size)) * loud).astype(np.float32)


def _rel_error(layer: QLoraLinear, w: np.ndarray, x: np.ndarray) -> float:
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    return float(np.linalg.norm(layer(x) - ref) / np.linalg.norm(ref))


class Adam:
    """Adam over a layer's LoRA A and B (NumPy), then one ``set_lora`` per step."""

    def __init__(self, layer: QLoraLinear, lr: float) -> None:
        self.layer, self.lr, self.t = layer, lr, 0
        self.params = [layer.lora_a, layer.lora_b]
        self.moments = [(np.zeros_like(p), np.zeros_like(p)) for p in self.params]

    def step(self, grads) -> None:
        b1, b2, self.t = 0.9, 0.999, self.t + 1
        for p, g, (m, v) in zip(self.params, (grads.lora_a, grads.lora_b), self.moments):
            m[:] = b1 * m + (1 - b1) * g
            v[:] = b2 * v + (1 - b2) * g * g
            p -= self.lr * (m / (1 - b1**self.t)) / (np.sqrt(v / (1 - b2**self.t)) + 1e-8)
        self.layer.set_lora(*self.params, scaling=self.layer.scaling)


def train_step(layer: QLoraLinear, opt: Adam, x: np.ndarray, target: np.ndarray,
               dropout: float, seed: int) -> float:
    """One step on mean((layer(x) - target)^2); returns the loss before the step."""
    y, saved = layer.forward_train(x, dropout=dropout, seed=seed)
    diff = y - target
    grads = layer.backward(saved, (2.0 / diff.size) * diff, input_grad=False)
    opt.step(grads)
    return float(np.mean(diff * diff))


def run(args: argparse.Namespace) -> int:
    rng = np.random.default_rng(args.seed)
    w = synthetic_weight(rng, args.shape)
    loud = np.ones(args.shape[1])
    loud[rng.choice(args.shape[1], size=max(1, args.shape[1] // 64), replace=False)] = 8.0
    x_test = _inputs(np.random.default_rng(args.seed + 1), loud, 512)
    kw = dict(rank=args.rank, alpha=args.alpha, seed=args.seed)

    t0 = time.perf_counter()
    nf4 = QLoraLinear.from_weight(w, **kw)
    t1 = time.perf_counter()
    loftq = QLoraLinear.from_weight(w, init="loftq", **kw)
    t2 = time.perf_counter()
    start = {"nf4": _rel_error(nf4, w, x_test), "loftq": _rel_error(loftq, w, x_test)}
    print(f"layer {args.shape[0]}x{args.shape[1]} rank {args.rank}, {args.steps} Adam steps of "
          f"{args.batch} rows, lr {args.lr:g}; quantize {1e3 * (t1 - t0):.0f} ms, "
          f"LoftQ init {1e3 * (t2 - t1):.0f} ms")
    data = np.random.default_rng(args.seed + 2)
    opts = [Adam(nf4, args.lr), Adam(loftq, args.lr)]
    print("step   loss from NF4 start   loss from LoftQ start")
    t3 = time.perf_counter()
    for step in range(1, args.steps + 1):
        x = _inputs(data, loud, args.batch)
        target = x @ w.T
        losses = [train_step(layer, opt, x, target, args.dropout, step)
                  for layer, opt in zip((nf4, loftq), opts)]
        print(f"{step:4d}   {losses[0]:.4e}            {losses[1]:.4e}")
    per_step = (time.perf_counter() - t3) / (2 * args.steps)
    print(f"relative output error against the fp32 layer (512 held-out rows), "
          f"{1e3 * per_step:.1f} ms per step:")
    print(f"  NF4 only (B = 0)            {start['nf4']:.4f}")
    print(f"  LoftQ start                 {start['loftq']:.4f}")
    print(f"  NF4 start + {args.steps} steps        {_rel_error(nf4, w, x_test):.4f}")
    print(f"  LoftQ start + {args.steps} steps      {_rel_error(loftq, w, x_test):.4f}")
    return 0
