"""`openvino`: export to OpenVINO IR and run every task through OpenVINO (CPU).

The model (after any steps that leave plain torch layers) is exported through its ONNX graph
to OpenVINO IR (slimbench.engines.openvino), compiled for the CPU with the cell's threads, and
``lm.model`` becomes it; perplexity comes from OpenVINO's logits, latency from its kernels. A
quantized torch layer (packed RTN, dynamic int8) cannot be exported: quantize for OpenVINO with
``nncf-weights`` instead. A fake-quant method's weights are exported as the dense values they
hold (exact in fp32; the IR does not carry the method's grid, and says so).

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

from slimbench.engines import onnxruntime as ortx
from slimbench.engines import openvino as ovx
from slimbench.method import Method, MethodReport


class OpenVINOConfig(AgreementConfig):
    threads: int | None = Field(None, ge=1, le=512, description="OpenVINO inference threads (default: the cell's)")
    precision: Literal["f32", "bf16"] = Field("f32", description="OpenVINO CPU inference precision hint")


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
    model, facts = ovx.build(lm, threads=cfg.threads or torch.get_num_threads(), precision=cfg.precision)
    agree = finish(lm, model, ref, win, cfg)
    return MethodReport(
        execution="native",
        details={**ovx.engine_facts(model), "export_seconds": facts["export_seconds"],
                 "convert_seconds": facts["convert_seconds"], "ir": ovx.ir_weights(model.xml), "agreement": agree},
        notes=["OpenVINO IR from the ONNX graph (fp32 weights: a fake-quant grid is exported as its dense values)",
               agreement_note(agree)],
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
    test_params={"check_windows": 1, "check_seqlen": 32},
)
