"""`onnx-runtime`: execute the model with ONNX Runtime on CPU instead of eager PyTorch.

The model (after any preceding step that leaves plain torch layers: layer-drop, structured
pruning, a factorized low-rank model, ...) is exported once with ``torch.onnx.export``
(dynamo) into a graph with a KV cache as inputs and outputs, opened in an ORT session, and
``lm.model`` becomes that session (slimbench.engines.onnxruntime, an implementation of the
backend interface in slimbench.engines.backend). Every task, the efficiency task's prefill and
decode included, then runs through ORT.

At apply time the ORT logits on a corpus prompt are compared with the eager model's (the cell
fails beyond ``tolerance``, relative to the largest logit) and greedy decoding through the ORT
KV cache is compared token for token. Export time is the method's cost; the stored bytes are the
ONNX files' (graph + external weights).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from slimbench.config import Config
from slimbench.engines import onnxruntime as ortx
from slimbench.method import Method, MethodReport


class OnnxRuntimeConfig(Config):
    threads: int | None = Field(None, ge=1, le=512, description="ORT intra-op threads (default: the cell's threads)")
    optimization: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="ORT graph optimization level"
    )
    opset: int | None = Field(None, ge=17, le=23, description="ONNX opset (default: the exporter's)")
    tolerance: float = Field(1e-4, gt=0, description="max |logit difference| / max |logit| allowed vs eager")
    check_prompt_len: int = Field(32, ge=1, le=8192, description="self-check prompt tokens (corpus text)")
    check_new_tokens: int = Field(8, ge=1, le=4096, description="self-check greedy tokens through the ORT KV cache")
    corpus: str = Field("shakespeare", description="where the self-check prompt comes from")
    split: str = Field("test", description="corpus split of the self-check prompt")


def check(lm, cfg: OnnxRuntimeConfig) -> None:
    reason = ortx.unavailable() or ortx.unsupported(lm)
    if reason:
        raise ValueError(f"onnx-runtime: {reason}")


def prompt(lm, cfg) -> torch.Tensor:
    from slimbench.zoo.corpora import encode_split

    ids = encode_split(lm, cfg.corpus, cfg.split)[: cfg.check_prompt_len]
    if len(ids) < cfg.check_prompt_len:
        raise ValueError(f"corpus split gives only {len(ids)} prompt tokens (< {cfg.check_prompt_len})")
    return torch.tensor([ids])


def agreement(lm, ids: torch.Tensor, ref_logits: torch.Tensor, ref_tokens: torch.Tensor) -> dict:
    """How the current lm.model's logits and greedy tokens compare with reference ones."""
    logits = lm.logits(ids).float()
    tokens = lm.generate(ids, ref_tokens.shape[1])
    return {
        "logits_max_abs_diff": float((logits - ref_logits).abs().max()),
        "logits_max_abs": float(ref_logits.abs().max()),
        "greedy_identical": bool(torch.equal(tokens, ref_tokens)),
        "greedy_agreement": float((tokens == ref_tokens).float().mean()),
    }


def apply(lm, cfg: OnnxRuntimeConfig, ctx) -> MethodReport:
    ids = prompt(lm, cfg)
    ref_logits = lm.logits(ids).float()
    ref_tokens = lm.generate(ids, cfg.check_new_tokens)
    threads = cfg.threads or torch.get_num_threads()  # what the cell resolved (auto included)
    model, facts = ortx.build(lm, threads=threads, optimization=cfg.optimization, opset=cfg.opset)
    lm.model = model
    result = agreement(lm, ids, ref_logits, ref_tokens)
    if result["logits_max_abs_diff"] > cfg.tolerance * max(1.0, result["logits_max_abs"]):
        model.close()
        raise ValueError(
            f"onnx-runtime: ORT logits differ from eager by {result['logits_max_abs_diff']:.3g} "
            f"(max |logit| {result['logits_max_abs']:.3g}, tolerance {cfg.tolerance:g} relative)"
        )
    import onnxruntime

    sizes = ortx.graph_sizes(model.path)
    return MethodReport(
        execution="native",
        details={
            "onnxruntime": onnxruntime.__version__,
            "provider": "CPUExecutionProvider",
            "threads": threads,
            "optimization": cfg.optimization,
            "export_seconds": facts["export_seconds"],
            "graph_ops": sizes["op_counts"],
            "self_check": result,
        },
        notes=[
            f"ORT logits equal eager within {result['logits_max_abs_diff']:.2g}; greedy tokens "
            + ("identical" if result["greedy_identical"] else f"{100 * result['greedy_agreement']:.0f}% equal"),
            "sizes are the ONNX graph's: initializers in memory, graph + external data files stored",
        ],
    )


METHOD = Method(
    name="onnx-runtime",
    family="acceleration",
    description="export to ONNX (torch.onnx, dynamo) and run prefill/decode with a KV cache in ONNX Runtime (CPU)",
    config=OnnxRuntimeConfig,
    apply=apply,
    check=check,
    check_reads_weights=True,  # its check inspects the loaded model (device, engine), not shapes
)
