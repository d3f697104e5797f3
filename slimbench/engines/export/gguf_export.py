"""Write a SlimBench model as a GGUF file (llama.cpp's format) through the ``gguf`` library.

Types: ``F32``, ``F16``, ``BF16`` always; ``Q8_0``, ``Q4_0``, ``Q4_1`` (blocks of 32 weights
along the input dimension, an fp16 scale per block; Q4_1 adds an fp16 minimum) written from a
method's own integer grid where the grid fits the block format:

- ``Q8_0`` (``w = d * q``, q int8): any grid whose groups are runs of a multiple of 32 columns
  (or one per row) and whose ``code - zero`` fits int8 (symmetric up to 8 bits, asymmetric up
  to 7): exact, since the method's scale is already fp16.
- ``Q4_0`` (``w = d * (q - 8)``, q 0..15): symmetric grids of up to 4 bits: exact.
- ``Q4_1`` (``w = d * q + m``): asymmetric grids of up to 4 bits; ``m = -scale * zero`` is
  rounded to fp16, so values move by at most half an fp16 ulp of ``m`` (measured and stated).

A grid that does not fit (act-order groups scattered over the columns, groups narrower than
32, more bits than the type) is **re-quantized** from the dense weight by the ``gguf``
library's reference quantizer, and the manifest says so with how far the weights moved. Dense
weights (no grid) are tried against the block types in ``auto`` mode and written in the first
one that reproduces them bit for bit (SmolLM2's weights, dequantized from Q4_1, go back to
Q4_1 exactly), else in F16. Every tensor's written values are decoded again by ``gguf``'s own
dequantizer and compared with the weight SlimBench's model holds; ``exact`` means equal in
every bit. Norm vectors stay F32, as llama.cpp requires.

Layout transforms llama.cpp's converter applies are applied here too, so a GGUF reader
(llama.cpp, transformers) sees the model it expects: Llama's q/k rows permuted for its rope
layout; Gemma's norm weights stored as ``1 + w``.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimbench.engines.export import manifest as mf
from slimbench.engines.export.gguf_meta import ExportRefused, gguf_arch, write_metadata
from slimbench.engines.export.grid import LinearGrid, change, sparsity
from slimbench.modeling import get_weight, iter_linears

WRITABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
BLOCK_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # smallest first: auto takes the first exact one
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "BF16": 32}


def type_bits(qtype: str) -> float:
    """Bits per weight of a GGUF type, block scales included (Q4_0: 4.5, Q4_K: 4.5, Q6_K: 6.5625)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    return 8 * size / block


# -- encoding one tensor ------------------------------------------------------------------------
def _fp16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float16).numpy().view(np.uint8).reshape(*x.shape, 2)


def _nibbles(v: torch.Tensor) -> np.ndarray:
    """[..., 32] values 0..15 -> [..., 16] bytes, ggml's order (low nibble j, high nibble j + 16)."""
    v = v.to(torch.uint8)
    return (v[..., :16] | (v[..., 16:] << 4)).numpy()


def encode_grid(grid: LinearGrid, qtype: str) -> np.ndarray | None:
    """Block bytes ``[out, row_bytes]`` of ``grid`` in ``qtype``, or None if the grid does not fit."""
    blocks = grid.blocks(32)
    if blocks is None:
        return None
    codes, scale, zero = blocks
    q = codes.to(torch.int16) - zero.to(torch.int16).unsqueeze(-1)
    out_f = codes.shape[0]
    if qtype == "Q8_0":
        if int(q.min()) < -128 or int(q.max()) > 127:
            return None
        parts = [_fp16_bytes(scale), q.to(torch.int8).numpy().view(np.uint8)]
    elif qtype == "Q4_0":
        if int(q.min()) < -8 or int(q.max()) > 7:
            return None
        parts = [_fp16_bytes(scale), _nibbles(q + 8)]
    elif qtype == "Q4_1":
        if grid.bits > 4:
            return None
        parts = [_fp16_bytes(scale), _fp16_bytes(-scale * zero), _nibbles(codes)]
    else:
        return None
    return np.concatenate(parts, axis=-1).reshape(out_f, -1)


