"""`llamacpp-quant`: llama.cpp's own quantization types, by its own tools, run in llama.cpp.

What practitioners ship for CPUs and edge devices: ``type`` one of Q8_0, Q6_K, Q5_K_M, Q4_K_M,
Q4_0, Q3_K_M, Q2_K, IQ4_XS. The model (after any earlier steps) is written as an F32 GGUF
(bit-exact, slimbench.engines.export.gguf_export); llama.cpp's own quantizer
(``llama_model_quantize``, what ``llama-quantize`` calls) writes the type, with its own
per-tensor mix (a ``_M`` type keeps some tensors at more bits, the embedding included); and the
model then runs in llama.cpp (like the ``llama-cpp`` step), so every task measures llama.cpp's
kernels and logits. Sizes are the quantized file's; effective bits those of the linear weights'.

The importance matrix (``imatrix``) is the quantity ``llama-imatrix`` defines: for each weight
matrix, the mean over the calibration tokens of the square of each input column. Two sources:

- ``activations`` (default): from SlimBench's forward pass over the seeded calibration windows
  (forward pre-hooks on every linear, the output projection included), handed to llama.cpp's
  quantizer through its C API (``llama_model_imatrix_data``, as llama-quantize does from a file).
- ``llama-imatrix``: llama.cpp's own tool on the same windows decoded to text (llama.cpp
  tokenizes it again, ``calib_seqlen`` tokens per chunk): needs the tool built.
- ``none``: no importance matrix (llama.cpp's plain rounding per type).
"""

from __future__ import annotations

import math
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from slimbench.methods.acceleration.engine_check import agreement_note, agreement_windows, in_process_nll
from slimbench.methods.acceleration.llama_cpp import EngineOptions, open_engine, switch

from slimbench.calibration import CalibrationConfig, feed_linear_inputs, sample_calibration
from slimbench.engines import llamacpp, llamacpp_build
from slimbench.engines.engine_process import EngineProcess
from slimbench.engines.export import gguf_export
from slimbench.engines.export.gguf_meta import ExportRefused, gguf_arch
from slimbench.method import Method, MethodReport
from slimbench.modeling import count_parameters

TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K", "IQ4_XS")


class LlamaQuantConfig(CalibrationConfig, EngineOptions):
    type: Literal["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K", "IQ4_XS"] = Field(
        "Q4_K_M", description="llama.cpp quantization type (llama-quantize's name)")
    imatrix: Literal["activations", "llama-imatrix", "none"] = Field(
        "activations", description="importance matrix source (calibration split): SlimBench's activations, "
                                   "llama.cpp's llama-imatrix tool, or none")
    calib_samples: int = Field(64, ge=1, le=100000, description="calibration chunks for the importance matrix")


def check(lm, cfg: LlamaQuantConfig) -> None:
    reason = llamacpp.unavailable()
    if not reason and cfg.imatrix == "llama-imatrix":
        reason = llamacpp_build.tool_unavailable("llama-imatrix")
    if reason:
        raise ValueError(f"llamacpp-quant: {reason}")
    try:
        gguf_arch(lm.model.config)
    except ExportRefused as exc:
        raise ValueError(f"llamacpp-quant: {exc}") from None


def run_tool(args: list[str], what: str, timeout_s: float) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {(done.stderr or done.stdout)[-2000:]}")
    return time.perf_counter() - t0


def activation_imatrix(lm, ids: torch.Tensor) -> dict:
    """{GGUF weight name: mean over tokens of each input column's square} from forward pre-hooks."""
    from slimbench.modeling import iter_linears

    names = gguf_export.gguf_names(lm.model, gguf_arch(lm.model.config))
    tied = gguf_export.tied_head(lm.model)
    head = lm.model.get_output_embeddings()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    linears = []
    for name, mod in iter_linears(lm.model, include_lm_head=True):
        gname = "token_embd" if (tied and mod is head) else names.get_name(name)
        if gname is not None:
            linears.append((f"{gname}.weight", mod))

    def add(key: str, x: torch.Tensor) -> None:
        x = x.float()
        sums[key] = sums.get(key, 0) + x.pow(2).sum(0)
        counts[key] = counts.get(key, 0) + x.shape[0]

    feed_linear_inputs(lm.model, linears, ids, add, lm.device)
    return {k: (sums[k] / counts[k]).numpy() for k in sums}


