"""`accel-bench`: variants of one model built in one process and measured interleaved (A/B/A/B).

Ratios between execution paths are only trustworthy when the variants share the machine's
state: each variant is built (its method steps applied), warmed up (compiled), then the timed
repeats of all variants alternate, in reverse order every other round (A B C, C B A, ...), so
slow drift and bursts of load hit every variant alike; rounds go on until every variant has the
efficiency protocol's minimum (``--repeats``, then its minimum timed duration). Each repeat is
the efficiency task's (tasks/efficiency.py, protocol version 4); the table gives decode
tokens/s, the speed-up over the first variant, inter-token latency, prefill, time to first
token and both roofline fractions, each with its denominator: the bandwidth measured at that
variant's decode working set, the FLOP/s of the dtype its linear layers compute in. A fraction
above 100% is printed as an error (the limit was measured too low), never as a value.

    benchmark.py accel-bench --list
    benchmark.py accel-bench --variants eager-fp32,compile-static-fp32 --prompt-len 128 --new-tokens 64
    benchmark.py accel-bench --variant 'mine=[{name: cast}, {name: compile, freezing: true}]'

Peak memory is not reported: one process holds every variant at once.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

# The best compiled decode path found here: single-token steps compiled with static shapes,
# weights frozen into the graph, kernels called from C++.
FAST = {"name": "compile", "scope": "decode", "dynamic": False, "freezing": True, "cpp_wrapper": True}
STATIC = {"name": "kv-cache", "implementation": "static"}
INT4 = {"name": "rtn", "bits": 4, "group_size": 32, "format": "packed"}
INT8W = {"name": "rtn", "bits": 8, "group_size": None, "symmetric": True, "format": "packed"}  # weight-only int8
FP16 = {"name": "cast", "dtype": "float16"}

PRESETS: dict[str, list[Any]] = {
    "eager-fp32": ["baseline"],
    "eager-bf16": [{"name": "cast", "dtype": "bfloat16"}],
    "eager-fp16": [{"name": "cast", "dtype": "float16"}],
    "compile-fp32": [{"name": "compile"}],
    "compile-static-fp32": [STATIC, FAST],
    "compile-static-bf16": [{"name": "cast", "dtype": "bfloat16"}, STATIC, FAST],
    "compile-static-fp16": [{"name": "cast", "dtype": "float16"}, STATIC, FAST],
    "dynamic-int8": ["dynamic-int8"],
    "compile-static-int8": ["dynamic-int8", STATIC, FAST],
    "int4-packed": [INT4],
    "compile-static-int4": [INT4, STATIC, FAST],
    "compile-static-fp16-int8w": [FP16, INT8W, STATIC, FAST],
    "compile-static-fp32-autotune": [STATIC, {**FAST, "mode": "max-autotune-no-cudagraphs"}],
}
DEFAULT_VARIANTS = "eager-fp32,compile-static-fp32,eager-bf16,compile-static-bf16"


def parse_variants(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """(label, method spec) per variant, validated like a suite's methods before any work."""
    from slimbench.errors import SuiteError
    from slimbench.sweep.suite import Problems, parse_methods
    from slimbench.sweep.yaml_limits import load_text

    raw: list[tuple[str, Any]] = []
    names = args.variants if args.variants is not None else ("" if args.variant else DEFAULT_VARIANTS)
    for name in [v for v in names.split(",") if v]:
        if name not in PRESETS:
            raise SuiteError(f"unknown variant {name!r}; presets: {', '.join(PRESETS)} (or --variant LABEL=STEPS)",
                             source="accel-bench", field="--variants")
        raw.append((name, PRESETS[name]))
    for item in args.variant or []:
        label, sep, steps = item.partition("=")
        if not sep:
            raise SuiteError(f"--variant expects LABEL=STEPS (YAML), got {item!r}", source="accel-bench",
                             field="--variant")
        raw.append((label.strip(), load_text(steps, f"--variant {label.strip()}")))
    if not raw:
        raise SuiteError("no variants given", source="accel-bench", field="--variants")
    out = []
    for label, steps in raw:
        steps = with_regime_warmup(steps, args)
        source = f"accel-bench variant {label}"
        problems = Problems(source)
        specs = parse_methods([steps], source, problems)
        problems.raise_if_any()
        if len(specs) != 1:
            raise SuiteError("a variant must be one configuration (no list-valued parameters)",
                             source="accel-bench", field=label)
        out.append((label, specs[0]))
    return out


