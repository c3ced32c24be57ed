"""The optional torch bridge: train qlora layers from torch code, and swap bitsandbytes 4-bit
linears (bare or wrapped by PEFT LoRA) for them in a model.

torch (and bitsandbytes / PEFT, for the conversions) are imported when first needed, never by
``import qlora``; install the ``interop`` extra. The pieces:

- :class:`QLoraTorchLinear`: a ``torch.nn.Module`` holding a :class:`qlora.QLoraLinear` (the
  frozen NF4 base) and the adapter as ``nn.Parameter`` s ``lora_a`` (rank, in) and ``lora_b``
  (out, rank), plus ``bias`` (frozen unless you set ``requires_grad``). Its forward runs
  ``qlora.QLoraLinear.forward_train`` and its autograd backward ``QLoraLinear.backward``.
- :func:`from_linear4bit`, :func:`from_peft`, :meth:`QLoraTorchLinear.to_linear4bit`,
  :meth:`QLoraTorchLinear.copy_to_peft`: conversions, exact for the base (the NF4 codes and
  scales are taken as stored).
- :func:`replace_linear4bit`: replaces every such module of a model in place.

Memory: CPU float32 C-contiguous inputs, gradients and parameters are shared with NumPy
(``Tensor.numpy()`` / ``torch.from_numpy``), never copied. The parameters' current values are
not copied into the layer either: each forward computes with read-only NumPy views of them, and
the autograd graph keeps them with ``save_for_backward``, so an in-place change between forward
and backward (an optimizer step) raises torch's usual "modified by an inplace operation" error
instead of mixing versions. Other dtypes and devices are converted to CPU float32 first (a copy)
and the output converted back to the input's dtype (it stays on the CPU: qlora is a CPU library).
"""

from __future__ import annotations

import copy

import numpy as np

from ._layer import QLoraLinear, layer_states
from ._precision import check_precision
from ._train import backward as _backward
from ._train import check_dropout, forward_train, train_state

__all__ = ["QLoraTorchLinear", "from_linear4bit", "from_peft", "replace_linear4bit"]


def _torch():
    import torch

    return torch


def _np(t) -> np.ndarray:
    """A NumPy view of a CPU float32 tensor (a contiguous copy first if it is not one)."""
    torch = _torch()
    t = t.detach()
    if t.device.type != "cpu" or t.dtype != torch.float32:
        t = t.to("cpu", torch.float32)
    return t.contiguous().numpy()


def _readonly(t) -> np.ndarray:
    arr = _np(t).view()
    arr.setflags(write=False)
    return arr


def _function():
    """The autograd Function, defined on first use so torch is imported lazily."""
    global _QLoraFunction
    if _QLoraFunction is not None:
        return _QLoraFunction
    torch = _torch()

    class QLoraFunction(torch.autograd.Function):
        """y = qlora forward_train(x) with the adapter (lora_a, lora_b) and bias given."""

        @staticmethod
        def forward(ctx, x, lora_a, lora_b, bias, layer, scaling, dropout, seed, precision):
            base = layer_states({"layer": layer})["layer"]
            state = train_state(base, _readonly(lora_a), _readonly(lora_b), scaling,
                                None if bias is None else _readonly(bias))
            y, saved = forward_train(state, layer, _np(x), dropout, seed, precision)
            ctx.qlora = (layer, saved, x.dtype)
            # Keeps the tensors alive and lets torch detect an in-place change before backward.
            ctx.save_for_backward(x, lora_a, lora_b, bias)
            out = torch.from_numpy(y)
            return out if x.dtype == torch.float32 else out.to(x.dtype)

        @staticmethod
        def backward(ctx, grad_y):
            ctx.saved_tensors  # raises if x or a parameter changed in place since forward
            layer, saved, dtype = ctx.qlora
            need = ctx.needs_input_grad
            grads = _backward(layer, saved, _np(grad_y), input_grad=bool(need[0]),
                              bias_grad=bool(need[3]))
            dx = None
            if grads.input is not None:
                dx = torch.from_numpy(grads.input)
                dx = dx if dtype == torch.float32 else dx.to(dtype)
            da = torch.from_numpy(grads.lora_a) if need[1] else None
            db = torch.from_numpy(grads.lora_b) if need[2] else None
            dbias = torch.from_numpy(grads.bias) if grads.bias is not None else None
            return dx, da, db, dbias, None, None, None, None, None

    _QLoraFunction = QLoraFunction
    return QLoraFunction


