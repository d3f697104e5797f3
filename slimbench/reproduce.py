"""Paper reproduction: a paper's headline table and its claim card, from one YAML file.

A paper file (``configs/papers/<key>.yaml``) has three top-level blocks:

- ``paper``: what the paper is (title, citation, links, where the numbers were taken from).
- ``headline``: the paper's headline table as an ordinary suite (``headline.suite``: the
  paper's models at pinned revisions, its data, protocol and settings) plus ``published``
  numbers, each matched to one cell, with a tolerance. Reaching it usually needs the hub or
  local copies of the paper's models and data sets; ``reproduce`` says exactly what is missing.
- ``claim``: the paper's qualitative claim restated as checks (slimbench.claimcards) on the
  embedded model: ``claim.suite`` is an ordinary suite, ``arms`` name its method configs,
  ``budgets`` scale calibration and evaluation (``small`` for the benchmark command set,
  ``paper`` for the paper's calibration size).

Both ``suite`` blocks are plain suites: ``suite_from_mapping`` validates them with the same
parsers as ``slimbench.suite.load_suite`` (tested to give the same cells), and their cells run
through the normal runner into a results folder (records, resumable). Verdicts are computed
from the stored records, so rerunning ``reproduce`` on a finished folder recomputes nothing.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from slimbench.claimcards import Check, Verdict, evaluate
from slimbench.config import Config, format_validation_error
from slimbench.errors import SuiteError
from slimbench.specs import CellSpec, MethodSpec, TaskSpec
from slimbench.store import ResultStore, atomic_write_text
from slimbench.suite import Suite, suite_from_mapping

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
    from slimbench.suite import builtin_suites_dir

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


def load_paper(name: str) -> Paper:
    """Read and validate a paper file: its blocks, both suites, the budgets and every matcher."""
    path = find_paper(name)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SuiteError(f"malformed YAML: {err}", source=str(path)) from None
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


# -- what is reachable -----------------------------------------------------------------------
@dataclass(frozen=True)
class Missing:
    kind: Literal["model", "data"]
    what: str
    why: str
    fix: str

    def line(self) -> str:
        return f"{self.kind} {self.what}: {self.why}. {self.fix}"


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def model_missing(spec) -> Missing | None:
    """A hub model that cannot load here: not in the local cache while the hub is offline."""
    from slimbench.registry import MODELS

    if spec.name in MODELS:
        return None
    rev = spec.revision or "(unpinned)"
    if spec.name.startswith((".", "/", "~")):
        if (Path(spec.name).expanduser() / "config.json").exists():
            return None
        return Missing("model", spec.name, "no model folder with a config.json there", "Point the suite at a folder.")
    if not hub_offline():
        return None  # downloaded at load time
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        return isinstance(try_to_load_from_cache(spec.name, filename, revision=spec.revision), str)

    if cached("config.json") and any(cached(f) for f in WEIGHT_FILES):
        return None
    return Missing(
        "model",
        f"{spec.name} at revision {rev}",
        "not in the local Hugging Face cache, and the hub is offline (HF_HUB_OFFLINE=1)",
        f"Download it with `HF_HUB_OFFLINE=0` set (or `huggingface-cli download {spec.name} --revision {rev}` "
        "where the hub is reachable, then copy the cache folder).",
    )


def data_missing(corpus: str, split: str) -> Missing | None:
    """A corpus split that cannot be read here (no local copy, no pinned revision, or offline)."""
    from slimbench.registry import CORPORA

    try:
        CORPORA.get(corpus).documents(split)
        return None
    except Exception as err:  # any failure to read the data is what the user must fix
        hub = ""
        try:
            from slimbench.datasets.standard_corpora import SOURCES

            src = SOURCES.get(corpus, {}).get(split)
            if src is not None:
                hub = f" (hub data set {src.dataset}, {src.config}, split {src.split})"
        except ImportError:
            pass
        return Missing(
            "data",
            f"{corpus} split {split}{hub}",
            f"{type(err).__name__}: {err}",
            "Provide a local copy or a pinned hub commit (see docs/reproduction.md).",
        )


def requirements(suite: Suite) -> list[Missing]:
    """Everything the suite needs that this machine lacks: models, data sets, revisions."""
    out = [m for m in (model_missing(s) for s in suite.models) if m is not None]
    needed: list[tuple[str, str]] = []
    for t in suite.tasks:
        if "corpus" in t.params:
            needed.append((t.params["corpus"], t.params.get("split", "test")))
    for me in suite.methods:
        for step in me.steps:
            if "calib_corpus" in step.params:
                needed.append((step.params["calib_corpus"], "calibration"))
    for corpus, split in dict.fromkeys(needed):
        miss = data_missing(corpus, split)
        if miss is not None:
            out.append(miss)
    return out


# -- running and reading records -----------------------------------------------------------
def run_suite_cells(cells: list[CellSpec], store: ResultStore, source: str, *, progress: bool, isolate: bool):
    from slimbench.runner import run_cells

    unique = list({c.run_id: c for c in cells}.values())
    return run_cells(unique, store, suite_source=source, show_progress=progress, isolate=isolate)


def read_value(store: ResultStore, cell: CellSpec, metric: str) -> tuple[float | None, str]:
    """(value, "") from the cell's ok record, or (None, why there is none)."""
    path = store.ok_path(cell.run_id)
    if path.exists():
        rec = json.loads(path.read_text())
        m = rec.get("metrics", {}).get(metric)
        if m is None:
            return None, f"record {cell.run_id} has no metric {metric!r}"
        return float(m["value"]), ""
    failed = sorted(store.runs.glob(f"{cell.run_id}.failed.*.json"))
    if failed:
        err = json.loads(failed[-1].read_text()).get("error") or {}
        return None, f"failed ({err.get('stage', '?')}): {err.get('type', '')}: {err.get('message', '')}"[:300]
    return None, "not run"


