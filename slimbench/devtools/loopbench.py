"""`benchmark.py loop-bench`: the layer-wise calibration loop, as first written vs now.

One process, one model, one method config (by default GPTQ as in ``configs/gptq_cost.yaml``):
the method runs once through :func:`slimbench.layerwise.sequential_reference` (the loop as
first written, every Hessian product computed per linear) and once through
:func:`slimbench.layerwise.sequential`, each on a freshly loaded model. It prints both times
(wall and process CPU), their ratio, the loop's counters and whether the two compressed models
are bit-identical (every tensor of the state dict, and every stored form: codes, scales, ...).

Timings are only meaningful on an otherwise idle machine; the fast loop runs first by default
so any first-run cost (allocator growth, thread-pool start) counts against it.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from slimbench.config import build_config
from slimbench.layerwise import loop_variant
from slimbench.method import MethodContext
from slimbench.registry import METHODS
from slimbench.specs import HardwareSpec, ModelSpec
from slimbench.sweep.suite import load_suite

VARIANTS = {
    "reference": {"reference": True},
    "fast": {},
    "no-memo": {"memo": False},
    "no-early-stop": {"early_stop": False},
    "no-share": {"share": False},
    "no-triangle": {"triangle": False},
}


def method_config(method: str, suite: str | None, overrides: dict[str, Any]) -> tuple[Any, ModelSpec, HardwareSpec]:
    """The method's config from the suite's entry of that name (else its defaults), plus overrides."""
    params: dict[str, Any] = {}
    model, hw = ModelSpec(name="smollm2-135m"), HardwareSpec(threads=2)
    if suite:
        s = load_suite(suite)
        model, hw = s.models[0], s.hardware
        steps = [st for m in s.methods for st in m.steps if st.name == method]
        params = dict(steps[0].params) if steps else {}
    cls = METHODS.get(method, source="loop-bench", field="--method").config
    return build_config(cls, {**params, **overrides}, source="loop-bench", field=method), model, hw


def load_for(model: ModelSpec, hw: HardwareSpec):
    """A freshly loaded model, threads set: what every variant starts from."""
    from slimbench.zoo.models import resolve

    lm = resolve(model, source="loop-bench", field="--model")(model, hw)
    torch.set_num_threads(hw.threads)
    return lm


def apply_variant(lm, method: str, cfg: Any, hw: HardwareSpec, variant: str) -> dict[str, Any]:
    """Apply ``method`` to ``lm`` with the loop run as ``variant``; times, counters, the result."""
    torch.manual_seed(0)
    stats: dict[str, int] = {}
    settings = dict(VARIANTS[variant])
    if variant != "reference":
        settings["stats"] = stats
    wall, cpu = time.perf_counter(), time.process_time()
    with loop_variant(**settings):
        rep = METHODS.get(method).apply(lm, cfg, MethodContext(hardware=hw))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    state = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    return {"variant": variant, "wall_s": wall, "cpu_s": cpu, "stats": stats, "state": state,
            "storage": rep.storage, "details": rep.details}


def run_variant(method: str, cfg: Any, model: ModelSpec, hw: HardwareSpec, variant: str) -> dict[str, Any]:
    return apply_variant(load_for(model, hw), method, cfg, hw, variant)


def identical(a: dict[str, Any], b: dict[str, Any]) -> tuple[bool, list[str]]:
    """Bitwise comparison of two runs' state dicts and stored forms; the names that differ."""
    diff = sorted(set(a["state"]) ^ set(b["state"]))
    diff += [k for k in a["state"].keys() & b["state"].keys() if not _same(a["state"][k], b["state"][k])]
    sa, sb = a["storage"], b["storage"]
    diff += [f"storage:{k}" for k in sorted(set(sa) ^ set(sb))]
    for k in sa.keys() & sb.keys():
        if sa[k].keys() != sb[k].keys() or not all(_same(sa[k][f], sb[k][f]) for f in sa[k]):
            diff.append(f"storage:{k}")
    return not diff, sorted(diff)


def _same(x: torch.Tensor, y: torch.Tensor) -> bool:
    from slimbench.layerwise import same_tensor

    return x.dtype == y.dtype and x.shape == y.shape and same_tensor(x.contiguous(), y.contiguous())


def loop_bench(method: str = "gptq", suite: str | None = "configs/gptq_cost.yaml", samples: int | None = None,
               seqlen: int | None = None, threads: int | None = None, variants: tuple[str, ...] = ("fast", "reference"),
               model: str | None = None) -> dict[str, Any]:
    overrides = {k: v for k, v in (("calib_samples", samples), ("calib_seqlen", seqlen)) if v is not None}
    cfg, mspec, hw = method_config(method, suite, overrides)
    if model:
        mspec = ModelSpec(name=model)
    if threads:
        hw = hw.model_copy(update={"threads": threads})
    print(f"loop-bench: {method} on {mspec.name}, {hw.threads} threads, config {cfg.to_dict()}", flush=True)
    runs = {}
    for v in variants:
        runs[v] = run_variant(method, cfg, mspec, hw, v)
        r = runs[v]
        loop_s, solve_s = r["details"].get("loop_seconds"), r["details"].get("quantize_seconds")
        extra = f", loop {loop_s:.1f} s" if loop_s is not None else ""
        if loop_s is not None and solve_s is not None:  # GPTQ: the solve is the same work in both loops
            extra += f" (solve {solve_s:.1f} s, the rest {loop_s - solve_s:.1f} s)"
        print(f"  {v:>14}: wall {r['wall_s']:.1f} s, cpu {r['cpu_s']:.1f} s{extra}  {r['stats'] or ''}", flush=True)
    out: dict[str, Any] = {"method": method, "model": mspec.name, "threads": hw.threads, "config": cfg.to_dict(),
                           "runs": {v: {k: r[k] for k in ("wall_s", "cpu_s", "stats")} for v, r in runs.items()}}
    if "reference" in runs:
        ref = runs["reference"]
        for v, r in runs.items():
            if v == "reference":
                continue
            same, diff = identical(ref, r)
            ratio = r["wall_s"] / ref["wall_s"]
            out["runs"][v].update(ratio=ratio, cpu_ratio=r["cpu_s"] / ref["cpu_s"], bit_identical=same)
            verdict = "bit-identical" if same else f"DIFFERENT in {len(diff)} tensors, e.g. {diff[:3]}"
            print(f"  {v} / reference: wall {ratio:.3f}, cpu {r['cpu_s'] / ref['cpu_s']:.3f}; "
                  f"weights and stored codes {verdict}", flush=True)
    return out
