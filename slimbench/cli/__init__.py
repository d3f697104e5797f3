"""SlimBench: benchmark LLM compression and acceleration methods on equal terms.

    slimbench run configs/quickstart.yaml            # run every cell (resumes); `run quickstart` works too
    slimbench run SUITE --set tasks.0.max_windows=8  # override a suite field
    slimbench run SUITE --workers 2                  # 2 worker processes (--executor ray: Ray tasks)
    slimbench status RESULTS --suite SUITE           # done / running / failed / pending, ETA
    slimbench validate SUITE                         # check a suite, run nothing
    slimbench list methods|tasks|models|corpora      # what is registered
    slimbench report --results results --html        # leaderboard, plots, HTML page
    slimbench compare RESULTS_A RESULTS_B            # two result sets, like with like
    slimbench verify RESULTS --rerun 2               # check a results folder, re-run 2 sampled cells
    slimbench new method NAME --family F             # a documented method template
    slimbench check-method NAME                      # the contract every method passes

For developers: each subcommand lives in its own module of this package, which defines
``register(subparsers)``: it adds its parser and sets ``fn`` to the function that runs it
(taking the parsed arguments, returning the exit status). The CLI only parses, validates and
delegates; the work happens in the core modules.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import sys

from slimbench.zoo.hub import offline_defaults


def command_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def parser(prog: str = "slimbench") -> argparse.ArgumentParser:
    # The user-facing half of the docstring, with the name the user typed.
    usage = __doc__.split("For developers:")[0].replace("    slimbench ", f"    {prog} ")
    p = argparse.ArgumentParser(prog=prog, description=usage, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in command_modules():
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return p


# What each dependency SlimBench imports is installed as (import name -> pip name); requirements.txt pins them.
DEPENDENCIES = {
    "torch": "torch", "transformers": "transformers", "accelerate": "accelerate", "gguf": "gguf",
    "safetensors": "safetensors", "datasets": "datasets", "evaluate": "evaluate", "pandas": "pandas",
    "matplotlib": "matplotlib", "pydantic": "pydantic", "yaml": "PyYAML", "tqdm": "tqdm", "psutil": "psutil",
    "numpy": "numpy", "tokenizers": "tokenizers", "huggingface_hub": "huggingface_hub",
}


def missing_dependency(err: ModuleNotFoundError) -> str | None:
    """One line saying what to install, if ``err`` is a missing dependency of SlimBench itself."""
    top = (err.name or "").split(".")[0]
    if top not in DEPENDENCIES:
        return None
    return (f"SlimBench needs the Python package {DEPENDENCIES[top]!r}, which is not installed in this environment "
            f"({sys.executable}): install SlimBench's requirements with `pip install -r requirements.txt` "
            f"(or `pip install .`) from a clone, or this one alone with `pip install {DEPENDENCIES[top]}`")


def main(argv: list[str] | None = None, prog: str = "slimbench") -> int:
    try:
        return _main(argv, prog)
    except ModuleNotFoundError as err:  # a dependency missing: one line, not a traceback
        line = missing_dependency(err)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None, prog: str) -> int:
    from slimbench.errors import SuiteError

    offline_defaults()
    try:
        args = parser(prog).parse_args(argv)
        try:
            return args.fn(args)
        finally:
            report_plugin_problems()
    except SuiteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: records are written atomically, so nothing half-done stays
        print("\ninterrupted: finished cells are kept; the same command resumes from them", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` or a pager that quit: not an error of ours
        # Python would report the pipe again while flushing stdout at exit; point it at nowhere
        with contextlib.suppress(OSError, ValueError):  # ValueError: a stdout without a file descriptor
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a command ended by SIGPIPE


def report_plugin_problems() -> None:
    """A broken plugin is skipped, not fatal: say so once, after the command's own output."""
    from slimbench.registry import plugin_problems

    for problem in plugin_problems():
        print(f"warning: {problem}", file=sys.stderr)