def importance_matrix(lm, cfg: LlamaQuantConfig, source: Path, folder: Path, threads: int) -> dict:
    ids, info = sample_calibration(lm, cfg)
    if cfg.imatrix == "activations":
        t0 = time.perf_counter()
        data = activation_imatrix(lm, ids)
        return {"data": data, "seconds": time.perf_counter() - t0, "calibration": info, "source": "activations"}
    text = folder / "calibration.txt"
    text.write_text("\n\n".join(lm.decode_ids(row.tolist()) for row in ids))
    out = folder / "imatrix.gguf"
    seconds = run_tool(
        [str(llamacpp_build.tool_path("llama-imatrix")), "-m", str(source), "-f", str(text), "-o", str(out),
         "-c", str(cfg.calib_seqlen), "-b", str(cfg.calib_seqlen), "--chunks", str(cfg.calib_samples),
         "-t", str(threads), "--no-ppl"],
        "llama-imatrix", cfg.timeout_s * 10,
    )
    return {"data": read_imatrix(out), "seconds": seconds, "calibration": info, "source": "llama-imatrix"}


def read_imatrix(path: Path) -> dict:
    """An imatrix GGUF (llama-imatrix's output) as {tensor: sums / counts}."""
    import gguf
    import numpy as np

    tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1) for t in gguf.GGUFReader(path).tensors}
    out = {}
    for name, sums in tensors.items():
        if name.endswith(".in_sum2"):
            base = name.removesuffix(".in_sum2")
            counts = tensors[f"{base}.counts"]
            out[base] = sums / np.repeat(counts, sums.size // counts.size)
    return out


# Bytes of GGUF's fixed-size metadata value types (uint8 ... float64; 8 = string, 9 = array).
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _skip_gguf_value(buf, pos: int, vtype: int) -> int:
    if vtype == 8:  # string: uint64 length, bytes
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
    if vtype == 9:  # array: item type, uint64 count, items
        itype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if itype in _GGUF_SIZES:
            return pos + count * _GGUF_SIZES[itype]
        for _ in range(count):
            pos = _skip_gguf_value(buf, pos, itype)
        return pos
    return pos + _GGUF_SIZES[vtype]


def tensor_types(path: Path) -> list[dict]:
    """Name, type, shape (outermost first) and bytes of every tensor of a GGUF file.

    Reads the header and the tensor table only, stepping over the metadata: gguf.GGUFReader
    decodes every metadata value, the vocabulary's tens of thousands of strings one numpy view
    at a time (seconds per file, for a list of a few dozen tensors). Same answer as
    ``gguf.GGUFReader(path).tensors`` (tests/test_quantization.py compares them).
    """
    import mmap

    import gguf

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic, version, n_tensors, n_kv = struct.unpack_from("<IIQQ", buf, 0)
        if magic != gguf.GGUF_MAGIC or version not in (2, 3):  # other byte order or an old layout
            reader = gguf.GGUFReader(path)
            return [{"tensor": t.name, "type": t.tensor_type.name, "shape": [int(x) for x in reversed(t.shape)],
                     "bytes": int(t.n_bytes)} for t in reader.tensors]
        pos = 24
        for _ in range(n_kv):
            pos += 8 + struct.unpack_from("<Q", buf, pos)[0]  # the key
            (vtype,) = struct.unpack_from("<I", buf, pos)
            pos = _skip_gguf_value(buf, pos + 4, vtype)
        out = []
        for _ in range(n_tensors):
            (n,) = struct.unpack_from("<Q", buf, pos)
            name = buf[pos + 8 : pos + 8 + n].decode()
            (n_dims,) = struct.unpack_from("<I", buf, pos + 8 + n)
            pos += 12 + n
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos)
            (raw_type,) = struct.unpack_from("<I", buf, pos + 8 * n_dims)
            pos += 8 * n_dims + 12  # dims, type, data offset
            qtype = gguf.GGMLQuantizationType(raw_type)
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            out.append({"tensor": name, "type": qtype.name, "shape": [int(x) for x in reversed(dims)],
                        "bytes": math.prod(dims) * size // block})
        return out


def apply(lm, cfg: LlamaQuantConfig, ctx) -> MethodReport:
    threads = cfg.threads or torch.get_num_threads()
    win = agreement_windows(lm, cfg)
    ref = in_process_nll(lm, win)
    parameters = count_parameters(lm.model)
    folder = Path(tempfile.mkdtemp(prefix="slimbench-llamaq-"))
    source = folder / "f32.gguf"
    exported = gguf_export.export(lm, source, weights="F32", embeddings="F32", progress=ctx.progress)
    imat = importance_matrix(lm, cfg, source, folder, threads) if cfg.imatrix != "none" else None
    out = folder / f"model-{cfg.type}.gguf"
    job = EngineProcess("slimbench.engines.llamacpp_worker:quantize_file",
                        {"src": str(source), "dst": str(out), "type": cfg.type, "threads": threads,
                         "imatrix": imat["data"] if imat else None},
                        name="llama.cpp quantize", timeout_s=cfg.timeout_s, start_timeout_s=cfg.timeout_s * 10,
                        env=llamacpp_build.lib_env())
    quantize_s = job.info["seconds"]
    job.close()
    source.unlink()
    types = tensor_types(out)
    linear = [t for t in types if len(t["shape"]) == 2 and t["tensor"] not in ("token_embd.weight", "output.weight")]
    numel = sum(t["shape"][0] * t["shape"][1] for t in linear)
    bits = sum(gguf_export.type_bits(t["type"]) * t["shape"][0] * t["shape"][1] for t in linear) / numel
    mix: dict[str, int] = {}
    for t in types:
        mix[t["type"]] = mix.get(t["type"], 0) + 1
    manifest = {"file_type": cfg.type, "tensors": types, "summary": {"tensor_types": mix}}
    model = open_engine(lm, out, manifest, cfg, owned_dir=folder, parameters=parameters)
    agree = switch(lm, model, ref, win, cfg)
    imat_facts = None if imat is None else {"source": imat["source"], "seconds": imat["seconds"],
                                            "tensors": len(imat["data"]), "calibration": imat["calibration"]}
    return MethodReport(
        execution="native",
        details={**llamacpp.engine_facts(model), "type": cfg.type, "imatrix": imat_facts,
                 "quantize_seconds": quantize_s,
                 "tensor_types": mix, "linear_effective_bits": bits, "f32_export_exact": exported["summary"]["exact"],
                 "agreement": agree, "engine_memory": model.memory()},
        notes=[f"llama.cpp {cfg.type}" + (f" with an importance matrix ({imat['source']}) from the calibration split"
                                          if imat else "")
               + f": linear weights {bits:.3g} bits each; tensor types {mix}", agreement_note(agree)],
    )


METHOD = Method(
    name="llamacpp-quant",
    family="quantization",
    description="llama.cpp quantization types (Q8_0 ... Q2_K, IQ4_XS) by llama-quantize, importance matrix from "
                "the calibration split; runs in llama.cpp",
    config=LlamaQuantConfig,
    apply=apply,
    check=check,
    check_reads_weights=True,
    unavailable=llamacpp.unavailable,
    calibration_need=lambda cfg: "activation-statistics" if cfg.imatrix != "none" else None,
    test_params={"type": "Q8_0", "imatrix": "none", "check_windows": 1, "check_seqlen": 32, "n_ctx": 256},
)
