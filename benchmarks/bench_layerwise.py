"""The layer-wise calibration loop as first written against the loop as it is now (GPTQ; the
``loop-bench`` command runs the same code on a bigger budget). Model loading is not timed."""

from __future__ import annotations

import pytest

from slimbench.devtools.loopbench import apply_variant, identical, load_for, method_config

SAMPLES, SEQLEN = 4, 128


@pytest.fixture(scope="module")
def setup(model_name, threads):
    from slimbench.specs import ModelSpec

    cfg, _, hw = method_config("gptq", None, {"calib_samples": SAMPLES, "calib_seqlen": SEQLEN})
    return cfg, ModelSpec(name=model_name), hw.model_copy(update={"threads": threads})


@pytest.fixture(scope="module")
def runs() -> dict:
    return {}


@pytest.mark.parametrize("variant", ["reference", "fast"])
def bench_gptq_loop(benchmark, setup, runs, variant):
    cfg, spec, hw = setup
    benchmark.group = f"gptq layer-wise loop, {SAMPLES} x {SEQLEN} calibration tokens"
    run = benchmark.pedantic(apply_variant, setup=lambda: ((load_for(spec, hw), "gptq", cfg, hw, variant), {}),
                             rounds=1, iterations=1)
    benchmark.extra_info.update(cpu_s=run["cpu_s"], stats=run["stats"])
    runs[variant] = run
    if variant == "fast":  # the shortcuts must not change a single bit of what GPTQ produced
        assert identical(runs["reference"], run)[0]
