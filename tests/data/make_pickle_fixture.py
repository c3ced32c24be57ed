"""Generate the frozen pickle fixture of format version 1 (run once; the outputs are committed).

    python tests/data/make_pickle_fixture.py

Writes, next to this script:
  layer_v1.pkl            a pickled QLoraLinear (protocol 4) built by the qlora of that time
  layer_v1_weight.npy     the float32 weight it was quantized from
  layer_v1_x.npy          an input batch
  layer_v1_expected.npy   the forward output computed in float64 by tests/reference.py (NOT by
                          qlora), from the weight and the adapter/bias stored below
  layer_v1_adapter.npz    lora_a, lora_b, bias, scaling and group_size used for that output

The test loads the pickle with today's qlora and checks it against these files, so a change of
the pickle format that cannot read old files fails the suite.
"""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import reference as ref  # noqa: E402
from qlora import QLoraLinear  # noqa: E402


def main() -> None:
    rng = np.random.default_rng(20261128)
    out_f, in_f, rank, group_size = 24, 70, 3, 32  # in % group_size != 0: straddling groups
    w = (rng.standard_normal((out_f, in_f)) * 0.05).astype(np.float32)
    w[0, :40] = 0.0  # an all-zero full group
    bias = rng.standard_normal(out_f).astype(np.float32)
    layer = QLoraLinear.from_weight(w, rank=rank, alpha=6.0, group_size=group_size, bias=bias,
                                    seed=11)
    lora_b = rng.standard_normal((out_f, rank)).astype(np.float32)
    layer.set_lora_b(lora_b)
    lora_a = layer.lora_a  # from the seed; stored so the expected output does not depend on it
    x = rng.standard_normal((5, in_f)).astype(np.float32)

    codes, absmax = ref.quantize(w, group_size)
    deq = ref.dequantize(codes, absmax, group_size)
    expected = ref.forward(x, deq, lora_a, lora_b, 6.0 / rank, bias)

    with open(os.path.join(HERE, "layer_v1.pkl"), "wb") as f:
        pickle.dump(layer, f, protocol=4)
    np.save(os.path.join(HERE, "layer_v1_weight.npy"), w)
    np.save(os.path.join(HERE, "layer_v1_x.npy"), x)
    np.save(os.path.join(HERE, "layer_v1_expected.npy"), expected)
    np.savez(os.path.join(HERE, "layer_v1_adapter.npz"), lora_a=lora_a, lora_b=lora_b, bias=bias,
             scaling=np.float64(6.0 / rank), group_size=np.int64(group_size))


if __name__ == "__main__":
    main()