def encode_dense(w: torch.Tensor, qtype: str) -> np.ndarray:
    """``w`` in ``qtype`` by the gguf library's reference quantizer (bit-exact with ggml for Q8_0)."""
    import gguf

    a = w.detach().float().numpy()
    if qtype == "F32":
        return a.astype(np.float32)
    if qtype == "F16":
        return a.astype(np.float16)
    return gguf.quants.quantize(a, gguf.GGMLQuantizationType[qtype])


def decode(data: np.ndarray, qtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 values a GGUF reader gets back (the gguf library's own dequantizer)."""
    import gguf

    if qtype in ("F32", "F16"):
        return torch.from_numpy(data.astype(np.float32)).reshape(shape)
    return torch.from_numpy(np.asarray(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]))).reshape(shape)


def fits_blocks(w: torch.Tensor) -> bool:
    return w.dim() == 2 and w.shape[1] % 32 == 0


def choose(w: torch.Tensor, grid: LinearGrid | None, requested: str) -> tuple[str, np.ndarray, dict[str, Any]]:
    """(type, bytes, manifest row) for one 2-D weight."""
    if requested != "auto":
        if grid is not None:
            data = encode_grid(grid, requested)
            if data is not None:
                return requested, data, {"from": "grid"}
        if requested in BLOCK_TYPES and not fits_blocks(w):
            requested = "F16"  # a width not divisible by 32 has no block layout
        return requested, encode_dense(w, requested), {"from": "dense", "requantized": grid is not None}
    if grid is not None:
        for qtype in BLOCK_TYPES:
            data = encode_grid(grid, qtype)
            if data is not None and change(w, decode(data, qtype, tuple(w.shape)))["exact"]:
                return qtype, data, {"from": "grid"}
        fallback = "Q4_1" if grid.bits <= 4 else "Q8_0"
        data = encode_grid(grid, fallback)
        if data is not None:
            return fallback, data, {"from": "grid"}
        if fits_blocks(w):
            return fallback, encode_dense(w, fallback), {"from": "dense", "requantized": True}
    elif fits_blocks(w):
        for qtype in BLOCK_TYPES:  # weights that already lie on a block grid go back to it exactly
            probe = w[:16]  # a few rows decide cheaply whether the whole matrix can be on this grid
            if not change(probe, decode(encode_dense(probe, qtype), qtype, tuple(probe.shape)))["exact"]:
                continue
            data = encode_dense(w, qtype)
            if change(w, decode(data, qtype, tuple(w.shape)))["exact"]:
                return qtype, data, {"from": "dense (on the block grid)"}
    return "F16", encode_dense(w, "F16"), {"from": "dense"}


# -- the model's tensors, in GGUF's names and layout --------------------------------------------
def tied_head(model) -> bool:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and emb is not None and head.weight is emb.weight


def hf_tensors(model) -> dict[str, torch.Tensor]:
    """Every weight as the float tensor the model computes with (quantized layers dequantized)."""
    out: dict[str, torch.Tensor] = {}
    linears = set()
    skip_head = tied_head(model)
    head = model.get_output_embeddings()
    for name, mod in iter_linears(model, include_lm_head=True):
        if skip_head and mod is head:
            continue
        linears.add(name)
        out[f"{name}.weight"] = get_weight(mod).detach().float()
        bias = getattr(mod, "bias", None)
        if bias is not None:
            out[f"{name}.bias"] = bias.detach().float()
    for pname, p in model.named_parameters():
        if pname.rsplit(".", 1)[0] not in linears:
            out[pname] = p.detach().float()
    return out


def rope_rows(rows: int, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order: each head's rotary halves interleaved (convert_hf_to_gguf's permute)."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)


