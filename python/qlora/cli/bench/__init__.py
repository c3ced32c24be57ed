"""``qlora bench``, split by job: :mod:`.run` (the command: arguments, the run over shapes and
batches, the calling-overhead figures), :mod:`.timing` (the harness), :mod:`.methods` (qlora
and its peers on the same inputs), :mod:`.machine` (cache, memory, CPU and thread-pool probes)
and :mod:`.report` (the figures, their tables and JSON)."""

from .run import register, run

__all__ = ["register", "run"]
