"""What a paper-budget reproduction costs on this machine, per token: the numbers behind the
run-time estimates of docs/reproduction.md ("running the paper budget online").

The papers' models cannot be downloaded here, so each is built from its published shape with
random weights (speed does not depend on the values) and timed in fp32 on the CPU:

- ``eval``: one 2048-token window forward (the perplexity protocol), seconds per window;
- ``gptq``: SlimBench's GPTQ on OPT-125M with ``k`` calibration sequences of 2048 tokens, for
  two values of ``k``, to split its cost into a fixed part (the per-layer quantization) and a
  part per calibration token (layer forwards and Hessian updates).

Times are CPU seconds of this process (``time.process_time``) with one torch thread, so other
processes on a shared machine inflate them less than wall-clock time (memory-bandwidth
contention still does). Run on an idle machine for the final figures::

    python -m slimbench.devtools.paper_cost --json paper_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

SHAPES = {  # the papers' models, from their published configs (hidden, layers, heads, ffn, vocab)
    "opt-125m": ("opt", 768, 12, 12, 3072, 50272),
    "opt-350m": ("opt", 1024, 24, 16, 4096, 50272),
    "opt-1.3b": ("opt", 2048, 24, 32, 8192, 50272),
}


def build(name: str):
    from transformers import AutoModelForCausalLM, OPTConfig

    _arch, hidden, layers, heads, ffn, vocab = SHAPES[name]
    cfg = OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
                    vocab_size=vocab, max_position_embeddings=2048, word_embed_proj_dim=512 if name == "opt-350m"
                    else hidden)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def cpu_seconds(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def eval_window(model, seqlen: int = 2048, repeats: int = 2) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, seqlen))
    with torch.inference_mode():
        model(input_ids=ids[:, :128])  # warm-up
        return min(cpu_seconds(lambda: model(input_ids=ids)) for _ in range(repeats))


def gptq_seconds(samples: int, seqlen: int = 2048) -> float:
    """SlimBench's GPTQ (4-bit, per channel, the paper's settings) on a random OPT-125M."""
    from slimbench.method import MethodContext
    from slimbench.registry import METHODS
    from slimbench.specs import HardwareSpec
    from slimbench.zoo.models import gpt2_tokenizer, wrap

    lm = wrap(build("opt-125m"), gpt2_tokenizer(), "opt-125m-random", HardwareSpec(threads=1), {})
    method = METHODS.get("gptq")
    cfg = method.config(bits=4, calib_corpus="shakespeare", calib_samples=samples, calib_seqlen=seqlen,
                        true_sequential=False)
    from slimbench.calibration import calibration_tokens

    calibration_tokens(lm, "shakespeare")  # tokenized once, outside the timing
    return cpu_seconds(lambda: method.apply(lm, cfg, MethodContext(hardware=HardwareSpec(threads=1))))


def note(line: str) -> None:
    """Each figure as soon as it is measured (a long run on a busy machine shows its progress)."""
    print(f"[paper_cost] {line} (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)


def measure(models: list[str], gptq_samples: tuple[int, int], repeats: int = 2) -> dict:
    torch.set_num_threads(1)
    out = {"threads": 1, "clock": "process_time", "load_at_start": os.getloadavg(),
           "eval_seconds_per_2048_window": {}}
    a, b = gptq_samples
    ta = gptq_seconds(a)
    note(f"gptq opt-125m, {a} x 2048 calibration: {ta:.1f} s")
    tb = gptq_seconds(b)
    note(f"gptq opt-125m, {b} x 2048 calibration: {tb:.1f} s")
    per_sample = (tb - ta) / (b - a)
    out["gptq_opt125m"] = {f"samples_{a}": ta, f"samples_{b}": tb, "per_2048_sample": per_sample,
                           "fixed": ta - a * per_sample, "estimate_128_samples": ta + (128 - a) * per_sample}
    for name in models:
        model = build(name)
        out["eval_seconds_per_2048_window"][name] = eval_window(model, repeats=repeats)
        note(f"eval {name}: {out['eval_seconds_per_2048_window'][name]:.1f} s per 2048-token window")
        del model
    out["load_at_end"] = os.getloadavg()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="opt-125m,opt-350m,opt-1.3b")
    p.add_argument("--gptq-samples", default="2,6", help="two calibration sizes (sequences of 2048 tokens)")
    p.add_argument("--repeats", type=int, default=2, help="timed forwards per model (the fastest is kept)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    a, b = (int(x) for x in args.gptq_samples.split(","))
    result = measure(args.models.split(","), (a, b), args.repeats)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
