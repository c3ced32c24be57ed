"""The public QLoraLinear class: argument validation, then the C++ core (qlora._core) for
arithmetic and the converters (qlora.formats) for files and interop.

A layer holds one immutable :class:`qlora._state.LayerState` in one attribute; setters build
a new state and store it with one write. A forward reads the attribute once, so a forward
running in another thread while an adapter is swapped sees either the old state or the new
one, never a mix, and the core keeps the arrays it computes on alive until it returns.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from . import _core, _precision
from ._adapters import WRITE_LOCK, AdapterMethods, forward_mixed
from ._precision import PRECISIONS, check_precision
from ._state import Adapter, LayerState, frozen, make_state, new_adapter, quantize_weight
from ._train import TrainMethods, initial_weights
from ._validate import (as_float32, check_alpha, check_bool, check_finite, check_int,
                        check_out, check_path, check_scaling, float32_matrix)
from .formats import bnb as _bnb
from .formats import files as _files
from .formats import pickled as _pickle
from .formats.peft import LoraWeights

__all__ = ["QLoraLinear", "layer_from_state", "layer_states"]

_F32 = np.dtype(np.float32)


class QLoraLinear(AdapterMethods, TrainMethods):
    """A linear layer with a frozen NF4-quantized weight, a default LoRA adapter and any number
    of named adapters (``add_adapter``; rows of a batch pick theirs in ``forward``).

    ``forward(x) = x @ deq(W).T + scaling * (x @ A.T) @ B.T + bias`` with ``scaling = alpha /
    rank``, computed by a fused kernel that decodes the 4-bit codes in registers. Build one with
    :meth:`from_weight`, :meth:`from_bnb` (a bitsandbytes state dict) or :meth:`load` (a file).

    Attributes
    ----------
    in_features, out_features : int
        The weight is (out_features, in_features), as in ``torch.nn.Linear``.
    rank : int
        Rows of ``lora_a``.
    alpha, scaling : float
        ``scaling = alpha / rank`` multiplies the LoRA term.
    group_size, num_groups : int
        Each run of ``group_size`` consecutive elements of the flattened row-major weight shares
        one absmax scale; ``num_groups = ceil(out_features * in_features / group_size)``.
    """

    __slots__ = ("_state", "__weakref__")

    def _read_state(self) -> LayerState:
        return self._state

    def _update_state(self, change) -> LayerState:
        """Store ``change(state)`` (it may raise: nothing changes then); see qlora._adapters."""
        with WRITE_LOCK:
            self._state = new = change(self._state)
        return new

    def __init__(self) -> None:
        raise TypeError("use QLoraLinear.from_weight(...) to build a layer")

    # ------------------------------------------------------------------ construction
    @classmethod
    def _from_state(cls, state: LayerState) -> "QLoraLinear":
        self = object.__new__(cls)
        self._state = state
        return self

    @classmethod
    def from_weight(
        cls,
        weight: object,
        rank: int = 8,
        alpha: float = 16.0,
        group_size: int = 64,
        *,
        bias: object = None,
        seed: int = 0,
        double_quant: bool = False, init: str = "default", loftq_iters: int = 1,
    ) -> "QLoraLinear":
        """Quantize a weight matrix to NF4 and attach a freshly initialised LoRA adapter.

        Parameters
        ----------
        weight : array_like, shape (out_features, in_features)
            Real numbers, finite. Any real numeric dtype or memory order is accepted; anything
            but a float32 C-contiguous array is converted first (a copy).
        rank : int, default 8
            LoRA rank, ``1 <= rank <= min(out_features, in_features)``.
        alpha : float, default 16.0
            LoRA alpha, finite and > 0; ``scaling = alpha / rank``.
        group_size : int, default 64
            Elements per absmax group over the flattened row-major weight, >= 1. Groups may
            straddle rows and the last one may be partial, exactly as in bitsandbytes.
        bias : array_like, shape (out_features,), optional
            Added to every output row.
        seed : int, default 0
            Seed of the LoRA ``A`` initialisation (Kaiming-uniform, as PEFT does:
            ``U(-1/sqrt(in_features), 1/sqrt(in_features))``); ``B`` starts at zero. The same
            seed gives the same ``A`` on every platform.
        double_quant : bool, default False
            Store the group scales double-quantized, in bitsandbytes' ``compress_statistics``
            layout: 8-bit codes over bitsandbytes' signed dynamic map, one float32 scale per 256
            groups and a float32 offset ``mean(absmax)``, each code rounded to the exactly
            nearest decoded scale. At group size 64 the weight then costs about 4.13 bits per
            parameter instead of 4.5. ``forward`` and ``dequantize_weight`` use the decoded
            scales ``map[q] * nested[g // 256] + offset``.
        init, loftq_iters : {"default", "loftq"}, int >= 1; default "default", 1
            ``"loftq"``: LoftQ (README "Fine-tuning"); the stored base then is not quantize(W).

        Returns
        -------
        QLoraLinear

        Raises
        ------
        TypeError
            If ``weight`` or ``bias`` is not of a real numeric dtype, or an integer argument is
            not an integer.
        ValueError
            If ``weight`` is not 2-D, has an empty dimension or a NaN/Inf (the message gives
            its index), or ``rank``, ``alpha``, ``group_size`` or ``bias`` is out of range.
        MemoryError
            If the layer is too large to allocate.
        """
        w = as_float32(weight, "weight", ndim=2)
        out_features, in_features = (int(d) for d in w.shape)
        if out_features == 0 or in_features == 0:
            raise ValueError(
                f"weight must have no empty dimension, got shape ({out_features}, {in_features})"
            )
        rank = check_int(rank, "rank", minimum=1, maximum=min(out_features, in_features))
        alpha = check_alpha(alpha, rank)
        group_size = check_int(group_size, "group_size", minimum=1, maximum=2**63 - 1)  # int64
        seed = check_int(seed, "seed", minimum=0)
        double_quant = check_bool(double_quant, "double_quant")
        check_finite(w, "weight")
        bias_arr = None if bias is None else float32_matrix(bias, "bias", (out_features,))
        weight, lora = initial_weights(w, rank, alpha / rank, group_size, double_quant, seed,
                                       init, loftq_iters)
        return cls._from_state(make_state(weight, lora, bias_arr))

    # ------------------------------------------------------------------ compute
    def forward(self, x: object, out: np.ndarray | None = None, *,
                precision: str | None = None, adapters: object = None,
                adapter_scales: object = None) -> np.ndarray:
        """Apply the layer: ``x @ deq(W).T + scaling * (x @ A.T) @ B.T + bias``.

        Parameters
        ----------
        x : array_like, shape (in_features,) or (..., in_features)
            Real numbers; converted to an aligned float32 C-contiguous array if it is not
            already one (a copy).
            NaN and Inf propagate as IEEE arithmetic does.
        out : numpy.ndarray, optional
            float32, C-contiguous, aligned, writable, of exactly the result shape and not
            overlapping ``x``: written in place and returned.
        precision : {"fp32", "bf16", "int8"}, optional
            What the base product ``x @ deq(W).T`` is computed in (the LoRA term and the bias
            are always float32); default: :func:`qlora.get_precision`. ``"bf16"`` rounds x
            and each decoded weight to bfloat16; ``"int8"`` quantizes x per row in blocks of
            32 and uses the NF4 codebook as int8. Where this CPU has no kernel for it (or,
            for int8, the layer's groups do not hold whole 32-column blocks) the call runs
            in fp32; :func:`qlora.kernel_info` says which kernel serves what.
        adapters : str, int, sequence or 1-D integer ndarray, optional
            Per row of a 2-D ``x``: a name, a slot, ``"default"``/0 or None/-1 (base only);
            or one name or slot for all rows. See README "Serving many adapters".
        adapter_scales : float or array_like (batch,), optional
            Per-row multipliers of the chosen adapter's scaling (finite).

        Returns
        -------
        numpy.ndarray
            float32, shape ``x.shape[:-1] + (out_features,)``.

        Raises
        ------
        TypeError
            If ``x`` is not real numeric, ``out`` is not a float32 ndarray, or ``precision``
            is not a str.
        ValueError
            If the last dimension of ``x`` is not ``in_features``, ``x`` is 0-d, ``out`` has
            the wrong shape, is not C-contiguous or not aligned, is read-only or overlaps
            ``x``, ``precision`` is not one of the precisions, or ``adapters`` or
            ``adapter_scales`` has the wrong length or a bad value.
        KeyError
            If a row names an adapter the layer does not hold (the row and value are named).
        """
        if precision is None:
            precision = _precision.default
        elif precision not in PRECISIONS:
            check_precision(precision)
        state = self._state  # read once: one consistent state for the whole call
        w = state.weight
        # Shapes from the namedtuple (plain ints): a pybind11 property read costs ~0.1 us,
        # a measurable part of a small layer's ~2.5 us fixed cost per call.
        in_features, out_features = w.in_features, w.out_features
        if not (type(x) is np.ndarray and x.dtype is _F32 and (f := x.flags).c_contiguous
                and f.aligned and x.ndim and x.shape[-1] == in_features):
            x = self._prepare_x(x, in_features)
        shape = x.shape[:-1] + (out_features,)
        if out is None:
            y = np.empty(shape, dtype=np.float32)
        else:
            y = check_out(out, shape, "out")
            if np.may_share_memory(y, x):
                raise ValueError("out must not overlap x")
        # The core takes any leading dimensions (C-contiguous), so nothing is reshaped here.
        if adapters is not None or adapter_scales is not None:
            forward_mixed(state, x, y, "default" if adapters is None else adapters,
                          adapter_scales, precision)
        elif x.size:
            lora = state.lora
            _core.forward(state.tensor, x, lora.a, lora.b, lora.scaling, state.bias, y, precision)
        return y

    __call__ = forward

    @staticmethod
    def _prepare_x(x: object, in_features: int) -> np.ndarray:
        arr = as_float32(x, "x")
        if arr.ndim == 0:
            raise ValueError(
                f"x must have shape (..., {in_features}) to match in_features, got a 0-d array"
            )
        if arr.shape[-1] != in_features:
            raise ValueError(
                f"x must have shape (..., {in_features}) to match in_features, got {arr.shape}"
            )
        return arr

    def dequantize_weight(self, out: np.ndarray | None = None) -> np.ndarray:
        """Return the dequantized weight ``code * absmax`` as float32 (out_features, in_features).

        Parameters
        ----------
        out : numpy.ndarray, optional
            float32, C-contiguous, aligned, writable, shape (out_features, in_features);
            written in place and returned.

        Returns
        -------
        numpy.ndarray
            A new array unless ``out`` is given.

        Raises
        ------
        TypeError, ValueError
            If ``out`` is not as described.
        """
        state = self._state
        shape = (state.weight.out_features, state.weight.in_features)
        y = np.empty(shape, np.float32) if out is None else check_out(out, shape, "out")
        _core.dequantize_nf4(state.tensor, y)
        return y

    # ------------------------------------------------------------------ adapter
    def set_lora_a(self, a: object) -> None:
        """Replace LoRA ``A``: array_like (rank, in_features), finite real numbers (copied).

        Raises
        ------
        TypeError, ValueError
            On a wrong dtype, shape or a non-finite value; the layer is then unchanged.
        """
        state = self._state
        arr = float32_matrix(a, "a", (state.lora.rank, state.weight.in_features))
        self._update_state(lambda s: s._replace(lora=state.lora._replace(a=arr)))

    def set_lora_b(self, b: object) -> None:
        """Replace LoRA ``B``: array_like (out_features, rank), finite real numbers (copied).

        Raises
        ------
        TypeError, ValueError
            On a wrong dtype, shape or a non-finite value; the layer is then unchanged.
        """
        state = self._state
        arr = float32_matrix(b, "b", (state.weight.out_features, state.lora.rank))
        self._update_state(lambda s: s._replace(lora=state.lora._replace(b=arr)))

    def set_bias(self, bias: object) -> None:
        """Replace the bias with array_like (out_features,) of finite reals, or remove it (None).

        Raises
        ------
        TypeError, ValueError
            On a wrong dtype, shape or a non-finite value; the layer is then unchanged.
        """
        state = self._state
        arr = None if bias is None else float32_matrix(bias, "bias",
                                                       (state.weight.out_features,))
        self._update_state(lambda s: s._replace(bias=arr))

    # ------------------------------------------------------------------ properties
    @property
    def in_features(self) -> int:
        """Columns of the weight (length of an input vector)."""
        return self._state.weight.in_features

    @property
    def out_features(self) -> int:
        """Rows of the weight (length of an output vector)."""
        return self._state.weight.out_features

    @property
    def rank(self) -> int:
        """LoRA rank: rows of ``lora_a``."""
        return self._state.lora.rank

    @property
    def scaling(self) -> float:
        """Factor of the LoRA term, ``alpha / rank``."""
        return self._state.lora.scaling

    @property
    def alpha(self) -> float:
        """LoRA alpha, ``scaling * rank``."""
        lora = self._state.lora
        return lora.scaling * lora.rank

    @property
    def group_size(self) -> int:
        """Elements per absmax group of the flattened weight."""
        return self._state.weight.group_size

    @property
    def num_groups(self) -> int:
        """Number of absmax groups, ``ceil(out_features * in_features / group_size)``."""
        return self._state.tensor.num_groups

    @property
    def scale(self) -> np.ndarray:
        """Per-group absmax as a new float32 array of length ``num_groups``."""
        return self._state.weight.decoded_scales()

    @property
    def zero_point(self) -> np.ndarray:
        """Per-group zero point: all zeros (NF4 is symmetric), float32 of length ``num_groups``."""
        return np.zeros(self.num_groups, dtype=np.float32)

    @property
    def lora_a(self) -> np.ndarray:
        """A copy of LoRA ``A``, float32 (rank, in_features)."""
        return self._state.lora.a.copy()

    @property
    def lora_b(self) -> np.ndarray:
        """A copy of LoRA ``B``, float32 (out_features, rank)."""
        return self._state.lora.b.copy()

    @property
    def bias(self) -> np.ndarray | None:
        """A copy of the bias, float32 (out_features,), or None."""
        bias = self._state.bias
        return None if bias is None else bias.copy()

    def memory_saved_bytes(self) -> int:
        """Bytes of the fp32 weight minus the bytes stored for the quantized weight (>= 0).

        Returns
        -------
        int
            ``4 * out_features * in_features`` minus codes, scales and any double-quantization
            tables, floored at zero (a tiny layer can cost more than its fp32 weight).
        """
        w = self._state.weight
        return max(0, 4 * w.out_features * w.in_features - w.nbytes())

    def trainable_params(self) -> int:
        """LoRA parameters, ``rank * (in_features + out_features)``."""
        state = self._state
        return state.lora.rank * (state.weight.in_features + state.weight.out_features)

    def __repr__(self) -> str:
        state = self._state
        w, lora = state.weight, state.lora
        dq = ", double_quant=True" if w.double_quant else ""
        return (
            f"QLoraLinear(in_features={w.in_features}, out_features={w.out_features}, "
            f"rank={lora.rank}, alpha={lora.scaling * lora.rank:g}, "
            f"group_size={w.group_size}{dq}, nf4_bytes={w.nbytes()}, "
            f"fp32_bytes={4 * w.out_features * w.in_features}, bias={state.bias is not None})"
        )

    # ------------------------------------------------------------------ files and interop
    @classmethod
    def from_bnb(
        cls,
        state_dict: Mapping[str, object],
        prefix: str = "",
        *,
        rank: int = 8,
        alpha: float = 16.0,
        seed: int = 0,
    ) -> "QLoraLinear":
        """Build a layer from the state dict of a bitsandbytes ``Linear4bit`` (NF4).

        The codes, scales (plain float32 or double-quantized) and bias are taken exactly as
        stored, so :meth:`dequantize_weight` equals bitsandbytes' ``dequantize_4bit`` of the
        same state bit for bit. A fresh LoRA adapter is attached as in :meth:`from_weight`.

        Parameters
        ----------
        state_dict : mapping of str to array_like
            NumPy arrays (or anything ``numpy.asarray`` reads) under the keys bitsandbytes
            writes: ``{prefix}weight``, ``weight.absmax``, ``weight.quant_map``,
            ``weight.quant_state.bitsandbytes__nf4``, and with double quantization
            ``weight.nested_absmax`` and ``weight.nested_quant_map``; ``{prefix}bias`` is
            optional. Other keys are ignored.
        prefix : str, default ""
            Prefix of the layer's keys, e.g. ``"model.layers.0.mlp.up_proj."``.
        rank, alpha, seed
            As in :meth:`from_weight`.

        Returns
        -------
        QLoraLinear

        Raises
        ------
        ValueError
            If a key is missing, a shape or dtype disagrees with the quant state, or the state
            is FP4, of an unknown quant type, or uses a codebook other than NF4.
        TypeError
            If ``state_dict`` is not a mapping.
        """
        weight, bias = _bnb.weight_from_bnb(state_dict, prefix)
        out_features, in_features = weight.out_features, weight.in_features
        rank = check_int(rank, "rank", minimum=1, maximum=min(out_features, in_features))
        alpha = check_alpha(alpha, rank)
        seed = check_int(seed, "seed", minimum=0)
        lora = new_adapter(rank, alpha / rank, seed, out_features, in_features)
        return cls._from_state(make_state(weight, lora, bias))

    def to_bnb(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Export the quantized weight (and bias) as a bitsandbytes ``Linear4bit`` state dict.

        Parameters
        ----------
        prefix : str, default ""
            Prepended to every key.

        Returns
        -------
        dict of str to numpy.ndarray
            The keys, shapes and dtypes bitsandbytes writes; loadable with
            ``bnb.nn.Params4bit.from_prequantized`` (after ``torch.from_numpy``), giving the
            same dequantized weight. The LoRA adapter is not part of it.

        Raises
        ------
        ValueError
            If ``group_size`` is not a block size bitsandbytes accepts (32, 64, ..., 4096).
        """
        state = self._state
        return _bnb.weight_to_bnb(state.weight, state.bias, prefix)

    def save(self, path: "str | os.PathLike[str]") -> None:
        """Save the layer to one safetensors file (codes, scales, LoRA, bias and metadata).

        The file is written to a temporary name in the same directory and renamed, so an
        interrupted save never leaves a half-written file. Equivalent to
        ``qlora.save_layers(path, {"layer": self})``.

        Parameters
        ----------
        path : str or os.PathLike

        Raises
        ------
        TypeError
            If ``path`` is not a str or os.PathLike.
        OSError
            If the file cannot be written.
        """
        _files.write_layers(check_path(path, "path"), {"layer": self._state})

    @classmethod
    def load(cls, path: "str | os.PathLike[str]", *, mmap: bool = True) -> "QLoraLinear":
        """Load a layer saved by :meth:`save` (a file holding exactly one layer).

        Parameters
        ----------
        path : str or os.PathLike
        mmap : bool, default True
            Use the packed codes and scales straight from a read-only shared mapping of the
            file (no copy: processes loading the same file share its pages). The file must not
            be modified or truncated while layers loaded from it are alive.

        Returns
        -------
        QLoraLinear

        Raises
        ------
        TypeError
            If ``path`` is not a str or os.PathLike, or ``mmap`` is not a bool.
        OSError
            If the file cannot be read.
        ValueError
            If the file is not a valid qlora file or does not hold exactly one layer; the
            message names the file and the field.
        """
        path = check_path(path, "path")
        layers = _files.read_layers(path, mmap=check_bool(mmap, "mmap"))
        if len(layers) != 1:
            raise ValueError(f"{os.fspath(path)}: holds {len(layers)} layers "
                             f"({sorted(layers)}); use qlora.load_layers")
        return cls._from_state(next(iter(layers.values())))

    def set_lora(self, a: object, b: object, *, scaling: float) -> None:
        """Replace the whole LoRA adapter at once; the rank may change.

        Parameters
        ----------
        a : array_like, shape (r, in_features)
        b : array_like, shape (out_features, r)
            Finite real numbers, copied to float32. ``r >= 1``.
        scaling : float
            Finite and > 0, a normal float32 number (``1.18e-38 <= scaling <= 3.40e38``: the
            core multiplies by it in float32); multiplies the LoRA term. ``alpha`` becomes
            ``scaling * r``.

        Raises
        ------
        TypeError, ValueError
            On a wrong dtype, shape, rank mismatch or non-finite value; the layer is then
            unchanged. A forward running concurrently sees the old or the new adapter, never a
            mix.
        """
        state = self._state
        a_arr = as_float32(a, "a", ndim=2)
        r = int(a_arr.shape[0])
        if r < 1:
            raise ValueError(f"a must have at least one row (rank >= 1), got shape {a_arr.shape}")
        a_arr = float32_matrix(a_arr, "a", (r, state.weight.in_features))
        b_arr = float32_matrix(b, "b", (state.weight.out_features, r))
        s = check_scaling(scaling, "scaling")
        self._update_state(lambda st: st._replace(lora=Adapter(a_arr, b_arr, s)))

    def load_adapter(self, weights: object) -> None:
        """Apply one adapter entry from :func:`qlora.load_peft_adapter`.

        Parameters
        ----------
        weights : qlora.LoraWeights

        Raises
        ------
        TypeError
            If ``weights`` is not a ``LoraWeights``.
        ValueError
            If its shapes do not fit this layer (the message names the module).
        """
        if not isinstance(weights, LoraWeights):
            raise TypeError(f"weights must be a qlora.LoraWeights, got {type(weights).__name__}")
        w = self._state.weight
        try:
            self.set_lora(weights.a, weights.b, scaling=weights.scaling)
        except ValueError as exc:
            raise ValueError(f"adapter for module {weights.name!r} does not fit this layer "
                             f"({w.out_features}x{w.in_features}): weights.{exc}") from None

    def merged_weight(self) -> np.ndarray:
        """The effective weight ``deq(W) + scaling * B @ A`` as float32 (out, in).

        Computed in float64 and rounded once. Merging is for export or inspection: quantizing
        the merged weight back to NF4 is lossy (the LoRA update is mostly far below one NF4
        step), so qlora keeps the adapter separate.

        Returns
        -------
        numpy.ndarray
            A new float32 array of shape (out_features, in_features).
        """
        state = self._state
        lora = state.lora
        deq = np.empty((state.weight.out_features, state.weight.in_features), np.float32)
        _core.dequantize_nf4(state.tensor, deq)
        deq = deq.astype(np.float64)
        deq += lora.scaling * (lora.b.astype(np.float64) @ lora.a.astype(np.float64))
        return deq.astype(np.float32)

    # ------------------------------------------------------------------ copy and pickle
    def __copy__(self) -> "QLoraLinear":
        # The state is immutable and replaced whole by setters, so sharing is independence.
        return type(self)._from_state(self._state)

    def __deepcopy__(self, memo: dict) -> "QLoraLinear":
        state = self._state
        bias = None if state.bias is None else frozen(np.array(state.bias, copy=True))
        return type(self)._from_state(make_state(state.weight.owned(), state.lora.owned(), bias,
                                                 state.adapters.owned()))

    def __getstate__(self) -> dict:
        return _pickle.state_to_dict(self._state)

    def __setstate__(self, state: dict) -> None:
        self._state = _pickle.state_from_dict(state)

    def __reduce__(self):
        return (_unpickle, (self.__getstate__(),))


def _unpickle(state: dict) -> QLoraLinear:
    layer = object.__new__(QLoraLinear)
    layer.__setstate__(state)
    return layer


# ---------------------------------------------------------------------- states of layers
def layer_states(layers: object) -> dict[str, LayerState]:
    """The current state of each layer of ``layers`` (checked as ``qlora.save_layers`` checks
    it), for code that writes layers through :mod:`qlora.formats.files`.

    Raises
    ------
    TypeError
        If ``layers`` is not a mapping or holds something other than a QLoraLinear.
    ValueError
        If it is empty or a name is not a non-empty string (or is ``__metadata__``).
    """
    if not isinstance(layers, Mapping):
        raise TypeError(f"layers must be a mapping of names to QLoraLinear, got "
                        f"{type(layers).__name__}")
    if not layers:
        raise ValueError("layers must hold at least one layer")
    states = {}
    for name, layer in layers.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"layer names must be non-empty strings, got {name!r}")
        if not isinstance(layer, QLoraLinear):
            raise TypeError(f"layers[{name!r}] must be a QLoraLinear, got "
                            f"{type(layer).__name__}")
        states[name] = layer._state
    return states


def layer_from_state(state: LayerState) -> QLoraLinear:
    """A layer holding ``state`` (a value read by :mod:`qlora.formats.files`)."""
    return QLoraLinear._from_state(state)
