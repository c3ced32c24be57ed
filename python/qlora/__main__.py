"""``python -m qlora``: the same as the ``qlora`` console script."""

from .cli import main

raise SystemExit(main())