def with_regime_warmup(steps: Any, args: argparse.Namespace) -> list[Any]:
    """Compile steps warm up on the benchmark's own shape unless told otherwise: compiling the
    warm-up's shape and then the regime's would pay the compilation twice."""
    steps = steps if isinstance(steps, list) else [steps]
    regime = {"warmup_prompt": args.prompt_len, "warmup_tokens": args.new_tokens, "warmup_batch": args.batch_size}
    return [{**regime, **s} if isinstance(s, dict) and s.get("name") == "compile" else s for s in steps]


def build(label: str, spec, args, hw) -> dict[str, Any]:
    """Load a fresh model, apply the variant's steps (compiling warm-up included)."""
    from slimbench.measure.clocks import release_memory
    from slimbench.method import apply_method
    from slimbench.specs import ModelSpec
    from slimbench.zoo.models import resolve

    model_spec = ModelSpec(name=args.model)
    lm = resolve(model_spec, source="accel-bench", field="--model")(model_spec, hw)
    lm.spec = model_spec
    t0 = time.perf_counter()
    report = apply_method(lm, spec, hw)
    release_memory()
    print(f"built {label}: {spec.label()} in {time.perf_counter() - t0:.1f} s", flush=True)
    return {"label": label, "spec": spec, "lm": lm, "report": report}


def compile_seconds(report: dict[str, Any]) -> float | None:
    secs = [s["details"].get("compile_seconds") for s in report["steps"] if s["name"] == "compile"]
    return sum(secs) if secs else None


def fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def fraction_cell(r: dict[str, Any], name: str) -> str:
    """'52.1% of 26.7 GB/s at 257 MiB', or the error when the fraction came out above 1."""
    from slimbench.measure.trust import roofline_denominator

    record = {"task_details": r["details"]}
    roof = r["details"].get("roofline") or {}
    if name in r["metrics"]:
        return f"{r['metrics'][name].value * 100:.1f}% {roofline_denominator(record, name)}".rstrip()
    value = roof.get(f"{name}_value")
    if value is not None:  # above 1: refused as a result
        return f"error: {value * 100:.0f}% {roofline_denominator(record, name)} (limit measured too low)"
    return "–"


