"""`lm-eval`: run lm-evaluation-harness tasks on the in-memory (compressed) model.

Optional extra: ``pip install -r requirements-extras.txt`` (lm-eval==0.4.13, tested). ``HarnessLM`` wraps
SlimBench's ``LanguageModel`` as an ``lm_eval.api.model.LM``: the harness' ``loglikelihood``,
``loglikelihood_rolling`` and ``generate_until`` requests go to the methods of the same names,
which follow the harness' HFLM semantics (see ``slimbench/lm.py``), so the harness scores
exactly the model SlimBench compressed, not a reloaded copy.

Task names are checked against the harness' task index when the config is validated: an
unknown name fails before any model is loaded, with the closest known names. Offline, the
harness' own tasks cannot download their data; point ``include_path`` at a folder of task
YAMLs that read local files (``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``).
Each harness metric becomes ``<task>/<metric>`` with its stderr in the spread; the harness'
version and each task's version are kept in the details.
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from typing import Any

from pydantic import Field, field_validator, model_validator

from slimbench.config import Config
from slimbench.task import Metric, Task, TaskResult


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise ValueError("the lm-eval task needs the optional extra: pip install -r requirements-extras.txt "
                         "(lm-eval==0.4.13)") from None
    return lm_eval


@lru_cache(maxsize=8)
def task_manager(include_path: str | None):
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


class LmEvalConfig(Config):
    tasks: list[str] = Field(..., min_length=1, description="lm-evaluation-harness task (or group) names")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples (null = the task's default)")
    limit: int | None = Field(None, ge=1, description="first N examples per task (null = all)")
    include_path: str | None = Field(None, description="folder of extra task YAMLs (e.g. reading local files)")
    batch_size: int = Field(16, ge=1, le=1024, description="requests per forward pass")
    bootstrap_iters: int = Field(1000, ge=0, description="the harness' bootstrap iterations for stderr")
    seed: int = Field(0, description="the harness' random, numpy and torch seeds")

    @field_validator("tasks")
    @classmethod
    def _no_duplicates(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate task names in {v}")
        return v

    @model_validator(mode="after")
    def _known_tasks(self):
        known = set(task_manager(self.include_path).all_tasks)
        for name in self.tasks:
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
                hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
                raise ValueError(f"unknown lm-evaluation-harness task {name!r}.{hint}")
        return self


def harness_lm_class():
    """``HarnessLM``, defined on first use so that importing this module never needs lm-eval."""
    require_lm_eval()
    from lm_eval.api.model import LM

    class HarnessLM(LM):
        def __init__(self, lm, batch_size: int = 16):
            super().__init__()
            self.lm = lm
            self.batch_size = batch_size

        @property
        def tokenizer_name(self) -> str:
            return getattr(self.lm.tokenizer, "name_or_path", self.lm.name).replace("/", "__")

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return self.lm.loglikelihood([r.args for r in requests], batch_size=self.batch_size)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            return self.lm.loglikelihood_rolling([r.args[0] for r in requests], batch_size=self.batch_size)

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out = []
            for r in requests:
                context, kwargs = r.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                out.append(self.lm.generate_until(context, until, int(kwargs.get("max_gen_toks", 256))))
            return out

    return HarnessLM


# Scores whose name says lower is better, where the harness states no direction.
LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "bpb", "loss", "nll", "ter")


def metrics_of(results: dict[str, Any]) -> dict[str, Metric]:
    """``<task>/<metric>`` from the harness' results, stderr into the spread.

    Only the harness' scores are metrics: they are keyed ``metric,filter``. Its bookkeeping
    (``sample_len``, the number of documents scored; ``alias``) has no filter and is not a
    score: it goes to the details (``bookkeeping``), never into a leaderboard as "higher is better".
    """
    out = {}
    for task, values in results["results"].items():
        better = results.get("higher_is_better", {}).get(task, {})
        for key, value in values.items():
            metric, comma, _filter = key.partition(",")
            if not comma or metric.endswith("_stderr") or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            stderr = values.get(f"{metric}_stderr,{_filter}")
            spread = {"stderr": float(stderr)} if isinstance(stderr, int | float) else None
            unit = "fraction" if metric.startswith(("acc", "exact_match", "f1", "mcc")) else "value"
            higher = better.get(metric)
            if not isinstance(higher, bool):
                higher = not any(word in metric for word in LOWER_IS_BETTER)
            out[f"{task}/{metric}"] = Metric(float(value), unit, higher, spread=spread)
    return out


def bookkeeping(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task, the harness' entries that are not scores (``sample_len``, ...)."""
    return {
        task: {k: v for k, v in values.items() if "," not in k and k != "alias"}
        for task, values in results["results"].items()
    }


def evaluate(lm, cfg: LmEvalConfig, ctx) -> TaskResult:
    lm_eval = require_lm_eval()
    from lm_eval import simple_evaluate

    results = simple_evaluate(
        model=harness_lm_class()(lm, cfg.batch_size),
        tasks=list(cfg.tasks),
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        task_manager=task_manager(cfg.include_path),
        bootstrap_iters=cfg.bootstrap_iters,
        log_samples=False,
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
    )
    return TaskResult(
        metrics=metrics_of(results),
        details={
            "lm_eval_version": getattr(lm_eval, "__version__", None),
            "task_versions": results.get("versions", {}),
            "n_shot": results.get("n-shot", {}),
            "n_samples": results.get("n-samples", {}),
            "bookkeeping": bookkeeping(results),
        },
    )


TASK = Task(
    name="lm-eval",
    version="1",
    description="any lm-evaluation-harness task on the in-memory compressed model (optional extra lm-eval)",
    config=LmEvalConfig,
    evaluate=evaluate,
)
