"""OpenVINO (CPU) as an execution backend, and OpenVINO IR export.

Export: the model goes through the same ONNX graph the ONNX Runtime backend exports
(``torch.onnx`` dynamo: ``input_ids`` and every layer's past keys/values in, logits and present
keys/values out, batch/length/past dynamic), then ``openvino.convert_model`` turns it into
OpenVINO's IR (``model.xml`` + ``model.bin``). optimum-intel, which writes a stateful IR, pins
an older transformers (its own environment); this path needs only ``openvino``.

``OVModel`` is the engine model (slimbench.engines.backend), run in the cell's process like ONNX
Runtime: OpenVINO is a library with its own thread pool, not a server. Inference precision is
fp32 unless asked (``precision: bf16`` lets OpenVINO use bf16 kernels on CPUs that have them).
The past keys/values travel as arrays each call (``OVCache``), as in the ORT backend.

A method's integer grid (RTN, GPTQ, AWQ's codes: ``methods/quantization/export_grids``) is kept
in the IR as compressed weights (``embed_grids``): its own codes, zero-points and fp16 scales in
the decompression pattern the CPU plugin runs with its int4/int8 weight kernels, bit-exact.

``compress_weights`` applies NNCF's weight compression to an IR (int8, int4 symmetric or
asymmetric, group sizes, and NNCF's data-aware AWQ / scale estimation / GPTQ with a dataset).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimbench.engines.export.grid import LinearGrid, change

ENGINE = "openvino"
INSTALL = "pip install openvino==2026.4.1 nncf==3.4.0"


def unavailable() -> str | None:
    try:
        import openvino  # noqa: F401
    except ImportError as exc:
        return f"the OpenVINO backend needs openvino ({INSTALL}): {exc}"
    from slimbench.engines import onnxruntime as ortx

    return ortx.unavailable()


def nncf_unavailable() -> str | None:
    try:
        import nncf  # noqa: F401
    except ImportError as exc:
        return f"NNCF weight compression needs nncf ({INSTALL}): {exc}"
    return None


def embed_grids(ov_model, weights: dict[str, torch.Tensor], grids: dict[str, LinearGrid]) -> list[dict[str, Any]]:
    """Put each grid into the IR in place of its dense weight: per MatMul whose weight constant
    equals a grid's weight bit for bit, the constant becomes the grid's own codes (u4 for up to 4
    bits, else u8) and zero-points ``[out, groups, group]`` / ``[out, groups, 1]`` with fp16 scales,
    decoded ``(code - zero) * scale`` in f32 and reshaped to ``[out, in]``: the weight-decompression
    pattern OpenVINO's CPU plugin fuses into its compressed FullyConnected kernel, and exact (an fp16
    scale times a small integer is exact in f32). Returns one manifest row per weight written."""
    import openvino as ov
    import openvino.opset13 as ops

    def key(values: np.ndarray) -> tuple:  # a digest, not the bytes: no second copy of every weight
        values = np.ascontiguousarray(values, dtype=np.float32)
        return values.shape, hashlib.sha256(values.data).digest()

    by_value: dict[tuple, str] = {}
    for name, grid in grids.items():
        if grid.contiguous_group() is not None:  # act-order's scattered groups stay dense
            by_value.setdefault(key(weights[name].numpy()), name)
    rows = []
    for op in ov_model.get_ordered_ops():
        const = op.input_value(1).get_node() if op.get_type_name() == "MatMul" else None
        if (const is None or const.get_type_name() != "Constant" or const.get_output_element_type(0) != ov.Type.f32
                or not op.get_attributes().get("transpose_b")):
            continue
        data = const.get_data()
        name = by_value.get(key(data))
        if name is None or not np.array_equal(data, weights[name].numpy()):
            continue
        grid = grids[name]
        (out_f, in_f), size = grid.shape, grid.contiguous_group()
        groups, kind = in_f // size, ov.Type.u4 if grid.bits <= 4 else ov.Type.u8
        codes = grid.codes.numpy().astype(np.uint8).reshape(out_f, groups, size)
        zero = grid.zero.numpy().astype(np.uint8).reshape(out_f, groups, 1)
        scale = grid.scale.numpy().astype(np.float16).reshape(out_f, groups, 1)
        f32 = ov.Type.f32
        w = ops.multiply(ops.subtract(ops.convert(ops.constant(codes, dtype=kind), f32),
                                      ops.convert(ops.constant(zero, dtype=kind), f32)),
                         ops.convert(ops.constant(scale, dtype=ov.Type.f16), f32))
        w = ops.reshape(w, ops.constant(np.array([out_f, in_f], dtype=np.int64)), special_zero=False)
        op.input(1).replace_source_output(w.output(0))
        decoded = torch.from_numpy((scale.astype(np.float32) * (codes.astype(np.float32) - zero)).reshape(out_f, in_f))
        rows.append({"tensor": name, "type": f"{kind.get_type_name()} {'channel' if groups == 1 else f'g{size}'}",
                     "bits": grid.bits, "from": "grid", "shape": [out_f, in_f], **change(weights[name], decoded)})
    return rows


def export_ir(model: nn.Module, folder: Path, grids: dict[str, LinearGrid] | None = None) -> dict[str, Any]:
    """Write ``model`` as OpenVINO IR in ``folder`` (via its ONNX graph), with ``grids`` (a
    method's integer grids) kept as compressed weights (:func:`embed_grids`); returns facts."""
    import openvino as ov

    from slimbench.engines import onnxruntime as ortx
    from slimbench.engines.export.gguf_export import hf_tensors

    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / "model.onnx"
    facts = ortx.export(model, onnx_path)
    t0 = time.perf_counter()
    ov_model = ov.convert_model(str(onnx_path))
    facts["grids"] = embed_grids(ov_model, hf_tensors(model), grids) if grids else []
    ov.save_model(ov_model, str(folder / "model.xml"), compress_to_fp16=False)
    for p in ortx.model_files(onnx_path):
        p.unlink()
    facts["convert_seconds"] = time.perf_counter() - t0
    facts["files"] = ir_files(folder / "model.xml")
    return facts


def ir_files(xml: Path) -> list[Path]:
    return [xml, xml.with_suffix(".bin")]


def ir_weights(xml: Path) -> dict[str, Any]:
    """Bytes and effective bits of the IR's MatMul weights (constants feeding a MatMul, through
    any decompression subgraph: Convert, Subtract zero-point, Multiply scale, Reshape)."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    bits = numel = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        consts, stack, seen = [], [op.input_value(1).get_node()], set()
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.get_type_name() == "Constant":
                consts.append(node)
            elif node.get_type_name() in ("Reshape", "Transpose"):  # input 1 is a shape, not weight data
                stack.append(node.input_value(0).get_node())
            elif node.get_type_name() in ("Convert", "Subtract", "Multiply"):
                stack += [v.get_node() for v in node.input_values()]
        if not consts:
            continue
        main = max(consts, key=lambda c: int(np.prod(c.get_output_shape(0))))
        numel += int(np.prod(main.get_output_shape(0)))
        bits += sum(int(np.prod(c.get_output_shape(0))) * c.get_output_element_type(0).bitwidth for c in consts)
    types: dict[str, int] = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Constant":
            t = op.get_output_element_type(0).get_type_name()
            types[t] = types.get(t, 0) + 1
    return {"effective_bits": bits / numel if numel else None, "constant_types": types,
            "stored_bytes": sum(p.stat().st_size for p in ir_files(xml))}


@dataclass
class OVOutput:
    logits: torch.Tensor
    cache: OVCache | None = None


class OVCache:
    def __init__(self, values: list[np.ndarray], length: int):
        self.values, self.length = values, length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def crop(self, tokens: int) -> None:
        keep = self.length + tokens if tokens < 0 else min(self.length, tokens)
        self.values = [np.ascontiguousarray(v[:, :, :keep]) for v in self.values]
        self.length = keep


class OVModel(nn.Module):
    engine = ENGINE

    def __init__(self, xml: Path, config, shapes, *, threads: int, precision: str = "f32",
                 parameters: int, stored_format: str, workdir: Path | None = None,
                 dynamic_quantization: int | None = None):
        super().__init__()
        import openvino as ov

        self.core = ov.Core()
        props = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision,
                 "PERFORMANCE_HINT": "LATENCY"}
        if dynamic_quantization is not None:
            props["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = dynamic_quantization
        self.compiled = self.core.compile_model(str(xml), "CPU", props)
        self.request = self.compiled.create_infer_request()
        self.xml, self.config, self.shapes = Path(xml), config, shapes
        self.threads, self.precision = threads, precision
        self.n_parameters, self.stored_format = parameters, stored_format
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self.outputs = list(self.compiled.outputs)
        self.workdir = workdir
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(workdir), True) if workdir else None

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def forward(self, input_ids: torch.Tensor, cache: OVCache | None = None, use_cache: bool = False, **kwargs):
        extra = {k for k, v in kwargs.items() if v is not None and k != "return_dict"}
        if extra:
            raise TypeError(f"the OpenVINO model takes input_ids, cache and use_cache only, not {sorted(extra)}")
        ids = input_ids.detach().cpu().long().numpy()
        if cache is None:
            past = [np.zeros((ids.shape[0], h, 0, d), np.float32) for h, d in self.shapes for _ in range(2)]
            length = 0
        else:
            past, length = cache.values, cache.length
        feeds = {"input_ids": ids, **dict(zip(self.input_names[1:], past, strict=True))}
        res = self.request.infer(feeds)
        logits = torch.from_numpy(np.array(res[self.outputs[0]]))
        if not (use_cache or cache is not None):
            return OVOutput(logits)
        present = [np.array(res[o]) for o in self.outputs[1:]]
        return OVOutput(logits, OVCache(present, length + ids.shape[1]))

    def slimbench_size(self) -> dict[str, Any]:
        w = ir_weights(self.xml)
        return {"parameters": self.n_parameters, "memory_bytes": w["stored_bytes"], "stored_bytes": w["stored_bytes"],
                "stored_format": self.stored_format, "effective_bits": w["effective_bits"],
                "bits_per_parameter": 8 * w["stored_bytes"] / self.n_parameters}

    def slimbench_files(self) -> list[Path]:
        return ir_files(self.xml)

    def close(self) -> None:
        self.request = self.compiled = None
        if self._cleanup is not None:
            self._cleanup()


def engine_facts(model: OVModel) -> dict[str, Any]:
    import openvino as ov

    core = model.core
    return {"engine": ENGINE, "openvino": ov.get_version(), "device": core.get_property("CPU", "FULL_DEVICE_NAME"),
            "capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
            "threads": model.threads, "inference_precision": model.precision, "format": model.stored_format,
            # the CPU plugin quantizes the activations of compressed-weight layers to int8 in groups of
            # this many channels (0: off); what it compiled with, its default included
            "dynamic_quantization_group_size": int(model.compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE"))}


def compress_weights(xml: Path, out: Path, *, mode: str, group_size: int | None, ratio: float,
                     dataset: list[dict[str, np.ndarray]] | None, awq: bool, scale_estimation: bool,
                     gptq: bool) -> float:
    """NNCF weight compression of the IR at ``xml`` into ``out``; returns seconds."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    kwargs: dict[str, Any] = {"mode": getattr(nncf.CompressWeightsMode, mode.upper()), "ratio": ratio}
    if mode.startswith("int4"):
        kwargs["group_size"] = group_size if group_size is not None else -1
    if dataset is not None:
        kwargs.update(dataset=nncf.Dataset(dataset), awq=awq, scale_estimation=scale_estimation, gptq=gptq)
    t0 = time.perf_counter()
    compressed = nncf.compress_weights(model, **kwargs)
    ov.save_model(compressed, str(out), compress_to_fp16=False)
    return time.perf_counter() - t0


def build(lm, *, threads: int, precision: str = "f32", workdir: Path | None = None,
          grids: dict[str, LinearGrid] | None = None, dynamic_quantization: int | None = None) -> tuple[OVModel, dict]:
    """Export ``lm.model`` to IR (``grids`` kept as compressed weights) and open it in OpenVINO."""
    from slimbench.modeling import count_parameters

    workdir = Path(workdir or tempfile.mkdtemp(prefix="slimbench-ov-"))
    facts = export_ir(lm.model, workdir, grids)
    kinds = sorted({r["type"].split()[0] for r in facts["grids"]})
    fmt = "openvino ir f32" + (f" + {'/'.join(kinds)} method grids" if kinds else "")
    model = OVModel(workdir / "model.xml", lm.model.config, facts["kv_shapes"], threads=threads, precision=precision,
                    parameters=count_parameters(lm.model), stored_format=fmt, workdir=workdir,
                    dynamic_quantization=dynamic_quantization)
    return model, facts
