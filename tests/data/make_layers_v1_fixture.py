"""Generate the frozen qlora file fixture written before named adapters existed (run once with
the qlora of commit f695732; the outputs are committed).

    PYTHONPATH=<that qlora>/python python tests/data/make_layers_v1_fixture.py

Writes, next to this script:
  layers_v1.qlora.safetensors   two layers saved by ``qlora.save_layers`` of that time
                                ("up": plain scales, a bias; "down": double quantization)
  layers_v1_x.npz               input batches, one per layer (keys ``up``, ``down``)
  layers_v1_expected.npz        each layer's forward output computed in float64 by
                                tests/reference.py from the dequantized weight saved beside it
                                (``<name>_deq``) and the adapter stored in the file

tests/test_adapters_files.py loads the file with today's qlora and checks it against these
outputs, so a change of the file format that cannot read old files fails the suite.
"""

from __future__ import annotations

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import reference as ref  # noqa: E402
import qlora  # noqa: E402
from qlora import QLoraLinear  # noqa: E402


def main() -> None:
    rng = np.random.default_rng(20261201)
    up = QLoraLinear.from_weight((rng.standard_normal((40, 24)) * 0.05).astype(np.float32),
                                 rank=4, alpha=8.0, group_size=32,
                                 bias=rng.standard_normal(40).astype(np.float32), seed=3)
    up.set_lora_b(rng.standard_normal((40, 4)).astype(np.float32))
    down = QLoraLinear.from_weight((rng.standard_normal((24, 40)) * 0.05).astype(np.float32),
                                   rank=2, alpha=5.0, group_size=16, double_quant=True, seed=4)
    down.set_lora_b(rng.standard_normal((24, 2)).astype(np.float32))
    qlora.save_layers(os.path.join(HERE, "layers_v1.qlora.safetensors"),
                      {"up": up, "down": down})
    xs, expected = {}, {}
    for name, layer in (("up", up), ("down", down)):
        x = rng.standard_normal((3, layer.in_features)).astype(np.float32)
        deq = layer.dequantize_weight()  # the stored weight, decoded
        xs[name] = x
        expected[name] = ref.forward(x, deq, layer.lora_a, layer.lora_b, layer.scaling,
                                     layer.bias)
        expected[f"{name}_deq"] = deq
    np.savez(os.path.join(HERE, "layers_v1_x.npz"), **xs)
    np.savez(os.path.join(HERE, "layers_v1_expected.npz"), **expected)


if __name__ == "__main__":
    main()
