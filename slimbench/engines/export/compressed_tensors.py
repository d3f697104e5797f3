"""Write a SlimBench model as a Hugging Face folder in the compressed-tensors format.

What transformers, vLLM and llm-compressor load: ``config.json`` with a ``quantization_config``
(``quant_method: compressed-tensors``), ``model.safetensors``, the tokenizer. A linear whose
integer grid is known (a method's stored form or packed layer, contiguous groups or one per
row) is written ``pack-quantized``: its own codes, shifted to the signed range the format uses
(``q = code - 2^(b-1)``, zero-point likewise), packed by the compressed-tensors library's own
``pack_to_int32``, with the scale in the model's float dtype (fp16 values, so decoding
``(q - zp) * scale`` reproduces SlimBench's weights bit for bit in fp32). A W8A8 linear (int8
weight, per-row scale, activations quantized at run time) is written ``int-quantized``: its int8
codes as they are and an ``input_activations`` scheme (8-bit, dynamic, per token or per tensor),
which is what vLLM's int8 W8A8 kernels read. Layers are grouped by scheme into config groups
that name them, each group with its format (``mixed-precision`` at the top when both occur).
Every other weight is written dense (an act-order grid, whose scattered groups this writer
does not express, is listed as such). Dense models: fp32, fp16 or bf16.

Not written: 2:4 and bitmask sparsity (compressed-tensors 0.20 and vLLM 0.32 removed those
formats: a pruned model is written dense and the manifest gives each weight's measured sparsity
and N:M pattern), low-rank factors (refused above the exporter by the CLI's check, or written as
their dense product and said so in the manifest).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from slimbench.engines.export import manifest as mf
from slimbench.engines.export.gguf_export import hf_tensors, tied_head
from slimbench.engines.export.gguf_meta import ExportRefused
from slimbench.engines.export.grid import Int8Layer, LinearGrid, change, sparsity

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _args(grid: LinearGrid) -> dict[str, Any] | None:
    size = grid.contiguous_group()
    if size is None:
        return None
    per_channel = size == grid.shape[1]
    return {"num_bits": grid.bits, "type": "int", "symmetric": grid.symmetric,
            "strategy": "channel" if per_channel else "group", "group_size": None if per_channel else size}


def pack_layer(grid: LinearGrid, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    offset = 1 << (grid.bits - 1)
    q = (grid.codes.to(torch.int16) - offset).to(torch.int8)
    out = {"weight_packed": pack_to_int32(q, grid.bits), "weight_scale": grid.scale.to(dtype),
           "weight_shape": torch.tensor(grid.shape)}
    if not grid.symmetric:
        zp = (grid.zero.to(torch.int16) - offset).to(torch.int8)
        out["weight_zero_point"] = pack_to_int32(zp, grid.bits, packed_dim=0).contiguous()
    return out


def int8_scheme(layer: Int8Layer) -> dict[str, Any]:
    return {"weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
            "input_activations": {"num_bits": 8, "type": "int", "symmetric": layer.act_symmetric,
                                  "strategy": layer.activations, "dynamic": True}}


def int8_parts(layer: Int8Layer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"weight": layer.qweight.to(torch.int8).contiguous(), "weight_scale": layer.scale.view(-1, 1).to(dtype)}


def decoded(parts: dict[str, torch.Tensor], scheme: dict[str, Any], fmt: str = "pack-quantized") -> torch.Tensor:
    """The weight the compressed-tensors library decodes from ``parts`` (its own decompressor)."""
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    compressor = PackedQuantizationCompressor if fmt == "pack-quantized" else IntQuantizationCompressor
    args = {k: QuantizationArgs(**v) for k, v in scheme.items()}
    return compressor.decompress(dict(parts), QuantizationScheme(targets=["Linear"], **args))["weight"]


def export(lm, folder: Path, *, dtype: str = "float32", grids: dict[str, LinearGrid] | None = None,
           int8: dict[str, Int8Layer] | None = None, provenance: dict | None = None) -> dict[str, Any]:
    """Write ``lm.model`` into ``folder`` (created; must not exist) and its manifest beside it."""
    from compressed_tensors import __version__ as ct_version
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ExportRefused(f"compressed-tensors dtype {dtype!r}: allowed {', '.join(DTYPES)}")
    folder = Path(folder)
    if folder.exists():
        raise ExportRefused(f"{folder} exists; choose a new folder")
    model, grids, int8, tdtype = lm.model, grids or {}, int8 or {}, DTYPES[dtype]
    t0 = time.perf_counter()
    tensors = hf_tensors(model)
    state: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, Any]] = {}
    rows = []
    for name, w in tensors.items():
        module = name.removesuffix(".weight")
        grid, layer = grids.get(name), int8.get(name)
        args = _args(grid) if grid is not None else None
        if args is not None or layer is not None:
            if layer is not None:
                fmt, scheme, parts = "int-quantized", int8_scheme(layer), int8_parts(layer, tdtype)
                kind = f"int8 channel, activations int8 per {layer.activations} (dynamic)"
            else:
                fmt, scheme, parts = "pack-quantized", {"weights": args}, pack_layer(grid, tdtype)
                kind = f"int{grid.bits} {args['strategy']}"
            state.update({f"{module}.{k}": v for k, v in parts.items()})
            key = json.dumps([fmt, scheme], sort_keys=True)
            groups.setdefault(key, {"targets": [], **scheme, "format": fmt})["targets"].append(module)
            back = decoded(parts, scheme, fmt).float()
            row = {"tensor": name, "type": kind, "from": "grid" if layer is None else "int8",
                   "shape": list(w.shape), **change(w, back)}
            if layer is not None:
                row["activations"] = layer.activations
                if layer.note:
                    row["note"] = layer.note
            rows.append(row)
            continue
        state[name] = w.to(tdtype).contiguous()
        row = {"tensor": name, "type": dtype, "from": "dense", "shape": list(w.shape), **change(w, state[name]),
               **sparsity(w)}
        if grid is not None:
            row["note"] = "act-order grid (scattered groups) written dense"
        rows.append(row)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = dtype
    config["tie_word_embeddings"] = tied_head(model)
    formats = sorted({g["format"] for g in groups.values()})
    qformat = "dense" if not formats else formats[0] if len(formats) == 1 else "mixed-precision"
    if groups:
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": qformat, "quantization_status": "compressed",
            "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())}, "ignore": [],
        }
    tmp = Path(tempfile.mkdtemp(prefix=".ct-", dir=folder.parent if folder.parent.exists() else None))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        lm.tokenizer.save_pretrained(str(tmp))
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    manifest = {
        "format": "compressed-tensors", "compressed_tensors": ct_version,
        "quantization_format": qformat,
        "dtype": dtype, "model": lm.name, "provenance": provenance or {},
        "export_seconds": time.perf_counter() - t0,
        "files": mf.files_entry([p for p in folder.iterdir() if p.is_file()], folder),
        "summary": mf.summarize(rows), "tensors": rows,
    }
    mf.write(folder, manifest)
    return manifest
