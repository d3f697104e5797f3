"""`serving` (version 2): the cell's model behind an OpenAI-compatible server, under load from GuideLLM.

Protocol ``guidellm-openai-completions``, version 2 (version 1 left the servers' prompt caches on):

1. **Server**: ``transformers`` (``transformers serve``'s app and handlers hosting the cell's
   compressed model in this process: any model SlimBench can load and compress),
   ``llama.cpp`` (llama.cpp's ``llama-server``, or llama-cpp-python's server, on the cell's GGUF)
   or ``vllm`` (vLLM's OpenAI server on the cell's exported folder, in its own environment);
   ``auto`` takes the cell's engine (slimbench.engines.serving.servers). It listens on
   127.0.0.1 at a free port, is warmed with ``warm_requests`` unmeasured requests, and is
   stopped after the cell whatever happens (slimbench.engines.serving.session). Every server
   runs with its cross-request prompt cache off (transformers' block sharing, llama-server's
   prompt cache and cache RAM, vLLM's prefix caching): each load point sends the workload's
   first requests again, and a cache would serve the later points' prefills from the earlier
   points' work.
2. **Workload**: ``dataset_requests`` requests cut from real text (``corpus``/``split``) with a
   seed: prompts of ``prompt_blocks`` consecutive text blocks (at most ``max_prompt_tokens``),
   each asking for exactly the length of the block that follows, clipped to
   ``[min_output_tokens, max_output_tokens]`` (slimbench.engines.serving.workload); greedy,
   ``ignore_eos``, streamed, ``/v1/completions``.
3. **Load** (GuideLLM 0.8.1, ``profile``): ``synchronous`` (one request at a time),
   ``concurrent`` (``streams``: a fixed number of users), ``constant`` / ``poisson``
   (``rates`` in requests/s, open loop), ``throughput`` (everything at once), or ``sweep``:
   synchronous, throughput, then ``sweep_points - 2`` rates evenly between the two
   (``sweep_rate_type``). Each load point runs until ``max_seconds`` or ``max_requests``; its
   first ``warmup_requests`` are not measured.
4. **Metrics** per load point (slimbench.engines.serving.analysis): TTFT, inter-token latency
   (per request, after the first token) and end-to-end latency p50/p90/p99, request and
   output-token throughput, errors, goodput; whether it meets the ``slo``. The cell's headline:
   ``max_rps_within_slo``, the highest request throughput among the load points that meet the
   SLO (a failed request counts as missing every objective).
5. **CPU accounting**: the server's CPU time and the load generator's (its processes,
   children included) are measured apart, overall and per load point, with the cores every
   other process took; ``server_cpus`` / ``loadgen_cpus`` pin them to separate cores. On a
   machine with few cores the generator competes with the server: its share is reported
   (``loadgen_cpu_share``) and a load point where it, or another process, took more than
   ``load_threshold`` cores marks the cell ``noisy``.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from slimbench.config import Config
from slimbench.engines.serving import analysis, loadgen, servers, session
from slimbench.engines.serving.workload import WorkloadSpec, build_rows, write_rows
from slimbench.measure import machine
from slimbench.task import Metric, Task, TaskResult

VERSION = "2"
PROTOCOL = "guidellm-openai-completions"
# A load point's p90 from fewer requests is its slowest request: below this many measured requests
# in any load point, the cell's timings are under-sampled (slimbench.measure.trust).
MIN_POINT_REQUESTS = 10


class SLOConfig(Config):
    ttft_ms: float | None = Field(1000.0, gt=0, description="time to first token bound (ms); null: none")
    itl_ms: float | None = Field(100.0, gt=0, description="inter-token latency bound (ms); null: none")
    e2e_ms: float | None = Field(None, gt=0, description="end-to-end latency bound (ms); null: none")
    percentile: float = Field(90.0, gt=0, lt=100, description="the percentile each bound applies to")

    @model_validator(mode="after")
    def _one(self) -> SLOConfig:
        if self.ttft_ms is None and self.itl_ms is None and self.e2e_ms is None:
            raise ValueError("an SLO needs at least one of ttft_ms, itl_ms, e2e_ms")
        return self

    def slo(self) -> analysis.SLO:
        return analysis.SLO(self.ttft_ms, self.itl_ms, self.e2e_ms, self.percentile)


class ServingConfig(Config):
    server: Literal["auto", "transformers", "llama.cpp", "vllm"] = Field("auto", description="which server")
    profile: Literal["sweep", "synchronous", "concurrent", "constant", "poisson", "throughput"] = Field(
        "sweep", description="load profile")
    rates: list[float] = Field([], description="constant/poisson: request rates (req/s)")
    streams: list[int] = Field([], description="concurrent: concurrent users, one point each")
    sweep_points: int = Field(6, ge=3, le=30, description="sweep: load points (synchronous, rates, throughput)")
    sweep_rate_type: Literal["constant", "poisson"] = Field("constant", description="sweep: how rates arrive")
    max_concurrency: int | None = Field(None, ge=1, description="cap on requests in flight (null: none)")
    max_seconds: float = Field(30.0, gt=0, le=3600, description="per load point: duration bound (s)")
    max_requests: int = Field(64, ge=4, le=100000, description="per load point: request bound")
    warmup_requests: int = Field(0, ge=0, description="per load point: first requests GuideLLM leaves out "
                                 "(it fails a point where fewer than this + 1 finish in max_seconds)")
    warm_requests: int = Field(2, ge=0, le=50, description="unmeasured requests before the run (server warm-up)")
    corpus: str = Field("shakespeare", description="where prompts come from")
    split: str = Field("test", description="corpus split")
    dataset_requests: int = Field(512, ge=8, le=100000, description="distinct requests drawn from the text")
    prompt_blocks: int = Field(4, ge=1, le=64, description="consecutive text blocks per prompt")
    max_prompt_tokens: int = Field(512, ge=8, le=131072, description="prompt length cap (tokens, keep the end)")
    min_output_tokens: int = Field(8, ge=2, description="output length floor (tokens)")
    max_output_tokens: int = Field(128, ge=2, le=32768, description="output length cap (tokens)")
    seed: int = Field(0, description="seed of the request draw and of Poisson arrivals")
    slo: SLOConfig = Field(SLOConfig(), description="service-level objective")
    continuous_batching: bool = Field(True, description="transformers: continuous batching (paged KV cache)")
    kv_tokens: int = Field(16384, ge=256, description="transformers with continuous batching: KV cache tokens")
    max_batch_tokens: int = Field(1024, ge=16, description="transformers with continuous batching: tokens per step")
    gguf_weights: Literal["auto", "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"] = Field(
        "auto", description="llama.cpp: GGUF type of the exported linear weights (auto: smallest exact, else F16)")
    llama_server: Literal["auto", "native", "python"] = Field(
        "auto", description="llama.cpp: its llama-server (native; auto if built) or llama-cpp-python's server")
    slots: int = Field(8, ge=1, le=256, description="llama.cpp's llama-server: parallel sequences (batched)")
    server_threads: int | None = Field(None, ge=1, description="llama.cpp / vLLM threads (null: the cell's)")
    server_cpus: list[int] = Field([], description="cores the server is pinned to ([]: any)")
    loadgen_cpus: list[int] = Field([], description="cores the load generator is pinned to")
    request_timeout_s: float = Field(120.0, gt=0, le=3600, description="per request timeout (s)")
    start_timeout_s: float = Field(300.0, gt=0, le=7200, description="server start + readiness bound (s)")
    load_threshold: float = Field(machine.DEFAULT_LOAD_THRESHOLD, ge=0,
                                  description="cores other processes may take during a load point before noisy")

    @model_validator(mode="after")
    def _profile_inputs(self) -> ServingConfig:
        if self.profile in ("constant", "poisson") and not self.rates:
            raise ValueError(f"profile {self.profile} needs rates (requests/s), e.g. rates: [0.5, 1, 2]")
        if self.profile == "concurrent" and not self.streams:
            raise ValueError("profile concurrent needs streams (concurrent users), e.g. streams: [1, 2, 4]")
        if any(r <= 0 for r in self.rates) or any(s < 1 for s in self.streams):
            raise ValueError("rates must be > 0 and streams >= 1")
        if self.min_output_tokens > self.max_output_tokens:
            raise ValueError("min_output_tokens must not exceed max_output_tokens")
        return self

    def profile_args(self) -> dict[str, Any]:
        cap = {"max_concurrency": self.max_concurrency} if self.max_concurrency else {}
        if self.profile == "sweep":
            return {"kind": "sweep", "sweep_size": self.sweep_points, "strategy_type": self.sweep_rate_type, **cap}
        if self.profile == "concurrent":
            return {"kind": "concurrent", "streams": list(self.streams)}
        if self.profile in ("constant", "poisson"):
            return {"kind": self.profile, "rate": list(self.rates), **cap}
        if self.profile == "throughput":
            return {"kind": "throughput", **cap}
        return {"kind": "synchronous"}

    def load_points(self) -> int:
        return {"sweep": self.sweep_points, "concurrent": len(self.streams), "constant": len(self.rates),
                "poisson": len(self.rates)}.get(self.profile, 1)

    def workload(self) -> WorkloadSpec:
        return WorkloadSpec(self.corpus, self.split, self.dataset_requests, self.prompt_blocks,
                            self.max_prompt_tokens, self.min_output_tokens, self.max_output_tokens, self.seed)


def _metrics(summary: dict[str, Any], m: session.Measurement, points: list[analysis.LoadPoint]) -> dict[str, Metric]:
    out = {
        "max_rps_within_slo": Metric(summary["max_rps_within_slo"], "requests/s", True),
        "max_goodput_rps": Metric(summary["max_goodput_rps"], "requests/s", True),
        "max_request_throughput": Metric(summary["max_request_throughput"], "requests/s", True),
        "max_output_tokens_per_s": Metric(summary["max_output_tokens_per_s"], "tokens/s", True),
        "error_rate": Metric(summary["errors"] / max(summary["requests"], 1), "fraction", False),
        "incomplete_rate": Metric(summary["incomplete"] / max(summary["requests"], 1), "fraction", False),
        "server_cpu_s": Metric(m.server_cpu_s, "s", False),
        "loadgen_cpu_s": Metric(m.loadgen_cpu_s, "s", False),
        "loadgen_cpu_share": Metric(m.loadgen_cpu_s / max(m.loadgen_cpu_s + m.server_cpu_s, 1e-9), "fraction", False),
    }
    # during the measured load points only (GuideLLM's start-up, imports and reports excluded)
    gen = sum(p.cpu.get("loadgen_cores", 0.0) * p.duration_s for p in points)
    srv = sum(p.cpu.get("server_cores", 0.0) * p.duration_s for p in points)
    if gen + srv > 0:
        out["loadgen_cpu_share_in_load"] = Metric(gen / (gen + srv), "fraction", False)
    sync = summary["sync"]
    if sync is not None:
        for key in ("ttft_ms", "itl_ms", "e2e_ms"):
            if sync.latency.get(key):
                out[f"sync_{key.removesuffix('_ms')}_p50_ms"] = Metric(sync.latency[key]["p50"], "ms", False)
    cores = [p.cpu.get("loadgen_cores") for p in points if p.cpu]
    if cores:
        out["loadgen_cores_max"] = Metric(max(cores), "cores", False)
    return out


def _noise(points: list[analysis.LoadPoint], cfg: ServingConfig) -> list[str]:
    reasons = []
    for p in points:
        where = f"{p.strategy}" + (f"@{p.target:g}" if p.target is not None else "")
        if p.cpu.get("other_cores", 0.0) > cfg.load_threshold:
            reasons.append(f"{where}: other processes took {p.cpu['other_cores']:.2f} cores")
        if not cfg.loadgen_cpus and p.cpu.get("loadgen_cores", 0.0) > cfg.load_threshold:
            reasons.append(f"{where}: the load generator took {p.cpu['loadgen_cores']:.2f} cores beside the server")
    return reasons


def _timing_protocol(points: list[analysis.LoadPoint]) -> dict[str, Any]:
    """What slimbench.measure.trust reads: the fewest requests any load point measured."""
    fewest = min(p.total for p in points)
    return {"repeats": fewest, "min_repeats": MIN_POINT_REQUESTS, "timed_seconds": sum(p.duration_s for p in points),
            "min_seconds": 0.0, "repeat": "a measured request (the fewest of any load point)",
            "sufficient": fewest >= MIN_POINT_REQUESTS}


def evaluate(lm, cfg: ServingConfig, ctx) -> TaskResult:
    choice = servers.choose(lm, cfg)  # refuses (ValueError) before any work, saying why
    flavour = servers.llama_flavour(cfg.llama_server) if choice == "llama.cpp" else None
    if loadgen.unavailable():
        loadgen.ensure_env(log=lambda s: print(s, flush=True))
    slo = cfg.slo.slo()
    with tempfile.TemporaryDirectory(prefix="slimbench-serving-") as tmp:
        work = Path(tmp)
        tokenizer_dir = work / "tokenizer"
        lm.tokenizer.save_pretrained(tokenizer_dir)
        rows = build_rows(lm.tokenizer, cfg.workload())
        workload = write_rows(rows, work / "requests.jsonl")
        server = servers.build(choice, lm, cfg, ctx, work)
        per_point_s = cfg.max_seconds + cfg.request_timeout_s
        plan = session.Plan(
            workdir=work,
            scenario=loadgen.scenario(
                target=server.url, model=server.model_name, tokenizer=tokenizer_dir, data=work / "requests.jsonl",
                output=work / "report.json", profile=cfg.profile_args(), max_seconds=cfg.max_seconds,
                max_requests=cfg.max_requests, warmup_requests=cfg.warmup_requests,
                request_timeout_s=cfg.request_timeout_s, seed=cfg.seed,
                extras=servers.request_extras(choice, lm, flavour), health_route=servers.health_route(choice, flavour)),
            warm_requests=[{"prompt": r["prompt"], "max_tokens": r["output_tokens_count"]}
                           for r in rows[: cfg.warm_requests]],
            start_timeout_s=cfg.start_timeout_s,
            run_timeout_s=120.0 + cfg.load_points() * per_point_s,
            request_timeout_s=cfg.request_timeout_s,
            loadgen_cpus=tuple(cfg.loadgen_cpus),
        )
        load_before = machine.snapshot()
        m = session.measure(server, plan)
        load_after = machine.snapshot()
    points = analysis.load_points(m.report)
    if not points:
        raise RuntimeError("the load generator reported no load point")
    for p in points:
        p.cpu = analysis.cpu_between(m.timeline, p.start, p.end)
    summary = analysis.summarize(points, slo)
    if all(p.successful == 0 for p in points):
        raise RuntimeError(f"every request failed; first errors: {points[0].errors}; server log:\n{m.log_tail}")
    reasons = _noise(points, cfg)
    details = {
        "protocol": PROTOCOL,
        "server": {"name": choice, "kind": server.kind, **servers.describe(choice, flavour),
                   "settings": m.server_settings},
        "loadgen": {"name": "guidellm", "version": loadgen.GUIDELLM_VERSION, "profile": cfg.profile_args()},
        "slo": {"words": slo.words(), **cfg.slo.to_dict()},
        "max_rps_within_slo_point": summary["max_rps_within_slo_point"],
        "workload": workload,
        "load_points": [p.to_dict() for p in points],
        "cpu": {"server_cpu_s": m.server_cpu_s, "loadgen_cpu_s": m.loadgen_cpu_s, "wall_s": m.wall_s,
                "machine_busy_cores": m.machine_busy_cores, "server_cpus": cfg.server_cpus,
                "loadgen_cpus": cfg.loadgen_cpus, "cpu_count": len(machine.affinity())},
        "warmup_s": m.warmup_s,
        "noisy": bool(reasons),
        "noise_reasons": reasons,
        "timing_protocol": _timing_protocol(points),
        "load_before": load_before,
        "load_after": load_after,
        "execution": (ctx.method_report or {}).get("execution"),
    }
    if (ctx.method_report or {}).get("execution") == "simulated":
        details["note"] = "simulated compression: the server runs the dense model's arithmetic; no speed is claimed"
    metrics = _metrics(summary, m, points)
    bad = [k for k, v in metrics.items() if not math.isfinite(v.value)]
    if bad:
        raise RuntimeError(f"non-finite serving metrics: {bad}")
    return TaskResult(metrics=metrics, details=details)


TASK = Task(
    name="serving",
    version=VERSION,
    description="an OpenAI-compatible server (transformers, llama.cpp, vLLM) under GuideLLM load: TTFT, ITL, "
    "E2E p50/p90/p99 per load point, throughput, goodput, max request rate within an SLO, server vs "
    "load-generator CPU",
    config=ServingConfig,
    evaluate=evaluate,
    timed=True,  # alone on the machine: another cell would take the server's cores
)
