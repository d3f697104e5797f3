"""Shared fixtures: tiny random models (Llama-, GPT-2-, OPT-shaped) and the offline setting."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `run` caches compressed models in the user cache by default; tests opt in with a tmp folder.
os.environ.setdefault("SLIMBENCH_ARTIFACTS", "off")
# The machine lock is machine-wide: a test session has its own, so it never waits for (nor blocks) other
# SlimBench runs on a shared machine; its own processes (workers, drivers it starts) still share it.
os.environ.setdefault("SLIMBENCH_NODE_LOCK", os.path.join(tempfile.gettempdir(), f"slimbench-tests-{os.getpid()}",
                                                          "node.lock"))
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from slimbench.specs import HardwareSpec, ModelSpec  # noqa: E402
from slimbench.zoo.models import make_tiny_loader  # noqa: E402

TINY_ARCHS = ("llama", "gpt2", "opt")


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test: the CI machine's 2 cores are shared, and one thread is
    much faster there than two fighting over them."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_tiny(arch: str):
    if arch == "gemma3":
        return load_tiny_gemma3()
    return make_tiny_loader(arch)(ModelSpec(name=f"tiny-{arch}"), HardwareSpec(threads=2))


def tiny_gemma3(vocab: int = 512):
    """A tiny random Gemma 3 with sliding-window layers around a global one (another rotary
    base, a full causal mask): what a layer is given differs from layer to layer."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def load_tiny_gemma3():
    """Tiny Gemma 3 as a LanguageModel (GPT-2's tokenizer, so the calibration corpora encode)."""
    from slimbench.zoo.models import gpt2_tokenizer, wrap

    prov = {"source": "random init from a tiny gemma3 config (seed 0)", "weights": "random"}
    return wrap(tiny_gemma3(vocab=50257), gpt2_tokenizer(), "tiny-gemma3", HardwareSpec(threads=2), prov)


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
    from slimbench.zoo.models import load_smollm2

    return load_smollm2(ModelSpec(name="smollm2-135m"), HardwareSpec(threads=2))