def table(rows: list[dict[str, Any]]) -> str:
    head = ["variant", "decode tok/s (cv)", "speed-up", "ITL p50 ms", "prefill ms", "TTFT ms",
            "decode roofline", "prefill roofline", "compile s", "noisy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = rows[0]["metrics"].get("decode_tokens_per_s")
    for r in rows:
        m = r["metrics"]
        dec = m.get("decode_tokens_per_s")
        cells = [
            r["label"],
            f"{dec.value:.1f} ({dec.spread['cv']:.2f})" if dec else "–",
            f"{dec.value / base.value:.2f}x" if dec and base else "–",
            fmt(m["itl_p50_ms"].value if "itl_p50_ms" in m else None, ".1f"),
            fmt(m["prefill_ms"].value, ".1f"),
            fmt(m["ttft_ms"].value, ".1f"),
            fraction_cell(r, "decode_roofline_fraction"),
            fraction_cell(r, "prefill_roofline_fraction"),
            fmt(compile_seconds(r["report"]), ".0f"),
            "yes" if r["details"]["noisy"] else "no",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from slimbench.measure.limits import limits_summary, machine_limits
    from slimbench.measure.machine import last_thread_choice, resolve_threads
    from slimbench.registry import TASKS
    from slimbench.specs import HardwareSpec
    from slimbench.task import TaskContext
    from slimbench.tasks.efficiency import EfficiencyRun

    variants = parse_variants(args)
    threads = args.threads if args.threads == "auto" else int(args.threads)
    hw = HardwareSpec(device=args.device, dtype=args.dtype, threads=threads)
    task = TASKS.get("efficiency")
    cfg = task.config(prompt_len=args.prompt_len, new_tokens=args.new_tokens, batch_size=args.batch_size,
                      repeats=args.repeats, warmup=args.warmup, cv_threshold=args.cv_threshold)
    n_threads = resolve_threads(hw)
    print(f"threads: {n_threads} ({last_thread_choice()})", flush=True)
    limits = machine_limits(n_threads, hw.device)
    summary = limits_summary(limits)
    print(f"machine: {summary['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s read at "
          f"{summary['bandwidth_size_bytes'] / 2**20:.0f} MiB ({summary['source']}; each variant's roofline uses the "
          "bandwidth at its own decode working set); "
          + ", ".join(f"{k} {v['flops_per_s'] / 1e9:.0f} GFLOP/s" for k, v in summary["flops"].items()
                      if "flops_per_s" in v), flush=True)
    built = [build(label, spec, args, hw) for label, spec in variants]
    runs, memo = [], {}
    for b in built:
        r = EfficiencyRun(b["lm"], cfg, TaskContext(hardware=hw, method_report=b["report"]))
        r.limits_memo = memo
        r.warm()
        runs.append(r)
    order = list(range(len(runs)))
    rnd = 0
    while any(r.needs_more() for r in runs):  # --repeats rounds, then until the protocol's minimum duration
        for i in order if rnd % 2 == 0 else order[::-1]:  # A B C, C B A, ...: drift hits all alike
            runs[i].sample()
        rnd += 1
        print(f"round {rnd} (of at least {cfg.repeats}): " + ", ".join(
            f"{b['label']} {r.decode[-1]:.1f}" for b, r in zip(built, runs, strict=True) if r.decode), flush=True)
    rows = []
    labels = [b["label"] for b in built]
    for b, r in zip(built, runs, strict=True):
        r.interleaving = {"interleaved": len(labels) > 1, "with": [], "labels": [x for x in labels if x != b["label"]],
                          "rounds": rnd, "order": "alternating: A B C, C B A, ...",
                          "reason": None if len(labels) > 1 else "one variant",
                          "note": "peak memory is of one process holding every variant"}
        res = r.result()
        rows.append({"label": b["label"], "steps": b["spec"].label(), "metrics": res.metrics,
                     "details": res.details, "report": b["report"]})
    return rows


def check_limits(args: argparse.Namespace) -> int:
    """Measure the machine's limits twice, from scratch, and say whether the two agree within 10%."""
    from slimbench.measure.limits import AGREEMENT, limits_summary, machine_limits
    from slimbench.measure.machine import resolve_threads
    from slimbench.specs import HardwareSpec

    threads = resolve_threads(HardwareSpec(device=args.device, threads=args.threads if args.threads == "auto"
                                           else int(args.threads)))
    size = int(args.working_set_mib * 2**20)
    runs = [limits_summary(machine_limits(threads, args.device, working_set=size, refresh=True)) for _ in range(2)]
    ok = True
    print(f"threads {threads}, working set {args.working_set_mib:g} MiB, measured twice from scratch:")
    rows = [("bandwidth GB/s", [r["bandwidth_bytes_per_s"] / 1e9 for r in runs])]
    rows += [(f"{k} GFLOP/s", [r["flops"][k]["flops_per_s"] / 1e9 for r in runs])
             for k in runs[0]["flops"] if all("flops_per_s" in r["flops"].get(k, {}) for r in runs)]
    for name, (a, b) in rows:
        diff = abs(a - b) / max(a, b)
        ok &= diff <= AGREEMENT
        print(f"  {name:20s} {a:9.1f} {b:9.1f}  differ by {diff:.1%} ({'ok' if diff <= AGREEMENT else 'DISAGREE'})")
    for i, r in enumerate(runs, 1):
        kernels = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in r["bandwidth_kernels"].items())
        print(f"  measurement {i}: {r['bandwidth_method']}; kernels GB/s: {kernels}; noisy {r['noisy']}, "
              f"unstable {r['unstable'] or 'no'}, kept in the cache: {r['cached']}")
        ok &= not r["noisy"] and not r["unstable"]
    print("limits agree within 10% and were measured quietly" if ok else
          "the limits are not reliable now (load, or a machine that does not hold its speed): do not quote fractions")
    return 0 if ok else 1


def cmd_accel_bench(args: argparse.Namespace) -> int:
    if args.check_limits:
        return check_limits(args)
    if args.list:
        for name, steps in PRESETS.items():
            print(f"{name:30s} {json.dumps(steps)}")
        return 0
    t0 = time.perf_counter()
    rows = run(args)
    print()
    print(f"{args.model}, prompt {args.prompt_len}, {args.new_tokens} new tokens, batch {args.batch_size}, "
          f"{args.repeats} interleaved repeats, threads {rows[0]['details']['threads']['torch_threads']}")
    print(table(rows))
    for r in rows:
        if r["details"]["noise_reasons"]:
            print(f"- {r['label']} noisy: " + "; ".join(r["details"]["noise_reasons"]))
        for err in (r["details"].get("roofline") or {}).get("errors") or []:
            print(f"- {r['label']} measurement error: {err}")
        proto = r["details"].get("timing_protocol") or {}
        if proto and not proto.get("sufficient"):
            print(f"- {r['label']} under-sampled: {proto['repeats']} repeats over {proto['timed_seconds']:.2f} s "
                  f"(the protocol asks for {proto['min_repeats']} over {proto['min_seconds']} s)")
    print(f"(total {time.perf_counter() - t0:.0f} s)")
    if args.json:
        from slimbench.measure.limits import write_json_atomic

        out = [{"label": r["label"], "steps": r["steps"], "metrics": {k: m.to_dict() for k, m in r["metrics"].items()},
                "details": r["details"], "method_report": r["report"]} for r in rows]
        from pathlib import Path

        write_json_atomic(Path(args.json), {"variants": out, "args": vars(args) | {"fn": None}})
        print(f"wrote {args.json}")
    return 0


def register(sub) -> None:
    s = sub.add_parser("accel-bench", help="benchmark: execution variants of one model, interleaved in one process")
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--variants", help=f"comma-separated presets (default {DEFAULT_VARIANTS} unless --variant is given)")
    s.add_argument("--variant", action="append", help="LABEL=STEPS: a variant's method steps as YAML (repeatable)")
    s.add_argument("--list", action="store_true", help="list the preset variants and exit")
    s.add_argument("--prompt-len", type=int, default=128)
    s.add_argument("--new-tokens", type=int, default=64)
    s.add_argument("--batch-size", type=int, default=1)
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--warmup", type=int, default=1)
    s.add_argument("--threads", default="auto", help="torch threads, or auto (probe the fastest now)")
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype the model is loaded in (variants cast further)")
    s.add_argument("--cv-threshold", type=float, default=0.1)
    s.add_argument("--json", help="also write every variant's metrics and details to this JSON file")
    s.add_argument("--check-limits", action="store_true",
                   help="only measure the machine's bandwidth and FLOP/s limits twice and check they agree within "
                        "10%% (exit 1 if not, or if measured under load)")
    s.add_argument("--working-set-mib", type=float, default=274.0,
                   help="with --check-limits: the bytes a decode step reads, in MiB (default 274: SmolLM2 in fp16)")
    s.set_defaults(fn=cmd_accel_bench)
