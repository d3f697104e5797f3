"""Claim cards: a paper's qualitative claim restated as checks on measured values.

A claim card names *arms* (method configs, e.g. ``fp``, ``rtn``, ``gptq``) and *checks* over
one quality metric of those arms (lower is better, e.g. perplexity). Three measures cover the
claims of the compression papers we reproduce:

- ``ratio`` of arms ``[a, b]``: ``m(a) / m(b)``. "SVD-LLM is two orders of magnitude below plain
  SVD" is ``ratio [svd_llm, svd] <= 0.01``.
- ``increase_ratio`` of arms ``[a, b]``: ``(m(a) - m(ref)) / (m(b) - m(ref))`` with ``ref`` the
  card's reference arm (the uncompressed model): the share of b's loss that a keeps. "GPTQ loses
  at most 40% of what RTN loses" is ``increase_ratio [gptq, rtn] <= 0.4``.
- ``relative_increase`` of arm ``[a]``: ``m(a) / m(ref) - 1``. "SmoothQuant stays within 5% of
  fp" is ``relative_increase [smoothquant] <= 0.05``.

Each check has a role: ``claim`` (decides the verdict), ``premise`` (a condition the claim is
about, e.g. "naive W8A8 does degrade this model"; if it fails the claim cannot be tested here),
or ``info`` (reported, never decides). The verdict:

- ``incomplete``: an arm has no measurement (a cell failed or was not run);
- ``inconclusive``: a premise does not hold on this model, or a measure is undefined (e.g. the
  baseline arm of an ``increase_ratio`` lost nothing);
- ``holds`` / ``fails``: every claim check passes / at least one fails.

Pure logic, no model: tested against fabricated values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, model_validator

from slimbench.config import Config

Measure = Literal["ratio", "increase_ratio", "relative_increase"]
ARITY = {"ratio": 2, "increase_ratio": 2, "relative_increase": 1}
VERDICTS = ("holds", "fails", "inconclusive", "incomplete")


class Check(Config):
    """One inequality over the arms' metric values."""

    text: str = Field(description="the check in words, as printed next to its result")
    measure: Measure
    arms: list[str] = Field(description="arm names the measure takes (2 for ratios, 1 for relative_increase)")
    at_most: float | None = None
    at_least: float | None = None
    role: Literal["claim", "premise", "info"] = "claim"
    why: str = Field("", description="where the bound comes from (the paper's numbers)")

    @model_validator(mode="after")
    def _shape(self):
        if len(self.arms) != ARITY[self.measure]:
            raise ValueError(f"measure {self.measure} takes {ARITY[self.measure]} arm(s), got {self.arms}")
        if (self.at_most is None) == (self.at_least is None):
            raise ValueError("give exactly one bound: at_most or at_least")
        return self

    def bound_text(self) -> str:
        return f"<= {self.at_most:g}" if self.at_most is not None else f">= {self.at_least:g}"

    def shown(self, value: float, reference: str) -> str:
        """A value of this check's measure in the words its text uses, so a row reads in one unit.

        ``relative_increase`` as a multiple of the reference (``12.07x fp (+1107%)``), an
        ``increase_ratio`` as a share of the other arm's increase (``16% of rtn's increase``), a
        ``ratio`` as a multiple of the other arm (``0.0018x svd``).
        """
        if self.measure == "relative_increase":
            return f"{1 + value:.4g}x {reference} ({percent(value, sign=True)})"
        if self.measure == "increase_ratio":
            return f"{percent(value)} of {self.arms[1]}'s increase"
        return f"{value:.3g}x {self.arms[1]}"

    def bound_shown(self, reference: str) -> str:
        """The bound in the same words as ``shown``: ``>= 1.5x fp (+50%)`` for ``at_least: 0.5``."""
        op, bound = ("<=", self.at_most) if self.at_most is not None else (">=", self.at_least)
        return f"{op} {self.shown(bound, reference)}"


def percent(fraction: float, sign: bool = False) -> str:
    """0.5 -> 50%, 11.07 -> 1,107%, 0.0163 -> 1.63%."""
    v = 100 * fraction
    text = f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return ("+" if sign and v > 0 else "") + text + "%"


@dataclass
class CheckResult:
    check: Check
    value: float | None  # None: an arm was not measured, or the measure is undefined
    passed: bool | None
    note: str = ""

    reference: str = "fp"

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.check.text,
            "role": self.check.role,
            "measure": self.check.measure,
            "arms": self.check.arms,
            "bound": self.check.bound_text(),
            "value": self.value,
            "shown": self.shown(),
            "bound_shown": self.check.bound_shown(self.reference),
            "passed": self.passed,
            "note": self.note,
        }

    def shown(self) -> str:
        """The measured value in the bound's unit, or why there is none."""
        return self.check.shown(self.value, self.reference) if self.value is not None else self.note


@dataclass
class Verdict:
    verdict: str
    checks: list[CheckResult] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # arms without a value

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "missing_arms": self.missing, "checks": [c.to_dict() for c in self.checks]}


def measure_value(check: Check, values: dict[str, float | None], reference: str) -> tuple[float | None, str]:
    """The check's measure from the arms' values, or (None, why not)."""
    needed = list(check.arms) + ([reference] if check.measure != "ratio" else [])
    absent = [a for a in needed if values.get(a) is None]
    if absent:
        return None, f"no value for {', '.join(absent)}"
    bad = [a for a in needed if not math.isfinite(values[a])]
    if bad:
        return None, f"non-finite value for {', '.join(bad)}"
    if check.measure == "ratio":
        a, b = (values[x] for x in check.arms)
        return (a / b, "") if b != 0 else (None, f"{check.arms[1]} is 0")
    ref = values[reference]
    if check.measure == "relative_increase":
        return (values[check.arms[0]] / ref - 1.0, "") if ref != 0 else (None, f"{reference} is 0")
    a, b = (values[x] - ref for x in check.arms)
    if b <= 0:
        # b did not lose anything: "a keeps x% of b's loss" has no meaning.
        return None, f"{check.arms[1]} is not worse than {reference} ({values[check.arms[1]]:g} vs {ref:g})"
    return a / b, ""


def run_check(check: Check, values: dict[str, float | None], reference: str) -> CheckResult:
    value, note = measure_value(check, values, reference)
    if value is None:
        return CheckResult(check, None, None, note, reference)
    passed = value <= check.at_most if check.at_most is not None else value >= check.at_least
    return CheckResult(check, value, passed, "", reference)


def evaluate(checks: list[Check], values: dict[str, float | None], reference: str) -> Verdict:
    """Run every check and combine them into a verdict (see module docstring)."""
    results = [run_check(c, values, reference) for c in checks]
    used = {reference} | {a for c in checks for a in c.arms}
    missing = sorted(a for a in used if values.get(a) is None)
    deciding = [r for r in results if r.check.role in ("claim", "premise")]
    premises = [r for r in deciding if r.check.role == "premise"]
    if missing:
        verdict = "incomplete"
    elif any(r.passed is None for r in deciding) or any(r.passed is False for r in premises):
        verdict = "inconclusive"  # measured, but the claim cannot be tested on this model
    elif all(r.passed for r in results if r.check.role == "claim"):
        verdict = "holds"
    else:
        verdict = "fails"
    return Verdict(verdict, results, missing)
