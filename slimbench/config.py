"""Frozen, typed, validated configs: the identity of every method, task and model.

A config is hashed into the run id and stored in every record, so two runs with the same
config are the same experiment. Unknown keys are rejected, not ignored.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from slimbench.errors import SuiteError, brief


class Config(BaseModel):
    """Base for every method/task/model config: frozen, strict about unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def canonical_json(obj: Any) -> str:
    """Key-sorted, whitespace-free JSON: the form that is hashed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def stable_hash(obj: Any, length: int = 16) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def format_validation_error(err: ValidationError, cls: type[BaseModel] | None = None) -> str:
    """One line per problem: `field: what is wrong (got value)`; a misspelt parameter name
    is answered with the closest parameters of ``cls``, as unknown names are."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(config)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown parameter"
            close = difflib.get_close_matches(str(e["loc"][-1]), list(cls.model_fields), n=3, cutoff=0.6) if cls else []
            if close:
                msg += f" (did you mean {', '.join(map(repr, close))}?)"
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {brief(got)})"  # cut: a value may be huge
        lines.append(f"{loc}: {msg}{got_s}")
    return "; ".join(lines)


def build_config(cls: type[Config], params: dict[str, Any], *, source: str, field: str) -> Config:
    """Validate `params` against `cls`, turning pydantic's error into a SuiteError."""
    try:
        return cls(**params)
    except ValidationError as err:
        allowed = ", ".join(cls.model_fields) or "(no parameters)"
        raise SuiteError(
            f"{format_validation_error(err, cls)}. Parameters of this entry: {allowed}",
            source=source,
            field=field,
        ) from None


def describe_fields(cls: type[Config]) -> list[tuple[str, str, str, str]]:
    """(name, type, default, description) for each field, for `benchmark.py list`."""
    rows = []
    for name, f in cls.model_fields.items():
        ann = f.annotation
        if typing.get_origin(ann) is typing.Literal:
            type_s = " | ".join(map(str, typing.get_args(ann)))
        else:
            type_s = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        default = "required" if f.is_required() else repr(f.default)
        rows.append((name, type_s, default, f.description or ""))
    return rows