@dataclass
class HeadlineRow:
    model: str
    method: str
    task: str
    metric: str
    published: float
    tolerance: Tolerance
    measured: float | None
    status: str  # pass | FAIL | not run | failed ...
    run_id: str

    def to_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in ("model", "method", "task", "metric", "published", "measured",
                                                  "status", "run_id")}, "tolerance": self.tolerance.text()}


@dataclass
class ArmResult:
    arm: str
    method: str
    value: float | None
    note: str
    run_id: str


@dataclass
class Reproduction:
    paper: Paper
    budget: str
    headline_missing: list[Missing]
    headline_ran: bool
    headline_rows: list[HeadlineRow]
    claim_model: str
    claim_task: str
    arms: list[ArmResult]
    verdict: Verdict
    notes: list[str] = field(default_factory=list)

    @property
    def headline_ok(self) -> bool:
        return all(r.status != "FAIL" for r in self.headline_rows)

    def exit_code(self) -> int:
        return 0 if self.verdict.verdict != "fails" and self.headline_ok else 1

    def to_dict(self) -> dict[str, Any]:
        info = self.paper.spec.paper
        return {
            "paper": info.to_dict(),
            "file": str(self.paper.path),
            "budget": self.budget,
            "headline": {
                "missing": [m.line() for m in self.headline_missing],
                "ran": self.headline_ran,
                "rows": [r.to_dict() for r in self.headline_rows],
            },
            "claim": {
                "statement": self.paper.spec.claim.statement,
                "model": self.claim_model,
                "task": self.claim_task,
                "arms": [a.__dict__ for a in self.arms],
                **self.verdict.to_dict(),
            },
            "notes": self.notes,
        }


