"""How far a compressed model's perplexity moves when its inputs move by fp32 rounding.

Two correct implementations of one quantized model (SlimBench's layers in process, an engine's
kernels) sum in different orders, so their activations differ at the level of fp32 rounding
(about 1e-7 relative). A model that quantizes its activations turns such a difference into a whole
code step wherever a value sits near a rounding boundary, and the steps compound across layers:
an engine's agreement with SlimBench (``details.agreement`` of an engine step) cannot be closer
than this floor, whatever the kernels. The tool measures the floor: the agreement check's windows
scored as they are, then with the input embeddings scaled by ``1 + rel * N(0, 1)`` per element
(``--seeds`` draws), for the method and for the uncompressed model beside it. Quality only: load
does not change the figures.

    python -m slimbench.devtools.perturb_sensitivity --model smollm2-135m --method '{name: smoothquant}'
"""

from __future__ import annotations

import argparse
import math

import torch


@torch.no_grad()
def perturbed_deltas(lm, win: torch.Tensor, rel: float, seeds: int) -> tuple[list[float], list[list[float]]]:
    """The windows' NLL as the model is, and per seed each window's NLL change with the input
    embeddings perturbed (restored afterwards, bit for bit)."""
    from slimbench.methods.acceleration.engine_check import in_process_nll

    emb = lm.model.get_input_embeddings().weight
    kept = emb.data.clone()
    base = in_process_nll(lm, win)
    out = []
    try:
        for seed in range(seeds):
            g = torch.Generator().manual_seed(seed)
            noise = torch.randn(kept.shape, generator=g, dtype=torch.float32).to(kept.dtype)
            emb.data.copy_(kept * (1 + rel * noise))
            out.append([p - b for p, b in zip(in_process_nll(lm, win), base, strict=True)])
    finally:
        emb.data.copy_(kept)
    return base, out


def summary(label: str, base: list[float], deltas: list[list[float]]) -> str:
    ppl = math.exp(sum(base) / len(base))
    means = [sum(d) / len(d) for d in deltas]
    worst = max(abs(x) for d in deltas for x in d)
    return (f"{label}: perplexity {ppl:.4f}; mean ΔNLL per seed " + ", ".join(f"{m:+.1e}" for m in means)
            + f"; largest window |ΔNLL| {worst:.1e}")


def main(argv: list[str] | None = None) -> None:
    from slimbench.errors import SuiteError
    from slimbench.method import apply_method
    from slimbench.methods.acceleration.engine_check import AgreementConfig, agreement_windows
    from slimbench.specs import HardwareSpec
    from slimbench.sweep.suite import suite_from_mapping
    from slimbench.sweep.yaml_limits import load_text
    from slimbench.zoo.models import resolve

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="{name: smoothquant}", help="method or chain, as YAML (a suite's methods entry)")
    p.add_argument("--rel", type=float, default=1e-7, help="relative size of the embedding perturbation")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--windows", type=int, default=8, help="perplexity test windows (concat-windows protocol)")
    p.add_argument("--seqlen", type=int, default=512)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    try:  # bad input: one line naming it, before any model is loaded
        doc = {"models": [args.model], "methods": [load_text(args.method, "--method"), "baseline"],
               "tasks": ["perplexity"], "hardware": {"threads": 1}}
        cells = suite_from_mapping(doc, "the command line", "perturb-sensitivity", check_models=False).cells()
    except SuiteError as err:
        raise SystemExit(f"perturb_sensitivity: {err}") from None
    hw = HardwareSpec(threads=1)
    print(f"{args.model}: {args.windows} x {args.seqlen} test tokens; embeddings x (1 + {args.rel:g} N(0,1)), "
          f"{args.seeds} seeds")
    for cell in cells:
        lm = resolve(cell.model, source="--model", field="model")(cell.model, hw)
        apply_method(lm, cell.method, hw)
        win = agreement_windows(lm, AgreementConfig(check_windows=args.windows, check_seqlen=args.seqlen))
        print(summary(cell.method.label(), *perturbed_deltas(lm, win, args.rel, args.seeds)))


if __name__ == "__main__":
    main()
