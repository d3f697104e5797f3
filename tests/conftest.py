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
# The machine-wide lock of timed cells: the tests' own, so the suite neither waits for nor
# blocks a benchmark run on the same machine (tests that check the lock set their own path).
os.environ.setdefault("SLIMBENCH_NODE_LOCK", os.path.join(tempfile.gettempdir(),
                                                          f"slimbench-test-{os.getpid()}", "node.lock"))
# Parallel workers (`make test` runs pytest-xdist): one intra-op thread each, whatever a suite
# asks for, so two workers on two cores do not fight over them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("SLIMBENCH_MAX_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # torch.compile's C++ builds in the worker itself: its default pool of compile subprocesses
    # (each importing torch, seconds of CPU) buys nothing when the workers already fill the cores
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# A timed cell's memory is read in a fresh process (a fork server that imports torch and
# transformers, then a child that loads the model again): seconds per cell that only the tests of
# that probe need; they turn it on (tests/test_timing_trust.py). Elsewhere the record says the
# memory was read in the sweep's process, which is what those tests check.
os.environ.setdefault("SLIMBENCH_MEMORY_PROBE", "off")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from slimbench.specs import HardwareSpec, ModelSpec  # noqa: E402
from slimbench.zoo.models import make_tiny_loader  # noqa: E402

TINY_ARCHS = ("llama", "gpt2", "opt")


DURATIONS = Path(__file__).with_name("durations.json")


def pytest_collection_modifyitems(session, config, items):
    """The slowest test files first (seconds from a measured run, tests/durations.json), so the
    parallel workers do not end on one long file while the other idles. Tests stay together by
    file (a module's fixtures are set up once); files not listed keep their order after the rest.
    Refresh the file with `make test-durations`."""
    import json

    if not DURATIONS.exists():
        return
    seconds = json.loads(DURATIONS.read_text())
    per_file: dict[str, float] = {}
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        per_file[path] = per_file.get(path, 0.0) + seconds.get(item.nodeid, 0.0)
    items.sort(key=lambda item: -per_file[item.nodeid.split("::", 1)[0]])  # stable within a file


_RECORDED: dict[str, float] = {}


def pytest_runtest_logreport(report):
    if os.environ.get("SLIMBENCH_RECORD_DURATIONS"):  # `make test-durations` (setup + call + teardown)
        nodeid = report.nodeid
        if nodeid.rfind("@") > nodeid.rfind("]"):  # an xdist_group's suffix (see _XdistGroupIds): not in the sort's ids
            nodeid = nodeid.rsplit("@", 1)[0]
        _RECORDED[nodeid] = _RECORDED.get(nodeid, 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
    import json

    if os.environ.get("SLIMBENCH_RECORD_DURATIONS") and not os.environ.get("PYTEST_XDIST_WORKER") and _RECORDED:
        kept = {k: round(v, 2) for k, v in sorted(_RECORDED.items(), key=lambda kv: -kv[1]) if v >= 0.5}
        DURATIONS.write_text(json.dumps(kept, indent=0) + "\n")


def pytest_configure(config):
    cap = os.environ.get("SLIMBENCH_MAX_THREADS")
    if cap and cap.isdigit():  # torch's default is every core; a capped worker starts at the cap
        import torch

        torch.set_num_threads(int(cap))


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test: the CI machine's 2 cores are shared, and one thread is
    much faster there than two fighting over them."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- fresh tiny models by copy ---------------------------------------------------------------
# Building a tiny model costs ~0.3 s of CPU (its random init and, mostly, parsing the 50k-word
# GPT-2 BPE); hundreds of tests build one. Each process builds each architecture once and hands
# out deep copies of the model (~10 ms): the same weights bit for bit, torch's RNG left where a
# fresh build leaves it, a model and config of its own. The tokenizer object is shared: nothing
# in SlimBench or its tests mutates a tokenizer (tests already shared one to reuse encodings).
_PRISTINE: dict[str, tuple] = {}


def _copy_of(arch: str, build):
    import copy
    import dataclasses

    import torch

    if arch not in _PRISTINE:
        lm = build()
        _PRISTINE[arch] = (dataclasses.replace(lm, model=copy.deepcopy(lm.model)), torch.get_rng_state())
    lm, rng = _PRISTINE[arch]
    torch.set_rng_state(rng)
    return dataclasses.replace(lm, model=copy.deepcopy(lm.model), provenance=dict(lm.provenance))


def load_tiny(arch: str):
    if arch == "gemma3":
        return _copy_of(arch, load_tiny_gemma3)
    return _copy_of(arch, lambda: make_tiny_loader(arch)(ModelSpec(name=f"tiny-{arch}"), HardwareSpec(threads=2)))


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


# -- xdist_group under pytest 9 --------------------------------------------------------------------
class _XdistGroupIds:
    """`make test` runs `--dist loadgroup`: tests marked ``xdist_group(name)`` go to one worker
    (those that share a module's expensive fixture: spread over two workers, each would build it).
    pytest-xdist 3.8 says a test's group by appending ``@name`` to ``item._nodeid``, which pytest 9
    no longer reads (its node ids live in ``item._id``), so every test was scheduled on its own.
    This sets the same suffix where pytest 9 reads it; where xdist's own suffix took, it does
    nothing. After the duration sort above (trylast), so durations.json's ids still match."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        if not getattr(config.option, "loadgroup", False):  # set on xdist's workers for --dist loadgroup
            return
        from _pytest.nodeid import coerce_node_id

        for item in items:
            names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                            for m in item.iter_markers("xdist_group")})
            suffix = "@" + "_".join(names)
            if names and not item.nodeid.endswith(suffix):
                item._id = coerce_node_id(item.nodeid + suffix)


def pytest_sessionstart(session):
    session.config.pluginmanager.register(_XdistGroupIds(), "slimbench-xdist-group-ids")


@pytest.fixture
def frozen_heap():
    """For tests that run sweeps in this process: the runner calls gc.collect() around every
    cell (release_memory), and each call walks every object the test process has accumulated
    (torch, transformers, earlier tests' imports: ~0.5 s a call). Freezing what exists before the
    test leaves those calls only the test's own objects to walk; everything the test creates is
    collected as before. Unfrozen afterwards."""
    import gc

    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