def headline_rows(paper: Paper, suite: Suite, store: ResultStore) -> list[HeadlineRow]:
    rows = []
    head = paper.spec.headline
    for pub, cell in zip(head.published, headline_cells(paper, suite), strict=True):
        tol = pub.tolerance or head.tolerance
        value, why = read_value(store, cell, pub.metric)
        status = ("pass" if tol.allows(value, pub.value) else "FAIL") if value is not None else why
        rows.append(
            HeadlineRow(pub.model, method_label(cell.method, pub.method), cell.task.label() + _task_params(cell.task),
                        pub.metric, pub.value, tol, value, status, cell.run_id)
        )
    return rows


def _task_params(task: TaskSpec) -> str:
    keys = ("corpus", "split", "seqlen")
    shown = ", ".join(f"{k}={task.params[k]}" for k in keys if k in task.params)
    return f" ({shown})" if shown else ""


def reproduce(
    name: str,
    *,
    budget: str = "small",
    results: str | Path = "results",
    hardware: dict[str, Any] | None = None,
    dry_run: bool = False,
    progress: bool = True,
    isolate: bool = False,
    log=print,
) -> Reproduction:
    """Run what is reachable of one paper and compute its verdicts from the stored records."""
    paper = load_paper(name)
    store = ResultStore(results)
    head = headline_suite(paper, hardware)
    missing = requirements(head)
    notes: list[str] = []
    ran = False
    if missing:
        notes.append("the paper's headline is not reachable here; the claim card runs on the embedded model instead")
    elif budget != "paper":
        notes.append("the headline runs only with --budget paper (the published numbers need the paper's protocol)")
    elif not dry_run:
        log(f"{paper.key}: running the headline ({len(head.cells())} cells)")
        run_suite_cells(headline_cells(paper, head), store, f"{paper.path}#headline", progress=progress,
                        isolate=isolate)
        ran = True
    rows = headline_rows(paper, head, store)

    suite = claim_suite(paper, budget, hardware)
    cells = claim_cells(paper, suite)
    claim_missing = requirements(suite)
    if claim_missing:
        notes += [f"claim card cannot run: {m.line()}" for m in claim_missing]
    elif not dry_run:
        n = len({c.run_id for c in cells.values()})
        log(f"{paper.key}: running the claim card, budget {budget} ({n} cells)")
        run_suite_cells(list(cells.values()), store, f"{paper.path}#claim.{budget}", progress=progress,
                        isolate=isolate)
    card = paper.spec.claim
    arms, values = [], {}
    for arm, cell in cells.items():
        value, why = read_value(store, cell, card.metric)
        values[arm] = value
        arms.append(ArmResult(arm, method_label(cell.method, card.arms[arm]), value, why, cell.run_id))
    verdict = evaluate(card.checks, values, card.reference)
    first = next(iter(cells.values()))
    return Reproduction(paper, budget, missing, ran, rows, first.model.name,
                        first.task.label() + _task_params(first.task), arms, verdict, notes)


# -- rendering ----------------------------------------------------------------------------
def md(text: Any) -> str:
    """A value made safe for a Markdown table cell (and for HTML rendering of it)."""
    s = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return s.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def plain(text: Any) -> str:
    """A value for the terminal: one line, nothing escaped."""
    return str(text).replace("\r", " ").replace("\n", " ")


def method_label(method: MethodSpec, matcher: Any) -> str:
    """The method's label, also showing the parameters the matcher names when they equal a default
    (a 4-bit RTN row says bits=4)."""
    matchers = matcher if isinstance(matcher, list) else [matcher]
    parts = []
    for step, m in zip(method.steps, matchers, strict=False):
        label = step.label()
        named = {k: v for k, v in (m.items() if isinstance(m, dict) else []) if k != "name"}
        shown = {k: v for k, v in named.items() if f"{k}=" not in label}
        if shown:
            extra = ",".join(f"{k}={v}" for k, v in sorted(shown.items()))
            label = f"{label[:-1]},{extra})" if label.endswith(")") else f"{label}({extra})"
        parts.append(label)
    return " + ".join(parts)


def fmt(v: float | None) -> str:
    if v is None:
        return "–"
    if abs(v) < 1000:
        return f"{v:.4g}"
    return f"{v:,.0f}" if abs(v) < 1e7 else f"{v:.3g}"


