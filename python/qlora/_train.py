"""The NumPy training API of a layer: the training forward, which returns what the backward
needs, and the backward giving the input, LoRA and bias gradients. :class:`QLoraLinear`'s
``forward_train`` and ``backward`` are these functions; the torch bridge (``qlora.torch``) calls
them with the adapter held in torch parameters.

The maths (``s`` the scaling, ``x~ = dropout(x)`` on the LoRA input only, as PEFT's
``lora_dropout``, ``u = x~ A^T``, ``G = dL/dy``)::

    y     = x deq(W)^T + s u B^T + bias
    dB    = s G^T u                      (out_features, rank)
    dA    = s (G B)^T x~                 (rank, in_features)
    dx    = G deq(W) + s (mask / (1 - p)) * ((G B) A)
    dbias = sum over rows of G

The core computes all of it (``_core.forward_train`` / ``_core.backward``): ``G deq(W)`` is a
fused kernel that decodes the 4-bit codes as the forward does, so neither call materializes
``deq(W)``. What is saved between the two calls is ``x`` (a reference), ``u`` (batch x rank),
the dropout probability and seed (the mask is regenerated from the seed, never stored) and the
layer's state at the time of the forward.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from . import _core, _precision
from ._precision import PRECISIONS, check_precision
from ._state import (Adapter, LayerState, Nf4Weight, loftq_init, new_adapter,
                     quantize_weight)
from ._validate import as_float32, check_bool, check_int

__all__ = ["Gradients", "SavedForBackward", "TrainMethods", "backward", "check_dropout",
           "forward_train", "initial_weights", "train_state"]

_F32 = np.dtype(np.float32)
_SEED_MAX = 2**64 - 1


class Gradients(NamedTuple):
    """What :meth:`QLoraLinear.backward` returns; a field is None when it was not asked for.

    Attributes
    ----------
    input : numpy.ndarray or None
        dL/dx, float32 of the forward input's shape; None when ``input_grad=False``.
    lora_a : numpy.ndarray
        dL/dA, float32 (rank, in_features).
    lora_b : numpy.ndarray
        dL/dB, float32 (out_features, rank).
    bias : numpy.ndarray or None
        dL/dbias, float32 (out_features,); None unless asked for (by default: when the layer
        has a bias).
    """

    input: np.ndarray | None
    lora_a: np.ndarray
    lora_b: np.ndarray
    bias: np.ndarray | None


class SavedForBackward(NamedTuple):
    """What :meth:`QLoraLinear.forward_train` keeps for :meth:`QLoraLinear.backward`.

    Its size is ``u`` (batch x rank floats) plus a reference to ``x``: nothing of size
    out_features x in_features, no dropout mask (it is regenerated from ``seed``).

    Attributes
    ----------
    x : numpy.ndarray
        The forward's input as the core read it: the caller's own array when it was already
        aligned C-contiguous float32 (not a copy: do not modify it before the backward),
        otherwise the converted copy.
    u : numpy.ndarray
        ``dropout(x) @ A.T``, float32 ``x.shape[:-1] + (rank,)``.
    dropout : float
    seed : int
        The dropout probability and seed of the forward.
    precision : str
        The precision the forward's base product ran in.
    state : LayerState
        The layer's state (weight, adapter, bias) the forward used, so a ``set_lora`` between
        forward and backward does not mix versions.
    owner : object
        The layer (checked by its backward).
    """

    x: np.ndarray
    u: np.ndarray
    dropout: float
    seed: int
    precision: str
    state: LayerState
    owner: object


def check_dropout(value: object) -> float:
    """``value`` as a float in [0, 1) that stays below 1 in float32; TypeError/ValueError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"dropout must be a real number in [0, 1), got {type(value).__name__}")
    p = float(value)
    # The core takes float32: a p that rounds to 1.0 in float32 would drop everything.
    if not (0.0 <= p < 1.0) or np.float32(p) >= 1.0:
        raise ValueError(f"dropout must be in [0, 1) (as a float32), got {value!r}")
    return p


def _prepare_x(x: object, in_features: int) -> np.ndarray:
    arr = as_float32(x, "x")
    got = "a 0-d array" if arr.ndim == 0 else arr.shape
    if arr.ndim == 0 or arr.shape[-1] != in_features:
        raise ValueError(f"x must have shape (..., {in_features}) to match in_features, got {got}")
    return arr


