"""Nothing SlimBench loads from disk can run code: a pickle planted where the distillation
checkpoint lives is refused, not executed; a genuine checkpoint still resumes."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch

from slimbench.method import MethodContext
from slimbench.registry import METHODS
from slimbench.specs import HardwareSpec, ModelSpec
from slimbench.zoo.models import make_tiny_loader

ROOT = Path(__file__).resolve().parent.parent
HW = HardwareSpec(threads=1)
PARAMS = {"calib_samples": 4, "calib_seqlen": 16, "teacher_topk": 8, "train_steps": 2, "batch_size": 1,
          "checkpoint_every": 1, "student_layers": 1}


class Planted:
    """Unpickling this calls `marker.write_text(...)`: the attack a checkpoint path invites."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def distill(lm):
    method = METHODS.get("distill")
    return method.run(lm, method.config(**PARAMS), MethodContext(hardware=HW))


def test_a_planted_pickle_at_the_checkpoint_path_is_not_executed(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMBENCH_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    load = make_tiny_loader("llama")
    rep = distill(load(ModelSpec(name="tiny-llama"), HW))  # writes the genuine checkpoint
    ckpt = Path(rep.details["checkpoint"])
    assert ckpt.exists()
    assert distill(load(ModelSpec(name="tiny-llama"), HW)).details["resumed_from_step"] == 2  # it reloads

    marker = tmp_path / "marker"
    ckpt.write_bytes(pickle.dumps({"step": 0, "payload": Planted(marker)}))
    with pytest.raises(ValueError, match="refusing to load the distillation checkpoint"):
        distill(load(ModelSpec(name="tiny-llama"), HW))
    assert not marker.exists()


def test_no_pickle_loading_anywhere_in_the_tree():
    """torch.load only with weights_only=True; no pickle.load / numpy allow_pickle at all."""
    unsafe = re.compile(
        r"weights_only\s*=\s*False|pickle\.loads?\(|allow_pickle\s*=\s*True|torch\.load\((?![^)]*weights_only=True)"
    )
    hits = []
    for folder in ("slimbench", "methods", "tasks"):
        for path in (ROOT / folder).rglob("*.py"):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if unsafe.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert hits == []
