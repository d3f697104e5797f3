"""Shared fixtures: tiny random models (Llama-, GPT-2-, OPT-shaped) and the offline setting."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `run` caches compressed models in the user cache by default; tests opt in with a tmp folder.
os.environ.setdefault("SLIMBENCH_ARTIFACTS", "off")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from slimbench.models import make_tiny_loader  # noqa: E402
from slimbench.specs import HardwareSpec, ModelSpec  # noqa: E402

TINY_ARCHS = ("llama", "gpt2", "opt")


def load_tiny(arch: str):
    return make_tiny_loader(arch)(ModelSpec(name=f"tiny-{arch}"), HardwareSpec(threads=2))


@pytest.fixture(params=TINY_ARCHS)
def tiny_lm(request):
    """A fresh tiny model of each architecture (a new one per test: methods mutate it)."""
    return load_tiny(request.param)


@pytest.fixture
def tiny_llama():
    return load_tiny("llama")


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded model (converted once into the user cache)."""
    from slimbench.models import load_smollm2

    return load_smollm2(ModelSpec(name="smollm2-135m"), HardwareSpec(threads=2))
