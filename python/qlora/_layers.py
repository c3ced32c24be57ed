"""``qlora.save_layers`` and ``qlora.load_layers``: several QLoraLinear layers in one
safetensors file (the format itself is :mod:`qlora.formats.files`)."""

from __future__ import annotations

import os
from typing import Mapping

from ._layer import QLoraLinear, layer_from_state, layer_states
from ._validate import check_bool, check_path
from .formats import files as _files

__all__ = ["load_layers", "save_layers"]


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
