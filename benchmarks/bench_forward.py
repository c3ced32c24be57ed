#!/usr/bin/env python3
"""Side-by-side forward benchmark: the same code as ``qlora bench`` (python/qlora/cli/bench/).

    python benchmarks/bench_forward.py --quick
    python benchmarks/bench_forward.py --shape 4096x4096 --batch 1,32 --json out.json
"""

import sys

from qlora.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
