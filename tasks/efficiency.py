"""`efficiency` (version 4): latency, throughput and memory of inference in one deployment regime,
against the machine's own limits.

The regime is three parameters a suite can grid over: ``prompt_len``, ``new_tokens``,
``batch_size`` (decode latency at batch 1, throughput at batch 8, time to first token at a
long prompt: conclusions flip between them).

Each timed repeat (after ``warmup`` untimed ones) measures, the device synchronised before
every clock read:

- ``prefill_ms``: one ``lm.prefill`` of the prompt (the cache sized for prompt + new tokens).
- one ``lm.generate(ids, new_tokens, on_tokens)``, timestamping each arrival of tokens (one at
  a time for plain decoding, bursts for speculative decoding: every engine is measured the
  same way): ``ttft_ms`` (call to first token, prefill included), ``decode_tokens_per_s``
  (tokens after the first, over the time from the first to the last), ``e2e_tokens_per_s``
  (all tokens of every row over the whole call).
- ``itl_p50_ms`` / ``itl_p90_ms`` / ``itl_p99_ms``: inter-token latency over the generated
  tokens of all repeats, as a streaming user sees it: each token after the first gets the gap
  since the previous arrival; the other tokens of a burst arrive with it (gap 0).

The value of each metric is the median over repeats; raw samples and spread are kept.

Sampling (new in version 3, like MLPerf's minimum query count and duration): at least
``repeats`` timed repeats, continued (up to ``max_repeats``) until the timed repeats last
``MIN_SECONDS`` in all. A result is ``sufficient`` with at least ``MIN_REPEATS`` repeats over at
least ``MIN_SECONDS``; ``details.timing_protocol`` says so (slimbench.measure.trust).

Memory, in one more untimed generation (a sampler thread would steal cycles from the clock):
``peak_memory_mb`` (process RSS on CPU, max allocated on CUDA), split into
``memory_runtime_mb`` (the process before any model: Python, torch, libraries),
``memory_weights_mb`` (the model's tensors), ``memory_kv_mb`` (the KV cache's tensors at the
end: prompt + new tokens) and ``memory_other_mb`` (the rest: activations, allocator). The
harness measures it in a fresh process that holds only this model where it can
(slimbench.measure.memory says how, ``details.memory_protocol`` says where). A model an engine
runs in a process of its own (llama.cpp, vLLM) is read in that process (new in version 4; version
3 read the cell's own process, which holds neither the engine's weights nor its cache): its
resident set's peak during the generation (Linux's peak reset before it), weights as the engine
holds them (the method report's bytes); no runtime or KV split. Version 4 also reads the
runtime of a sweep's process before its first model load (slimbench.measure.memory).
``kv_cache_bytes_logical`` / ``kv_cache_bytes_physical``: what the cache stands for (every
position, in its float dtype) vs what it really holds (slimbench.measure.roofline.kv_cache_bytes).

Roofline (``roofline: true``): the machine's bandwidth, measured at this model's decode working
set (weights + KV read per step), and its FLOP/s (slimbench.measure.limits) give
``decode_roofline_fraction`` and ``prefill_roofline_fraction`` (formulas in
slimbench.measure.roofline); ``details.roofline.denominators`` holds each denominator. A
fraction above 1 is a measurement error (a limit measured too low), kept in
``details.roofline.errors`` and not reported as a metric.

Hygiene: before and after the timed block the load average, CPU affinity and thread counts are
recorded; during every repeat, the CPU time other processes took on our cores. The cell is
``noisy`` (with ``noise_reasons``) when the coefficient of variation of the decode or prefill
samples exceeds ``cv_threshold``, when other processes took more than ``load_threshold`` cores,
when torch.compile compiled during the timed repeats, or when the limits were measured under
load or disagreed with themselves.

The repeats of several models can be interleaved in one process (A B C, C B A, ...: the sweep
does so for cells of one model, regime and hardware, and so does ``accel-bench``):
:class:`EfficiencyRun` is the task's session (``warm`` / ``sample`` / ``needs_more`` /
``memory`` / ``result``).
"""

from __future__ import annotations

