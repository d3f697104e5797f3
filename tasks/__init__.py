"""Evaluation tasks: one file each, declaring a module-level ``TASK`` (named and versioned)."""

# One name per module: from a clone this folder is `slimbench.tasks` (mounted by slimbench's
# __init__). Imported under its bare folder name it would be a second copy of every module, which
# a patch or an isinstance check through the other name would miss.
if __name__ != "slimbench.tasks":
    raise ImportError(f"import slimbench.tasks (not {__name__!r}): the folder is SlimBench's built-in tasks")
