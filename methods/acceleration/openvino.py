"""`openvino`: export to OpenVINO IR and run every task through OpenVINO (CPU).

The model (after any steps that leave plain torch layers) is exported through its ONNX graph
to OpenVINO IR (slimbench.engines.openvino), compiled for the CPU with the cell's threads, and
``lm.model`` becomes it; perplexity comes from OpenVINO's logits, latency from its kernels. A
quantized torch layer (packed RTN, dynamic int8) cannot be exported: quantize for OpenVINO with
``nncf-weights`` instead, or with a fake-quant method before this step: a method's integer grid
(RTN, GPTQ, AWQ's codes with contiguous groups) goes into the IR as itself (u4/u8 codes,
zero-points, fp16 scales; bit-exact) and runs in OpenVINO's compressed-weight kernels, so
``[gptq, openvino]`` executes GPTQ's own grid natively. Other weights are exported as the dense
values they hold.

At apply time the agreement windows are scored in process and by OpenVINO (engine_check).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from slimbench.methods.acceleration.engine_check import (
    AgreementConfig,
    agreement,
    agreement_note,
    agreement_windows,
    in_process_nll,
)
from slimbench.methods.quantization.export_grids import linear_grids

from slimbench.engines import onnxruntime as ortx
from slimbench.engines import openvino as ovx
from slimbench.method import Method, MethodReport


class OpenVINOConfig(AgreementConfig):
    threads: int | None = Field(None, ge=1, le=512, description="OpenVINO inference threads (default: the cell's)")
    precision: Literal["f32", "bf16"] = Field("f32", description="OpenVINO CPU inference precision hint")
    dynamic_quantization: int | None = Field(
        None, ge=0, le=4096, description="group size of the int8 quantization OpenVINO's CPU plugin applies to the "
        "activations of compressed-weight layers (0: off, weight-only; default: OpenVINO's own, 32)")


def check(lm, cfg) -> None:
    reason = ovx.unavailable() or ortx.unsupported(lm)
    if reason:
        raise ValueError(f"openvino: {reason}")


def finish(lm, model, ref, win, cfg) -> dict:
    """Score the agreement windows through OpenVINO, then make it the model every task runs through."""
    saved = lm.model
    lm.model = model
    try:
        return agreement(ref, in_process_nll(lm, win), cfg)
    except BaseException:
        lm.model = saved
        model.close()
        raise


def apply(lm, cfg: OpenVINOConfig, ctx) -> MethodReport:
    win = agreement_windows(lm, cfg)
    ref = in_process_nll(lm, win)
    grids = linear_grids(lm.model, ctx.stored_forms)
    model, facts = ovx.build(lm, threads=cfg.threads or torch.get_num_threads(), precision=cfg.precision,
                             grids=grids, dynamic_quantization=cfg.dynamic_quantization)
    agree = finish(lm, model, ref, win, cfg)
    # every stored form written as its own grid: OpenVINO executes what the earlier steps stored
    stored = {k for k in ctx.stored_forms if k.endswith(".weight")}
    written = {r["tensor"] for r in facts["grids"] if r["exact"]}
    engine = ovx.engine_facts(model)
    group = engine["dynamic_quantization_group_size"]
    return MethodReport(
        execution="native",
        details={**engine, "export_seconds": facts["export_seconds"],
                 "convert_seconds": facts["convert_seconds"], "ir": ovx.ir_weights(model.xml), "agreement": agree,
                 "grids_from_method": len(grids), "grids_written": len(written),
                 "executes_stored_forms": bool(stored) and stored <= written},
        notes=[f"OpenVINO IR from the ONNX graph: {len(written)} linear weights as the method's own grid "
               "(compressed-weight kernels), the rest fp32", agreement_note(agree)]
        + ([f"OpenVINO quantizes the activations of those layers to int8 in groups of {group} (its CPU "
            "default; dynamic_quantization: 0 for weight-only)"] if written and group else []),
    )


METHOD = Method(
    name="openvino",
    family="acceleration",
    description="export to OpenVINO IR (via ONNX) and run prefill/decode with a KV cache in OpenVINO (CPU)",
    config=OpenVINOConfig,
    apply=apply,
    check=check,
    check_reads_weights=True,
    unavailable=ovx.unavailable,
    # 2: a method's integer grid goes into the IR as compressed weights (was: its dense values)
    version="2",
    test_params={"check_windows": 1, "check_seqlen": 32},
)
