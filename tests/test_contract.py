"""The method contract: every registered method passes it (plugins included), and a method
that lies about what it achieved, or breaks a rule, fails it."""

from __future__ import annotations

import random

import pytest
import torch
from pydantic import Field
from slimbench.methods.pruning.sparse_format import sparse_storage
from slimbench.methods.quantization.grid import quantize_matrix, stored_form

from slimbench.calibration import sample_calibration
from slimbench.config import Config
from slimbench.devtools.contract import check_method
from slimbench.method import Method, MethodReport
from slimbench.modeling import get_weight, iter_linears, set_weight
from slimbench.registry import METHODS
from tests.onnx_memo import shared_onnx_exports  # noqa: F401  (a fixture)

torch.set_num_threads(1)
# The engine methods export the same tiny models to ONNX again and again (each run, and the run
# of onnx-runtime that ort-int8 requires): one export per distinct model, shared within a worker
# (tests/onnx_memo.py), so these methods run in one worker (xdist group).
pytestmark = pytest.mark.usefixtures("shared_onnx_exports")
EXPORTING = ("onnx-runtime", "ort-int8", "openvino", "nncf-weights")


def _param(name: str):
    return pytest.param(name, marks=pytest.mark.xdist_group("onnx-exports")) if name in EXPORTING else name


@pytest.mark.parametrize("name", [_param(n) for n in METHODS.names()])
def test_every_registered_method_honours_the_contract(name):
    method = METHODS.get(name)
    reason = method.unavailable() if method.unavailable is not None else None
    if reason:
        pytest.skip(f"{name} cannot run here: {reason}")
    outcomes = check_method(method)
    failures = [str(o) for o in outcomes if o.status == "fail"]
    assert not failures, "\n".join(failures)
    ran = [o for o in outcomes if o.check.startswith("runs on") and o.status == "pass"]
    if not method.requires_gpu and method.runs_on_tiny:  # a CPU method must show it works, not only refuse
        assert ran, [str(o) for o in outcomes]


# -- methods that break the contract ------------------------------------------------------------
class Sparsity(Config):
    sparsity: float = Field(0.5, gt=0, lt=1)


class Bits(Config):
    bits: int = Field(4, ge=2, le=8)


def prune(lm, cfg, ctx, claim=None):
    names = []
    for name, mod in iter_linears(lm.model):
        w = get_weight(mod)
        set_weight(mod, torch.where(w.abs() < w.abs().median(), torch.zeros_like(w), w))
        names.append(name)
    return MethodReport("simulated", storage=sparse_storage(lm.model, names, None),
                        details={"achieved_sparsity": claim if claim is not None else 0.5})


def failures_of(method: Method) -> list[str]:
    return [str(o) for o in check_method(method, archs=("llama",)) if o.status == "fail"]


def test_an_honest_toy_method_passes():
    assert failures_of(Method("toy", "pruning", "honest", Sparsity, prune)) == []


def test_claimed_sparsity_is_remeasured():
    liar = Method("liar", "pruning", "claims 90%", Sparsity, lambda lm, c, x: prune(lm, c, x, claim=0.9))
    assert any("claims sparsity 0.9000" in f for f in failures_of(liar))


def test_claimed_bits_are_remeasured_from_the_weights():
    def apply(lm, cfg, ctx):  # stores 2-bit codes, but leaves the dense weights as they were
        storage = {}
        for name, mod in iter_linears(lm.model):
            codes, _, params = quantize_matrix(get_weight(mod), _grid(2))
            storage[f"{name}.weight"] = stored_form(codes, params)
        return MethodReport("simulated", storage=storage, details={"bits": 2})

    found = failures_of(Method("fake-bits", "quantization", "claims 2 bits", Bits, apply))
    assert any("claims 2-bit weights" in f for f in found)


def _grid(bits):
    from slimbench.methods.quantization.grid import GridConfig

    return GridConfig(bits=bits)


def test_storage_smaller_than_the_information_in_the_weights_fails():
    def apply(lm, cfg, ctx):  # quantizes for real, but "stores" only the scales
        storage = {}
        for name, mod in iter_linears(lm.model):
            _, deq, params = quantize_matrix(get_weight(mod), _grid(4))
            set_weight(mod, deq)
            storage[f"{name}.weight"] = {"scales": params.scale.half()}
        return MethodReport("simulated", storage=storage, details={"bits": 4})

    found = failures_of(Method("tiny-store", "quantization", "scales only", Bits, apply))
    assert any("fewer than the" in f and "bits of information" in f for f in found)


def test_native_that_makes_nothing_smaller_fails():
    noop = Method("noop", "pruning", "claims native", Sparsity, lambda lm, c, x: MethodReport("native"))
    assert any("holds as many bytes as before" in f for f in failures_of(noop))


def test_native_acceleration_that_changes_nothing_fails():
    noop = Method("noop-accel", "acceleration", "claims speed", Sparsity, lambda lm, c, x: MethodReport("native"))
    assert any("unchanged" in f for f in failures_of(noop))


def test_nondeterminism_is_caught():
    def apply(lm, cfg, ctx):  # Python's RNG is not seeded by the harness
        mod = next(m for _, m in iter_linears(lm.model))
        set_weight(mod, get_weight(mod) * random.random())
        return MethodReport("native")

    found = failures_of(Method("dice", "recovery", "random", Sparsity, apply))
    assert any("two runs give different weights" in f for f in found)


def test_undeclared_calibration_data_is_caught():
    class Calib(Config):  # draws calibration data without inheriting CalibrationConfig
        calib_corpus: str = "shakespeare"
        calib_samples: int = 2
        calib_seqlen: int = 16
        calib_seed: int = 0

    def apply(lm, cfg, ctx):
        sample_calibration(lm, cfg)
        return MethodReport("native")

    found = failures_of(Method("sneaky", "recovery", "undeclared data", Calib, apply))
    assert any("does not inherit CalibrationConfig" in f for f in found)


def test_an_error_outside_check_is_a_failure_and_a_refusal_in_check_is_not():
    def boom(lm, cfg, ctx):
        raise ValueError("late")

    def refuse(lm, cfg):
        raise ValueError("this model has no such layer")

    assert any("raised ValueError: late" in f for f in failures_of(Method("late", "pruning", "x", Sparsity, boom)))
    outcomes = check_method(Method("polite", "pruning", "x", Sparsity, boom, check=refuse), archs=("llama",))
    assert [o.status for o in outcomes if o.check.startswith("runs on")] == ["refused"]
    assert "no such layer" in outcomes[2].detail


def test_a_config_that_does_not_survive_yaml_fails():
    from pydantic import field_validator

    class Doubling(Config):
        width: int = 2

        @field_validator("width")
        @classmethod
        def _double(cls, v):  # validation changes the value: a stored config would not reload as itself
            return v * 2

    outcomes = check_method(Method("doubling", "recovery", "x", Doubling, lambda lm, c, x: MethodReport("native")),
                            archs=("llama",), determinism=False)
    assert outcomes[1].status == "fail" and "changed through YAML" in outcomes[1].detail


def test_compression_after_acceleration_is_a_declaration_failure():
    rogue = Method("rogue", "pruning", "x", Sparsity, prune, follows=("acceleration",))
    assert any("only acceleration may follow acceleration" in f for f in failures_of(rogue))
