"""qlora: NF4-quantized QLoRA linear layers with a fused SIMD C++ core for CPUs.

>>> import numpy as np, qlora
>>> layer = qlora.QLoraLinear.from_weight(np.random.randn(256, 128).astype(np.float32), rank=8)
>>> layer(np.ones(128, np.float32)).shape
(256,)
"""

from __future__ import annotations

from . import _core
from ._adapters import AdapterInfo
from ._layer import QLoraLinear
from ._layers import add_peft_adapter, load_layers, remove_peft_adapter, save_layers
from .formats.peft import LoraWeights, load_peft_adapter
from ._precision import get_precision, set_precision
from ._runtime import active_isa, available_isas, get_num_threads, kernel_info, set_num_threads

__version__: str = _core.__version__

__all__ = [
    "AdapterInfo",
    "LoraWeights",
    "QLoraLinear",
    "__version__",
    "active_isa",
    "add_peft_adapter",
    "available_isas",
    "get_num_threads",
    "get_precision",
    "kernel_info",
    "load_layers",
    "load_peft_adapter",
    "remove_peft_adapter",
    "save_layers",
    "set_num_threads",
    "set_precision",
]