def gguf_names(model, arch: str) -> Any:
    import gguf

    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    return gguf.get_tensor_name_map(arch_enum, model.config.num_hidden_layers)


def export(
    lm,
    path: Path,
    *,
    weights: str = "auto",
    embeddings: str = "auto",
    grids: dict[str, LinearGrid] | None = None,
    provenance: dict[str, Any] | None = None,
    progress=None,
) -> dict[str, Any]:
    """Write ``lm.model`` to ``path`` (GGUF) and its manifest beside it; returns the manifest.

    ``grids``: {weight name ("model.layers.0.mlp.up_proj.weight"): LinearGrid} of the quantized
    linears, from the method's stored forms. ``weights`` / ``embeddings``: ``auto`` or one of
    WRITABLE, for the linear layers / the token embedding and output projection.
    """
    import gguf

    for what, value in (("weights", weights), ("embeddings", embeddings)):
        if value != "auto" and value not in WRITABLE:
            raise ExportRefused(f"GGUF {what} type {value!r}: allowed auto, {', '.join(WRITABLE)}")
    model, grids = lm.model, grids or {}
    cfg = model.config
    arch = gguf_arch(cfg)
    names = gguf_names(model, arch)
    t0 = time.perf_counter()
    tensors = hf_tensors(model)
    emb_names = {"token_embd.weight", "output.weight"}
    rows, written = [], []
    bar = progress(total=len(tensors), desc="gguf", unit="tensor") if progress else None
    for hf_name, w in tensors.items():
        base, _, suffix = hf_name.rpartition(".")
        gname = names.get_name(base)
        if gname is None:
            raise ExportRefused(f"no GGUF name for {hf_name} ({arch}): the exporter does not know this layer")
        gname = f"{gname}.{suffix}"
        grid = grids.get(hf_name)
        if arch == "llama" and gname.split(".")[-2] in ("attn_q", "attn_k") and w.dim() == 2:
            heads = cfg.num_attention_heads if "attn_q" in gname else cfg.num_key_value_heads
            order = rope_rows(w.shape[0], heads)
            w = w[order]
            grid = grid.rows(order) if grid is not None else None
        if arch == "gemma3" and hf_name.endswith("norm.weight"):
            w = w + 1  # Gemma's RMSNorm multiplies by (1 + w); GGUF stores the factor
        if w.dim() == 1:
            qtype, data, row = "F32", encode_dense(w, "F32"), {"from": "dense"}
        else:
            qtype, data, row = choose(w, grid, embeddings if gname in emb_names else weights)
        measured = change(w, decode(data, qtype, tuple(w.shape)))
        rows.append({"tensor": gname, "source": hf_name, "type": qtype, "shape": list(w.shape), **row, **measured,
                     **sparsity(w)})  # GGUF has no sparse type: a pruned weight's zeros are written dense
        written.append((gname, data, qtype))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    counts: dict[str, int] = {}
    for r in rows:
        if len(r["shape"]) == 2:
            counts[r["type"]] = counts.get(r["type"], 0) + r["shape"][0] * r["shape"][1]
    main_type = max(counts, key=counts.get) if counts else "F32"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".gguf-", suffix=".gguf", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch=arch)
        meta_source = write_metadata(writer, lm, arch)
        writer.add_file_type(FILE_TYPES.get(main_type, 0))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for gname, data, qtype in written:
            raw = None if qtype in ("F32", "F16") else gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(gname, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    manifest = {
        "format": "gguf",
        "gguf_library": gguf.__name__ + " " + _version("gguf"),
        "architecture": arch,
        "file_type": main_type,
        "requested": {"weights": weights, "embeddings": embeddings},
        "metadata": meta_source,
        "model": lm.name,
        "provenance": provenance or {},
        "export_seconds": time.perf_counter() - t0,
        "files": mf.files_entry([path], path.parent),
        "summary": mf.summarize(rows),
        "tensors": rows,
    }
    mf.write(path, manifest)
    return manifest


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)
