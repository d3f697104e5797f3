"""`speculative`: assisted greedy decoding, token-for-token identical to the target's own.

Sets ``lm.generator`` (slimbench.engines.speculative), so every task that generates through
``lm.generate`` (the efficiency task's TTFT / inter-token latency, ...) runs speculatively. Drafts:

- ``draft: prompt-lookup`` (default): n-gram lookup in the sequence so far, no second model.
- ``draft: {model: NAME}``: any model the harness can load (registered name, hub id, folder)
  whose tokenizer has the same vocabulary as the target's (compared token by token; a different
  one is refused in ``check()``).
- ``draft: {steps: [{name: layer-drop, keep_every: 2}]}``: a compressed copy of the target: the
  target's model spec is loaded again and the steps are applied by the harness' own
  ``apply_method`` (any registered method: layer-drop, dynamic-int8, rtn, ...).
  ``{model: NAME, steps: [...]}`` compresses another model the same way.

At apply time the method measures itself on a corpus prompt: plain greedy and speculative runs
interleaved (A/B/A/B), their output compared token for token (the cell fails if they differ),
acceptance rate, mean accepted tokens per step, the draft/verify time split and the speed-up go
into the method report. The generator also verifies the first prompt a task gives it against
plain greedy decoding (``verify: every`` does so on each call).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from slimbench.config import Config
from slimbench.engines.speculative import (
    ModelDrafter,
    PromptLookupDrafter,
    SpeculativeGenerator,
    check_identical,
)
from slimbench.method import Method, MethodReport

NOT_IN_DRAFT = ("speculative", "parallel")  # a draft runs in this process, one token at a time


class DraftSpec(Config):
    model: str | None = Field(
        None, description="model to draft with (registered name, hub id, folder); None: the target's own spec"
    )
    steps: list[dict[str, Any]] = Field(
        default_factory=list,
        description="method steps applied to the draft after loading, e.g. [{name: layer-drop, keep_every: 2}]",
    )

    @model_validator(mode="after")
    def _valid_steps(self):
        from slimbench.config import build_config
        from slimbench.registry import METHODS

        if self.model is None and not self.steps:
            raise ValueError("a draft needs a model, steps that compress the target, or is `prompt-lookup`")
        for i, step in enumerate(self.steps):
            if not isinstance(step, dict) or not isinstance(step.get("name"), str):
                raise ValueError(f"draft.steps[{i}]: expected a mapping with a `name` key, got {step!r}")
            if step["name"] in NOT_IN_DRAFT:
                raise ValueError(f"draft.steps[{i}]: {step['name']!r} cannot be part of a draft")
            method = METHODS.get(step["name"], field=f"draft.steps[{i}].name")
            params = {k: v for k, v in step.items() if k != "name"}
            build_config(method.config, params, source="speculative", field=f"draft.steps[{i}]")
        return self

    def method_spec(self):
        from slimbench.registry import METHODS
        from slimbench.specs import MethodSpec, StepSpec

        steps = []
        for step in self.steps:
            params = {k: v for k, v in step.items() if k != "name"}
            cfg = METHODS.get(step["name"]).config(**params)
            steps.append(StepSpec(name=step["name"], params=cfg.to_dict()))
        return MethodSpec(steps=tuple(steps))


class SpeculativeConfig(Config):
    draft: Literal["prompt-lookup"] | DraftSpec = Field(
        "prompt-lookup", description="prompt-lookup, {model: NAME}, {steps: [...]} or both"
    )
    num_draft_tokens: int = Field(4, ge=1, le=64, description="tokens the draft proposes per step (k)")
    ngram_max: int = Field(3, ge=1, le=16, description="prompt-lookup: longest n-gram matched")
    ngram_min: int = Field(1, ge=1, le=16, description="prompt-lookup: shortest n-gram matched")
    verify: Literal["first", "every"] = Field(
        "first", description="compare with plain greedy on the first call, or on every call"
    )
    check_prompt_len: int = Field(128, ge=2, le=8192, description="self-check prompt tokens (corpus text)")
    check_new_tokens: int = Field(64, ge=1, le=4096, description="self-check generated tokens")
    check_repeats: int = Field(3, ge=1, le=100, description="self-check timed A/B pairs (plain greedy vs speculative)")
    corpus: str = Field("shakespeare", description="where the self-check prompt comes from")
    split: str = Field("test", description="corpus split of the self-check prompt")

    @model_validator(mode="after")
    def _ngrams(self):
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min {self.ngram_min} > ngram_max {self.ngram_max}")
        return self


# -- drafts ------------------------------------------------------------------------------------
def vocabulary_difference(target_tok, draft_tok) -> str | None:
    """None if both tokenizers map the same strings to the same ids, else what differs."""
    a, b = target_tok.get_vocab(), draft_tok.get_vocab()
    if a == b:
        return None
    differing = sum(1 for t, i in a.items() if b.get(t) != i)
    return f"{len(a)} vs {len(b)} tokens; {differing} of the target's tokens are missing or have another id"


def load_draft(lm, draft: DraftSpec, hw) -> tuple[Any, dict[str, Any] | None]:
    """The draft LanguageModel, and the harness' method report of its steps (None if no steps)."""
    from slimbench.method import apply_method
    from slimbench.specs import ModelSpec
    from slimbench.zoo.models import resolve

    spec = ModelSpec(name=draft.model) if draft.model else lm.spec
    if spec is None:
        raise ValueError("speculative: the draft copies the target, but the target's model spec is unknown")
    draft_lm = resolve(spec, source="speculative", field="draft.model")(spec, hw)
    draft_lm.spec = spec
    report = apply_method(draft_lm, draft.method_spec(), hw) if draft.steps else None
    return draft_lm, report