import itertools
import statistics
import time
from typing import Any

import numpy as np
import torch
from pydantic import Field

from slimbench.config import Config
from slimbench.measure import limits as machine_limits
from slimbench.measure import machine, memory, roofline
from slimbench.measure.clocks import PeakMemory, summarize, timed
from slimbench.modeling import memory_bytes
from slimbench.registry import CORPORA
from slimbench.task import Metric, Task, TaskResult

VERSION = "4"
# The protocol's minimum before a timing may be read as a result (version 3).
MIN_REPEATS = 5
MIN_SECONDS = 1.0


class EfficiencyConfig(Config):
    prompt_len: int = Field(128, ge=1, le=32768, description="prompt tokens (regime)")
    new_tokens: int = Field(32, ge=2, le=4096, description="generated tokens per sequence (regime)")
    batch_size: int = Field(1, ge=1, le=512, description="sequences per batch (regime)")
    repeats: int = Field(5, ge=1, le=1000, description=f"timed repetitions, at least (a result needs {MIN_REPEATS})")
    max_repeats: int = Field(
        100, ge=1, le=10000,
        description=f"repetitions go on until the timed ones last {MIN_SECONDS:g} s in all, up to this many")
    warmup: int = Field(1, ge=0, le=100, description="untimed warm-up repetitions")
    corpus: str = Field("shakespeare", description="where the prompt text comes from")
    split: str = Field("test", description="corpus split for the prompt")
    cv_threshold: float = Field(0.1, gt=0, description="coefficient of variation above which a cell is noisy")
    load_threshold: float = Field(
        machine.DEFAULT_LOAD_THRESHOLD, ge=0, description="cores of CPU time other processes may take before noisy"
    )
    roofline: bool = Field(True, description="relate results to the machine's measured bandwidth and FLOP/s")


def prompt_ids(lm, cfg: EfficiencyConfig) -> torch.Tensor:
    text = "\n\n".join(CORPORA.get(cfg.corpus).texts(cfg.split))
    ids = lm.encode(text[: cfg.prompt_len * 20])[: cfg.prompt_len]
    if len(ids) < cfg.prompt_len:
        raise ValueError(f"corpus split gives only {len(ids)} prompt tokens (< {cfg.prompt_len})")
    return torch.tensor([ids] * cfg.batch_size)


def compile_counter() -> int:
    """Graphs torch.compile has compiled in this process (0 if dynamo was never used)."""
    import sys

    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def cv(samples: list[float]) -> float | None:
    if len(samples) < 2 or statistics.mean(samples) == 0:
        return None
    return statistics.stdev(samples) / abs(statistics.mean(samples))


class CacheCapture:
    """Keep the last KV cache ``lm.prefill`` / ``lm.decode`` returned during a block.

    Instance attributes shadow the methods for the block (generators call them too), so the cache
    of whatever produced the tokens is seen without reaching into the model.
    """

    def __init__(self, lm) -> None:
        self.lm, self.cache = lm, None

    def __enter__(self) -> CacheCapture:
        prefill, decode = self.lm.prefill, self.lm.decode

        def cap_prefill(*a, **kw):
            logits, self.cache = prefill(*a, **kw)
            return logits, self.cache

        def cap_decode(*a, **kw):
            logits, self.cache = decode(*a, **kw)
            return logits, self.cache

        self.lm.prefill, self.lm.decode = cap_prefill, cap_decode
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.lm.prefill, self.lm.decode  # the class methods are visible again


