"""`vllm`: export the model as a Hugging Face folder and run every task vLLM can serve through vLLM (CPU).

After any compression steps (``steps: [{name: rtn, bits: 4, group_size: 32}, vllm]``), the model is
written in the compressed-tensors format (slimbench.engines.export.compressed_tensors: a method's
own integer grid as packed int4/int8 with its groups where it fits, W8A8 layers as int8 with
their dynamic activation scheme, else dense), vLLM opens that
folder in its own environment and process (slimbench.engines.vllm) and ``lm.model`` becomes the
engine; ``lm.generator`` decodes greedily in vLLM's scheduler loop. Perplexity comes from vLLM's
own prompt log-probabilities, latency and throughput from its kernels. Tasks that need every
position's logits (fidelity, logit-level multiple choice) are refused by the engine model and
end as failed records: vLLM does not hand logits out.

At apply time the agreement windows are scored in process (before the switch) and by vLLM
(methods/acceleration/engine_check.py); both, their difference and the export manifest's summary
are in the record, with vLLM's version, the CPU kernels it loaded, threads and bound cores.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from slimbench.methods.acceleration.engine_check import (
    AgreementConfig,
    agreement_note,
    agreement_windows,
    in_process_nll,
    refuse_unless_engine_can_take,
    switch_to_engine,
)
from slimbench.methods.quantization.export_grids import int8_layers, linear_grids

from slimbench.engines import vllm
from slimbench.engines.export import compressed_tensors
from slimbench.method import Method, MethodReport
from slimbench.modeling import count_parameters


class VllmConfig(AgreementConfig):
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="vLLM's compute dtype (and the export's)")
    threads: int | None = Field(None, ge=1, le=512, description="vLLM's OpenMP threads (default: the cell's)")
    max_model_len: int = Field(2048, ge=64, le=131072, description="longest sequence vLLM admits")
    sequences: int = Field(8, ge=1, le=256, description="most sequences vLLM schedules at once")
    top_logprobs: int = Field(20, ge=1, le=1000, description="next-token log-probabilities a prefill returns")
    kv_cache_gib: int = Field(1, ge=1, le=1024, description="vLLM's CPU KV-cache space in GiB")
    timeout_s: float = Field(900.0, gt=0, description="longest any one engine request (start-up included) may take")


def check(lm, cfg: VllmConfig) -> None:
    refuse_unless_engine_can_take(lm, "vllm", "vLLM", vllm.unavailable())
    config = lm.model.config
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head not in vllm.CPU_HEAD_SIZES:
        sizes = ", ".join(map(str, vllm.CPU_HEAD_SIZES))
        raise ValueError(f"vllm: head size {head}; vLLM's CPU attention takes {sizes}")
    if cfg.check_seqlen > cfg.max_model_len:
        raise ValueError(f"vllm: check_seqlen {cfg.check_seqlen} exceeds max_model_len {cfg.max_model_len}")


def apply(lm, cfg: VllmConfig, ctx) -> MethodReport:
    win = agreement_windows(lm, cfg)
    ref = in_process_nll(lm, win)
    grids = linear_grids(lm.model, ctx.stored_forms)
    owned = Path(tempfile.mkdtemp(prefix="slimbench-vllm-"))
    try:
        manifest = compressed_tensors.export(lm, owned / "model", dtype=cfg.dtype, grids=grids,
                                              int8=int8_layers(lm.model))
        refused = vllm.unsupported_format(manifest)
        if refused:
            raise ValueError(f"vllm: {refused}")
        model = vllm.VllmModel(
            owned / "model", lm.model.config, dtype=cfg.dtype, threads=cfg.threads or torch.get_num_threads(),
            max_model_len=cfg.max_model_len, max_num_seqs=cfg.sequences, top_logprobs=cfg.top_logprobs,
            kv_cache_gib=cfg.kv_cache_gib, parameters=count_parameters(lm.model), manifest=manifest,
            timeout_s=cfg.timeout_s, owned_dir=owned,
        )
    except BaseException:
        import shutil

        shutil.rmtree(owned, ignore_errors=True)
        raise
    agree = switch_to_engine(lm, model, vllm.VllmGenerator(), ref, win, cfg)
    summary = manifest["summary"]
    stored = {k for k in ctx.stored_forms if k.endswith(".weight")}
    from_grid = {r["tensor"] for r in manifest["tensors"] if r["from"] == "grid"}
    return MethodReport(
        execution="native",
        details={**vllm.engine_facts(model), "export": {k: v for k, v in manifest.items() if k != "tensors"},
                 "grids_from_method": len(grids), "agreement": agree, "engine_memory": model.memory(),
                 "executes_stored_forms": stored <= from_grid},
        notes=[
            f"compressed-tensors {manifest['quantization_format']}: {summary['exact']} of {summary['tensors']} "
            "tensors exact",
            agreement_note(agree),
            "memory figures of the efficiency task count the cell's process; vLLM's own resident memory is in "
            "details.engine_memory",
        ],
    )


METHOD = Method(
    name="vllm",
    family="acceleration",
    description="export to compressed-tensors (the method's own grid where it fits) and run through vLLM (CPU)",
    config=VllmConfig,
    apply=apply,
    check=check,
    check_reads_weights=True,  # its check inspects the loaded model (an engine already, hooks)
    unavailable=vllm.unavailable,
    # 2: W8A8 layers are written int-quantized and run in vLLM's int8 kernels (were: dense)
    version="2",
    runs_on_tiny=False,  # the tiny models' head size (16) is below vLLM's CPU attention's smallest (32)
    test_params={"check_windows": 1, "check_seqlen": 32, "max_model_len": 256, "sequences": 2},
)
