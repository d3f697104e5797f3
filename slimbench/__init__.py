"""SlimBench: a benchmark suite for LLM compression and acceleration.

The top level reads as the architecture. The public API that method and task authors import:
``config`` (typed frozen configs), ``errors``, ``registry``, ``specs`` (the cross-product's
typed specs), ``method``, ``task``, ``lm`` (the narrow model interface), ``modeling`` (walking
a model's weights), ``calibration`` and ``layerwise`` (the one calibration loop). Then one
subpackage per stage of the pipeline:

    zoo/        models, corpora and datasets; a model's shapes without its weights
    measure/    clocks and peak memory, the machine's limits, roofline, statistics
    engines/    execution engines beyond one eager PyTorch process
    sweep/      suite -> cells -> executors -> runner -> store (+ cell claims, status, artifact cache)
    report/     leaderboard, plots, HTML, compare
    reproduce/  paper reproductions and claim cards
    devtools/   the project's own tools: method contract, scaffold, verify, benches
    cli/        one module per command

The built-in methods and tasks are the subpackages ``slimbench.methods`` and
``slimbench.tasks``, and the suites ``slimbench.configs``. In the repository they live in the
top-level folders ``methods/``, ``tasks/`` and ``configs/`` (where a newcomer looks for them);
an installed distribution places them under ``slimbench/`` (setup.py maps the folders).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

__version__ = "0.2.0"

# Running from a clone (`python benchmark.py`, or an editable install): the three folders that
# sit beside this package are mounted as its subpackages, and nothing else is. One name per
# module: `methods/` is reachable only as `slimbench.methods` (its __init__ refuses the bare
# name), so a patch, a registry lookup or an isinstance check always meets the same module.
_HERE = Path(__file__).resolve().parent
_MOUNTED = ("methods", "tasks", "configs")


class _CloneFolders:
    """A meta-path finder for ``slimbench.<folder>`` when the folder lives in the clone's root."""

    @staticmethod
    def find_spec(fullname: str, path=None, target=None):
        parent, _, leaf = fullname.rpartition(".")
        if parent != __name__ or leaf not in _MOUNTED or (_HERE / leaf).is_dir():
            return None
        folder = _HERE.parent / leaf
        if not folder.is_dir():
            return None
        init = folder / "__init__.py"
        if init.is_file():
            return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(folder)])
        spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)  # data only (configs/)
        spec.submodule_search_locations = [str(folder)]
        return spec


if not any(isinstance(f, type) and f.__name__ == "_CloneFolders" for f in sys.meta_path):
    sys.meta_path.insert(0, _CloneFolders)
