"""One ONNX export per distinct model in a test process (fixture ``shared_onnx_exports``).

``torch.onnx.export`` (dynamo) of a tiny model costs seconds of CPU, and the tests export the
same tiny models again and again: the method contract runs each engine method (onnx-runtime,
ort-int8 after onnx-runtime, openvino, nncf-weights: all through ``ortx.export``) on three tiny
models plus once more for determinism. While the fixture is active, the first export of each
distinct model is kept; a later export of an identical model gets a copy of its files and facts,
and the model is untied as the exporter would have untied it. Everything after the export (ORT
sessions, OpenVINO conversion, NNCF, int8 quantization, the methods' self-checks and every
contract check) still runs each time.

"Identical" is keyed by everything the graph depends on: the module classes, the config (with
its attention implementation), every tensor's name, dtype, shape and bytes, the opset and the
file name (the graph names its external data file). A model that cannot be keyed is exported.
"""

from __future__ import annotations

import atexit
import copy
import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from slimbench.engines import onnxruntime as ortx

_REAL_EXPORT = ortx.export
_STORE: dict[str, tuple[Path, dict[str, Any]]] = {}  # key -> (kept graph path, export facts)
STATS = {"exported": 0, "shared": 0}


def model_key(model: torch.nn.Module, path: Path, opset: int | None) -> str | None:
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    h.update(repr((path.name, opset, [type(m).__module__ + "." + type(m).__qualname__ for m in model.modules()],
                   getattr(cfg, "_attn_implementation", None))).encode())
    h.update(cfg.to_json_string().encode() if hasattr(cfg, "to_json_string") else repr(cfg).encode())
    try:
        for name, t in model.state_dict().items():
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    except (RuntimeError, TypeError, AttributeError):  # e.g. a quantized tensor: export it for real
        return None
    return h.hexdigest()


def memo_export(model: torch.nn.Module, path: Path, opset: int | None = None) -> dict[str, Any]:
    path = Path(path)
    key = model_key(model, path, opset)
    if key is None:
        return _REAL_EXPORT(model, path, opset)
    if key in _STORE:
        kept, facts = _STORE[key]
        ortx.untie_output_embedding(model)  # the export's one change to the model
        for p in ortx.model_files(kept):
            shutil.copyfile(p, path.parent / p.name)
        STATS["shared"] += 1
        return copy.deepcopy(facts)
    facts = _REAL_EXPORT(model, path, opset)
    folder = Path(tempfile.mkdtemp(prefix="slimbench-onnx-memo-"))
    atexit.register(shutil.rmtree, folder, True)
    for p in ortx.model_files(path):
        shutil.copyfile(p, folder / p.name)
    _STORE[key] = (folder / path.name, copy.deepcopy(facts))
    STATS["exported"] += 1
    return facts


@pytest.fixture(scope="module")
def shared_onnx_exports():
    """``ortx.export`` shares identical exports for this module's tests (and keeps them for
    later modules of the same process that use the fixture)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(ortx, "export", memo_export)
    yield STATS
    mp.undo()
