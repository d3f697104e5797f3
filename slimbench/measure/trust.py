"""Whether a record's timings may be read as results: the one place reports and compare ask.

A timed metric (latency, throughput, a fraction of the roofline) is trusted only when the
measurement was undisturbed (the task found no other process on its cores: ``noisy`` false) and
sampled enough (at least the protocol's minimum repeats and timed seconds). Quality metrics,
sizes and memory are not timings: other processes do not change them.

Records carry what this needs in ``task_details``: ``noisy`` and ``noise_reasons`` (every
timed task), and ``timing_protocol`` = ``{"repeats", "min_repeats", "timed_seconds",
"min_seconds", "sufficient"}`` (timed tasks from the versions that state a minimum). A record
without ``timing_protocol`` predates the minimums: its sampling is unknown, said as such.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TIMED_UNITS = frozenset({"ms", "s", "tokens/s", "GB/s", "requests/s", "TFLOP/s"})
TIMED_SUFFIXES = ("_roofline_fraction", "_per_s", "_ms", "_seconds")


def is_timed(name: str, metric: dict[str, Any] | None = None) -> bool:
    """A metric whose value depends on how busy the machine was."""
    unit = (metric or {}).get("unit")
    return unit in TIMED_UNITS or name.endswith(TIMED_SUFFIXES)


@dataclass(frozen=True)
class Trust:
    noisy: bool
    sufficient: bool | None  # None: the record predates the protocol's minimums
    reasons: list[str] = field(default_factory=list)

    @property
    def trusted(self) -> bool:
        return not self.noisy and self.sufficient is not False

    def label(self) -> str:
        """Short mark for tables: '' when trusted."""
        if self.noisy:
            return "noisy"
        if self.sufficient is False:
            return "under-sampled"
        return ""


def timing_trust(record: dict[str, Any]) -> Trust:
    """How far the timed metrics of ``record`` can be trusted."""
    details = record.get("task_details") or {}
    noisy = bool(details.get("noisy"))
    reasons = [str(r) for r in details.get("noise_reasons") or []]
    proto = details.get("timing_protocol")
    sufficient = None
    if isinstance(proto, dict) and "sufficient" in proto:
        sufficient = bool(proto["sufficient"])
        if not sufficient:
            reasons.append(
                f"{proto.get('repeats')} repeats over {proto.get('timed_seconds', 0):.2f} s, below the protocol's "
                f"minimum of {proto.get('min_repeats')} repeats and {proto.get('min_seconds')} s"
            )
    return Trust(noisy, sufficient, reasons)
