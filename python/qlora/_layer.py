"""The public QLoraLinear class: a frozen NF4 weight plus trainable-shape LoRA matrices, with
all validation in Python and all arithmetic in the C++ core (qlora._core).

State is held in immutable pieces (read-only arrays, a `_Nf4Parts` and a `_Lora` tuple) that
setters replace whole. A forward reads each piece once, so a forward running in another thread
while an adapter is swapped sees either the old adapter or the new one, never a mix, and the
core keeps the arrays it computes on alive until it returns.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, NamedTuple

import numpy as np

from . import _core
from ._validate import as_float32, check_finite, check_int, check_positive_float

__all__ = ["QLoraLinear"]

_F32 = np.dtype(np.float32)
_U8 = np.dtype(np.uint8)
_PICKLE_VERSION = 1


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr.setflags(write=False)
    return arr


class _Nf4Parts(NamedTuple):
    """The quantized weight: packed codes and either plain or double-quantized scales."""

    out_features: int
    in_features: int
    group_size: int
    codes: np.ndarray  # uint8, qlora's packed rows (see csrc/include/qlora/nf4.h)
    scales: np.ndarray | None  # float32 absmax per group
    qscales: np.ndarray | None = None  # uint8 per group (double quantization)
    nested_scales: np.ndarray | None = None  # float32 per 256 groups
    nested_map: np.ndarray | None = None  # float32 (256,)
    nested_offset: float = 0.0

    def tensor(self) -> _core.Nf4Tensor:
        return _core.Nf4Tensor(
            self.codes, self.scales, self.qscales, self.nested_scales, self.nested_map,
            float(self.nested_offset), self.out_features, self.in_features, self.group_size,
        )

    def nbytes(self) -> int:
        arrays = (self.codes, self.scales, self.qscales, self.nested_scales, self.nested_map)
        extra = 4 if self.qscales is not None else 0  # the offset
        return sum(a.nbytes for a in arrays if a is not None) + extra


class _Lora(NamedTuple):
    a: np.ndarray  # float32 (rank, in_features), read-only
    b: np.ndarray  # float32 (out_features, rank), read-only
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


class QLoraLinear:
    """A linear layer with a frozen NF4-quantized weight and a LoRA adapter.

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

    __slots__ = ("_w", "_tensor", "_lora", "_bias", "__weakref__")

    def __init__(self) -> None:
        raise TypeError("use QLoraLinear.from_weight(...) to build a layer")

    # ------------------------------------------------------------------ construction
    @classmethod
    def _from_parts(cls, parts: _Nf4Parts, lora: _Lora, bias: np.ndarray | None) -> "QLoraLinear":
        self = object.__new__(cls)
        self._w = parts
        self._tensor = parts.tensor()
        self._lora = lora
        self._bias = bias
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
        double_quant: bool = False,
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
        alpha = check_positive_float(alpha, "alpha")
        # The core multiplies by scaling in float32: a finite alpha whose alpha / rank
        # overflows (or underflows to 0) there would silently give NaN (or drop the adapter).
        if not 1.1754943508222875e-38 <= alpha / rank <= 3.4028234663852886e38:
            raise ValueError(
                f"alpha / rank must be a normal float32 number (the core computes in float32), "
                f"got alpha={alpha!r} and rank={rank} (alpha / rank = {alpha / rank!r})"
            )
        group_size = check_int(group_size, "group_size", minimum=1, maximum=2**63 - 1)  # int64
        seed = check_int(seed, "seed", minimum=0)
        if not isinstance(double_quant, (bool, np.bool_)):
            raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
        check_finite(w, "weight")
        bias_arr = None if bias is None else cls._check_bias(bias, out_features)

        codes = np.empty(_core.packed_bytes(out_features, in_features), dtype=np.uint8)
        scales = np.empty(_core.group_count(out_features * in_features, group_size), np.float32)
        _core.quantize_nf4(w, group_size, codes, scales)
        parts = _Nf4Parts(out_features, in_features, group_size, _frozen(codes), _frozen(scales))

        if double_quant:
            from ._bnb import double_quantize

            qscales, nested, nested_map, offset = double_quantize(scales)
            parts = parts._replace(scales=None, qscales=_frozen(qscales),
                                   nested_scales=_frozen(nested), nested_map=nested_map,
                                   nested_offset=offset)
        lora = _new_lora(rank, alpha, seed, out_features, in_features)
        return cls._from_parts(parts, lora, bias_arr)

    # ------------------------------------------------------------------ compute
    def forward(self, x: object, out: np.ndarray | None = None) -> np.ndarray:
        """Apply the layer: ``x @ deq(W).T + scaling * (x @ A.T) @ B.T + bias``.

        Parameters
        ----------
        x : array_like, shape (in_features,) or (..., in_features)
            Real numbers; converted to float32 C-contiguous if it is not already (a copy).
            NaN and Inf propagate as IEEE arithmetic does.
        out : numpy.ndarray, optional
            float32, C-contiguous, writable, of exactly the result shape and not overlapping
            ``x``: written in place and returned.

        Returns
        -------
        numpy.ndarray
            float32, shape ``x.shape[:-1] + (out_features,)``.

        Raises
        ------
        TypeError
            If ``x`` is not real numeric, or ``out`` is not a float32 ndarray.
        ValueError
            If the last dimension of ``x`` is not ``in_features``, ``x`` is 0-d, or ``out`` has
            the wrong shape, is not C-contiguous, is read-only or overlaps ``x``.
        """
        tensor = self._tensor
        lora = self._lora
        # Shapes from the namedtuple (plain ints): a pybind11 property read costs ~0.1 us,
        # a measurable part of a small layer's ~2.5 us fixed cost per call.
        in_features, out_features = self._w.in_features, self._w.out_features
        if not (type(x) is np.ndarray and x.dtype is _F32 and x.flags.c_contiguous
                and x.ndim and x.shape[-1] == in_features):
            x = self._prepare_x(x, in_features)
        shape = x.shape[:-1] + (out_features,)
        if out is None:
            y = np.empty(shape, dtype=np.float32)
        else:
            y = self._check_out(out, shape, "out")
            if np.may_share_memory(y, x):
                raise ValueError("out must not overlap x")
        # The core takes any leading dimensions (C-contiguous), so nothing is reshaped here.
        if x.size:
            _core.forward(tensor, x, lora.a, lora.b, lora.scaling, self._bias, y)
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

    @staticmethod
    def _check_out(out: object, shape: tuple[int, ...], name: str) -> np.ndarray:
        if not isinstance(out, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
        if out.dtype != _F32:
            raise TypeError(f"{name} must have dtype float32, got {out.dtype}")
        if out.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {out.shape}")
        if not out.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
        if not out.flags.writeable:
            raise ValueError(f"{name} must be writable")
        return out

    def dequantize_weight(self, out: np.ndarray | None = None) -> np.ndarray:
        """Return the dequantized weight ``code * absmax`` as float32 (out_features, in_features).

        Parameters
        ----------
        out : numpy.ndarray, optional
            float32, C-contiguous, writable, shape (out_features, in_features); written in
            place and returned.

        Returns
        -------
        numpy.ndarray
            A new array unless ``out`` is given.

        Raises
        ------
        TypeError, ValueError
            If ``out`` is not as described.
        """
        shape = (self._w.out_features, self._w.in_features)
        y = np.empty(shape, np.float32) if out is None else self._check_out(out, shape, "out")
        _core.dequantize_nf4(self._tensor, y)
        return y

    # ------------------------------------------------------------------ adapter
    def set_lora_a(self, a: object) -> None:
        """Replace LoRA ``A``: array_like (rank, in_features), finite real numbers (copied).

        Raises
        ------
        TypeError, ValueError
            On a wrong dtype, shape or a non-finite value; the layer is then unchanged.
        """
        lora = self._lora
        arr = self._check_matrix(a, "a", (lora.rank, self._w.in_features))
        self._lora = lora._replace(a=arr)

    def set_lora_b(self, b: object) -> None:
        """Replace LoRA ``B``: array_like (out_features, rank), finite real numbers (copied).

        Raises
        ------
        TypeError, ValueError
            On a wrong dtype, shape or a non-finite value; the layer is then unchanged.
        """
        lora = self._lora
        arr = self._check_matrix(b, "b", (self._w.out_features, lora.rank))
        self._lora = lora._replace(b=arr)

    def set_bias(self, bias: object) -> None:
        """Replace the bias with array_like (out_features,) of finite reals, or remove it (None).

        Raises
        ------
        TypeError, ValueError
            On a wrong dtype, shape or a non-finite value; the layer is then unchanged.
        """
        self._bias = None if bias is None else self._check_bias(bias, self._w.out_features)

    @staticmethod
    def _check_matrix(value: object, name: str, shape: tuple[int, int]) -> np.ndarray:
        arr = as_float32(value, name)
        if arr.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
        # Always copy: a conversion may return a view of the caller's memory (a torch tensor,
        # an np.matrix, anything with __array__), which the caller could then change.
        arr = arr.copy()
        check_finite(arr, name)
        return _frozen(arr)

    @classmethod
    def _check_bias(cls, bias: object, out_features: int) -> np.ndarray:
        arr = as_float32(bias, "bias")
        if arr.shape != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {arr.shape}")
        arr = arr.copy()  # never a view of the caller's memory (see _check_matrix)
        check_finite(arr, "bias")
        return _frozen(arr)

    # ------------------------------------------------------------------ properties
    @property
    def in_features(self) -> int:
        """Columns of the weight (length of an input vector)."""
        return self._w.in_features

    @property
    def out_features(self) -> int:
        """Rows of the weight (length of an output vector)."""
        return self._w.out_features

    @property
    def rank(self) -> int:
        """LoRA rank: rows of ``lora_a``."""
        return self._lora.rank

    @property
    def scaling(self) -> float:
        """Factor of the LoRA term, ``alpha / rank``."""
        return self._lora.scaling

    @property
    def alpha(self) -> float:
        """LoRA alpha, ``scaling * rank``."""
        return self._lora.scaling * self._lora.rank

    @property
    def group_size(self) -> int:
        """Elements per absmax group of the flattened weight."""
        return self._w.group_size

    @property
    def num_groups(self) -> int:
        """Number of absmax groups, ``ceil(out_features * in_features / group_size)``."""
        return self._tensor.num_groups

    @property
    def scale(self) -> np.ndarray:
        """Per-group absmax as a new float32 array of length ``num_groups``."""
        w = self._w
        if w.scales is not None:
            return w.scales.copy()
        m = w.nested_map[w.qscales] * np.repeat(w.nested_scales, 256)[: w.qscales.size]
        return (m + np.float32(w.nested_offset)).astype(np.float32)

    @property
    def zero_point(self) -> np.ndarray:
        """Per-group zero point: all zeros (NF4 is symmetric), float32 of length ``num_groups``."""
        return np.zeros(self.num_groups, dtype=np.float32)

    @property
    def lora_a(self) -> np.ndarray:
        """A copy of LoRA ``A``, float32 (rank, in_features)."""
        return self._lora.a.copy()

    @property
    def lora_b(self) -> np.ndarray:
        """A copy of LoRA ``B``, float32 (out_features, rank)."""
        return self._lora.b.copy()

    @property
    def bias(self) -> np.ndarray | None:
        """A copy of the bias, float32 (out_features,), or None."""
        return None if self._bias is None else self._bias.copy()

    def memory_saved_bytes(self) -> int:
        """Bytes of the fp32 weight minus the bytes stored for the quantized weight (>= 0).

        Returns
        -------
        int
            ``4 * out_features * in_features`` minus codes, scales and any double-quantization
            tables, floored at zero (a tiny layer can cost more than its fp32 weight).
        """
        fp32 = 4 * self._w.out_features * self._w.in_features
        return max(0, fp32 - self._w.nbytes())

    def trainable_params(self) -> int:
        """LoRA parameters, ``rank * (in_features + out_features)``."""
        return self.rank * (self._w.in_features + self._w.out_features)

    def __repr__(self) -> str:
        w = self._w
        dq = ", double_quant=True" if w.qscales is not None else ""
        return (
            f"QLoraLinear(in_features={w.in_features}, out_features={w.out_features}, "
            f"rank={self.rank}, alpha={self.alpha:g}, group_size={w.group_size}{dq}, "
            f"nf4_bytes={w.nbytes()}, fp32_bytes={4 * w.out_features * w.in_features}, "
            f"bias={self._bias is not None})"
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
        from ._bnb import layer_from_bnb

        return layer_from_bnb(cls, state_dict, prefix, rank, alpha, seed)

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
        from ._bnb import layer_to_bnb

        return layer_to_bnb(self, prefix)

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
        OSError
            If the file cannot be written.
        """
        from ._io import save_layers

        save_layers(path, {"layer": self})

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
        OSError
            If the file cannot be read.
        ValueError
            If the file is not a valid qlora file or does not hold exactly one layer; the
            message names the file and the field.
        """
        from ._io import load_layers

        layers = load_layers(path, mmap=mmap)
        if len(layers) != 1:
            raise ValueError(f"{os.fspath(path)}: holds {len(layers)} layers "
                             f"({sorted(layers)}); use qlora.load_layers")
        return next(iter(layers.values()))

    def set_lora(self, a: object, b: object, *, scaling: float) -> None:
        """Replace the whole LoRA adapter at once; the rank may change.

        Parameters
        ----------
        a : array_like, shape (r, in_features)
        b : array_like, shape (out_features, r)
            Finite real numbers, copied to float32. ``r >= 1``.
        scaling : float
            Finite and > 0; multiplies the LoRA term. ``alpha`` becomes ``scaling * r``.

        Raises
        ------
        TypeError, ValueError
            On a wrong dtype, shape, rank mismatch or non-finite value; the layer is then
            unchanged. A forward running concurrently sees the old or the new adapter, never a
            mix.
        """
        a_arr = as_float32(a, "a", ndim=2)
        r = int(a_arr.shape[0])
        if r < 1:
            raise ValueError(f"a must have at least one row (rank >= 1), got shape {a_arr.shape}")
        a_arr = self._check_matrix(a, "a", (r, self._w.in_features))
        b_arr = self._check_matrix(b, "b", (self._w.out_features, r))
        s = check_positive_float(scaling, "scaling")
        self._lora = _Lora(a_arr, b_arr, s)

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
        from ._peft import LoraWeights

        if not isinstance(weights, LoraWeights):
            raise TypeError(f"weights must be a qlora.LoraWeights, got {type(weights).__name__}")
        try:
            self.set_lora(weights.a, weights.b, scaling=weights.scaling)
        except ValueError as exc:
            raise ValueError(f"adapter for module {weights.name!r} does not fit this layer "
                             f"({self._w.out_features}x{self._w.in_features}): {exc}") from None

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
        lora = self._lora
        deq = self.dequantize_weight().astype(np.float64)
        deq += lora.scaling * (lora.b.astype(np.float64) @ lora.a.astype(np.float64))
        return deq.astype(np.float32)

    # ------------------------------------------------------------------ copy and pickle
    def __copy__(self) -> "QLoraLinear":
        # Every piece is immutable and replaced whole by setters, so sharing is independence.
        return type(self)._from_parts(self._w, self._lora, self._bias)

    def __deepcopy__(self, memo: dict) -> "QLoraLinear":
        def own(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else _frozen(np.array(a, copy=True))

        w = self._w
        parts = w._replace(codes=own(w.codes), scales=own(w.scales), qscales=own(w.qscales),
                           nested_scales=own(w.nested_scales), nested_map=own(w.nested_map))
        lora = self._lora._replace(a=own(self._lora.a), b=own(self._lora.b))
        return type(self)._from_parts(parts, lora, own(self._bias))

    def __getstate__(self) -> dict:
        w = self._w
        state = {
            "version": _PICKLE_VERSION,
            "out_features": w.out_features,
            "in_features": w.in_features,
            "group_size": w.group_size,
            "codes": np.asarray(w.codes),
            "scales": None if w.scales is None else np.asarray(w.scales),
            "qscales": None if w.qscales is None else np.asarray(w.qscales),
            "nested_scales": None if w.nested_scales is None else np.asarray(w.nested_scales),
            "nested_map": None if w.nested_map is None else np.asarray(w.nested_map),
            "nested_offset": float(w.nested_offset),
            "lora_a": self._lora.a,
            "lora_b": self._lora.b,
            "scaling": self._lora.scaling,
            "bias": self._bias,
        }
        return state

    def __setstate__(self, state: dict) -> None:
        version = state.get("version")
        if version != _PICKLE_VERSION:
            raise ValueError(
                f"cannot unpickle QLoraLinear: format version {version!r} is not supported "
                f"(this qlora reads version {_PICKLE_VERSION})"
            )

        def arr(key: str, dtype: np.dtype) -> np.ndarray | None:
            v = state[key]
            return None if v is None else _frozen(np.array(v, dtype=dtype, copy=True))

        parts = _Nf4Parts(
            int(state["out_features"]), int(state["in_features"]), int(state["group_size"]),
            arr("codes", _U8), arr("scales", _F32), arr("qscales", _U8),
            arr("nested_scales", _F32), arr("nested_map", _F32), float(state["nested_offset"]),
        )
        lora = _Lora(arr("lora_a", _F32), arr("lora_b", _F32), float(state["scaling"]))
        self._w = parts
        self._tensor = parts.tensor()
        self._lora = lora
        self._bias = arr("bias", _F32)

    def __reduce__(self):
        return (_unpickle, (self.__getstate__(),))


def _new_lora(rank: int, alpha: float, seed: int, out_features: int,
              in_features: int) -> _Lora:
    """PEFT's default LoRA init: ``A`` Kaiming-uniform from a PCG64 stream of ``seed``, ``B``
    zeros, ``scaling = alpha / rank``."""
    rng = np.random.Generator(np.random.PCG64(seed))
    bound = 1.0 / math.sqrt(in_features)
    a = rng.uniform(-bound, bound, size=(rank, in_features)).astype(np.float32)
    b = np.zeros((out_features, rank), dtype=np.float32)
    return _Lora(_frozen(a), _frozen(b), alpha / rank)


def _unpickle(state: dict) -> QLoraLinear:
    layer = object.__new__(QLoraLinear)
    layer.__setstate__(state)
    return layer