class EfficiencyRun:
    """One model's measurement in one regime, in steps so runs of several models can interleave.

    The harness may set ``interleaving`` (how the repeats alternated with other runs') and
    ``limits_memo`` (a dict shared by the runs of one interleaved block, so the limits are
    measured once per working set) before :meth:`result`.
    """

    def __init__(self, lm, cfg: EfficiencyConfig, ctx) -> None:
        self.lm, self.cfg, self.ctx = lm, cfg, ctx
        self.ids = prompt_ids(lm, cfg)
        self.capacity = cfg.prompt_len + cfg.new_tokens
        self.prefill: list[float] = []
        self.ttft: list[float] = []
        self.decode: list[float] = []
        self.e2e: list[float] = []
        self.itl: list[float] = []
        self.other_cores: list[float] = []
        self.timed_seconds = 0.0
        self.load_before: dict[str, Any] | None = None
        self.load_after: dict[str, Any] | None = None
        self.compiles_during_timed = 0
        self.interleaving: dict[str, Any] | None = None
        self.limits_memo: dict[Any, dict[str, Any]] | None = None
        self.warmup_cost: dict[str, Any] = {}

    # -- steps ---------------------------------------------------------------------------------
    def warm(self) -> None:
        """Untimed repeats; what they cost (compilation of this regime's shapes included) is kept."""
        graphs, t0 = compile_counter(), time.perf_counter()
        for _ in range(self.cfg.warmup):
            self.lm.prefill(self.ids, capacity=self.capacity)
            self.lm.generate(self.ids, self.cfg.new_tokens)
        self.lm.synchronize()
        self.warmup_cost = {"seconds": time.perf_counter() - t0, "graphs_compiled": compile_counter() - graphs}

    def _generate_timed(self) -> list[tuple[float, int]]:
        lm, stamps = self.lm, []

        def on_tokens(k: int) -> None:
            lm.synchronize()
            stamps.append((time.perf_counter(), k))

        lm.synchronize()
        t0 = time.perf_counter()
        lm.generate(self.ids, self.cfg.new_tokens, on_tokens)
        lm.synchronize()
        got = sum(k for _, k in stamps)
        if got != self.cfg.new_tokens:
            raise RuntimeError(f"generate reported {got} tokens through on_tokens, expected {self.cfg.new_tokens}")
        return [(t0, 0), *stamps]

    def sample(self) -> None:
        """One timed repeat: a prefill, then a timestamped generation."""
        if self.load_before is None:
            self.load_before = machine.snapshot()
        compiles = compile_counter()
        b, n = self.cfg.batch_size, self.cfg.new_tokens
        with machine.Contention() as c:
            prefill = lambda: self.lm.prefill(self.ids, capacity=self.capacity)
            self.prefill.append(timed(prefill, self.lm.synchronize) * 1e3)
            stamps = self._generate_timed()
        self.other_cores.append(c.other_cores)
        self.timed_seconds += c.wall
        self.compiles_during_timed += compile_counter() - compiles
        t0, (t_first, k_first), t_last = stamps[0][0], stamps[1], stamps[-1][0]
        self.ttft.append((t_first - t0) * 1e3)
        if n - k_first > 0 and t_last > t_first:
            self.decode.append(b * (n - k_first) / (t_last - t_first))
        self.e2e.append(b * n / (t_last - t0))
        for (t_prev, _), (t, k) in itertools.pairwise(stamps[1:]):
            self.itl += [(t - t_prev) * 1e3] + [0.0] * (k - 1)
        self.load_after = machine.snapshot()

    def needs_more(self) -> bool:
        """Whether the protocol asks for another timed repeat (``repeats``, then ``MIN_SECONDS`` in all)."""
        n = len(self.prefill)
        if n < self.cfg.repeats:
            return True
        return self.timed_seconds < MIN_SECONDS and n < max(self.cfg.max_repeats, self.cfg.repeats)

    def timing_protocol(self) -> dict[str, Any]:
        n = len(self.prefill)
        return {"repeats": n, "min_repeats": MIN_REPEATS, "timed_seconds": round(self.timed_seconds, 4),
                "min_seconds": MIN_SECONDS, "sufficient": n >= MIN_REPEATS and self.timed_seconds >= MIN_SECONDS}

    # -- results -------------------------------------------------------------------------------
    def memory(self) -> dict[str, Any]:
        """Peak memory and KV cache bytes of one untimed generation, read in this process (or in the
        engine's, for a model an engine runs in a process of its own)."""
        proc = getattr(self.lm.model, "proc", None)
        if getattr(proc, "pid", None):
            return self._engine_memory(proc.pid)
        with CacheCapture(self.lm) as cap, PeakMemory(self.lm.device) as mem:
            self.lm.generate(self.ids, self.cfg.new_tokens)
        kv = roofline.kv_cache_bytes(cap.cache) if cap.cache is not None else None
        try:
            weights = memory_bytes(self.lm.model)
        except (AttributeError, RuntimeError, TypeError):  # a model that is not a torch module (an engine)
            weights = 0
        # an engine in this process (OpenVINO, ONNX Runtime) holds its weights outside torch tensors
        weights = weights or self.ctx.method_report.get("memory_bytes")
        return {"peak": mem.peak_bytes, "start": mem.start_bytes, "kind": mem.kind, "weights": weights, "kv": kv,
                "runtime": memory.runtime_rss(), "isolation": "same process", "loaded": None}

    def _engine_memory(self, pid: int) -> dict[str, Any]:
        """The engine process' resident set around one untimed generation: this process holds
        neither its weights nor its cache (llama.cpp, vLLM)."""
        from slimbench.engines.engine_process import peak_rss_bytes, reset_peak_rss

        reset = reset_peak_rss(pid)
        covers = "this generation" if reset else "the engine process' lifetime (its peak could not be reset)"
        start = peak_rss_bytes(pid)["rss_bytes"]
        self.lm.generate(self.ids, self.cfg.new_tokens)
        peak = peak_rss_bytes(pid)["peak_rss_bytes"]
        return {"peak": peak, "start": start, "kind": "engine_process_rss",
                "weights": self.ctx.method_report.get("memory_bytes"), "kv": None, "runtime": None,
                "isolation": "engine process", "loaded": None,
                "peak_covers": covers}

    def noise(self, limits: dict[str, Any] | None) -> list[str]:
        reasons = []
        for name, samples in (("decode_tokens_per_s", self.decode), ("prefill_ms", self.prefill)):
            v = cv(samples)
            if v is not None and v > self.cfg.cv_threshold:
                reasons.append(f"{name}: coefficient of variation {v:.3f} > {self.cfg.cv_threshold}")
        busiest = max(self.other_cores, default=0.0)
        if busiest > self.cfg.load_threshold:
            reasons.append(
                f"other processes took {busiest:.2f} cores during a timed repeat (> {self.cfg.load_threshold})"
            )
        if self.compiles_during_timed:
            reasons.append(f"torch.compile compiled {self.compiles_during_timed} graph(s) during the timed repeats")
        if limits is not None:
            reasons += machine_limits.problems(limits)
        return reasons

    def limits(self, working_set: int | None) -> dict[str, Any]:
        """The machine's limits at ``working_set`` bytes (shared through ``limits_memo`` when set)."""
        size = machine_limits.working_set_size(working_set, self.lm.device)
        key = (torch.get_num_threads(), str(self.lm.device), size)
        if self.limits_memo is not None and key in self.limits_memo:
            return self.limits_memo[key]
        lim = machine_limits.machine_limits(torch.get_num_threads(), self.lm.device, working_set=working_set)
        if self.limits_memo is not None:
            self.limits_memo[key] = lim
        return lim

    def result(self, memory_reading: dict[str, Any] | None = None) -> TaskResult:
        """Metrics and details; ``memory_reading``: taken elsewhere (a fresh process), else read here now."""
        cfg, rep = self.cfg, self.ctx.method_report
        mem = memory_reading or self.memory()
        metrics = {
            "prefill_ms": self._metric(self.prefill, "ms", False),
            "ttft_ms": self._metric(self.ttft, "ms", False),
            "e2e_tokens_per_s": self._metric(self.e2e, "tokens/s", True),
        }
        if self.decode:  # empty only if a generator delivered every token in its first burst
            metrics["decode_tokens_per_s"] = self._metric(self.decode, "tokens/s", True)
        if self.itl:
            for q in (50, 90, 99):
                metrics[f"itl_p{q}_ms"] = Metric(float(np.percentile(self.itl, q)), "ms", False)
        memory_protocol = self._memory_metrics(mem, metrics)
        roof, limits = self._roofline(metrics, mem)
        for key, unit in (("parameters", "count"), ("memory_bytes", "bytes"), ("stored_bytes", "bytes"),
                          ("effective_bits", "bits/weight")):
            if rep.get(key) is not None:
                metrics[key] = Metric(float(rep[key]), unit, False)
        reasons = self.noise(limits)
        details = {
            "regime": {"prompt_len": cfg.prompt_len, "new_tokens": cfg.new_tokens, "batch_size": cfg.batch_size},
            "noisy": bool(reasons),
            "noise_reasons": reasons,
            "timing_protocol": self.timing_protocol(),
            "interleaving": self.interleaving or {
                "interleaved": False, "with": [], "labels": [], "rounds": len(self.prefill), "order": None,
                "reason": "measured on its own (the task run by itself, not by a sweep that interleaves)"},
            "threads": {"torch_threads": torch.get_num_threads(), "setting": self.ctx.hardware.threads,
                        **({"choice": machine.last_thread_choice()} if machine.last_thread_choice() else {})},
            "load_before": self.load_before,
            "load_after": self.load_after,
            "other_cores_per_repeat": [round(x, 3) for x in self.other_cores],
            "warmup": self.warmup_cost,
            "itl_samples_ms": self.itl,
            "memory_kind": mem["kind"],
            "memory_before_mb": mem["start"] / 2**20,
            "memory_protocol": memory_protocol,
            "kv_cache": mem["kv"],
            "execution": rep.get("execution"),
            "machine_limits": machine_limits.limits_summary(limits) if limits else None,
            "roofline": roof,
        }
        return TaskResult(metrics=metrics, details=details)

    @staticmethod
    def _metric(samples: list[float], unit: str, higher: bool) -> Metric:
        s = summarize(samples)
        return Metric(s["median"], unit, higher, samples=samples, spread={**s, "cv": cv(samples) or 0.0})

    @staticmethod
    def _memory_metrics(mem: dict[str, Any], metrics: dict[str, Metric]) -> dict[str, Any]:
        """Peak and its split into ``metrics``; returns the memory protocol for the details."""
        parts, proto = memory.split(mem)
        metrics["peak_memory_mb"] = Metric(parts["peak"] / 2**20, "MiB", False)
        kv = mem["kv"]
        if "runtime" in parts:
            metrics["memory_runtime_mb"] = Metric(parts["runtime"] / 2**20, "MiB", False)
        if mem["weights"] is not None:
            metrics["memory_weights_mb"] = Metric(parts["weights"] / 2**20, "MiB", False)
        if kv is not None:
            metrics["memory_kv_mb"] = Metric(kv["physical"] / 2**20, "MiB", False)
            metrics["kv_cache_bytes_logical"] = Metric(float(kv["logical"]), "bytes", False)
            metrics["kv_cache_bytes_physical"] = Metric(float(kv["physical"]), "bytes", False)
        if mem["weights"] is not None and kv is not None:
            metrics["memory_other_mb"] = Metric(parts["other"] / 2**20, "MiB", False)
        return proto

    def _weights_read(self, out: dict[str, Any]) -> int | None:
        try:
            weights = roofline.weight_bytes_read_per_step(self.lm.model)
        except (AttributeError, RuntimeError, TypeError):
            weights = None
        if not weights:  # an engine whose weights live elsewhere (worker processes, ONNX Runtime)
            out["roofline_skipped"] = f"no weights of {type(self.lm.model).__name__} in this process to count"
            return None
        if getattr(self.lm, "generator", None) is not None:
            # Speculative decoding: one verify pass reads the weights once for several accepted
            # tokens, and a draft model reads its own: bytes per token are not the weights' bytes.
            out["roofline_skipped"] = "a generator drives decoding (speculative): bytes per token are not the weights'"
            return None
        return weights

    def _roofline(self, metrics: dict[str, Metric], mem: dict[str, Any]) -> tuple[dict, dict | None]:
        """Both roofline fractions (added to ``metrics`` unless above 1), their inputs and denominators."""
        cfg = self.cfg
        out: dict[str, Any] = {"denominators": {}, "errors": []}
        weights = self._weights_read(out)
        kv = mem["kv"]
        kv_read = roofline.kv_read_per_step(kv, cfg.prompt_len, cfg.new_tokens) if kv else 0.0
        working_set = int(weights + kv_read) if weights is not None else None
        limits = self.limits(working_set) if cfg.roofline else None
        if weights is not None and self.decode:
            rate = metrics["decode_tokens_per_s"].value
            out["weight_bytes_read_per_step"] = weights
            out["kv_bytes_read_per_step"] = kv_read
            metrics["decode_bandwidth_gbs"] = Metric((weights + kv_read) * rate / cfg.batch_size / 1e9, "GB/s", True)
            if limits is not None:
                bw = limits["bandwidth"]
                out["bandwidth_bytes_per_s"] = bw["bytes_per_s"]
                out["decode_tokens_per_s_at_roofline"] = bw["bytes_per_s"] / (weights + kv_read) * cfg.batch_size
                out["denominators"]["decode"] = {"bytes_per_s": bw["bytes_per_s"], "method": bw["method"],
                                                 "working_set_bytes": working_set, "size_bytes": bw.get("size_bytes")}
                frac = roofline.decode_roofline_fraction(weights, kv_read, rate, cfg.batch_size, bw["bytes_per_s"])
                self._fraction(metrics, out, "decode_roofline_fraction", frac,
                               f"{bw['bytes_per_s'] / 1e9:.1f} GB/s at {bw.get('size_bytes', 0) / 2**20:.0f} MiB")
        try:
            flops = roofline.prefill_flops(self.lm.model, cfg.batch_size, cfg.prompt_len)
            dtype = roofline.compute_dtype(self.lm.model)
        except (AttributeError, RuntimeError, TypeError):
            flops, dtype = None, None
        if flops:
            out.update(prefill_flops=flops, compute_dtype=dtype)
            limit = (limits or {}).get("flops", {}).get(dtype, {})
            if limit.get("flops_per_s"):
                out["attainable_flops_per_s"] = limit["flops_per_s"]
                out["denominators"]["prefill"] = {"flops_per_s": limit["flops_per_s"], "dtype": dtype,
                                                  "method": limit.get("method")}
                seconds = metrics["prefill_ms"].value / 1e3
                frac = roofline.prefill_roofline_fraction(flops, seconds, limit["flops_per_s"])
                self._fraction(metrics, out, "prefill_roofline_fraction", frac,
                               f"{limit['flops_per_s'] / 1e9:.0f} GFLOP/s {dtype}")
        return out, limits

    @staticmethod
    def _fraction(metrics: dict[str, Metric], out: dict[str, Any], name: str, value: float, denominator: str) -> None:
        """A fraction of at most 1 is a result; above 1 the limit was measured too low: an error, said so."""
        out[f"{name}_value"] = value
        if value <= 1.0:
            metrics[name] = Metric(value, "fraction", True)
            return
        out["errors"].append(
            f"{name} came out at {value:.0%} of {denominator}: above the limit, so the limit was measured too low "
            "(under load, or by kernels slower than the model's); a measurement error, not a result"
        )


def evaluate(lm, cfg: EfficiencyConfig, ctx) -> TaskResult:
    run = EfficiencyRun(lm, cfg, ctx)
    bar = ctx.progress(total=cfg.warmup + cfg.repeats, desc="efficiency", unit="rep") if ctx.progress else None
    run.warm()
    if bar is not None:
        bar.update(cfg.warmup)
    while run.needs_more():
        run.sample()
        if bar is not None:
            bar.total = max(bar.total, cfg.warmup + len(run.prefill))
            bar.update(1)
    if bar is not None:
        bar.close()
    return run.result()


TASK = Task(
    name="efficiency",
    version=VERSION,
    description="per regime: TTFT, prefill, inter-token latency, decode/e2e tokens/s, memory split, "
    "and fractions of the machine's bandwidth / FLOP/s rooflines",
    config=EfficiencyConfig,
    evaluate=evaluate,
    timed=True,  # runs alone on the machine: a parallel cell would corrupt its clocks
    session=EfficiencyRun,  # interleavable: the sweep alternates the repeats of cells it compares
)
