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
starts, and nothing is written.
"""

from __future__ import annotations

import copy
import itertools
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from slimbench.config import Config, build_config, format_validation_error
from slimbench.errors import SuiteError
from slimbench.registry import METHODS, TASKS
from slimbench.specs import CellSpec, HardwareSpec, MethodSpec, ModelSpec, StepSpec, TaskSpec

TOP_KEYS = {"name", "description", "models", "methods", "tasks", "hardware"}


@dataclass
class Suite:
    source: str
    name: str
    models: list[ModelSpec]
    methods: list[MethodSpec]
    tasks: list[TaskSpec]
    hardware: HardwareSpec

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
        raise SuiteError(f"--set expects key=value, got {assignment!r}", source=source)
    key, value = assignment.split("=", 1)
    parts = key.replace("[", ".").replace("]", "").strip(".").split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise SuiteError(f"--set {key}: no list element {part!r} (list has {len(node)})", source=source)
            idx = int(part)
            if last:
                node[idx] = yaml.safe_load(value)
                return
            if isinstance(node[idx], str):  # `- efficiency` becomes `- {name: efficiency}`
                node[idx] = {"name": node[idx]}
            node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = yaml.safe_load(value)
                return
            node = node.setdefault(part, {})
        else:
            raise SuiteError(f"--set {key}: {'.'.join(parts[:i])} is not a mapping or list", source=source)


# -- parsing ----------------------------------------------------------------------------------
def load_yaml(path: Path) -> dict:
    if not path.exists():
        raise SuiteError(f"suite file not found: {path}", source=str(path))
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SuiteError(f"malformed YAML: {err}", source=str(path)) from None
    if not isinstance(raw, dict):
        raise SuiteError("a suite is a mapping with keys models, methods, tasks, hardware", source=str(path))
    return raw


def is_list_field(cls: type[Config], name: str) -> bool:
    field = cls.model_fields.get(name)
    if field is None:
        return False
    origins = {typing.get_origin(a) for a in (field.annotation, *typing.get_args(field.annotation))}
    return bool(origins & {list, tuple, set})


def expand_grid(cls: type[Config], params: dict[str, Any]) -> list[dict[str, Any]]:
    """A list value of a scalar parameter becomes one config per element (cross-product)."""
    keys = [k for k, v in params.items() if isinstance(v, list) and not is_list_field(cls, k)]
    if not keys:
        return [params]
    combos = itertools.product(*(params[k] for k in keys))
    return [{**params, **dict(zip(keys, combo, strict=True))} for combo in combos]


def split_entry(entry: Any, source: str, field: str) -> tuple[str, dict[str, Any]]:
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, dict) and isinstance(entry.get("name"), str):
        params = dict(entry)
        return params.pop("name"), params
    raise SuiteError(f"expected a name or a mapping with a `name` key, got {entry!r}", source=source, field=field)


def parse_step(entry: Any, source: str, field: str) -> list[StepSpec]:
    name, params = split_entry(entry, source, field)
    method = METHODS.get(name, source=source, field=f"{field}.name")
    out = []
    for combo in expand_grid(method.config, params):
        cfg = build_config(method.config, combo, source=source, field=f"{field} ({name})")
        out.append(StepSpec(name=name, params=cfg.to_dict()))
    return out


def parse_methods(raw: Any, source: str) -> list[MethodSpec]:
    if not isinstance(raw, list) or not raw:
        raise SuiteError("must be a non-empty list", source=source, field="methods")
    specs: list[MethodSpec] = []
    for i, entry in enumerate(raw):
        field = f"methods[{i}]"
        if isinstance(entry, dict) and "steps" in entry:
            entry = entry["steps"]
        steps = entry if isinstance(entry, list) else [entry]
        if not steps:
            raise SuiteError("a list of steps must not be empty", source=source, field=field)
        options = [parse_step(s, source, f"{field}[{j}]" if len(steps) > 1 else field) for j, s in enumerate(steps)]
        specs += [MethodSpec(steps=tuple(combo)) for combo in itertools.product(*options)]
    return specs


def parse_tasks(raw: Any, source: str) -> list[TaskSpec]:
    if not isinstance(raw, list) or not raw:
        raise SuiteError("must be a non-empty list", source=source, field="tasks")
    specs = []
    for i, entry in enumerate(raw):
        name, params = split_entry(entry, source, f"tasks[{i}]")
        task = TASKS.get(name, source=source, field=f"tasks[{i}].name")
        for combo in expand_grid(task.config, params):
            cfg = build_config(task.config, combo, source=source, field=f"tasks[{i}] ({name})")
            specs.append(
                TaskSpec(name=name, version=task.version, params=cfg.to_dict(), provider=TASKS.provider(name))
            )
    return specs


def parse_models(raw: Any, source: str) -> list[ModelSpec]:
    from slimbench.models import resolve

    if not isinstance(raw, list) or not raw:
        raise SuiteError("must be a non-empty list", source=source, field="models")
    specs = []
    for i, entry in enumerate(raw):
        params = {"name": entry} if isinstance(entry, str) else entry
        spec = build_config(ModelSpec, params, source=source, field=f"models[{i}]")
        resolve(spec, source=source, field=f"models[{i}]")
        specs.append(spec)
    return specs


def check_corpora(tasks: list[TaskSpec], source: str) -> None:
    from slimbench.corpora import SPLITS
    from slimbench.registry import CORPORA

    for i, t in enumerate(tasks):
        if "corpus" in t.params:
            CORPORA.get(t.params["corpus"], source=source, field=f"tasks[{i}].corpus")
        if "split" in t.params and t.params["split"] not in SPLITS:
            raise SuiteError(
                f"unknown split {t.params['split']!r}; allowed: {', '.join(SPLITS)}",
                source=source,
                field=f"tasks[{i}].split",
            )


def load_suite(path: str | Path, overrides: list[str] = ()) -> Suite:
    """Read, override, expand and validate a suite; raises SuiteError on any problem."""
    path = Path(path)
    source = str(path)
    raw = copy.deepcopy(load_yaml(path))
    for assignment in overrides:
        apply_override(raw, assignment, source)
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise SuiteError(f"unknown key(s) {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}", source=source)
    try:
        hardware = HardwareSpec(**(raw.get("hardware") or {}))
    except ValidationError as err:
        raise SuiteError(format_validation_error(err), source=source, field="hardware") from None
    except TypeError:
        raise SuiteError("must be a mapping", source=source, field="hardware") from None
    tasks = parse_tasks(raw.get("tasks"), source)
    check_corpora(tasks, source)
    return Suite(
        source=source,
        name=str(raw.get("name") or path.stem),
        models=parse_models(raw.get("models"), source),
        methods=parse_methods(raw.get("methods"), source),
        tasks=tasks,
        hardware=hardware,
    )