_QLoraFunction = None
_MODULE_CLASS = None


def __getattr__(name: str):
    # PEP 562: QLoraTorchLinear is made (and torch imported) on first access.
    if name == "QLoraTorchLinear":
        return _module_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _module_class():
    global _MODULE_CLASS
    if _MODULE_CLASS is not None:
        return _MODULE_CLASS
    torch = _torch()

    class QLoraTorchLinear(torch.nn.Module):
        """``torch.nn.Module`` over a :class:`qlora.QLoraLinear`: the NF4 base stays frozen in
        the layer, the adapter is trainable ``nn.Parameter`` s ``lora_a`` and ``lora_b``.

        ``y = x @ deq(W).T + scaling * (dropout(x) @ lora_a.T) @ lora_b.T + bias``, forward and
        backward in qlora's kernels. Dropout (PEFT's ``lora_dropout``) applies in training mode
        only, its mask drawn from a seed taken from torch's generator (``torch.manual_seed``
        reproduces it).

        Parameters
        ----------
        layer : qlora.QLoraLinear
            The base and the initial adapter (copied into the parameters); the layer itself is
            not changed by training (``qlora_layer()`` gives one with the trained adapter).
        dropout : float, default 0.0
            LoRA dropout probability in [0, 1).
        precision : {"fp32", "bf16", "int8"}, optional
            The forward's base product (default: :func:`qlora.get_precision`); the gradients
            are fp32.
        train_bias : bool, default False
            Whether the bias parameter (if the layer has one) requires grad.

        Raises
        ------
        TypeError, ValueError
            If ``layer`` is not a QLoraLinear, or ``dropout`` / ``precision`` is invalid.
        """

        def __init__(self, layer, *, dropout=0.0, precision=None, train_bias=False):
            super().__init__()
            if not isinstance(layer, QLoraLinear):
                raise TypeError(f"layer must be a qlora.QLoraLinear, got {type(layer).__name__}")
            self.layer = layer
            self.scaling = layer.scaling
            self.dropout = check_dropout(dropout)
            self.precision = None if precision is None else check_precision(precision)
            self.in_features, self.out_features = layer.in_features, layer.out_features
            self.lora_a = torch.nn.Parameter(torch.from_numpy(layer.lora_a))
            self.lora_b = torch.nn.Parameter(torch.from_numpy(layer.lora_b))
            bias = layer.bias
            if bias is None:
                self.register_parameter("bias", None)
            else:
                self.bias = torch.nn.Parameter(torch.from_numpy(bias),
                                               requires_grad=bool(train_bias))

        def forward(self, x):
            p = self.dropout if self.training else 0.0
            seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0.0 else 0
            return _function().apply(x, self.lora_a, self.lora_b, self.bias, self.layer,
                                     self.scaling, p, seed, self.precision)

        def qlora_layer(self) -> QLoraLinear:
            """A new QLoraLinear with this module's base and the parameters' current values
            (copied)."""
            out = copy.copy(self.layer)
            out.set_lora(_np(self.lora_a), _np(self.lora_b), scaling=self.scaling)
            out.set_bias(None if self.bias is None else _np(self.bias))
            return out

        def to_linear4bit(self):
            """A bitsandbytes ``Linear4bit`` (float32 compute) with this module's base and bias,
            bit for bit (the adapter is not part of it: see :meth:`copy_to_peft`)."""
            return _to_linear4bit(self.qlora_layer())

        def copy_to_peft(self, peft_layer, adapter_name: str = "default") -> None:
            """Copy ``lora_a``/``lora_b`` into a PEFT LoRA layer's ``adapter_name`` adapter."""
            with torch.no_grad():
                peft_layer.lora_A[adapter_name].weight.copy_(self.lora_a)
                peft_layer.lora_B[adapter_name].weight.copy_(self.lora_b)

        def extra_repr(self) -> str:
            return (f"in_features={self.in_features}, out_features={self.out_features}, "
                    f"rank={self.lora_a.shape[0]}, scaling={self.scaling:g}, "
                    f"dropout={self.dropout:g}, bias={self.bias is not None}")

    QLoraTorchLinear.__module__ = __name__
    _MODULE_CLASS = QLoraTorchLinear
    return QLoraTorchLinear


