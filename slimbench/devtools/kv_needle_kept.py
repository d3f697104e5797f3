"""Which KV heads still hold the needle after an eviction policy: the "why" behind a
long-context accuracy (docs/long-context.md, "Why, from the caches themselves").

For each example of a needle task (``niah-single``, ``niah-multikey`` or ``passkey``), the
prompt's prefill is taken from the recorded prefills the long-context tasks share (recorded
first where missing), each policy is replayed on it, and the (layer, KV head) caches that still
hold every token of the answer's span in the context are counted. Nothing is decoded. Run::

    python -m slimbench.devtools.kv_needle_kept --model smollm2-135m --lengths 1024 2048 \\
        --policies kv-snapkv kv-h2o kv-tova kv-streaming --ratio 4
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

import torch


def answer_span(ids: list[int], answer_ids: list[int]) -> list[int]:
    """Positions of the first occurrence of ``answer_ids`` in ``ids`` (the needle's value)."""
    n = len(answer_ids)
    for i in range(len(ids) - n + 1):
        if ids[i : i + n] == answer_ids:
            return list(range(i, i + n))
    raise ValueError("the answer's tokens do not occur in the prompt as one span")


def heads_holding(cache: Any, span: list[int]) -> tuple[int, int]:
    """(caches holding every position of ``span``, caches counted): over evicting layers x KV heads."""
    from slimbench.methods.kvcache.layer import EvictionLayer

    full = total = 0
    for layer in cache.layers:
        if isinstance(layer, EvictionLayer):
            for row in layer.positions[0]:
                kept = set(row.tolist())
                total += 1
                full += all(p in kept for p in span)
    return full, total


def needle_kept(lm: Any, task: str, task_params: dict, policies: list[str], policy_params: dict) -> list[dict]:
    """One row per (policy, example): id and the heads holding the whole answer span."""
    from slimbench.config import build_config
    from slimbench.method import MethodContext
    from slimbench.registry import METHODS, TASKS
    from slimbench.specs import HardwareSpec
    from slimbench.tasks._long_context import examples
    from slimbench.tasks._prefill_memo import memo_dir, recorded_cache

    spec = importlib.import_module(f"slimbench.tasks.{task.replace('-', '_')}").SPEC
    cfg = build_config(TASKS.get(task).config, task_params, source="kv_needle_kept", field=task)
    exs = examples(lm, spec, cfg)
    rows = []
    for name in policies:
        method = METHODS.get(name)
        mcfg = build_config(method.config, policy_params, source="kv_needle_kept", field=name)
        method.run(lm, mcfg, MethodContext(hardware=HardwareSpec(threads=1)))
        for ex in exs:
            ids = ex.fitted.context_ids + ex.fitted.query_ids
            span = answer_span(ids, lm.encode(" " + ex.fitted.parts.answers[0]))
            cache, _, _ = recorded_cache(lm, lm.cache_factory, torch.tensor([ids]), memo_dir())
            full, total = heads_holding(cache, span)
            rows.append({"policy": name, "id": ex.id, "held": full, "heads": total})
    return rows


def main(argv: list[str] | None = None) -> None:
    from slimbench.specs import HardwareSpec, ModelSpec
    from slimbench.zoo.models import resolve

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="niah-single", choices=["niah-single", "niah-multikey", "passkey"])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--depths", type=float, nargs="+", default=[0, 25, 50, 75, 100])
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--policies", nargs="+", default=["kv-snapkv", "kv-h2o", "kv-tova", "kv-streaming"])
    p.add_argument("--ratio", type=float, default=4.0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    spec = ModelSpec(name=args.model)
    lm = resolve(spec, source="--model", field="model")(spec, HardwareSpec(threads=1))
    rows = needle_kept(lm, args.task, {"lengths": args.lengths, "depths": args.depths, "samples": args.samples},
                       args.policies, {"ratio": args.ratio})
    for r in rows:
        print(f"{r['policy']:14s} {r['id']:28s} {r['held']:3d} / {r['heads']} KV heads x layers hold the answer")


if __name__ == "__main__":
    main()
