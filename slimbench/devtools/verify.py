"""Checking a results folder someone sends in (``benchmark.py verify RESULTS [--rerun K]``).

Reads ``RESULTS/runs/*.json`` as data and nothing else: files are parsed as strict JSON (no
``NaN``), never unpickled, and nothing in the folder is imported or executed. A re-run builds
each sampled cell from its record's spec and runs it with this installation's registered
methods, tasks and models; cells whose model is a local path (someone else's disk, or a
folder shipped inside the results) or needs ``trust_remote_code`` are not re-run.

What is checked:

- every record: strict JSON, a known ``schema``, the fields and types of a record, a file name
  that matches its run id and status, a run id that is the hash of its own spec (so the spec
  was not edited after the run), finite metrics with units, a complete environment, and
  method/task versions (compared with this installation: a warning when they differ);
- every record against itself: each metric that can be recomputed from the record's own
  per-example data or samples (perplexity from the per-window NLL, accuracy from per-example
  scores, latency percentiles from the inter-token samples; slimbench.report.consistency) must
  equal it, example counts must match, a metric's stated interval must hold its value, and the
  protocol fields must fit the task version (the protocol named in the version, the regime of the
  parameters, ``noisy`` with its reasons, ``timing_protocol`` with its minimums: those of this
  installation's task when the versions are equal);
- across records: no cell with two ok records (duplicates), none whose records disagree
  (contradictions);
- ``--rerun K``: K ok cells sampled with a seed, run here, and compared metric by metric:
  quality metrics and the method report's sizes must agree within ``rtol`` (they are
  deterministic); machine-dependent measurements (latency, throughput, memory) are compared
  only when the CPU is the same, within ``timing_rtol``.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMAS = (1,)
ENVIRONMENT_KEYS = ("python", "torch", "transformers", "platform", "cpu", "cpu_count", "torch_threads", "git")
# Units of measurements that depend on the machine and its load.
MACHINE_UNITS = frozenset({"s", "ms", "us", "tokens/s", "GB/s", "MiB", "MB", "GiB"})
REPORT_SIZES = ("parameters", "stored_bytes", "memory_bytes", "effective_bits", "sparsity")
FIELDS: dict[str, type | tuple[type, ...]] = {
    "schema": int,
    "run_id": str,
    "status": str,
    "model": dict,
    "method": dict,
    "task": dict,
    "hardware": dict,
    "environment": dict,
    "metrics": dict,
    "started_at": str,
    "finished_at": str,
}


@dataclass
class Finding:
    level: str  # "error" or "warning"
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.where}: {self.message}"


@dataclass
class Verification:
    root: Path
    findings: list[Finding] = field(default_factory=list)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # file name -> record
    reruns: list[dict[str, Any]] = field(default_factory=list)

    def error(self, where: str, message: str) -> None:
        self.findings.append(Finding("error", where, message))

    def warn(self, where: str, message: str) -> None:
        self.findings.append(Finding("warning", where, message))

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def disagreements(self) -> list[dict[str, Any]]:
        return [r for r in self.reruns if r["status"] == "disagree"]


# -- reading -------------------------------------------------------------------------------------
def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def read_record(path: Path) -> Any:
    """The parsed file; strict JSON (``NaN``/``Infinity`` rejected). Raises ValueError."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"unreadable: {err}") from None
    try:
        return json.loads(text, parse_constant=_no_constants)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON (truncated or corrupted?): {err}") from None


def record_files(runs: Path) -> tuple[list[Path], list[Path]]:
    """(record files, other files) in the runs folder; temporary files of a writer are skipped."""
    records, others = [], []
    for p in sorted(runs.iterdir()):
        if p.name.startswith("."):
            continue
        (records if p.is_file() and p.suffix == ".json" else others).append(p)
    return records, others


# -- one record ----------------------------------------------------------------------------------
def cell_of(rec: dict[str, Any]):
    """The CellSpec a record describes (as written, not re-filled from this installation)."""
    from slimbench.specs import CellSpec, HardwareSpec

    model = {k: v for k, v in rec["model"].items() if k in ("name", "revision", "trust_remote_code")}
    method = {"steps": rec["method"].get("steps")}
    # model_construct: a record from a CUDA machine must not fail because this one has none.
    hardware = HardwareSpec.model_construct(**rec["hardware"])
    cell = CellSpec.model_validate({"model": model, "method": method, "task": rec["task"], "hardware": hardware})
    return cell