def initial_weights(w: np.ndarray, rank: int, scaling: float, group_size: int,
                    double_quant: bool, seed: int, init: object,
                    loftq_iters: object) -> tuple[Nf4Weight, Adapter]:
    """The quantized weight and first adapter of ``QLoraLinear.from_weight``: ``init="default"``
    quantizes ``w`` and draws PEFT's Kaiming-uniform ``A`` (``B = 0``) from ``seed``;
    ``init="loftq"`` runs :func:`qlora._state.loftq_init` for ``loftq_iters`` rounds.

    Raises
    ------
    TypeError, ValueError
        If ``init`` is not ``"default"`` or ``"loftq"``, or ``loftq_iters`` is not an int >= 1.
    """
    if not isinstance(init, str) or init not in ("default", "loftq"):
        raise (ValueError if isinstance(init, str) else TypeError)(
            f"init must be 'default' or 'loftq', got {init!r}")
    loftq_iters = check_int(loftq_iters, "loftq_iters", minimum=1)
    if init == "loftq":
        return loftq_init(w, rank, scaling, group_size, double_quant, loftq_iters)
    out_features, in_features = w.shape
    return (quantize_weight(w, group_size, double_quant),
            new_adapter(rank, scaling, seed, out_features, in_features))


def train_state(state: LayerState, a: np.ndarray, b: np.ndarray, scaling: float,
                bias: np.ndarray | None) -> LayerState:
    """``state`` with the adapter ``(a, b, scaling)`` and ``bias`` in place of its own, without
    copying (for the torch bridge: ``a``, ``b``, ``bias`` are float32 C-contiguous aligned views
    of parameters, shapes already checked, and must not change until the backward)."""
    return state._replace(lora=Adapter(a, b, float(scaling)), bias=bias)


# TrainMethods.forward_train is this with the layer's state and the layer; the docstring is the
# method's. The torch bridge passes a state from train_state() instead.
def forward_train(state: LayerState, layer: object, x: object, dropout: object = 0.0,
                  seed: object = 0, precision: object = None):
    """Training forward: the output and what :meth:`backward` needs.

    ``y = x @ deq(W).T + scaling * (dropout(x) @ A.T) @ B.T + bias``, the dropout (PEFT's
    ``lora_dropout``) applying to the LoRA input only: an element of ``x`` is kept with
    probability ``1 - dropout`` and then scaled by ``1 / (1 - dropout)``. The mask is a
    function of ``seed`` and the element's position (row within the call's batch, column), so
    the same call gives the same mask on any thread count. With ``dropout=0`` ``y`` equals
    :meth:`forward`'s bit for bit.

    Parameters
    ----------
    x : array_like, shape (in_features,) or (..., in_features)
        As in :meth:`forward`. An aligned float32 C-contiguous array is used in place and
        kept by reference in the result: do not modify it before calling :meth:`backward`.
    dropout : float, default 0.0
        Probability in [0, 1) of dropping an element of the LoRA input.
    seed : int, default 0
        Seed of the dropout mask, 0 <= seed < 2**64. Use a new seed for every step.
    precision : {"fp32", "bf16", "int8"}, optional
        The base product's precision, as in :meth:`forward` (default:
        :func:`qlora.get_precision`). The LoRA term and the bias are float32.

    Returns
    -------
    y : numpy.ndarray
        float32, shape ``x.shape[:-1] + (out_features,)``.
    saved : SavedForBackward
        Pass it to :meth:`backward` of the same layer. Holds ``x`` (a reference), ``u``
        (batch x rank), the dropout seed and the layer's state.

    Raises
    ------
    TypeError
        If ``x`` is not real numeric, ``dropout`` is not a real number, ``seed`` is not an
        integer or ``precision`` is not a str.
    ValueError
        If ``x`` does not end in ``in_features``, ``dropout`` is outside [0, 1), ``seed`` is
        negative or >= 2**64, or ``precision`` is not one of the precisions.
    """
    p = check_dropout(dropout)
    seed = check_int(seed, "seed", minimum=0, maximum=_SEED_MAX)
    if precision is None:
        precision = _precision.default
    elif precision not in PRECISIONS:
        check_precision(precision)
    w = state.weight
    if not (type(x) is np.ndarray and x.dtype is _F32 and (f := x.flags).c_contiguous
            and f.aligned and x.ndim and x.shape[-1] == w.in_features):
        x = _prepare_x(x, w.in_features)
    lora = state.lora
    y = np.empty(x.shape[:-1] + (w.out_features,), dtype=np.float32)
    u = np.empty(x.shape[:-1] + (lora.rank,), dtype=np.float32)
    if x.size:
        _core.forward_train(state.tensor, x, lora.a, lora.b, lora.scaling, state.bias, y, u,
                            p, seed, precision)
    return y, SavedForBackward(x, u, p, seed, precision, state, layer)