# ---------------------------------------------------------------------- conversions
def _linear4bit_state(module) -> dict:
    """NumPy copies of a bitsandbytes Linear4bit's state dict. Call before the module's first
    eval-mode forward: on AVX512-BF16 CPUs that forward rewrites the weight in place into a
    layout this format does not describe."""
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def from_linear4bit(module, *, rank: int = 8, alpha: float = 16.0, seed: int = 0,
                    dropout: float = 0.0, precision=None):
    """A :class:`QLoraTorchLinear` with the NF4 base (codes, scales, bias) of a bitsandbytes
    ``Linear4bit`` taken exactly and a fresh adapter (as ``QLoraLinear.from_bnb``).

    The module must not have run an eval-mode forward on the CPU before (bitsandbytes then
    rewrites its weight in place on AVX512-BF16 CPUs). ValueError for FP4 or other formats.
    """
    layer = QLoraLinear.from_bnb(_linear4bit_state(module), rank=rank, alpha=alpha, seed=seed)
    out = _module_class()(layer, dropout=dropout, precision=precision)
    if out.bias is not None:
        out.bias.requires_grad_(bool(module.bias.requires_grad))
    return out


def from_peft(module, adapter_name: str = "default", *, precision=None):
    """A :class:`QLoraTorchLinear` from a PEFT LoRA layer whose ``base_layer`` is a
    bitsandbytes ``Linear4bit``: the base taken exactly, ``lora_A``/``lora_B`` of
    ``adapter_name`` copied, its scaling and ``lora_dropout`` probability kept.

    Raises
    ------
    ValueError
        For DoRA, a merged layer, or a missing adapter.
    """
    if adapter_name not in module.lora_A:
        raise ValueError(f"adapter_name must be one of {sorted(module.lora_A)}, "
                         f"got {adapter_name!r}")
    if getattr(module, "use_dora", {}).get(adapter_name, False):
        raise ValueError(f"adapter {adapter_name!r} uses DoRA, which qlora does not implement")
    if getattr(module, "merged", False):
        raise ValueError("the PEFT layer has merged adapters; unmerge it first")
    drop = module.lora_dropout[adapter_name]
    p = float(getattr(drop, "p", 0.0))
    base = module.base_layer
    layer = QLoraLinear.from_bnb(_linear4bit_state(base), rank=1, alpha=1.0)
    layer.set_lora(_np(module.lora_A[adapter_name].weight), _np(module.lora_B[adapter_name].weight),
                   scaling=float(module.scaling[adapter_name]))
    out = _module_class()(layer, dropout=p, precision=precision)
    if out.bias is not None:
        out.bias.requires_grad_(bool(base.bias.requires_grad))
    return out


def _to_linear4bit(layer: QLoraLinear):
    torch = _torch()
    import bitsandbytes as bnb

    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in layer.to_bnb().items()}
    lin = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                            quant_type="nf4", compute_dtype=torch.float32)
    qs_keys = {k: v for k, v in sd.items() if k.startswith("weight.")}
    lin.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], qs_keys, requires_grad=False,
                                                     device="cpu")
    if layer.bias is not None:
        lin.bias = torch.nn.Parameter(sd["bias"], requires_grad=False)
    return lin


def _is_peft_linear4bit(module, bnb) -> bool:
    return (hasattr(module, "lora_A") and hasattr(module, "base_layer")
            and isinstance(module.base_layer, bnb.nn.Linear4bit))


def replace_linear4bit(model, *, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                       precision=None, adapter_name: str = "default") -> list[str]:
    """Replace, in place, every PEFT LoRA layer over a bitsandbytes ``Linear4bit`` (by
    :func:`from_peft`) and every bare NF4 ``Linear4bit`` (by :func:`from_linear4bit` with a
    fresh adapter of ``rank``, ``alpha``, ``dropout``) in ``model`` by a
    :class:`QLoraTorchLinear`.

    Call it before the model's first eval-mode forward (see :func:`from_linear4bit`). Build the
    optimizer afterwards: the new modules' parameters are new tensors.

    Returns
    -------
    list of str
        The qualified names of the replaced modules.
    """
    import bitsandbytes as bnb

    targets = []
    skip = set()
    for name, module in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if _is_peft_linear4bit(module, bnb):
            targets.append((name, from_peft(module, adapter_name, precision=precision)))
            skip.add(name)
        elif isinstance(module, bnb.nn.Linear4bit):
            targets.append((name, from_linear4bit(module, rank=rank, alpha=alpha,
                                                  dropout=dropout, precision=precision)))
            skip.add(name)
    for name, new in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return [name for name, _ in targets]
