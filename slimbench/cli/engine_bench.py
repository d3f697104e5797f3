"""`engine-bench`: engines x formats x methods, perplexity through each engine and decode speed, interleaved.

    benchmark.py engine-bench --list
    benchmark.py engine-bench --models smollm2-135m,gemma3-270m --threads 2 --out results/engine-bench
    benchmark.py engine-bench --paths torch-fp32,llama-auto,llama-q4_k_m --repeats 3 --windows 4

Writes ``engine-bench.json`` (every sample), ``engine-bench.md`` (one table per model) and
``engine-pareto.png`` (perplexity vs decode tokens/s, one panel per model) into ``--out``.
Details of what is measured: slimbench/devtools/engine_bench.py and docs/deployment.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def parse_paths(args) -> list[tuple[str, Any]]:
    from slimbench.devtools.engine_bench import PATHS, with_agreement
    from slimbench.errors import SuiteError
    from slimbench.sweep.suite import Problems, parse_methods

    out = []
    for name in [p for p in args.paths.split(",") if p]:
        if name not in PATHS:
            raise SuiteError(f"unknown path {name!r}; known: {', '.join(PATHS)}", source="engine-bench",
                             field="--paths")
        problems = Problems(f"engine-bench path {name}")
        specs = parse_methods([with_agreement(PATHS[name], args.windows, args.seqlen)], name, problems)
        problems.raise_if_any()
        out.append((name, specs[0]))
    return out


def fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def table(result: dict[str, Any]) -> str:
    head = ["path", "engine", "format", "perplexity", "Δ NLL vs in-process", "decode tok/s", "in-engine loop tok/s",
            "prefill tok/s", "roofline", "memory MB", "stored MB"]
    lines = [f"### {result['model']}" + (f" (weights {result['weights_note']})" if result["weights_note"] else ""),
             "", f"{result['threads']} threads, prompt {result['prompt_len']}, {result['new_tokens']} new tokens, "
             f"{result['repeats']} interleaved repeats (medians); perplexity on {result['windows']} x "
             f"{result['seqlen']} test tokens; bandwidth {result['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; "
             f"load {result['load_before'][0]:.1f} -> {result['load_after'][0]:.1f}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'][:120].replace('|', '/')} |" + " |" * (len(head) - 2))
            continue
        s, q, m = r["speed"], r["quality"], r["memory"]
        mem = m.get("engine_peak_rss_mb") or m.get("weights_mb")
        lines.append("| " + " | ".join([
            r["label"], r["engine"], r["format"] or "–", f"{q['perplexity']:.3f}", fmt(q["delta_nll"], "+.1e"),
            f"{s['decode_tokens_per_s']['median']:.1f}",
            fmt(s.get("native_decode_tokens_per_s", {}).get("median"), ".1f"),
            f"{s['prefill_tokens_per_s']['median']:.0f}", f"{100 * r['roofline_fraction']:.0f}%",
            f"{mem:.0f} ({m['where']})", fmt((r["stored_bytes"] or 0) / 2**20 or None, ".0f"),
        ]) + " |")
    return "\n".join(lines)


ENGINE_COLORS = {"llama.cpp": "tab:blue", "openvino": "tab:green", "vLLM": "tab:purple"}


def pareto(results: list[dict[str, Any]], path: Path) -> None:
    """Perplexity vs decode tokens/s, one panel per model: a colour per engine, the frontier
    (faster and better than every other path) drawn and labelled; every point is in the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slimbench.report.plots import pareto_front

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        rows = [r for r in res["rows"] if "error" not in r]
        xs = [r["speed"].get("native_decode_tokens_per_s", r["speed"]["decode_tokens_per_s"])["median"] for r in rows]
        ys = [r["quality"]["perplexity"] for r in rows]
        seen = set()
        for r, x, y in zip(rows, xs, ys, strict=True):
            engine = r["engine"] if r["engine"] in ENGINE_COLORS else "torch (in process)"
            ax.scatter([x], [y], color=ENGINE_COLORS.get(engine, "tab:gray"), label=None if engine in seen else engine,
                       zorder=3)
            seen.add(engine)
        front = sorted(pareto_front(xs, ys, higher_y_better=False, higher_x_better=True), key=lambda i: xs[i])
        ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color="black", alpha=0.4, lw=1,
                label="frontier")
        for i in front:
            ax.annotate(rows[i]["label"], (xs[i], ys[i]), fontsize=7, xytext=(3, -9), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("decode tokens/s, batch 1 (log scale)")
        ax.set_ylabel("perplexity (Shakespeare test windows)")
        ax.set_title(f"{res['model']}, {res['threads']} threads: frontier labelled, every path in the table",
                     fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_engine_bench(args: argparse.Namespace) -> int:
    from slimbench.devtools.engine_bench import PATHS, run_model

    if args.list:
        for name, steps in PATHS.items():
            print(f"{name:16s} {steps}")
        return 0
    paths = parse_paths(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for model in [m for m in args.models.split(",") if m]:
        results.append(run_model(model, paths, threads=args.threads, prompt_len=args.prompt_len,
                                 new_tokens=args.new_tokens, repeats=args.repeats, windows=args.windows,
                                 seqlen=args.seqlen))
        (out / "engine-bench.json").write_text(json.dumps(results, indent=1, default=str))
    text = "\n\n".join(table(r) for r in results)
    (out / "engine-bench.md").write_text(text + "\n")
    pareto(results, out / "engine-pareto.png")
    print(text)
    return 0


def register(sub) -> None:
    from slimbench.devtools.engine_bench import DEFAULT

    s = sub.add_parser("engine-bench", help="engines x formats x methods: perplexity through each engine, decode "
                       "speed interleaved", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--list", action="store_true", help="list the known paths and exit")
    s.add_argument("--models", default="smollm2-135m")
    s.add_argument("--paths", default=DEFAULT, help="comma-separated path names (--list)")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--prompt-len", type=int, default=128)
    s.add_argument("--new-tokens", type=int, default=64)
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--windows", type=int, default=8, help="perplexity windows (test split)")
    s.add_argument("--seqlen", type=int, default=512)
    s.add_argument("--out", default="results/engine-bench")
    s.set_defaults(fn=cmd_engine_bench)