def check_record(v: Verification, path: Path, rec: Any) -> None:
    where = path.name
    if not isinstance(rec, dict):
        v.error(where, f"a JSON {type(rec).__name__}, not a record")
        return
    bad = [k for k, t in FIELDS.items() if not isinstance(rec.get(k), t) or isinstance(rec.get(k), bool)]
    if bad:
        v.error(where, f"not a SlimBench record: missing or mistyped {', '.join(bad)}")
        return
    if rec["schema"] not in SCHEMAS:
        v.error(where, f"schema {rec['schema']} is not one this version reads ({', '.join(map(str, SCHEMAS))})")
        return
    if rec["status"] not in ("ok", "failed"):
        v.error(where, f"status {rec['status']!r} is neither 'ok' nor 'failed'")
        return
    expected = f"{rec['run_id']}.json" if rec["status"] == "ok" else f"{rec['run_id']}.failed."
    if not (path.name == expected or (rec["status"] == "failed" and path.name.startswith(expected))):
        v.error(where, f"file name does not match run id {rec['run_id']} and status {rec['status']}")
    try:
        cell = cell_of(rec)
    except Exception as exc:
        v.error(where, f"its spec does not parse: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        return
    if cell.run_id != rec["run_id"]:
        v.error(where, f"run id {rec['run_id']} is not the hash of its spec ({cell.run_id}): the spec was edited")
    check_metrics(v, where, rec)
    if rec["status"] == "ok":
        check_self_consistency(v, where, rec)
        check_protocol(v, where, rec)
    check_environment(v, where, rec)
    check_versions(v, where, rec)
    v.records[path.name] = rec


def check_metrics(v: Verification, where: str, rec: dict[str, Any]) -> None:
    if rec["status"] == "failed":
        if not isinstance(rec.get("error"), dict) or not rec["error"].get("message"):
            v.error(where, "a failed record without an error message")
        return
    if not rec["metrics"]:
        v.error(where, "an ok record with no metrics")
    if not isinstance(rec.get("method_report"), dict):
        v.error(where, "an ok record without a method_report")
    for name, m in rec["metrics"].items():
        value = m.get("value") if isinstance(m, dict) else None
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            v.error(where, f"metric {name}: value {value!r} is not a finite number")
        elif not isinstance(m.get("unit"), str):
            v.error(where, f"metric {name}: no unit")


def check_self_consistency(v: Verification, where: str, rec: dict[str, Any]) -> None:
    """Metrics against the record's own per-example data and samples; stated intervals against values."""
    from slimbench.report.consistency import counts, mismatches

    for name, why in mismatches(rec).items():
        v.error(where, f"metric {name} contradicts the record's own data: {why} (edited?)")
    for why in counts(rec):
        v.error(where, why)
    for name, m in rec["metrics"].items():
        spread = m.get("spread") if isinstance(m, dict) else None
        value = m.get("value") if isinstance(m, dict) else None
        if not isinstance(spread, dict) or not isinstance(value, int | float):
            continue
        lo, hi = spread.get("ci_low"), spread.get("ci_high")
        if isinstance(lo, int | float) and isinstance(hi, int | float) and not lo - 1e-9 <= value <= hi + 1e-9:
            v.error(where, f"metric {name}: value {value:.6g} outside its own interval [{lo:.6g}, {hi:.6g}]")


def check_protocol(v: Verification, where: str, rec: dict[str, Any]) -> None:
    """The protocol fields a record states against its task version (and this installation's task)."""
    task, details = rec["task"], rec.get("task_details") or {}
    version, params = str(task.get("version")), task.get("params") or {}
    stated = details.get("protocol")
    if isinstance(stated, str) and "/" in version and version.rsplit("/", 1)[0] != stated:
        v.error(where, f"task version {version} but its details say protocol {stated!r}")
    regime = details.get("regime")
    if isinstance(regime, dict):
        off = [k for k in ("prompt_len", "new_tokens", "batch_size") if k in params and params[k] != regime.get(k)]
        if off:
            v.error(where, f"details.regime {regime} differs from the task parameters in {', '.join(off)}")
    if "noisy" in details and bool(details.get("noisy")) != bool(details.get("noise_reasons")):
        v.error(where, "details.noisy and details.noise_reasons disagree (a flag without reasons, or the reverse)")
    proto = details.get("timing_protocol")
    if isinstance(proto, dict):
        check_timing_protocol(v, where, proto)
    minimums = installed_minimums(rec)
    if minimums is not None:
        if not isinstance(proto, dict):
            v.error(where, f"{task.get('name')} version {version} states timing minimums, but the record has no "
                           "timing_protocol")
        elif (proto.get("min_repeats"), proto.get("min_seconds")) != minimums:
            v.error(where, f"timing_protocol minimums {proto.get('min_repeats')} repeats / {proto.get('min_seconds')} "
                           f"s, but {task.get('name')} version {version} asks {minimums[0]} / {minimums[1]} s")


def check_timing_protocol(v: Verification, where: str, proto: dict[str, Any]) -> None:
    try:
        enough = proto["repeats"] >= proto["min_repeats"] and proto["timed_seconds"] >= proto["min_seconds"]
    except (KeyError, TypeError):
        v.error(where, f"timing_protocol lacks repeats, min_repeats, timed_seconds or min_seconds: {proto}")
        return
    if bool(proto.get("sufficient")) != enough:
        v.error(where, f"timing_protocol says sufficient={proto.get('sufficient')} for {proto['repeats']} repeats over "
                       f"{proto['timed_seconds']} s (minimum {proto['min_repeats']} / {proto['min_seconds']} s)")


def installed_minimums(rec: dict[str, Any]) -> tuple[Any, Any] | None:
    """(min repeats, min seconds) the installed task of the record's version states, or None."""
    import sys

    from slimbench.registry import TASKS

    name = rec["task"].get("name")
    if name not in TASKS or str(TASKS.get(name).version) != str(rec["task"].get("version")):
        return None
    module = sys.modules.get(getattr(TASKS.get(name).evaluate, "__module__", ""), None)
    reps, secs = getattr(module, "MIN_REPEATS", None), getattr(module, "MIN_SECONDS", None)
    return (reps, secs) if reps is not None and secs is not None else None


def check_environment(v: Verification, where: str, rec: dict[str, Any]) -> None:
    env = rec["environment"]
    missing = [k for k in ENVIRONMENT_KEYS if env.get(k) in (None, "")]
    if missing:
        v.error(where, f"environment incomplete: no {', '.join(missing)}")
        return
    git = env["git"]
    if not isinstance(git, dict) or not git.get("commit"):
        v.warn(where, "environment names no git commit: the code that ran cannot be identified")
    elif git.get("dirty"):
        v.warn(where, f"ran from a modified checkout of {git['commit'][:12]} (dirty)")
    threads = rec["hardware"].get("threads")
    if rec["hardware"].get("device", "cpu") == "cpu" and threads is not None and env["torch_threads"] != threads:
        v.warn(where, f"environment says torch_threads {env['torch_threads']}, the cell asked for {threads}")


def check_versions(v: Verification, where: str, rec: dict[str, Any]) -> None:
    from slimbench.registry import METHODS, TASKS

    for step in rec["method"].get("steps") or []:
        name = step.get("name")
        if name not in METHODS:
            v.warn(where, f"method {name!r} is not registered here (a plugin not installed?)")
        elif str(step.get("version")) != str(here := METHODS.get(name).version):
            v.warn(where, f"method {name} version {step.get('version')} in the record, {here} here")
    task = rec["task"].get("name")
    if task not in TASKS:
        v.warn(where, f"task {task!r} is not registered here")
    elif str(rec["task"].get("version")) != str(TASKS.get(task).version):
        v.warn(where, f"task {task} version {rec['task'].get('version')} in the record, {TASKS.get(task).version} here")


# -- across records ------------------------------------------------------------------------------
def comparable(rec: dict[str, Any]) -> dict[str, Any]:
    """What two records of one cell must share: deterministic metrics and the method report's sizes."""
    metrics = {k: m.get("value") for k, m in rec["metrics"].items() if m.get("unit") not in MACHINE_UNITS}
    report = rec.get("method_report") or {}
    return {"metrics": metrics, "report": {k: report.get(k) for k in REPORT_SIZES}}


def check_cells(v: Verification) -> None:
    by_cell: dict[str, list[str]] = {}
    for name, rec in v.records.items():
        if rec["status"] == "ok":
            by_cell.setdefault(rec["run_id"], []).append(name)
    for run_id, names in by_cell.items():
        if len(names) < 2:
            continue
        views = {json.dumps(comparable(v.records[n]), sort_keys=True) for n in names}
        if len(views) > 1:
            v.error(", ".join(names), f"contradictory: {len(names)} ok records of cell {run_id} with different results")
        else:
            v.error(", ".join(names), f"duplicate: {len(names)} ok records of cell {run_id}")


def verify_folder(root: str | Path) -> Verification:
    """Every check that reads the folder (no re-runs)."""
    root = Path(root)
    v = Verification(root)
    runs = root / "runs"
    if not runs.is_dir():
        v.error(str(root), "no runs/ folder: not a SlimBench results folder")
        return v
    files, others = record_files(runs)
    for p in others:
        v.warn(p.name, "not a record file (ignored, never opened)")
    if not files:
        v.error(str(runs), "no record files")
    for p in files:
        try:
            rec = read_record(p)
        except ValueError as err:
            v.error(p.name, str(err))
            continue
        check_record(v, p, rec)
    check_cells(v)
    return v


# -- re-running ----------------------------------------------------------------------------------
def cell_name(rec: dict[str, Any]) -> str:
    """The cell as a reader names it: model | method label | task@version."""
    from slimbench.report.labels import method_label

    try:
        label = method_label(rec)
    except (KeyError, TypeError, AttributeError):
        label = str(rec.get("method", {}).get("label") or rec.get("method", {}).get("name"))
    return f"{rec['model']['name']} | {label} | {rec['task']['name']}@{rec['task'].get('version')}"


def rerun_refusal(rec: dict[str, Any]) -> str | None:
    """Why this cell is not re-run here (None: it can be)."""
    import torch

    from slimbench.registry import METHODS, MODELS, TASKS
    from slimbench.zoo.models import HUB_ID

    model = rec["model"]
    name = str(model.get("name"))
    if model.get("trust_remote_code"):
        return "its model needs trust_remote_code (it would run code shipped with the model)"
    if name not in MODELS and not HUB_ID.match(name):
        return f"its model {name!r} is a local path, not a registered model or hub id"
    for step in rec["method"].get("steps") or []:
        if step.get("name") not in METHODS:
            return f"method {step.get('name')!r} is not registered here"
        if str(step.get("version")) != str(METHODS.get(step["name"]).version):
            return f"method {step['name']} has another version here"
        if step.get("provider") != METHODS.provider(step["name"]):
            return f"method {step['name']} comes from {step.get('provider') or 'the built-ins'} in the record, " \
                   f"{METHODS.provider(step['name']) or 'the built-ins'} here"
    task = rec["task"].get("name")
    if task not in TASKS or str(rec["task"].get("version")) != str(TASKS.get(task).version):
        return f"task {task!r} is not registered here in version {rec['task'].get('version')}"
    if rec["hardware"].get("device") == "cuda" and not torch.cuda.is_available():
        return "it ran on CUDA; this machine has none"
    return None


def close(a: Any, b: Any, rtol: float) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-9)
    return a == b


