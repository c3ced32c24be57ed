"""Whole models: ``qlora.save_layers`` and ``qlora.load_layers`` (several QLoraLinear layers in
one safetensors file; the format itself is :mod:`qlora.formats.files`), and
``qlora.add_peft_adapter`` / ``qlora.remove_peft_adapter`` (one PEFT adapter as a named adapter
of every layer of such a dict)."""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from ._adapters import check_adapter_name
from ._layer import QLoraLinear, layer_from_state, layer_states
from ._state import Adapter, frozen
from ._validate import check_bool, check_path
from .formats import files as _files
from .formats.peft import load_peft_adapter

__all__ = ["add_peft_adapter", "load_layers", "remove_peft_adapter", "save_layers"]


def save_layers(path: "str | os.PathLike[str]", layers: Mapping[str, QLoraLinear]) -> None:
    """Save several layers to one safetensors file.

    The file is written to a temporary name in the same directory and renamed over ``path``,
    so an interrupted save never leaves a half-written file.

    Parameters
    ----------
    path : str or os.PathLike
    layers : mapping of str to QLoraLinear
        Non-empty; names are any non-empty strings (module paths such as
        ``"model.layers.0.mlp.up_proj"`` are typical).

    Raises
    ------
    TypeError
        If ``path`` is not a str or os.PathLike, or ``layers`` is not a mapping of
        QLoraLinear.
    ValueError
        If it is empty or a name is empty.
    OSError
        If the file cannot be written.

    Examples
    --------
    >>> qlora.save_layers("model.qlora.safetensors", {"up": up, "down": down})  # doctest: +SKIP
    """
    path = check_path(path, "path")
    _files.write_layers(path, layer_states(layers))


def load_layers(path: "str | os.PathLike[str]", *, mmap: bool = True) -> dict[str, QLoraLinear]:
    """Load every layer of a file written by :func:`save_layers` or ``qlora quantize``.

    Every count, size, dtype and shape is checked against the metadata and the file size
    before any data is touched; nothing is unpickled.

    Parameters
    ----------
    path : str or os.PathLike
    mmap : bool, default True
        Use the packed codes and scales straight from a read-only shared mapping of the file
        (no copy). The file must not be modified or truncated while the layers are alive.
        With ``False`` the file is read into memory once.

    Returns
    -------
    dict of str to QLoraLinear
        In the order the metadata lists them.

    Raises
    ------
    TypeError
        If ``path`` is not a str or os.PathLike, or ``mmap`` is not a bool.
    OSError
        If the file cannot be opened or read.
    ValueError
        If it is not a valid qlora safetensors file; the message names the file and the
        field (header length, a tensor's offsets or shape, a layer's group size, ...).
    """
    path, mmap = check_path(path, "path"), check_bool(mmap, "mmap")
    states = _files.read_layers(path, mmap=mmap)
    return {name: layer_from_state(state) for name, state in states.items()}


def add_peft_adapter(layers: Mapping[str, QLoraLinear], name: str,
                     folder: "str | os.PathLike[str]", *, replace: bool = False) -> dict[str, int]:
    """Load one PEFT LoRA adapter folder into a model's layers as the named adapter ``name``.

    All or nothing: the folder is read and checked as :func:`qlora.load_peft_adapter` checks
    it, every adapted module must be a layer of ``layers`` with matching shapes, and ``name``
    must be free on every layer (unless ``replace``), before any layer changes. Layers the
    adapter does not target get a rank-0 placeholder under ``name``, so a batch row naming it
    runs the base only there, as PEFT does for modules it does not adapt.

    Parameters
    ----------
    layers : mapping of str to QLoraLinear
        Typically the dict :func:`qlora.load_layers` returns, keyed by module path.
    name : str
        The adapter's name on every layer (non-empty, not ``"default"``).
    folder : str or os.PathLike
        A PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
    replace : bool, default False
        Replace an adapter already present under ``name`` (each layer keeps its slot).

    Returns
    -------
    dict of str to int
        The adapter's slot on each layer.

    Raises
    ------
    TypeError
        If ``layers`` is not a mapping of QLoraLinear, or ``name`` is not a str.
    ValueError
        If the folder is not a valid adapter (as :func:`qlora.load_peft_adapter`), modules of
        the adapter are missing from ``layers`` (all are listed), a shape does not fit its
        layer, or ``name`` is taken on a layer and ``replace`` is False.
    OSError
        If the folder cannot be read.
    """
    layer_states(layers)  # type and name checks only
    name = check_adapter_name(name)
    replace = check_bool(replace, "replace")
    weights = load_peft_adapter(folder)
    missing = sorted(set(weights) - set(layers))
    if missing:
        raise ValueError(f"{os.fspath(folder)}: the adapter targets modules that layers does "
                         f"not hold: {missing} (layers holds {sorted(layers)[:8]}"
                         f"{' ...' if len(layers) > 8 else ''})")
    plan = {}
    for module, layer in layers.items():
        if not replace and name in layer.adapters:
            raise ValueError(f"name: layers[{module!r}] already has an adapter {name!r}; pass "
                             "replace=True or remove it first (qlora.remove_peft_adapter)")
        lw = weights.get(module)
        if lw is None:
            empty = frozen(np.zeros((0, layer.in_features), np.float32))
            plan[module] = Adapter(empty, frozen(np.zeros((layer.out_features, 0), np.float32)),
                                   1.0)
            continue
        if lw.a.shape[1] != layer.in_features or lw.b.shape[0] != layer.out_features:
            raise ValueError(f"adapter for module {module!r} does not fit its layer "
                             f"({layer.out_features}x{layer.in_features}): lora_A "
                             f"{lw.a.shape}, lora_B {lw.b.shape}")
        plan[module] = Adapter(lw.a, lw.b, lw.scaling)  # read-only float32 arrays
    slots: dict[str, int] = {}
    try:
        for module, adapter in plan.items():
            slots[module] = layers[module]._put_adapter(name, adapter, replace)
    except BaseException:  # a concurrent add took the name: undo ours, then report
        for module in slots:
            if not replace:
                layers[module].remove_adapter(name)
        raise
    return slots


def remove_peft_adapter(layers: Mapping[str, QLoraLinear], name: str) -> list[str]:
    """Remove the named adapter from every layer of ``layers`` that holds it.

    Parameters
    ----------
    layers : mapping of str to QLoraLinear
    name : str

    Returns
    -------
    list of str
        The layers it was removed from.

    Raises
    ------
    TypeError
        If ``layers`` is not a mapping of QLoraLinear or ``name`` is not a str.
    KeyError
        If no layer holds an adapter ``name`` (nothing changes).
    """
    layer_states(layers)
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    holders = [module for module, layer in layers.items() if name in layer.adapters]
    if not holders:
        raise KeyError(f"name: no layer holds an adapter {name!r}")
    for module in holders:
        try:
            layers[module].remove_adapter(name)
        except KeyError:  # removed concurrently: the goal is reached
            pass
    return holders