def check(lm, cfg: SpeculativeConfig) -> None:
    if lm.generator is not None:
        raise ValueError(
            f"speculative: the model already has a generator ({type(lm.generator).__name__}); "
            "only one can drive generation"
        )
    _, cache = lm.prefill(torch.tensor([[lm.prefix_token_id] * 2]))
    if not (hasattr(cache, "crop") and hasattr(cache, "get_seq_length")):
        raise ValueError(
            f"speculative: the model's KV cache ({type(cache).__name__}) cannot be cropped back to the "
            "accepted tokens (no crop / get_seq_length); use a cache that supports them"
        )
    if isinstance(cfg.draft, DraftSpec) and cfg.draft.model is not None:
        from slimbench.specs import HardwareSpec, ModelSpec
        from slimbench.zoo.models import resolve

        spec = ModelSpec(name=cfg.draft.model)
        draft = resolve(spec, source="speculative", field="draft.model")(
            spec, HardwareSpec(threads=torch.get_num_threads())
        )
        diff = vocabulary_difference(lm.tokenizer, draft.tokenizer)
        if diff:
            raise ValueError(
                f"speculative: draft {cfg.draft.model!r} has a different tokenizer from the target "
                f"{lm.name!r} ({diff}); a draft must share the target's vocabulary"
            )


def make_drafter(lm, cfg: SpeculativeConfig, hw) -> tuple[Any, dict[str, Any]]:
    if cfg.draft == "prompt-lookup":
        return PromptLookupDrafter(cfg.ngram_max, cfg.ngram_min), {
            "kind": "prompt-lookup",
            "ngram_max": cfg.ngram_max,
            "ngram_min": cfg.ngram_min,
        }
    draft_lm, report = load_draft(lm, cfg.draft, hw)
    diff = vocabulary_difference(lm.tokenizer, draft_lm.tokenizer)
    if diff:  # also after the steps, in case a step changed the tokenizer
        raise ValueError(f"speculative: the draft's tokenizer differs from the target's ({diff})")
    from slimbench.modeling import count_parameters, memory_bytes

    info = {
        "kind": "compressed copy" if cfg.draft.steps else "model",
        "model": draft_lm.spec.name,
        "steps": cfg.draft.method_spec().label() if cfg.draft.steps else None,
        "parameters": count_parameters(draft_lm.model),
        "memory_bytes": memory_bytes(draft_lm.model),
        "method_report": report,
    }
    return ModelDrafter(draft_lm), info


