"""Running a paper's reachable cells and reading the verdicts back from their records.

What is reachable (the paper's models and data, here or on the hub), the cells run through the
normal runner into a results folder, and the comparison of published and measured numbers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from slimbench.reproduce.claim_cards import Verdict, evaluate
from slimbench.reproduce.papers import (
    Paper,
    Tolerance,
    claim_cells,
    claim_suite,
    headline_cells,
    headline_suite,
    load_paper,
    method_label,
)
from slimbench.specs import CellSpec, TaskSpec
from slimbench.sweep.store import ResultStore
from slimbench.sweep.suite import Suite


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
            from slimbench.zoo.datasets.standard_corpora import SOURCES

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
    from slimbench.sweep.driver import run_cells

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
