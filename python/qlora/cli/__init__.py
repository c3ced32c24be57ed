"""The ``qlora`` command line (the console script ``qlora = "qlora.cli:main"``).

:mod:`.main` assembles the subcommands, one module each (:mod:`.demo`, :mod:`.bench`,
:mod:`.quantize`, :mod:`.inspect`); :mod:`.common` holds what several of them share.
"""

from .main import main

__all__ = ["main"]
