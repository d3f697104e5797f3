"""Suites: a YAML file of models x methods x tasks x hardware, validated before anything runs.

    models: [smollm2-135m]
    methods:
      - baseline
      - {name: rtn, bits: [4, 8], group_size: 128}     # a list value expands into a grid
      - [{name: magnitude, sparsity: 0.5}, {name: rtn, bits: 8}]   # steps, applied in order
    tasks:
      - {name: perplexity, corpus: shakespeare, split: test, seqlen: 512, max_windows: 64}
      - efficiency
    hardware: {device: cpu, dtype: float32, threads: 2}

Every problem is reported as ``file: field: what is wrong. What is allowed`` before any cell
starts, all problems of a suite at once, and nothing is written. Validation reads each
model's config (never its weights) to check every method against the model's shapes, the
hardware and its calibration budget; chains are checked against the composition rules
(``Method.follows``).

A bare name (``quickstart``) that is not a file names a built-in suite: the repository's
``configs/`` folder, installed as ``slimbench.configs``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import itertools
import math
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from slimbench.config import Config, build_config, format_validation_error
from slimbench.errors import SuiteError, brief
from slimbench.registry import METHODS, TASKS
from slimbench.specs import CellSpec, HardwareSpec, MethodSpec, ModelSpec, StepSpec, TaskSpec
from slimbench.sweep import yaml_limits

MAX_GRID = 1000  # configs one entry may expand into
MAX_CELLS = 100_000  # cells of one suite
MAX_MESSAGE = 2000  # characters of one problem in a message
TOP_KEYS = {"name", "description", "models", "methods", "tasks", "hardware"}


@dataclass
class Suite:
    source: str
    name: str
    models: list[ModelSpec]
    methods: list[MethodSpec]
    tasks: list[TaskSpec]
    hardware: HardwareSpec
    # What validation found that does not stop a run (a calibration budget below what a
    # method needs, shape checks deferred to load time): shown by validate and run.
    warnings: list[str] = field(default_factory=list)

    def cells(self) -> list[CellSpec]:
        return [
            CellSpec(model=mo, method=me, task=ta, hardware=self.hardware)
            for mo in self.models
            for me in self.methods
            for ta in self.tasks
        ]


# -- overrides --------------------------------------------------------------------------------
def apply_override(raw: dict, assignment: str, source: str) -> None:
    """`--set a.b.0.c=value`: value parsed as YAML; `tasks.1.x` also accepts `tasks[1].x`."""
    if "=" not in assignment:
        raise SuiteError(f"--set expects key=value, got {brief(assignment)}", source=source)
    key, value = assignment.split("=", 1)
    parts = key.replace("[", ".").replace("]", "").strip(".").split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise SuiteError(f"--set {key}: no list element {brief(part)} (list has {len(node)})", source=source)
            idx = int(part)
            if last:
                node[idx] = yaml_limits.load_text(value, f"{source}: --set {key}")
                return
            if isinstance(node[idx], str):  # `- efficiency` becomes `- {name: efficiency}`
                node[idx] = {"name": node[idx]}
            node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = yaml_limits.load_text(value, f"{source}: --set {key}")
                return
            node = node.setdefault(part, {})
        else:
            raise SuiteError(f"--set {key}: {'.'.join(parts[:i])} is not a mapping or list", source=source)


# -- collecting every problem ----------------------------------------------------------------
class Problems:
    """Every error of a suite, collected so `validate` reports them all at once."""

    def __init__(self, source: str):
        self.source = source
        self.errors: list[str] = []
        self.warnings: list[str] = []  # shown by validate and run; they do not stop anything

    @contextlib.contextmanager
    def collect(self) -> Iterator[None]:
        try:
            yield
        except SuiteError as err:
            text = str(err)
            if len(text) > MAX_MESSAGE:  # a value quoted whole (a name of a megabyte) would bury the rest
                text = text[: MAX_MESSAGE - 1] + "…"
            if text not in self.errors:  # a grid repeats the same problem per combination
                self.errors.append(text)

    def add(self, message: str, field: str | None = None) -> None:
        with self.collect():
            raise SuiteError(message, source=self.source, field=field)

    def raise_if_any(self) -> None:
        if len(self.errors) == 1:
            raise SuiteError(self.errors[0])
        if self.errors:
            lines = "\n".join(f"  - {e}" for e in self.errors)
            raise SuiteError(f"{self.source}: {len(self.errors)} problems:\n{lines}")


# -- parsing ----------------------------------------------------------------------------------
BUILTIN_SUITES = "slimbench.configs"  # the repository's configs/ folder, packaged


def builtin_suites_dir() -> Path | None:
    spec = importlib.util.find_spec(BUILTIN_SUITES)
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


def resolve_suite_path(path: str | Path) -> Path:
    """A suite file, or the bare name of a built-in suite (``quickstart`` -> its packaged YAML).

    A file of that name in the current folder wins, so a bare name never hides a local file.
    """
    path = Path(path)
    if path.exists() or len(path.parts) != 1:
        return path
    folder = builtin_suites_dir()
    for candidate in (path.name, f"{path.name}.yaml"):
        if folder is not None and (folder / candidate).is_file():
            return folder / candidate
    return path


def builtin_suite_names() -> list[str]:
    folder = builtin_suites_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder else []


def load_yaml(path: Path) -> dict:
    if not path.exists():
        names = ", ".join(builtin_suite_names())
        raise SuiteError(f"suite file not found: {path} (built-in suites, usable by name: {names})", source=str(path))
    raw = yaml_limits.load_file(path)  # size, encoding, depth and alias expansion bounded
    if not isinstance(raw, dict):
        raise SuiteError("a suite is a mapping with keys models, methods, tasks, hardware", source=str(path))
    return raw


def is_list_field(cls: type[Config], name: str) -> bool:
    field = cls.model_fields.get(name)
    if field is None:
        return False
    origins = {typing.get_origin(a) for a in (field.annotation, *typing.get_args(field.annotation))}
    return bool(origins & {list, tuple, set})


def expand_grid(
    cls: type[Config], params: dict[str, Any], source: str | None = None, field: str | None = None
) -> list[dict[str, Any]]:
    """A list value of a scalar parameter becomes one config per element (cross-product)."""
    keys = [k for k, v in params.items() if isinstance(v, list) and not is_list_field(cls, k)]
    if not keys:
        return [params]
    size = math.prod(len(params[k]) for k in keys)
    if size > MAX_GRID:
        lengths = " x ".join(f"{k} ({len(params[k])})" for k in keys)
        raise SuiteError(
            f"the grid {lengths} makes {size:,} configs; at most {MAX_GRID:,} per entry", source=source, field=field
        )
    combos = itertools.product(*(params[k] for k in keys))
    return [{**params, **dict(zip(keys, combo, strict=True))} for combo in combos]


def split_entry(entry: Any, source: str, field: str) -> tuple[str, dict[str, Any]]:
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, dict) and isinstance(entry.get("name"), str):
        params = dict(entry)
        return params.pop("name"), params
    raise SuiteError(f"expected a name or a mapping with a `name` key, got {brief(entry)}", source=source, field=field)


def parse_step(entry: Any, source: str, field: str, problems: Problems) -> list[StepSpec]:
    name, params = split_entry(entry, source, field)
    method = METHODS.get(name, source=source, field=f"{field}.name")
    out = []
    for combo in expand_grid(method.config, params, source, field):
        with problems.collect():
            cfg = build_config(method.config, combo, source=source, field=f"{field} ({name})")
            check_stored_config(method, cfg, source, f"{field} ({name})")
            out.append(StepSpec(name=name, params=cfg.to_dict()))
    return out


def check_stored_config(method: Any, cfg: Config, source: str, field: str) -> None:
    """The runner rebuilds each config from its stored form (every field): it must validate
    again as the same config, or the cell would fail after loading the model."""
    try:
        again = method.config(**cfg.to_dict())
    except ValidationError as err:
        again, why = None, format_validation_error(err, method.config)
    else:
        why = "it reloads as a different config"
    if again != cfg:
        raise SuiteError(
            f"these parameters do not survive being stored ({why}): a defect of method {method.name}'s config; "
            f"stored form {cfg.to_dict()}",
            source=source,
            field=field,
        )


def chain_steps(entry: Any) -> list[Any]:
    """The steps of a methods entry: `{steps: [...]}` or a list is a chain; anything else one step.

    A mapping with a `name` is one method even if it has a `steps` parameter (fine-tuning's
    optimizer steps), so only a mapping without `name` reads `steps` as composition.
    """
    if isinstance(entry, dict) and "steps" in entry and "name" not in entry:
        entry = entry["steps"]
    return entry if isinstance(entry, list) else [entry]


def parse_methods(raw: Any, source: str, problems: Problems) -> list[MethodSpec]:
    if not isinstance(raw, list) or not raw:
        raise SuiteError("must be a non-empty list", source=source, field="methods")
    specs: list[MethodSpec] = []
    for i, entry in enumerate(raw):
        field = f"methods[{i}]"
        steps = chain_steps(entry)
        if not steps:
            problems.add("a list of steps must not be empty", field)
            continue
        options = []
        for j, step in enumerate(steps):
            with problems.collect():
                options.append(parse_step(step, source, f"{field}[{j}]" if len(steps) > 1 else field, problems))
        if len(options) < len(steps) or not all(options):
            continue  # errors collected above
        with problems.collect():
            check_chain([METHODS.get(s.name) for s in (o[0] for o in options)], source, field)
        if math.prod(len(o) for o in options) > MAX_GRID:
            problems.add(
                f"the chain's grids make {math.prod(len(o) for o in options):,} configs; at most {MAX_GRID:,}", field
            )
            continue
        specs += [MethodSpec(steps=tuple(combo)) for combo in itertools.product(*options)]
    return specs


def check_chain(methods: list[Any], source: str, field: str) -> None:
    """Composition rules: each step may follow every step before it (Method.follows)."""
    for j, method in enumerate(methods):  # the first step too: it may require an earlier one
        problem = method.chain_problem(methods[:j])
        if problem:
            raise SuiteError(f"invalid chain: {problem}", source=source, field=f"{field}[{j}]")


def parse_tasks(raw: Any, source: str, problems: Problems) -> list[TaskSpec]:
    if not isinstance(raw, list) or not raw:
        raise SuiteError("must be a non-empty list", source=source, field="tasks")
    specs = []
    for i, entry in enumerate(raw):
        with problems.collect():
            name, params = split_entry(entry, source, f"tasks[{i}]")
            task = TASKS.get(name, source=source, field=f"tasks[{i}].name")
            for combo in expand_grid(task.config, params, source, f"tasks[{i}]"):
                with problems.collect():
                    cfg = build_config(task.config, combo, source=source, field=f"tasks[{i}] ({name})")
                    specs.append(
                        TaskSpec(name=name, version=task.version, params=cfg.to_dict(), provider=TASKS.provider(name))
                    )
    return specs


def parse_models(raw: Any, source: str, problems: Problems) -> list[ModelSpec]:
    from slimbench.zoo.models import resolve

    if not isinstance(raw, list) or not raw:
        raise SuiteError("must be a non-empty list", source=source, field="models")
    specs = []
    for i, entry in enumerate(raw):
        with problems.collect():
            params = {"name": entry} if isinstance(entry, str) else entry
            if not isinstance(params, dict):
                raise SuiteError(
                    f"expected a name or a mapping, got {brief(entry)}", source=source, field=f"models[{i}]"
                )
            spec = build_config(ModelSpec, params, source=source, field=f"models[{i}]")
            resolve(spec, source=source, field=f"models[{i}]")
            specs.append(spec)
    return specs


def check_corpora(tasks: list[TaskSpec], source: str, problems: Problems) -> None:
    from slimbench.registry import CORPORA
    from slimbench.zoo.corpora import SPLITS

    for i, t in enumerate(tasks):
        with problems.collect():
            if "corpus" in t.params:
                CORPORA.get(t.params["corpus"], source=source, field=f"tasks[{i}].corpus")
        if "split" in t.params and t.params["split"] not in SPLITS:
            problems.add(f"unknown split {brief(t.params['split'])}; allowed: {', '.join(SPLITS)}", f"tasks[{i}].split")


# -- checks that need the model's shapes (no weights) --------------------------------------------
def check_against_models(suite: Suite, problems: Problems) -> None:
    """Each method config against each model's shapes, its hardware, and its calibration budget.

    Runs every method's shape-only ``check`` on a weightless skeleton of the model (see
    slimbench.zoo.shapes), so `validate` reports what the run would otherwise fail on after loading.
    A later step of a chain is checked on the original shapes only while no earlier step
    changes shapes or the execution (an acceleration step); the runner checks every step again before applying it.
    """
    from slimbench.calibration import budget_problems
    from slimbench.zoo.shapes import skeleton

    for mi, spec in enumerate(suite.models):
        try:
            sk = skeleton(spec)
        except Exception as exc:  # no config here (hub id offline, plugin model without one)
            problems.warnings.append(
                f"{spec.name}: shape checks wait until the model is loaded (config not readable: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
            )
            continue
        for me in suite.methods:
            where = f"models[{mi}] {spec.name} x {me.label()}"
            for step in me.steps:
                method = METHODS.get(step.name)
                cfg = build_config(method.config, step.params, source=suite.source, field=step.name)
                if method.requires_gpu and suite.hardware.device != "cuda":
                    problems.add(f"method {method.name} needs a CUDA GPU; hardware.device is cpu", where)
                if method.check is not None and not method.check_reads_weights:
                    try:
                        method.check(sk, cfg)
                    except ValueError as err:
                        problems.add(f"{step.name}: {err}", where)
                    except Exception as exc:  # a check that needs values after all: it runs after loading
                        problems.warnings.append(f"{where}: {step.name}: check needs weights ({type(exc).__name__})")
                if method.uses_calibration:
                    errors, warnings = budget_problems(sk.model, cfg, method)
                    for e in errors:
                        problems.add(f"{step.name}: calibration budget: {e}", where)
                    problems.warnings += [f"{where}: {step.name}: calibration budget: {w}" for w in warnings]
                if method.changes_shapes or method.family == "acceleration":
                    break  # later steps see other shapes, or an engine instead of the model
        check_tasks_against_model(suite, mi, spec, sk, problems)


def check_tasks_against_model(suite: Suite, mi: int, spec: ModelSpec, sk: Any, problems: Problems) -> None:
    """Each task's own ``check`` (if it has one) against the model and each cell's method steps."""
    for ti, t in enumerate(suite.tasks):
        task = TASKS.get(t.name)
        if getattr(task, "check", None) is None:
            continue
        tcfg = build_config(task.config, t.params, source=suite.source, field=f"tasks[{ti}]")
        for me in suite.methods:
            steps = [(METHODS.get(s.name), build_config(METHODS.get(s.name).config, s.params, source=suite.source,
                                                        field=s.name)) for s in me.steps]
            try:
                task.check(sk, tcfg, steps)
            except ValueError as err:
                problems.add(str(err), f"models[{mi}] {spec.name} x {me.label()} x tasks[{ti}] {t.name}")


def validate_against_models(suite: Suite) -> None:
    """The model checks of a suite loaded with ``check_models=False``, done later (raises as
    ``load_suite`` would, and adds their warnings to the suite's)."""
    problems = Problems(suite.source)
    problems.warnings = list(suite.warnings)
    check_against_models(suite, problems)
    problems.raise_if_any()
    suite.warnings = problems.warnings


def load_suite(path: str | Path, overrides: list[str] = (), *, check_models: bool = True) -> Suite:
    """Read, override, expand and validate a suite; raises SuiteError listing every problem.

    ``check_models``: also check each method against each model's shapes and hardware (reads
    model configs, never weights).
    """
    path = resolve_suite_path(path)
    source = str(path)
    raw = copy.deepcopy(load_yaml(path))
    for assignment in overrides:
        apply_override(raw, assignment, source)
    return suite_from_mapping(raw, source, path.stem, check_models=check_models)


def suite_from_mapping(raw: Any, source: str, name: str, *, check_models: bool = True) -> Suite:
    """A suite from an already-read mapping (``source`` names it in errors); ``load_suite``'s checks."""
    problems = Problems(source)
    if not isinstance(raw, dict):
        problems.add("a suite is a mapping with keys models, methods, tasks, hardware")
        problems.raise_if_any()
    unknown = set(raw) - TOP_KEYS
    if unknown:
        problems.add(f"unknown key(s) {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}")
    hardware = HardwareSpec()
    try:
        hardware = HardwareSpec(**(raw.get("hardware") or {}))
    except ValidationError as err:
        problems.add(format_validation_error(err, HardwareSpec), "hardware")
    except TypeError:
        problems.add("must be a mapping", "hardware")
    tasks = models = methods = []
    with problems.collect():
        tasks = parse_tasks(raw.get("tasks"), source, problems)
    check_corpora(tasks, source, problems)
    with problems.collect():
        models = parse_models(raw.get("models"), source, problems)
    with problems.collect():
        methods = parse_methods(raw.get("methods"), source, problems)
    suite = Suite(
        source=source,
        name=str(raw.get("name") or name),
        models=models,
        methods=methods,
        tasks=tasks,
        hardware=hardware,
    )
    if len(models) * len(methods) * len(tasks) > MAX_CELLS:
        problems.add(
            f"{len(models)} models x {len(methods)} method configs x {len(tasks)} task configs make "
            f"{len(models) * len(methods) * len(tasks):,} cells; at most {MAX_CELLS:,} per suite"
        )
        problems.raise_if_any()
    if check_models:  # on whatever parsed, so one validation lists every problem
        check_against_models(suite, problems)
    problems.raise_if_any()
    suite.warnings = problems.warnings
    return suite
