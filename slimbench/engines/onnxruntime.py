"""ONNX Runtime (CPU) as an execution backend: export once, then prefill and decode through ORT.

Export: ``torch.onnx.export(dynamo=True)`` (torch.export, then onnxscript) of a wrapper whose
inputs are ``input_ids [B, T]`` and the past keys/values of every layer ``[B, H_kv, P, D]``
and whose outputs are the logits ``[B, T, V]`` and the present keys/values ``[B, H_kv, P+T, D]``.
Batch, T and P are dynamic and P may be 0, so one graph serves prefill (empty past) and decode
(and the multi-token verification of speculative decoding). The wrapper fills a transformers
DynamicCache from the past arrays, so the architecture's own forward (masks, positions) is what
is exported; no attention mask is an input (no padding; ``slimbench.lm`` never left-pads). A tied
output projection gets its own weight first (``untie_output_embedding``).

``OrtModel`` is the engine model (``slimbench.engines.backend``); ``OrtCache`` holds the
present arrays as OrtValues and hands them back as the next call's past without copying.
``quantize_int8`` runs ORT's own dynamic quantization (int8 weights of every MatMul with a
constant weight, activations quantized per tensor at run time: MatMulInteger /
DynamicQuantizeMatMul kernels).
"""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def unavailable() -> str | None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        return ("ONNX Runtime backend needs onnx, onnxruntime and onnxscript "
                f"(pip install -r requirements-extras.txt): {exc}")
    return None


def unsupported(lm) -> str | None:
    from transformers import PreTrainedModel

    from slimbench.modeling import CompressedLinear

    if not isinstance(lm.model, PreTrainedModel):
        return (
            f"exports a transformers model; the model is a {type(lm.model).__name__} (from an earlier execution step)"
        )
    if lm.device.type != "cpu":
        return "runs ONNX Runtime's CPU execution provider; the model is on " + lm.device.type
    if lm.model.dtype != torch.float32:
        return f"ONNX Runtime's CPU kernels are float32; the model is {lm.model.dtype} (load it with dtype: float32)"
    if lm.cache_factory is not None:
        return "the exported graph has its own KV cache; it cannot follow a kv-cache step"
    packed = [type(m).__name__ for m in lm.model.modules() if isinstance(m, CompressedLinear)]
    if packed:
        return (
            f"the model has {len(packed)} {packed[0]} layers whose torch kernels ONNX cannot express; "
            "apply ort-int8 after onnx-runtime instead of a torch quantization step"
        )
    return None


class Exportable(nn.Module):
    """(input_ids, *past k/v) -> (logits, *present k/v) around a transformers causal LM."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.n_layers = model.config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, past: tuple[torch.Tensor, ...]):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, cache=cache, use_cache=True)
        present = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def untie_output_embedding(model: nn.Module) -> bool:
    """Give a tied output projection its own weight before export.

    Tied, the exporter emits ``MatMul(x, Transpose(embedding))``: a transpose of the whole
    vocabulary matrix on every call, and a MatMul without a constant weight, which ORT's int8
    quantizer skips. Untied, the head is a MatMul with its own (pre-transposed) initializer; the
    graph then holds the embedding twice, which ``slimbench_size`` counts.
    """
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or emb is None or head.weight.data_ptr() != emb.weight.data_ptr():
        return False
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    return True


def kv_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(KV heads, head dim) of each layer, read from a real forward (no per-architecture table)."""
    with torch.inference_mode():
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True)
    return [(layer.keys.shape[1], layer.keys.shape[3]) for layer in out.cache.layers]


def export(model: nn.Module, path: Path, opset: int | None = None) -> dict[str, Any]:
    """Write ``model`` as an ONNX graph at ``path`` (weights in ``path``.data); returns facts."""
    shapes = kv_shapes(model)
    n = len(shapes)
    untie_output_embedding(model)
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past", min=0)
    ids = torch.zeros(2, 5, dtype=torch.long)
    dtype = next(model.parameters()).dtype
    kv = tuple(torch.zeros(2, h, 3, d, dtype=dtype) for h, d in shapes for _ in range(2))
    names = [f"past.{i}.{kind}" for i in range(n) for kind in ("key", "value")]
    t0 = time.perf_counter()
    kwargs = {"opset_version": opset} if opset else {}
    with warnings.catch_warnings():  # the exporter warns about every renamed axis and deprecated pytree API
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Exportable(model).eval(),
            (ids, kv),
            str(path),
            dynamo=True,
            external_data=True,
            dynamic_shapes=({0: batch, 1: seq}, tuple({0: batch, 2: past} for _ in kv)),
            input_names=["input_ids", *names],
            output_names=["logits", *(x.replace("past", "present") for x in names)],
            verbose=False,
            **kwargs,
        )
    return {"export_seconds": time.perf_counter() - t0, "layers": n, "kv_shapes": shapes}


def model_files(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name))


def graph_sizes(path: Path) -> dict[str, Any]:
    """Bytes ORT holds (initializers), bytes on disk, effective bits of the MatMul weights."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path), load_external_data=True).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    weight_bits = weight_numel = 0
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in init:
            w = init[node.input[1]]
            weight_bits += 8 * w.nbytes
            weight_numel += w.size
        elif node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"):
            parts = [x for x in node.input if x in init]
            w = max((init[x] for x in parts), key=lambda a: a.size)
            weight_bits += 8 * sum(init[x].nbytes for x in parts)
            weight_numel += w.size
    return {
        "memory_bytes": int(sum(a.nbytes for a in init.values())),
        "stored_bytes": int(sum(p.stat().st_size for p in model_files(path))),
        "effective_bits": weight_bits / weight_numel if weight_numel else None,
        "op_counts": _op_counts(graph),
    }


def _op_counts(graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:12])


def quantize_int8(src: Path, dst: Path, per_channel: bool) -> float:
    """ORT dynamic quantization of every MatMul with a constant weight; returns seconds."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t0 = time.perf_counter()
    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        per_channel=per_channel,
        op_types_to_quantize=["MatMul"],
        use_external_data_format=True,
    )
    return time.perf_counter() - t0


