"""`make bench` / `.venv/bin/python bench/run.py [--quick]`: the muster-edge benchmark (see bench/main.py).

Run as a script, Python puts bench/ on the import path instead of the repository root that `bench.*` and
`tests.*` live under; this file only swaps the two and hands over to bench/main.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def entry() -> int:
    here = ROOT / "bench"
    sys.path[:] = [str(ROOT)] + [p for p in sys.path if p and Path(p).resolve() not in (here, ROOT)]
    from bench.main import main

    return main()


if __name__ == "__main__":
    sys.exit(entry())
