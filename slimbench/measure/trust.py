"""Whether a record's timings may be read as results: the one place reports and compare ask.

A timed metric (latency, throughput, a fraction of the roofline) is trusted only when the
measurement was undisturbed (the task found no other process on its cores: ``noisy`` false) and
sampled enough (at least the protocol's minimum repeats and timed seconds). Quality metrics,
sizes and memory are not timings: other processes do not change them.

Records carry what this needs in ``task_details``: ``noisy`` and ``noise_reasons`` (every
timed task), and ``timing_protocol`` = ``{"repeats", "min_repeats", "timed_seconds",
"min_seconds", "sufficient"}`` (timed tasks from the versions that state a minimum). A record
without ``timing_protocol`` predates the minimums: its sampling is unknown, said as such.

Beyond whether timings are trusted, a record says how its timed and memory numbers were taken
(all in ``task_details``; absent in records that predate them):

- ``interleaving`` = ``{"interleaved", "with", "labels", "rounds", "order", "reason"}``: whether
  this cell's timed repeats alternated (A B C, C B A, ...) with those of the other cells a report
  compares it with (same model, task protocol and hardware; ``with``: their run ids, ``labels``:
  their method labels), or, with ``interleaved`` false, ``reason``: why it was measured alone.
- ``memory_protocol`` = ``{"isolation", "loaded", "clean", "runtime_mb", "leftover_mb",
  "tolerance_mb", "note"}``: where the peak memory was measured (``"fresh process"``: a process
  that held only this model; ``"same process"``: beside what else the process held, which is
  ``leftover_mb`` and is left out of the peak), and whether the reset before it was verified
  (``clean``: what the process held beyond its runtime and this model was within ``tolerance_mb``).
- ``roofline``: the inputs of each roofline fraction; ``denominators`` (``decode``: the
  bandwidth in bytes/s with ``method`` and ``working_set_bytes``; ``prefill``: the FLOP/s of
  ``dtype`` with ``method``) and ``errors``: fractions above 1, which are measurement errors
  (a limit measured too low) and are not stored as metrics.
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


def task_is_timed(record: dict[str, Any]) -> bool | None:
    """Whether the record's task measured alone on the machine (a timed task); None if unknown."""
    info = record.get("task_info")
    if isinstance(info, dict) and isinstance(info.get("timed"), bool):
        return info["timed"]
    from slimbench.registry import TASKS  # older records: what this installation knows of the task

    name = (record.get("task") or {}).get("name")
    return TASKS.get(name).timed if isinstance(name, str) and name in TASKS else None


def timing_trust(record: dict[str, Any]) -> Trust:
    """How far the timed metrics of ``record`` can be trusted.

    A throughput an untimed task reports on the side (perplexity's ``eval_tokens_per_s``) was
    measured while other cells could share the machine: it counts as noisy, saying so.
    """
    details = record.get("task_details") or {}
    noisy = bool(details.get("noisy"))
    reasons = [str(r) for r in details.get("noise_reasons") or []]
    if "noisy" not in details and task_is_timed(record) is False:
        noisy = True
        reasons.append("measured by an untimed task, which shares the machine with other cells: not a controlled "
                       "timing")
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


def interleaving(record: dict[str, Any]) -> tuple[bool | None, str]:
    """Whether the record's timed repeats were interleaved with its peers', and a short text.

    None: the record does not say (older records, untimed tasks).
    """
    info = (record.get("task_details") or {}).get("interleaving")
    if not isinstance(info, dict):
        return None, ""
    if info.get("interleaved"):
        labels = [str(x) for x in info.get("labels") or []]
        peers = ", ".join(labels) if labels else f"{len(info.get('with') or [])} other cells"
        return True, f"interleaved with {peers} ({info.get('rounds')} rounds, {info.get('order')})"
    return False, f"measured alone: {info.get('reason') or 'no reason recorded'}"


def roofline_denominator(record: dict[str, Any], metric: str) -> str:
    """The limit a roofline fraction was divided by, in words ('' when the record does not say).

    ``metric``: ``decode_roofline_fraction`` or ``prefill_roofline_fraction``.
    """
    roof = (record.get("task_details") or {}).get("roofline") or {}
    den = (roof.get("denominators") or {}).get(metric.split("_", 1)[0])
    if not isinstance(den, dict):
        return ""
    if "bytes_per_s" in den:
        size = den.get("size_bytes") or den.get("working_set_bytes")  # the size it was measured at
        at = f" at {size / 2**20:.0f} MiB" if isinstance(size, int | float) else ""
        return f"of {den['bytes_per_s'] / 1e9:.1f} GB/s{at}"
    if "flops_per_s" in den:
        return f"of {den['flops_per_s'] / 1e9:.0f} GFLOP/s {den.get('dtype', '')}".rstrip()
    return ""


def roofline_errors(record: dict[str, Any]) -> list[str]:
    """Roofline fractions above 1 the task refused to report (each a sentence)."""
    roof = (record.get("task_details") or {}).get("roofline") or {}
    return [str(e) for e in roof.get("errors") or []]
