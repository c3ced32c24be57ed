"""Process-wide runtime settings of the C++ core: which instruction set runs the kernels and
how many threads the core's pool uses."""

from __future__ import annotations

import os
import re
import warnings

from . import _core, _precision
from ._validate import check_int

__all__ = ["active_isa", "available_isas", "get_num_threads", "kernel_info", "set_num_threads"]


def active_isa() -> str:
    """Name of the best instruction set the kernels may use, e.g. 'amx', 'avx512_bf16',
    'avx512', 'avx2', 'neon_dot', 'neon' or 'scalar'.

    Chosen once from the CPU's features; the environment variable ``QLORA_FORCE_ISA`` overrides
    (it caps the choice: kernels come from that instruction set or the ones below it).
    :func:`kernel_info` says which kernel serves each precision.

    Returns
    -------
    str

    Raises
    ------
    ValueError
        If ``QLORA_FORCE_ISA`` names an instruction set that is unknown or that this CPU lacks.
    """
    return _core.active_isa()


def available_isas() -> list[str]:
    """Instruction sets built into this package that this CPU can run, best first.

    Returns
    -------
    list of str
    """
    return list(_core.available_isas())


def kernel_info() -> dict:
    """What serves each precision on this CPU, as a plain dict (for logs and bug reports).

    Returns
    -------
    dict
        ``isa`` (the active instruction set), ``available_isas``, ``compiled_isas``,
        ``cpu_features`` (what was detected, AMX only when the OS granted it), ``precision``
        (the process default), ``num_threads``, and ``precisions``: for each of ``"fp32"``,
        ``"bf16"``, ``"int8"`` a list of batch regimes, each a dict with ``from_batch`` (the
        smallest batch chunk it serves; it serves up to the next regime's), ``kernel`` (e.g.
        ``"avx512_bf16.gemm_nf4_bf16"``), ``isa``, ``precision`` (what it computes) and
        ``fallback`` (True when the precision asked for is served by a more exact kernel).
        Batches run in chunks of at most 256 rows. For int8 the regimes assume a layer whose
        groups hold whole 32-column blocks; other layers run int8 requests in fp32.
    """
    info = dict(_core.kernel_info())
    info["precision"] = _precision.get_precision()
    info["num_threads"] = _core.get_num_threads()
    return info


def get_num_threads() -> int:
    """Threads the core uses per call (the calling thread included).

    Returns
    -------
    int
        ``QLORA_NUM_THREADS`` if set, else the CPUs this process may run on (its affinity
        mask), unless changed by :func:`set_num_threads`.
    """
    return _core.get_num_threads()


def set_num_threads(n: int) -> None:
    """Set the threads the core uses per call, ``n >= 1`` (process-wide).

    Parameters
    ----------
    n : int

    Raises
    ------
    TypeError
        If ``n`` is not an integer.
    ValueError
        If ``n < 1``.
    """
    _core.set_num_threads(check_int(n, "n", minimum=1, maximum=4096))


def _warn_on_ignored_env() -> None:
    # The core silently ignores a QLORA_NUM_THREADS it cannot use (thread_pool.cpp parses it
    # with strtol: optional blanks and sign, digits, nothing after; 1..4096); say so here.
    value = os.environ.get("QLORA_NUM_THREADS", "")
    if value and not (re.fullmatch(r"\s*[+-]?\d+", value) and 1 <= int(value) <= 4096):
        warnings.warn(
            f"QLORA_NUM_THREADS={value!r} is ignored: it must be an integer between 1 and "
            f"4096; using {_core.default_num_threads()} threads",
            RuntimeWarning,
            stacklevel=2,
        )


_warn_on_ignored_env()
# Choose the kernels now, so a bad QLORA_FORCE_ISA fails the import with its message rather
# than the first forward of a long-running server.
_core.active_isa()
