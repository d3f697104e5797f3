"""SlimBench core: registry, typed specs, runner, measurement, results store and reports.

The built-in methods and tasks are the subpackages ``slimbench.methods`` and
``slimbench.tasks``. In the repository they live in the top-level folders ``methods/`` and
``tasks/`` (where a newcomer looks for them); an installed distribution places them under
``slimbench/`` (setup.py maps the folders), so no generic top-level name such as ``methods``
lands in site-packages.
"""

from pathlib import Path

__version__ = "0.2.0"

# Running from a clone (`python benchmark.py`, or an editable install): let the subpackage
# lookup also search the repository root, so `slimbench.methods` finds `<repo>/methods/`.
# Python resolves a subpackage through its parent's __path__, the same mechanism
# pkgutil.extend_path uses; an installed copy has the folders inside and skips this.
_REPO = Path(__file__).resolve().parent.parent
if not (Path(__file__).resolve().parent / "methods").is_dir() and (_REPO / "methods" / "__init__.py").is_file():
    __path__.append(str(_REPO))