@dataclass
class OrtOutput:
    logits: torch.Tensor
    cache: OrtCache | None = None


class OrtCache:
    """Present keys/values of every layer as OrtValues, fed back as the next call's past."""

    def __init__(self, values: list[Any], length: int):
        self.values, self.length = values, length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def crop(self, tokens: int) -> None:
        """``crop(-n)`` drops the last n tokens (transformers' convention)."""
        from onnxruntime import OrtValue

        keep = self.length + tokens if tokens < 0 else min(self.length, tokens)
        if keep == self.length:
            return
        self.values = [OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, :keep])) for v in self.values]
        self.length = keep


class OrtModel(nn.Module):
    """An ONNX Runtime session with the call contract of ``slimbench.lm`` (an engine model)."""

    def __init__(
        self,
        path: Path,
        config,
        shapes,
        *,
        threads: int,
        optimization: str,
        workdir: Path,
        parameters: int,
        stored_format: str,
    ):
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.path, self.config, self.shapes = path, config, shapes
        self.threads, self.optimization = threads, optimization
        # not `parameters`: that would shadow nn.Module.parameters()
        self.n_parameters, self.stored_format = parameters, stored_format
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # The temporary folder lives as long as this model (the int8 step reads the file from it).
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(workdir), True)
        self.workdir = workdir

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def forward(self, input_ids: torch.Tensor, cache: OrtCache | None = None, use_cache: bool = False, **kwargs):
        from onnxruntime import OrtValue

        extra = {k for k, v in kwargs.items() if v is not None and k != "return_dict"}
        if extra:
            raise TypeError(f"the ONNX Runtime model takes input_ids, cache and use_cache only, not {sorted(extra)}")
        if cache is not None and not isinstance(cache, OrtCache):
            raise TypeError(f"the ONNX Runtime model keeps its own KV cache; got a {type(cache).__name__}")
        ids = input_ids.detach().cpu().to(torch.long).numpy()
        if cache is None:
            b = ids.shape[0]
            past = [
                OrtValue.ortvalue_from_numpy(np.zeros((b, h, 0, d), np.float32))
                for h, d in self.shapes
                for _ in range(2)
            ]
            length = 0
        else:
            past, length = cache.values, cache.length
        feeds = {"input_ids": OrtValue.ortvalue_from_numpy(ids), **dict(zip(self.input_names[1:], past, strict=True))}
        outs = self.session.run_with_ort_values(self.output_names, feeds)
        logits = torch.from_numpy(outs[0].numpy())
        if not (use_cache or cache is not None):
            return OrtOutput(logits)
        return OrtOutput(logits, OrtCache(list(outs[1:]), length + ids.shape[1]))

    def slimbench_size(self) -> dict[str, Any]:
        sizes = graph_sizes(self.path)
        return {
            "parameters": self.n_parameters,
            "memory_bytes": sizes["memory_bytes"],
            "stored_bytes": sizes["stored_bytes"],
            "stored_format": self.stored_format,
            "effective_bits": sizes["effective_bits"],
            "bits_per_parameter": 8 * sizes["stored_bytes"] / self.n_parameters,
        }

    def slimbench_files(self) -> list[Path]:
        """The files ``stored_bytes`` counts (the graph and its external data)."""
        return model_files(self.path)

    def close(self) -> None:
        self.session = None
        self._cleanup()


def build(
    lm, *, threads: int, optimization: str = "all", opset: int | None = None, workdir: Path | None = None
) -> tuple[OrtModel, dict]:
    """Export ``lm.model`` and open it in ONNX Runtime; returns the engine model and export facts."""
    from slimbench.modeling import count_parameters

    workdir = Path(workdir or tempfile.mkdtemp(prefix="slimbench-onnx-"))
    path = workdir / "model.onnx"
    facts = export(lm.model, path, opset)
    model = OrtModel(
        path,
        lm.model.config,
        facts["kv_shapes"],
        threads=threads,
        optimization=optimization,
        workdir=workdir,
        parameters=count_parameters(lm.model),
        stored_format="onnx fp32",
    )
    return model, facts


def requantize(model: OrtModel, per_channel: bool) -> tuple[OrtModel, float]:
    """A new OrtModel over the int8 dynamic quantization of ``model``'s graph (same folder)."""
    dst = model.workdir / "model.int8.onnx"
    seconds = quantize_int8(model.path, dst, per_channel)
    workdir = model.workdir
    model._cleanup.detach()  # the folder now belongs to the new model
    out = OrtModel(
        dst,
        model.config,
        model.shapes,
        threads=model.threads,
        optimization=model.optimization,
        workdir=workdir,
        parameters=model.n_parameters,
        stored_format=f"onnx int8 dynamic ({'per-channel' if per_channel else 'per-tensor'} weights)",
    )
    for p in model_files(model.path):  # the fp32 graph is no longer needed
        if not p.name.startswith("model.int8"):
            p.unlink()
    return out, seconds
