"""Paper reproduction: a paper's headline table and its claim card, from one YAML file.

A paper file (``configs/papers/<key>.yaml``) has three top-level blocks:

- ``paper``: what the paper is (title, citation, links, where the numbers were taken from).
- ``headline``: the paper's headline table as an ordinary suite (``headline.suite``: the
  paper's models at pinned revisions, its data, protocol and settings) plus ``published``
  numbers, each matched to one cell, with a tolerance. Reaching it usually needs the hub or
  local copies of the paper's models and data sets; ``reproduce`` says exactly what is missing.
- ``claim``: the paper's qualitative claim restated as checks (slimbench.reproduce.claim_cards) on the
  embedded model: ``claim.suite`` is an ordinary suite, ``arms`` name its method configs,
  ``budgets`` scale calibration and evaluation (``small`` for the benchmark command set,
  ``paper`` for the paper's calibration size).

Both ``suite`` blocks are plain suites: ``suite_from_mapping`` validates them with the same
parsers as ``slimbench.sweep.suite.load_suite`` (tested to give the same cells), and their cells run
through the normal runner into a results folder (records, resumable). Verdicts are computed
from the stored records, so rerunning ``reproduce`` on a finished folder recomputes nothing.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from slimbench.config import Config, format_validation_error
from slimbench.errors import SuiteError
from slimbench.reproduce.claim_cards import Check
from slimbench.specs import CellSpec, MethodSpec, TaskSpec
from slimbench.sweep.suite import Suite, suite_from_mapping
from slimbench.sweep.yaml_limits import load_file

PAPERS_DIR = Path("configs") / "papers"
BUDGETS = ("small", "paper")


# -- the file format ----------------------------------------------------------------------
class PaperInfo(Config):
    key: str = Field(description="short name, the file's stem: `reproduce KEY`")
    title: str
    citation: str = Field(description="authors, venue, year")
    url: str
    code: str | None = Field(None, description="the authors' code")
    source: str = Field(description="where the published numbers in this file were taken from")


class Tolerance(Config):
    """A measured value passes if ``|measured - published| <= max(relative * published, absolute)``."""

    relative: float = Field(0.0, ge=0.0)
    absolute: float = Field(0.0, ge=0.0)

    def allows(self, measured: float, published: float) -> bool:
        return abs(measured - published) <= max(self.relative * abs(published), self.absolute)

    def text(self) -> str:
        parts = [f"±{self.relative * 100:g}%"] if self.relative else []
        parts += [f"±{self.absolute:g}"] if self.absolute else []
        return " or ".join(parts) or "exact"


class Published(Config):
    model: str = Field(description="a model name of headline.suite.models")
    method: Any = Field(description="matcher of one method config: a name, {name, params...}, or a list of steps")
    task: dict[str, Any] = Field({}, description="matcher of one task: {name?, params...}; empty if the suite has one")
    metric: str = "perplexity"
    value: float
    tolerance: Tolerance | None = None
    note: str = ""


class Headline(Config):
    description: str
    protocol: str
    deviations: list[str] = Field([], description="where SlimBench's run differs from the paper's code")
    suite: dict[str, Any]
    tolerance: Tolerance
    published: list[Published]


class Budget(Config):
    """Parameter values applied to every method step / task of the claim suite that has the field."""

    methods: dict[str, Any] = Field({}, description="method parameter -> value, e.g. calib_samples: 16")
    tasks: dict[str, Any] = Field({}, description="task parameter -> value, e.g. max_windows: 8")
    note: str = ""


class ClaimCard(Config):
    statement: str = Field(description="the claim in one sentence, as tested here")
    paper_claim: str = Field(description="what the paper claims, in its setting")
    caveats: list[str] = Field([], description="what differs from the paper's setting, and why")
    metric: str = "perplexity"
    reference: str = Field("fp", description="arm that increase measures are taken against")
    suite: dict[str, Any]
    budgets: dict[str, Budget]
    arms: dict[str, Any] = Field(description="arm name -> matcher of one method config of claim.suite")
    checks: list[Check]

    @model_validator(mode="after")
    def _consistent(self):
        missing = [b for b in BUDGETS if b not in self.budgets]
        if missing:
            raise ValueError(f"budgets must define {', '.join(BUDGETS)}; missing {missing}")
        used = {self.reference} | {a for c in self.checks for a in c.arms}
        unknown = sorted(used - set(self.arms))
        if unknown:
            raise ValueError(f"checks use arm(s) {unknown} not defined in arms ({sorted(self.arms)})")
        return self


class PaperFile(Config):
    paper: PaperInfo
    headline: Headline
    claim: ClaimCard


# -- loading ------------------------------------------------------------------------------
@dataclass
class Paper:
    path: Path
    spec: PaperFile

    @property
    def key(self) -> str:
        return self.spec.paper.key


def paper_dirs() -> list[Path]:
    """Where paper names are looked up: ./configs/papers, then the packaged suites' papers/."""
    from slimbench.sweep.suite import builtin_suites_dir

    builtin = builtin_suites_dir()
    packaged = builtin / "papers" if builtin else PAPERS_DIR
    return [d for d in dict.fromkeys((PAPERS_DIR, packaged)) if d.is_dir()]


