"""`ort-int8`: ONNX Runtime's own int8 dynamic quantization of an `onnx-runtime` model.

Follows an ``onnx-runtime`` step (``[onnx-runtime, ort-int8]``): ``quantize_dynamic`` rewrites
every MatMul with a constant weight (the linear layers and the output projection) into int8
weights (per tensor, or per output channel with ``per_channel``) with activations quantized per
tensor at run time (DynamicQuantizeLinear + MatMulInteger), the ORT analogue of torch's
``dynamic-int8``. Stored bytes are the int8 ONNX files'; the embedding stays fp32. The method
reports how far the logits and greedy tokens moved from the fp32 ORT model (lossy: no
tolerance; quality is measured by the tasks).
"""

from __future__ import annotations

from pydantic import Field
from slimbench.methods.acceleration.onnx_runtime import agreement, prompt

from slimbench.config import Config
from slimbench.engines import onnxruntime as ortx
from slimbench.method import Method, MethodReport


class OrtInt8Config(Config):
    per_channel: bool = Field(False, description="one weight scale per output channel instead of per tensor")
    check_prompt_len: int = Field(32, ge=1, le=8192, description="prompt tokens for the fp32 vs int8 comparison")
    check_new_tokens: int = Field(8, ge=1, le=4096, description="greedy tokens compared with the fp32 ORT model")
    corpus: str = Field("shakespeare", description="where the comparison prompt comes from")
    split: str = Field("test", description="corpus split of the comparison prompt")


def check(lm, cfg: OrtInt8Config) -> None:
    if not isinstance(lm.model, ortx.OrtModel):
        raise ValueError(
            f"ort-int8: quantizes the ONNX graph of an onnx-runtime step; the model is a "
            f"{type(lm.model).__name__}: use steps [onnx-runtime, ort-int8]"
        )
    if getattr(lm.model.config, "model_type", None) == "opt":
        # onnxruntime 1.31's quantize_dynamic fails shape inference on the exported OPT graph
        # ("Inferred shape and existing shape differ"): refused rather than failing mid-cell.
        raise ValueError("ort-int8: ONNX Runtime's int8 quantizer cannot process the exported OPT graph")
    if "int8" in lm.model.stored_format:
        raise ValueError("ort-int8: the ONNX model is already int8")


def apply(lm, cfg: OrtInt8Config, ctx) -> MethodReport:
    ids = prompt(lm, cfg)
    ref_logits = lm.logits(ids).float()
    ref_tokens = lm.generate(ids, cfg.check_new_tokens)
    fp32 = lm.model
    lm.model, seconds = ortx.requantize(fp32, cfg.per_channel)
    fp32.close()
    result = agreement(lm, ids, ref_logits, ref_tokens)
    sizes = ortx.graph_sizes(lm.model.path)
    return MethodReport(
        execution="native",
        details={
            "quantize_seconds": seconds,
            "per_channel": cfg.per_channel,
            "graph_ops": sizes["op_counts"],
            "vs_fp32_onnx": result,
        },
        notes=[
            "ORT MatMulInteger kernels with int8 weights (native); the embedding stays fp32",
            f"vs the fp32 ORT model: max |logit difference| {result['logits_max_abs_diff']:.3g}, "
            f"{100 * result['greedy_agreement']:.0f}% of {cfg.check_new_tokens} greedy tokens equal",
        ],
    )


METHOD = Method(
    name="ort-int8",
    family="acceleration",
    description="ONNX Runtime int8 dynamic quantization (MatMulInteger) of an onnx-runtime model; follows onnx-runtime",
    config=OrtInt8Config,
    apply=apply,
    check=check,
    requires=("onnx-runtime",),
    check_reads_weights=True,  # its check inspects the loaded model (device, engine), not shapes
)