# -- the self-check ----------------------------------------------------------------------------
def self_check(lm, gen: SpeculativeGenerator, cfg: SpeculativeConfig) -> dict[str, Any]:
    """Plain vs speculative on one corpus prompt, interleaved; raises if the outputs differ."""
    from slimbench.zoo.corpora import encode_split

    ids = encode_split(lm, cfg.corpus, cfg.split)[: cfg.check_prompt_len]
    if len(ids) < cfg.check_prompt_len:
        raise ValueError(f"speculative: corpus split gives only {len(ids)} prompt tokens (< {cfg.check_prompt_len})")
    ids_t = torch.tensor([ids])

    def run(use_spec: bool) -> tuple[float, torch.Tensor]:
        lm.generator = gen if use_spec else None
        lm.synchronize()
        t0 = time.perf_counter()
        out = lm.generate(ids_t, cfg.check_new_tokens)
        lm.synchronize()
        return time.perf_counter() - t0, out

    saved_verify, gen.verify = gen.verify, "none"  # compared explicitly below
    try:
        run(False), run(True)  # warm-up
        gen.stats = type(gen.stats)()
        plain, spec = [], []
        for _ in range(cfg.check_repeats):
            t, ref = run(False)
            plain.append(t)
            t, out = run(True)
            spec.append(t)
    finally:
        gen.verify = saved_verify
        lm.generator = gen
    check_identical(lm, ids_t, out)  # raises SpeculativeMismatch: the cell fails
    stats = gen.stats.summary()
    gen.stats = type(gen.stats)()  # tasks start counting afresh
    return {
        "prompt_tokens": len(ids),
        "new_tokens": cfg.check_new_tokens,
        "identical_to_greedy": bool(torch.equal(ref, out)),
        "plain_seconds": plain,
        "speculative_seconds": spec,
        "speedup": statistics.median(plain) / statistics.median(spec),
        **stats,
    }


def apply(lm, cfg: SpeculativeConfig, ctx) -> MethodReport:
    drafter, draft_info = make_drafter(lm, cfg, ctx.hardware)
    gen = SpeculativeGenerator(drafter, k=cfg.num_draft_tokens, verify=cfg.verify)
    lm.generator = gen
    result = self_check(lm, gen, cfg)
    notes = [
        "output verified token for token against the target's greedy decoding",
        f"speed-up {result['speedup']:.2f}x on the self-check prompt ({cfg.check_new_tokens} tokens, "
        f"median of {cfg.check_repeats} A/B pairs)",
    ]
    if "memory_bytes" in draft_info:
        notes.append(
            f"the draft model's {draft_info['memory_bytes'] / 2**20:.1f} MiB are held besides the target "
            "and not in its memory_bytes"
        )
    return MethodReport(
        execution="native",
        details={"draft": draft_info, "num_draft_tokens": cfg.num_draft_tokens, "self_check": result},
        notes=notes,
    )


METHOD = Method(
    name="speculative",
    family="acceleration",
    description=(
        "assisted greedy decoding (prompt-lookup, another model, or a compressed copy of the target as "
        "draft); identical output, verified"
    ),
    config=SpeculativeConfig,
    apply=apply,
    check=check,
    check_reads_weights=True,  # it runs a prefill to see the cache, and loads a draft model's tokenizer
    # a short self-check (one A/B pair) still compares speculative with plain greedy token for token
    test_params={"check_prompt_len": 32, "check_new_tokens": 16, "check_repeats": 1},
)
