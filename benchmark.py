#!/usr/bin/env python
"""SlimBench from a clone: `python benchmark.py COMMAND ...` (same as the installed `slimbench`).

python benchmark.py run configs/quickstart.yaml            # run every cell (resumes)
python benchmark.py validate SUITE                         # check a suite, run nothing
python benchmark.py list methods|tasks|models|corpora      # what is registered
python benchmark.py report --results results               # leaderboard + Pareto plots
python benchmark.py --help                                 # every command
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from slimbench.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="benchmark.py"))