def available_papers() -> list[str]:
    names: set[str] = set()
    for d in paper_dirs():
        names |= {p.stem for p in d.glob("*.yaml")}
    return sorted(names)


def find_paper(name: str) -> Path:
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        path = Path(name)
        if not path.exists():
            raise SuiteError(f"paper file not found: {path}", source=name)
        return path
    for d in paper_dirs():
        if (d / f"{name}.yaml").exists():
            return d / f"{name}.yaml"
    import difflib

    known = available_papers()
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise SuiteError(f"unknown paper {name!r}{hint} Known: {', '.join(known) or '(none)'}", source="reproduce")


def load_paper(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Paper:
    """Read and validate a paper file: its blocks, both suites, the budgets and every matcher.

    ``overrides`` are ``--set key=value`` assignments on the file's mapping (value parsed as
    YAML), e.g. ``headline.suite.models.0.revision=<commit>``, applied before validation.
    """
    from slimbench.sweep.suite import apply_override

    path = find_paper(name)
    raw = load_file(path)  # the suites' limits: size, encoding, depth, alias expansion
    for assignment in overrides:
        if not isinstance(raw, dict):
            break  # the validation below says what a paper file is
        apply_override(raw, assignment, str(path))
    try:
        spec = PaperFile(**(raw or {}))
    except ValidationError as err:
        raise SuiteError(format_validation_error(err), source=str(path)) from None
    except TypeError:
        raise SuiteError("a paper file is a mapping with keys paper, headline, claim", source=str(path)) from None
    if spec.paper.key != path.stem:
        raise SuiteError(f"paper.key {spec.paper.key!r} must equal the file name {path.stem!r}", source=str(path))
    paper = Paper(path, spec)
    headline_cells(paper, headline_suite(paper))  # every check happens here, before anything runs
    for budget in BUDGETS:
        suite = claim_suite(paper, budget)
        claim_cells(paper, suite)
    return paper


def with_hardware(raw: dict[str, Any], hardware: dict[str, Any] | None) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    if hardware:
        raw["hardware"] = {**(raw.get("hardware") or {}), **hardware}
    return raw


def headline_suite(paper: Paper, hardware: dict[str, Any] | None = None) -> Suite:
    source = f"{paper.path} (headline.suite)"
    return suite_from_mapping(with_hardware(paper.spec.headline.suite, hardware), source, f"{paper.key}-headline",
                              check_models=False)


def apply_budget(raw: dict[str, Any], budget: Budget) -> dict[str, Any]:
    """Set each budget parameter on every method step / task whose config has that field."""
    from slimbench.registry import METHODS, TASKS

    raw = copy.deepcopy(raw)

    def scaled(entry: Any, registry) -> Any:
        if isinstance(entry, list):
            return [scaled(e, registry) for e in entry]
        if isinstance(entry, dict) and "steps" in entry:
            return {**entry, "steps": scaled(entry["steps"], registry)}
        mapping = {"name": entry} if isinstance(entry, str) else dict(entry)
        if mapping.get("name") not in registry:
            return entry  # the suite parser reports the unknown name
        fields = registry.get(mapping["name"]).config.model_fields
        values = budget.methods if registry is METHODS else budget.tasks
        mapping.update({k: v for k, v in values.items() if k in fields})
        return mapping

    raw["methods"] = [scaled(e, METHODS) for e in raw.get("methods") or []]
    raw["tasks"] = [scaled(e, TASKS) for e in raw.get("tasks") or []]
    return raw


def claim_suite(paper: Paper, budget: str, hardware: dict[str, Any] | None = None) -> Suite:
    card = paper.spec.claim
    if budget not in card.budgets:
        raise SuiteError(f"unknown budget {budget!r}; this card has {', '.join(card.budgets)}", source=str(paper.path))
    raw = apply_budget(with_hardware(card.suite, hardware), card.budgets[budget])
    return suite_from_mapping(raw, f"{paper.path} (claim.suite, budget {budget})", f"{paper.key}-claim-{budget}",
                              check_models=False)


# -- matching published numbers and arms to cells ----------------------------------------
def _step_matches(matcher: Any, step) -> bool:
    if isinstance(matcher, str):
        return step.name == matcher
    if not isinstance(matcher, dict) or "name" not in matcher:
        return False
    params = {k: v for k, v in matcher.items() if k != "name"}
    return step.name == matcher["name"] and all(step.params.get(k, object()) == v for k, v in params.items())


def method_matches(matcher: Any, method: MethodSpec) -> bool:
    steps = matcher if isinstance(matcher, list) else [matcher]
    if len(steps) != len(method.steps):
        return False
    return all(_step_matches(m, s) for m, s in zip(steps, method.steps, strict=True))


def match_one(kind: str, matcher: Any, candidates: list, matches, label, source: str, field: str):
    found = [c for c in candidates if matches(matcher, c)]
    if len(found) != 1:
        shown = ", ".join(label(c) for c in candidates)
        what = "matches none" if not found else f"matches {len(found)} ({', '.join(label(c) for c in found)})"
        msg = f"{kind} {matcher!r} {what}; it must match exactly one of: {shown}"
        raise SuiteError(msg, source=source, field=field)
    return found[0]


def task_matches(matcher: dict[str, Any], task: TaskSpec) -> bool:
    params = {k: v for k, v in matcher.items() if k != "name"}
    if matcher.get("name", task.name) != task.name:
        return False
    return all(task.params.get(k, object()) == v for k, v in params.items())


def cell_for(suite: Suite, model: str | None, method: Any, task: dict[str, Any], source: str, field: str) -> CellSpec:
    models = suite.models if model is None else [m for m in suite.models if m.name == model]
    if len(models) != 1:
        names = ", ".join(m.name for m in suite.models)
        raise SuiteError(f"model {model!r} must match exactly one of: {names}", source=source, field=field)
    me = match_one("method", method, suite.methods, method_matches, lambda m: m.label(), source, field)
    ta = match_one("task", task, suite.tasks, task_matches, lambda t: f"{t.name}{t.params}", source, field)
    return CellSpec(model=models[0], method=me, task=ta, hardware=suite.hardware)


def headline_cells(paper: Paper, suite: Suite) -> list[CellSpec]:
    src = str(paper.path)
    return [
        cell_for(suite, p.model, p.method, p.task, src, f"headline.published[{i}]")
        for i, p in enumerate(paper.spec.headline.published)
    ]


def claim_cells(paper: Paper, suite: Suite) -> dict[str, CellSpec]:
    card, src = paper.spec.claim, str(paper.path)
    if len(suite.models) != 1 or len(suite.tasks) != 1:
        raise SuiteError("claim.suite must have exactly one model and one task", source=src, field="claim.suite")
    cells = {arm: cell_for(suite, None, m, {}, src, f"claim.arms.{arm}") for arm, m in card.arms.items()}
    unused = [m.label() for m in suite.methods if all(c.method != m for c in cells.values())]
    if unused:
        raise SuiteError(f"method configs no arm names (they would run for nothing): {unused}", source=src,
                         field="claim.suite.methods")
    return cells


def method_label(method: MethodSpec, matcher: Any) -> str:
    """The method's label, also showing the parameters the matcher names when they equal a default
    and the label does not already say them: a key setting is always in the label (``rtn(3-bit,
    per-channel)``, never ``...,bits=3``); another parameter at its default is added (``act_order=False``)."""
    matchers = matcher if isinstance(matcher, list) else [matcher]
    parts = []
    for step, m in zip(method.steps, matchers, strict=False):
        label = step.label()
        named = {k: v for k, v in (m.items() if isinstance(m, dict) else []) if k != "name"}
        keys = label_keys(step)
        shown = {k: v for k, v in named.items() if f"{k}=" not in label and k not in keys}
        if shown:
            extra = ", ".join(f"{k}={v}" for k, v in sorted(shown.items()))
            label = f"{label[:-1]}, {extra})" if label.endswith(")") else f"{label}({extra})"
        parts.append(label)
    return " + ".join(parts)


def label_keys(step) -> set[str]:
    """The parameters a step's label always shows (its method's key settings)."""
    from slimbench.registry import METHODS
    from slimbench.specs import KEY_PARAMS

    if step.name not in METHODS:
        return set()
    config = METHODS.get(step.name).config
    if hasattr(config, "label_keys"):
        full = {k: f.default for k, f in config.model_fields.items() if not f.is_required()} | dict(step.params)
        return set(config.label_keys(full))
    return set(getattr(config, "label_params", KEY_PARAMS))
