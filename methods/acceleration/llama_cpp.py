"""`llama-cpp`: export the model to GGUF and run every task through llama.cpp (CPU).

After any compression steps (``steps: [{name: rtn, bits: 4, group_size: 32, symmetric: true},
llama-cpp]``), the model is written as a GGUF file (slimbench.engines.export.gguf_export: a
method's own integer grid as Q4_0 / Q4_1 / Q8_0 where it fits, else re-quantized and said so),
opened by llama.cpp in its own process (slimbench.engines.llamacpp) and ``lm.model`` becomes
that engine; ``lm.generator`` decodes greedily inside it. Perplexity then comes from llama.cpp's
own logits, latency and throughput from its kernels.

At apply time the agreement windows are scored in process (before the switch) and by the engine
(methods/acceleration/engine_check.py); both, their difference and the export manifest's summary
(which tensors were exact) are in the record, with the engine's version, build and threads.
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
from slimbench.methods.quantization.export_grids import linear_grids

from slimbench.engines import llamacpp
from slimbench.engines.export import gguf_export
from slimbench.engines.export.gguf_meta import ExportRefused, gguf_arch
from slimbench.method import Method, MethodReport
from slimbench.modeling import count_parameters

GGUFType = Literal["auto", "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]


class EngineOptions(AgreementConfig):
    """How llama.cpp is opened (shared with the llama.cpp quantization methods)."""

    threads: int | None = Field(None, ge=1, le=512, description="llama.cpp threads (default: the cell's threads)")
    n_ctx: int = Field(2048, ge=64, le=131072, description="context positions per sequence")
    sequences: int = Field(8, ge=1, le=256, description="most rows of one batch (llama.cpp sequences)")
    kv_type: Literal["f16", "f32", "q8_0"] = Field("f16", description="llama.cpp KV-cache type (its default: f16)")
    timeout_s: float = Field(600.0, gt=0, description="longest any one engine request may take before the cell fails")


class LlamaCppConfig(EngineOptions):
    weights: GGUFType = Field("auto", description="GGUF type of the linear weights (auto: the method's grid "
                                                  "where it fits exactly, else F16)")
    embeddings: GGUFType = Field("auto", description="GGUF type of the token embedding / output projection")


def check(lm, cfg: LlamaCppConfig) -> None:
    refuse_unless_engine_can_take(lm, "llama-cpp", "llama.cpp", llamacpp.unavailable())
    try:
        gguf_arch(lm.model.config)
    except ExportRefused as exc:
        raise ValueError(f"llama-cpp: {exc}") from None


def open_engine(lm, gguf: Path, manifest: dict, cfg, *, owned_dir: Path | None, parameters: int):
    threads = cfg.threads or torch.get_num_threads()
    return llamacpp.LlamaCppModel(
        gguf, lm.model.config, threads=threads, n_ctx=cfg.n_ctx, n_seq=cfg.sequences, kv_type=cfg.kv_type,
        parameters=parameters, manifest=manifest, timeout_s=cfg.timeout_s, owned_dir=owned_dir,
    )


def switch(lm, model, ref_nll: list[float], win: torch.Tensor, cfg) -> dict:
    """Score the agreement windows in llama.cpp, then make it the model every task runs through."""
    return switch_to_engine(lm, model, llamacpp.LlamaCppGenerator(), ref_nll, win, cfg)


def apply(lm, cfg: LlamaCppConfig, ctx) -> MethodReport:
    win = agreement_windows(lm, cfg)
    ref = in_process_nll(lm, win)
    grids = linear_grids(lm.model, ctx.stored_forms)
    folder = Path(tempfile.mkdtemp(prefix="slimbench-gguf-"))
    manifest = gguf_export.export(lm, folder / "model.gguf", weights=cfg.weights, embeddings=cfg.embeddings,
                                  grids=grids, progress=ctx.progress)
    model = open_engine(lm, folder / "model.gguf", manifest, cfg, owned_dir=folder,
                        parameters=count_parameters(lm.model))
    agree = switch(lm, model, ref, win, cfg)
    summary = manifest["summary"]
    # every quantized linear written as its own grid (nothing re-quantized, nothing left dense
    # that had a stored form): the engine executes exactly what the earlier steps stored
    stored = {k for k in ctx.stored_forms if k.endswith(".weight")}
    from_grid = {r["source"] for r in manifest["tensors"] if r["from"] == "grid" and r["exact"]}
    realizes = stored <= from_grid and not summary["requantized"]
    return MethodReport(
        execution="native",
        details={**llamacpp.engine_facts(model), "export": {k: v for k, v in manifest.items() if k != "tensors"},
                 "grids_from_method": len(grids), "agreement": agree, "engine_memory": model.memory(),
                 "executes_stored_forms": realizes},
        notes=[
            f"GGUF {manifest['file_type']}: {summary['exact']} of {summary['tensors']} tensors bit-exact"
            + (f", re-quantized: {len(summary['requantized'])}" if summary["requantized"] else ""),
            agreement_note(agree),
            "memory figures of the efficiency task count the cell's process; the engine's own resident "
            "memory is in details.engine_memory",
        ],
    )


METHOD = Method(
    name="llama-cpp",
    family="acceleration",
    description="export to GGUF (the method's own grid where it fits) and run every task through llama.cpp (CPU)",
    config=LlamaCppConfig,
    apply=apply,
    check=check,
    check_reads_weights=True,  # its check inspects the loaded model (an engine already, hooks)
    unavailable=llamacpp.unavailable,
    test_params={"check_windows": 1, "check_seqlen": 32, "n_ctx": 256},
)
