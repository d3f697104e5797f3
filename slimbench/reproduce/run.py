"""Running a paper's reachable cells and reading the verdicts back from their records.

What is reachable (the paper's models and data, here or on the hub), the cells run through the
normal runner into a results folder, and the comparison of published and measured numbers.
"""

from __future__ import annotations

import json
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
from slimbench.zoo.hub import endpoint, hub_offline


# -- what is reachable -----------------------------------------------------------------------
@dataclass(frozen=True)
class Missing:
    kind: Literal["model", "data", "hub"]
    what: str
    why: str
    fix: str

    def line(self) -> str:
        return f"{self.kind} {self.what}: {self.why}." + (f" {self.fix}" if self.fix else "")


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


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
    """A corpus split that cannot be read here (no local copy, not in the cache while offline)."""
    from slimbench.registry import CORPORA

    try:
        CORPORA.get(corpus).documents(split)
        return None
    except Exception as err:  # any failure to read the data is what the user must fix
        hub, fix = "", "Provide a local copy or a pinned hub commit (see docs/reproduction.md)."
        from slimbench.zoo.datasets import standard_corpora as sc

        src = sc.SOURCES.get(corpus, {}).get(split)
        if src is not None:
            rev = sc.revision(corpus)
            hub = (f" (hub data set {src.dataset}, {src.config or src.data_files}, split {src.split}"
                   + (f", at {rev})" if rev else ")"))
            fix = (f"Set HF_HUB_OFFLINE=0 to download it, or put a local copy at $SLIMBENCH_DATA/{corpus}/"
                   f"{split}(.jsonl|.json|.parquet|.txt|.raw); $SLIMBENCH_REVISION_{corpus.upper()} pins another "
                   "hub commit (see docs/reproduction.md).")
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return Missing("data", f"{corpus} split {split}{hub}", why, fix)


def requirements(suite: Suite) -> list[Missing]:
    """Everything the suite needs that this machine lacks: models, data sets, revisions."""
    from slimbench.reproduce.online import data_needed

    out = [m for m in (model_missing(s) for s in suite.models) if m is not None]
    for corpus, split in data_needed(suite):
        miss = data_missing(corpus, split)
        if miss is not None:
            out.append(miss)
    return out


def hub_missing(suite: Suite) -> list[Missing]:
    """What a dry run with the hub on finds missing: local models checked here, hub models and
    data asked of the hub; nothing is downloaded."""
    from slimbench.reproduce import online

    local = [m for m in (model_missing(s) for s in suite.models) if m is not None]
    return local + [Missing("hub", endpoint(), p, "") for p in online.check(suite)]


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
    status: str  # pass | FAIL | missing: not run | missing: failed (stage): ...
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
    headline_expected: bool = False  # --budget paper with everything reachable: every row should be measured

    @property
    def headline_missing_rows(self) -> list[HeadlineRow]:
        return [r for r in self.headline_rows if r.measured is None]

    @property
    def headline_ok(self) -> bool:
        """No published number missed: none outside its tolerance and, where the headline was to
        run, none left unmeasured (a failed or unfinished cell)."""
        if any(r.status == "FAIL" for r in self.headline_rows):
            return False
        return not (self.headline_expected and self.headline_missing_rows)

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
                "measured": sum(r.measured is not None for r in self.headline_rows),
                "within_tolerance": sum(r.status == "pass" for r in self.headline_rows),
                "unmeasured": [r.to_dict() for r in self.headline_missing_rows],
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
        status = ("pass" if tol.allows(value, pub.value) else "FAIL") if value is not None else f"missing: {why}"
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
    overrides: list[str] = (),
    dry_run: bool = False,
    progress: bool = True,
    isolate: bool = False,
    log=print,
) -> Reproduction:
    """Run what is reachable of one paper and compute its verdicts from the stored records.

    Offline, the headline runs if its models and data are in the local caches, else the report
    says what is missing. Online with ``budget="paper"``, everything the headline needs is
    fetched first (``slimbench.reproduce.online``): a failure there raises ``HubUnavailable``
    before any record is written.
    """
    from slimbench.reproduce import online

    paper = load_paper(name, overrides)
    store = ResultStore(results)
    head = headline_suite(paper, hardware)
    notes: list[str] = []
    ran = False
    if budget != "paper":
        # Online, checking would download the data for nothing: the headline does not run.
        missing = requirements(head) if hub_offline() else []
        notes.append("the headline runs only with --budget paper (the published numbers need the paper's protocol)")
    elif hub_offline():
        missing = requirements(head)
    elif dry_run:
        missing = hub_missing(head)
    else:
        online.prefetch(head, log)  # raises before anything is written
        missing = []
    if missing:
        notes.append("the paper's headline is not reachable here; the claim card runs on the embedded model instead")
    elif budget == "paper" and not dry_run:
        log(f"{paper.key}: running the headline ({len(head.cells())} cells)")
        run_suite_cells(headline_cells(paper, head), store, f"{paper.path}#headline", progress=progress,
                        isolate=isolate)
        ran = True
    rows = headline_rows(paper, head, store)

    suite = claim_suite(paper, budget, hardware)
    cells = claim_cells(paper, suite)
    claim_missing = hub_missing(suite) if dry_run and not hub_offline() else requirements(suite)
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
    expected = budget == "paper" and not missing
    return Reproduction(paper, budget, missing, ran, rows, first.model.name,
                        first.task.label() + _task_params(first.task), arms, verdict, notes, expected)
