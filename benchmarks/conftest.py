"""Shared set-up of the micro-benchmarks (`make bench`): not part of the test suite.

Each benchmark times one hot path of SlimBench with pytest-benchmark, next to the path it is
meant to beat (dense fp32, a bare loop, the loop as first written), so the saved history holds
both sides measured in the same run. pytest-benchmark stores every run under ``.benchmarks/``
named by machine and commit; ``make bench`` compares with the previous run and flags a median
that got worse by more than the threshold. Timings on a shared machine are noise: run it on an
idle one, and compare ratios within a run rather than absolute times across machines.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SLIMBENCH_ARTIFACTS", "off")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def pytest_addoption(parser):
    parser.addoption("--bench-threads", type=int, default=int(os.environ.get("SLIMBENCH_BENCH_THREADS", "2")),
                     help="torch intra-op threads for every benchmark (default 2, the machine's cores)")
    parser.addoption("--bench-model", default="smollm2-135m", help="model of the model-level benchmarks")


@pytest.fixture(scope="session")
def threads(request) -> int:
    import torch

    n = request.config.getoption("--bench-threads")
    torch.set_num_threads(n)
    return n


@pytest.fixture(scope="session")
def model_name(request) -> str:
    return request.config.getoption("--bench-model")


@pytest.fixture(scope="session")
def loaded(model_name, threads):
    """The benchmark model, loaded once (methods that change it work on a deep copy)."""
    from slimbench.specs import HardwareSpec, ModelSpec
    from slimbench.zoo.models import resolve

    spec = ModelSpec(name=model_name)
    lm = resolve(spec, source="benchmarks", field="--bench-model")(spec, HardwareSpec(threads=threads))
    lm.spec = spec
    return lm


def record_ratio(benchmark, **info) -> None:
    """Keep what a reader needs beside the timing in the saved JSON (pytest-benchmark extra_info)."""
    benchmark.extra_info.update(info)