def render(rep: Reproduction, markdown: bool = True) -> str:
    """The reproduction as Markdown (escaped, for files) or as plain text for the terminal."""
    esc = md if markdown else plain
    info, card, head = rep.paper.spec.paper, rep.paper.spec.claim, rep.paper.spec.headline
    out = [f"## {esc(info.title)}", "", f"{esc(info.citation)}. {esc(info.url)}", ""]
    out += [f"### Headline: {esc(head.description)}", "", f"Protocol: {esc(head.protocol)}", ""]
    if rep.headline_missing:
        out += ["Not reachable here (what is missing):", ""]
        out += [f"- {esc(m.line())}" for m in rep.headline_missing] + [""]
    if head.deviations:
        out += ["Differences from the paper's code:", ""] + [f"- {esc(d)}" for d in head.deviations] + [""]
    out += ["| model | method | task | published | measured | tolerance | result |", "|---|---|---|---|---|---|---|"]
    for r in rep.headline_rows:
        out.append(f"| {esc(r.model)} | {esc(r.method)} | {esc(r.task)} | {fmt(r.published)} | {fmt(r.measured)} | "
                   f"{esc(r.tolerance.text())} | {esc(r.status)} |")
    verdict = rep.verdict.verdict.upper()
    out += ["", f"### Claim card ({esc(rep.claim_model)}, budget {esc(rep.budget)}): **{verdict}**", ""]
    out += [f"Claim tested: {esc(card.statement)}", "", f"The paper: {esc(card.paper_claim)}", ""]
    out += [f"Task: {esc(rep.claim_task)}; metric: {esc(card.metric)}.", ""]
    out += ["| arm | method | " + esc(card.metric) + " | run id / note |", "|---|---|---|---|"]
    for a in rep.arms:
        out.append(f"| {esc(a.arm)} | {esc(a.method)} | {fmt(a.value)} | {esc(a.note or a.run_id)} |")
    out += ["", "| role | check | measured | bound | result |", "|---|---|---|---|---|"]
    for c in rep.verdict.checks:
        res = {True: "pass", False: "FAIL", None: "n/a"}[c.passed]
        measured = fmt(c.value) if c.value is not None else esc(c.note)
        out.append(f"| {c.check.role} | {esc(c.check.text)} | {measured} | {esc(c.check.bound_text())} | {res} |")
    if card.caveats:
        out += ["", "Caveats:", ""] + [f"- {esc(c)}" for c in card.caveats]
    if rep.notes:
        out += ["", "Notes:", ""] + [f"- {esc(n)}" for n in rep.notes]
    return "\n".join(out) + "\n"


def summary_table(reps: list[Reproduction]) -> str:
    out = ["| paper | claim tested on the embedded model | budget | verdict | headline |", "|---|---|---|---|---|"]
    for r in reps:
        if r.headline_missing:
            head = f"not reachable ({len(r.headline_missing)} missing)"
        else:
            done = [x for x in r.headline_rows if x.measured is not None]
            head = f"{sum(x.status == 'pass' for x in done)}/{len(r.headline_rows)} within tolerance"
        out.append(f"| {md(r.paper.key)} | {md(r.paper.spec.claim.statement)} | {md(r.budget)} | "
                   f"**{r.verdict.verdict}** | {md(head)} |")
    return "\n".join(out) + "\n"


def write_outputs(rep: Reproduction, results: str | Path) -> Path:
    """``RESULTS/reproduce/<key>-<budget>.md`` and ``.json``; returns the Markdown path."""
    folder = Path(results) / "reproduce"
    stem = f"{rep.paper.key}-{rep.budget}"
    atomic_write_text(folder / f"{stem}.json", json.dumps(rep.to_dict(), indent=1, sort_keys=True, default=str))
    path = folder / f"{stem}.md"
    atomic_write_text(path, render(rep))
    return path