# TrainMethods.backward is this with the layer; the docstring is the method's.
def backward(layer: object, saved: object, grad_y: object, input_grad: object = True,
             bias_grad: object = None) -> Gradients:
    """The gradients of a loss through the training forward that returned ``saved``.

    Parameters
    ----------
    saved : SavedForBackward
        From this layer's :meth:`forward_train`. The state it holds is used, so the gradients
        are those of the adapter the forward ran with, even if the layer changed since.
    grad_y : array_like
        dL/dy, real numbers of the forward output's shape ``x.shape[:-1] + (out_features,)``;
        anything but an aligned float32 C-contiguous array is converted first (a copy).
    input_grad : bool, default True
        Compute dL/dx (False for a first layer: that skips the largest product).
    bias_grad : bool, optional
        Compute dL/dbias (``sum`` of ``grad_y`` over rows); default: when the layer has a bias.
        True also works without a bias (the gradient a zero bias would get).

    Returns
    -------
    Gradients
        ``(input, lora_a, lora_b, bias)``, float32. ``input = grad_y @ deq(W) + scaling *
        (mask / (1 - p)) * ((grad_y @ B) @ A)``: its base part ``grad_y @ deq(W)`` is always
        computed in fp32 by a fused kernel that decodes the codes (whatever precision the
        forward used); ``lora_a = scaling * (grad_y @ B).T @ dropout(x)``, ``lora_b =
        scaling * grad_y.T @ u``.

    Raises
    ------
    TypeError
        If ``saved`` is not a SavedForBackward, ``grad_y`` is not real numeric or a flag is not
        a bool.
    ValueError
        If ``saved`` comes from another layer or ``grad_y`` has the wrong shape.
    """
    if not isinstance(saved, SavedForBackward):
        raise TypeError(f"saved must be the SavedForBackward returned by forward_train, got "
                        f"{type(saved).__name__}")
    if saved.owner is not layer:
        raise ValueError("saved must come from this layer's forward_train, got one from "
                         f"another layer ({saved.owner!r})")
    input_grad = check_bool(input_grad, "input_grad")
    state = saved.state
    if bias_grad is None:
        bias_grad = state.bias is not None
    else:
        bias_grad = check_bool(bias_grad, "bias_grad")
    x, u, w, lora = saved.x, saved.u, state.weight, state.lora
    shape = x.shape[:-1] + (w.out_features,)
    g = grad_y
    if not (type(g) is np.ndarray and g.dtype is _F32 and g.flags.c_contiguous
            and g.flags.aligned):
        g = as_float32(grad_y, "grad_y")
    if g.shape != shape:
        raise ValueError(f"grad_y must have the forward output's shape {shape}, got {g.shape}")
    dx = np.empty(x.shape, np.float32) if input_grad else None
    da = np.zeros((lora.rank, w.in_features), np.float32)
    db = np.zeros((w.out_features, lora.rank), np.float32)
    dbias = np.zeros(w.out_features, np.float32) if bias_grad else None
    if x.size:
        _core.backward(state.tensor, x, lora.a, lora.b, lora.scaling, u, g, dx, da, db, dbias,
                       saved.dropout, saved.seed)
    return Gradients(dx, da, db, dbias)


class TrainMethods:
    """``forward_train`` and ``backward``, a mixin of :class:`qlora.QLoraLinear` (which gives
    ``_read_state``). They train the layer's default adapter (``lora_a``, ``lora_b``); named
    adapters do not take part."""

    __slots__ = ()

    def _read_state(self) -> LayerState:  # pragma: no cover - QLoraLinear defines it
        raise NotImplementedError

    def forward_train(self, x: object, *, dropout: float = 0.0, seed: int = 0,
                      precision: str | None = None) -> tuple[np.ndarray, SavedForBackward]:
        # The state is read once: one consistent state for the whole call.
        return forward_train(self._read_state(), self, x, dropout, seed, precision)

    def backward(self, saved: SavedForBackward, grad_y: object, *, input_grad: bool = True,
                 bias_grad: bool | None = None) -> Gradients:
        return backward(self, saved, grad_y, input_grad, bias_grad)


TrainMethods.forward_train.__doc__ = forward_train.__doc__
TrainMethods.backward.__doc__ = backward.__doc__