def compare_rerun(old: dict[str, Any], new: dict[str, Any], rtol: float, timing_rtol: float) -> list[str]:
    """What disagrees between a record and its re-run, beyond noise."""
    if new["status"] != "ok":
        err = new.get("error") or {}
        return [f"the re-run failed: {err.get('type')}: {err.get('message')}"]
    same_machine = old["environment"].get("cpu") == new["environment"].get("cpu")
    out = []
    for name, m in old["metrics"].items():
        got = (new["metrics"].get(name) or {}).get("value")
        machine = m.get("unit") in MACHINE_UNITS
        if machine and not same_machine:
            continue  # another CPU: its latency says nothing about this record
        tol = timing_rtol if machine else rtol
        if got is None or not close(m.get("value"), got, tol):
            out.append(f"{name}: recorded {m.get('value')}, here {got} (tolerance {tol:g} relative)")
    old_rep, new_rep = old.get("method_report") or {}, new.get("method_report") or {}
    for key in REPORT_SIZES:
        if key in old_rep and not close(old_rep.get(key), new_rep.get(key), rtol):
            out.append(f"method_report.{key}: recorded {old_rep.get(key)}, here {new_rep.get(key)}")
    return out


def rerun(v: Verification, k: int, *, seed: int = 0, rtol: float = 1e-3, timing_rtol: float = 0.5,
          log=print) -> None:
    """Re-run ``k`` sampled ok cells here and compare (results into ``v.reruns``)."""
    from slimbench.sweep.driver import run_cells
    from slimbench.sweep.store import ResultStore

    candidates = sorted((n for n, r in v.records.items() if r["status"] == "ok"))
    rng = random.Random(seed)
    for name in rng.sample(candidates, min(k, len(candidates))):
        rec = v.records[name]
        why = rerun_refusal(rec)
        if why:
            v.reruns.append({"file": name, "cell": cell_name(rec), "status": "skipped", "reason": why})
            continue
        cell = cell_of(rec)
        cell = type(cell).model_validate(cell.to_dict())  # validated here, now that it will run
        with tempfile.TemporaryDirectory(prefix="slimbench-verify-") as tmp:
            store = ResultStore(tmp)
            run_cells([cell], store, show_progress=False, log=log)
            new = json.loads(next((Path(tmp) / "runs").glob("*.json")).read_text())
        problems = compare_rerun(rec, new, rtol, timing_rtol)
        status = "disagree" if problems else "agree"
        v.reruns.append({"file": name, "cell": cell_name(rec), "status": status, "problems": problems})
