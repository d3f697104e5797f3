"""Load points from GuideLLM's report; the service-level objective, goodput and the highest rate meeting it.

Per load point (one GuideLLM benchmark: the synchronous run, a concurrency level, a constant or
Poisson rate, the throughput run), from the per-request records it keeps, over the requests
GuideLLM itself measures (those overlapping its measured window, which starts after its warm-up
requests):

- ``ttft_ms`` (request sent -> first token), ``itl_ms`` (per request: the mean gap between its
  tokens after the first, vLLM's TPOT, GuideLLM's inter-token latency), ``e2e_ms`` (request
  sent -> last byte): p50 / p90 / p99 over the load point's successful requests (numpy's
  default, linear interpolation);
- ``request_throughput`` (successful requests / the load point's duration) and
  ``output_tokens_per_s`` (their output tokens / duration); ``errored`` and ``error_rate``
  (requests the server failed, over all), ``incomplete`` (requests still running when the load
  point's time bound cut them off: not the server's failure, but not finished either);
- ``dispatch_delay_p90_ms``: how late the load generator sent requests against its own
  schedule (a generator that cannot keep up shows here, not as the server's latency).

The SLO (``SLO``): a load point meets it when, for each objective set, the ``percentile`` of that
metric over *all* its requests is within the bound, a request that failed counting as
infinitely slow (so errors break the SLO), and one cut off by the time bound counting with what
it reached (its first token, if it got one; never an end). Goodput is the rate of requests that met every
objective themselves (DistServe's definition). The highest rate meeting the SLO is the largest
``request_throughput`` among the load points that meet it: its resolution is the grid of
load points measured.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

QUANTILES = (50, 90, 99)


@dataclass(frozen=True)
class SLO:
    ttft_ms: float | None = 1000.0
    itl_ms: float | None = 100.0
    e2e_ms: float | None = None
    percentile: float = 90.0

    def objectives(self) -> dict[str, float]:
        return {k: v for k, v in (("ttft_ms", self.ttft_ms), ("itl_ms", self.itl_ms), ("e2e_ms", self.e2e_ms))
                if v is not None}

    def words(self) -> str:
        names = {"ttft_ms": "TTFT", "itl_ms": "ITL", "e2e_ms": "E2E"}
        p = f"p{self.percentile:g}"
        return ", ".join(f"{names[k]} {p} ≤ {v:g} ms" for k, v in self.objectives().items())


@dataclass
class LoadPoint:
    strategy: str  # synchronous, concurrent, constant, poisson, throughput
    target: float | None  # the rate (req/s) or the number of streams asked for; None: as fast as it goes
    start: float
    end: float
    duration_s: float
    successful: int
    errored: int
    incomplete: int
    request_throughput: float
    output_tokens_per_s: float
    latency: dict[str, dict[str, float]]  # metric -> {p50, p90, p99, mean}
    dispatch_delay_p90_ms: float | None
    samples: dict[str, list[float]] = field(default_factory=dict)  # per successful request
    cut_off: dict[str, list[float]] = field(default_factory=dict)  # per incomplete request, what it reached
    errors: list[str] = field(default_factory=list)  # the first few error messages
    reported: dict[str, Any] = field(default_factory=dict)  # GuideLLM's own summary, for reference
    slo: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.successful + self.errored + self.incomplete

    @property
    def error_rate(self) -> float:
        return self.errored / self.total if self.total else 1.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["error_rate"] = self.error_rate
        return out


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values, dtype=float)
    return {**{f"p{q}": float(np.percentile(a, q)) for q in QUANTILES}, "mean": float(a.mean())}


def _target(strategy: dict[str, Any]) -> float | None:
    for key in ("rate", "streams"):
        if strategy.get(key) is not None:
            return float(strategy[key])
    return None


def _time(r: dict[str, Any], key: str, timing: str) -> float | None:
    t = r.get(key)
    if t is None:
        t = ((r.get("info") or {}).get("timings") or {}).get(timing)
    return float(t) if t is not None else None


def _reported(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key in ("time_to_first_token_ms", "inter_token_latency_ms", "request_latency", "requests_per_second",
                "output_tokens_per_second"):
        s = ((metrics.get(key) or {}).get("successful") or {})
        p = s.get("percentiles") or {}
        out[key] = {"mean": s.get("mean"), "p50": p.get("p50"), "p90": p.get("p90"), "p99": p.get("p99")}
    out["request_totals"] = metrics.get("request_totals")
    return out


def load_point(bench: dict[str, Any]) -> LoadPoint:
    """One GuideLLM benchmark (an entry of its JSON report's ``benchmarks``) as a LoadPoint."""
    reqs = bench.get("requests") or {}
    sched = bench.get("scheduler_metrics") or {}
    start = float(sched.get("measure_start_time") or bench["start_time"])
    end = float(sched.get("measure_end_time") or bench["end_time"])

    def measured(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # GuideLLM keeps its warm-up (and cool-down) requests in the list; its own metrics count
        # the requests that overlap its measured window (ended after it began, began before it
        # ended): the same ones here
        out = []
        for r in rs:
            began, ended = _time(r, "request_start_time", "request_start"), _time(r, "request_end_time", "request_end")
            outside = (ended is not None and ended < start) or (began if began is not None else ended or start) > end
            if not outside:
                out.append(r)
        return out

    ok = measured(reqs.get("successful") or [])
    errored, incomplete = measured(reqs.get("errored") or []), measured(reqs.get("incomplete") or [])
    duration = end - start
    samples = {
        "ttft_ms": [float(r["time_to_first_token_ms"]) for r in ok if r.get("time_to_first_token_ms") is not None],
        "itl_ms": [float(r["inter_token_latency_ms"]) for r in ok if r.get("inter_token_latency_ms") is not None],
        "e2e_ms": [1e3 * float(r["request_latency"]) for r in ok if r.get("request_latency") is not None],
        "output_tokens": [float(r.get("output_tokens") or 0) for r in ok],
        "prompt_tokens": [float(r.get("prompt_tokens") or 0) for r in ok],
    }
    delays = [1e3 * float(r["request_dispatch_delay"]) for r in ok if r.get("request_dispatch_delay") is not None]
    messages = []
    for r in errored:
        info = r.get("info") or {}
        messages.append(str(info.get("error") or info.get("status") or "error"))
    cut_off = {"ttft_ms": [float(r["time_to_first_token_ms"]) if r.get("time_to_first_token_ms") is not None
                           else math.inf for r in incomplete],
               "itl_ms": [float(r["inter_token_latency_ms"]) for r in incomplete
                          if r.get("inter_token_latency_ms") is not None],
               "e2e_ms": [math.inf] * len(incomplete)}
    strategy = (bench.get("config") or {}).get("strategy") or {}
    return LoadPoint(
        strategy=str(strategy.get("type_", "?")),
        target=_target(strategy),
        start=start,
        end=end,
        duration_s=duration,
        successful=len(ok),
        errored=len(errored),
        incomplete=len(incomplete),
        request_throughput=len(ok) / duration if duration > 0 else 0.0,
        output_tokens_per_s=sum(samples["output_tokens"]) / duration if duration > 0 else 0.0,
        latency={k: percentiles(samples[k]) for k in ("ttft_ms", "itl_ms", "e2e_ms")},
        dispatch_delay_p90_ms=float(np.percentile(delays, 90)) if delays else None,
        samples=samples,
        cut_off=cut_off,
        errors=messages[:5],
        reported=_reported(bench.get("metrics") or {}),
    )


def load_points(report: dict[str, Any]) -> list[LoadPoint]:
    return [load_point(b) for b in report.get("benchmarks") or []]


def judge(point: LoadPoint, slo: SLO) -> dict[str, Any]:
    """Whether the load point meets the SLO, each objective's percentile, and its goodput."""
    out: dict[str, Any] = {"objectives": {}}
    met_all = point.total > 0
    for key, bound in slo.objectives().items():
        # a failed request misses every objective; one cut off by the time bound counts with the
        # first token it got (or none: infinite) and never finished (end-to-end: infinite)
        values = point.samples[key] + (point.cut_off.get(key) or []) + [math.inf] * point.errored
        value = float(np.percentile(values, slo.percentile, method="inverted_cdf")) if values else math.inf
        met = value <= bound
        out["objectives"][key] = {"bound": bound, f"p{slo.percentile:g}": value if math.isfinite(value) else None,
                                  "met": met}
        met_all = met_all and met
    # per request: did it meet every objective itself (goodput)
    n = point.successful
    conforming = 0
    if n and all(len(point.samples[k]) == n for k in slo.objectives()):
        conforming = sum(all(point.samples[k][i] <= b for k, b in slo.objectives().items()) for i in range(n))
    out["met"] = met_all
    out["conforming_requests"] = conforming
    out["goodput"] = conforming / point.duration_s if point.duration_s > 0 else 0.0
    return out


def summarize(points: list[LoadPoint], slo: SLO) -> dict[str, Any]:
    """The cell's headline numbers over its load points (``None`` where no point qualifies)."""
    for p in points:
        p.slo = judge(p, slo)
    meeting = [p for p in points if p.slo["met"]]
    best = max(meeting, key=lambda p: p.request_throughput, default=None)
    sync = next((p for p in points if p.strategy == "synchronous"), None)
    return {
        "max_rps_within_slo": best.request_throughput if best else 0.0,
        "max_rps_within_slo_point": (best.strategy, best.target) if best else None,
        "max_goodput_rps": max((p.slo["goodput"] for p in points), default=0.0),
        "max_request_throughput": max((p.request_throughput for p in points), default=0.0),
        "max_output_tokens_per_s": max((p.output_tokens_per_s for p in points), default=0.0),
        "sync": sync,
        "errors": sum(p.errored for p in points),
        "incomplete": sum(p.incomplete for p in points),
        "requests": sum(p.total for p in points),
    }


def cpu_between(timeline: list[tuple[float, float, float, float]], start: float, end: float) -> dict[str, float]:
    """Cores used by the server, the load generator and everything else between two times.

    ``timeline``: samples ``(time, server CPU s, generator CPU s, machine busy CPU s)``, cumulative;
    each is interpolated linearly at ``start`` and ``end``.
    """
    if len(timeline) < 2 or end <= start:
        return {}
    t = np.array([s[0] for s in timeline])

    def at(col: int, x: float) -> float:
        return float(np.interp(x, t, [s[col] for s in timeline]))

    wall = end - start
    server = (at(1, end) - at(1, start)) / wall
    generator = (at(2, end) - at(2, start)) / wall
    busy = (at(3, end) - at(3, start)) / wall
    return {"server_cores": server, "loadgen_cores": generator, "other_cores": max(0.0, busy - server - generator)}
