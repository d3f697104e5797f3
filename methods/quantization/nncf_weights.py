"""`nncf-weights`: NNCF weight compression of the OpenVINO IR, run in OpenVINO.

What Intel's stack ships for CPUs: the model is exported to OpenVINO IR (fp32, via its ONNX
graph), ``nncf.compress_weights`` rewrites the MatMul weights (``mode``: int8_sym / int8_asym
per output channel, int4_sym / int4_asym in groups of ``group_size``; ``ratio`` of the layers at
4 bits, the rest int8, by NNCF's own rule) and, with ``data_aware``, uses the calibration split
for NNCF's AWQ, scale estimation or GPTQ. The compressed IR runs in OpenVINO (as the
``openvino`` step), so every task measures OpenVINO's int8/int4 kernels and logits. Sizes are
the IR's; effective bits count every constant feeding a MatMul (codes, scales, zero-points).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from slimbench.methods.acceleration.engine_check import agreement_note, agreement_windows, in_process_nll
from slimbench.methods.acceleration.openvino import OpenVINOConfig, finish

from slimbench.calibration import CalibrationConfig, sample_calibration
from slimbench.engines import onnxruntime as ortx
from slimbench.engines import openvino as ovx
from slimbench.method import Method, MethodReport
from slimbench.modeling import count_parameters


class NNCFConfig(CalibrationConfig, OpenVINOConfig):
    mode: Literal["int8_sym", "int8_asym", "int4_sym", "int4_asym"] = Field("int4_asym", description="NNCF mode")
    group_size: int | None = Field(64, ge=8, description="int4 group size (null: per channel)")
    ratio: float = Field(1.0, gt=0, le=1, description="share of the layers at 4 bits (the rest int8)")
    data_aware: bool = Field(False, description="use the calibration split (awq / scale_estimation / gptq)")
    awq: bool = Field(False, description="NNCF's AWQ (data-aware)")
    scale_estimation: bool = Field(False, description="NNCF's scale estimation (data-aware)")
    gptq: bool = Field(False, description="NNCF's GPTQ (data-aware)")
    calib_samples: int = Field(32, ge=1, le=100000, description="calibration sequences (data-aware only)")

    @model_validator(mode="after")
    def _data(self):
        if (self.awq or self.scale_estimation or self.gptq) and not self.data_aware:
            raise ValueError("awq, scale_estimation and gptq need data_aware: true")
        return self


def check(lm, cfg: NNCFConfig) -> None:
    reason = ovx.unavailable() or ovx.nncf_unavailable() or ortx.unsupported(lm)
    if reason:
        raise ValueError(f"nncf-weights: {reason}")


def dataset(lm, cfg: NNCFConfig, shapes) -> list[dict[str, np.ndarray]]:
    ids, _ = sample_calibration(lm, cfg)
    empty = {f"past.{i}.{k}": np.zeros((1, h, 0, d), np.float32) for i, (h, d) in enumerate(shapes)
             for k in ("key", "value")}
    return [{"input_ids": row[None].numpy(), **empty} for row in ids]


def apply(lm, cfg: NNCFConfig, ctx) -> MethodReport:
    win = agreement_windows(lm, cfg)
    ref = in_process_nll(lm, win)
    threads = cfg.threads or torch.get_num_threads()
    params = count_parameters(lm.model)
    fp32, facts = ovx.build(lm, threads=threads, precision=cfg.precision)
    data = dataset(lm, cfg, facts["kv_shapes"]) if cfg.data_aware else None
    out = fp32.workdir / "model.nncf.xml"
    seconds = ovx.compress_weights(fp32.xml, out, mode=cfg.mode, group_size=cfg.group_size, ratio=cfg.ratio,
                                   dataset=data, awq=cfg.awq, scale_estimation=cfg.scale_estimation, gptq=cfg.gptq)
    workdir = fp32.workdir
    fp32._cleanup.detach()  # the folder now belongs to the compressed model
    fp32.close()
    for p in ovx.ir_files(workdir / "model.xml"):
        p.unlink()
    fmt = f"openvino ir, nncf {cfg.mode}" + (f" g{cfg.group_size}" if cfg.mode.startswith("int4") else "")
    model = ovx.OVModel(out, lm.model.config, facts["kv_shapes"], threads=threads, precision=cfg.precision,
                        parameters=params, stored_format=fmt, workdir=workdir,
                        dynamic_quantization=cfg.dynamic_quantization)
    agree = finish(lm, model, ref, win, cfg)
    import nncf

    return MethodReport(
        execution="native",
        details={**ovx.engine_facts(model), "nncf": nncf.__version__, "compress_seconds": seconds,
                 "ir": ovx.ir_weights(out), "agreement": agree},
        notes=[f"NNCF {cfg.mode} weight compression" + (" (data-aware)" if cfg.data_aware else "")
               + "; runs in OpenVINO", agreement_note(agree)],
    )


METHOD = Method(
    name="nncf-weights",
    family="quantization",
    description="NNCF weight compression (int8, int4 sym/asym, groups; AWQ, scale estimation, GPTQ) of the "
                "OpenVINO IR; runs in OpenVINO",
    config=NNCFConfig,
    apply=apply,
    check=check,
    check_reads_weights=True,
    unavailable=lambda: ovx.unavailable() or ovx.nncf_unavailable(),
    calibration_need=lambda cfg: "activation-statistics" if cfg.data_aware else None,
    test_params={"mode": "int8_asym", "check_windows": 1, "check_seqlen": 32},
)
