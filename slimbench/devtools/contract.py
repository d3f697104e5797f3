"""The contract every registered method passes, built-in or plugin.

``benchmark.py check-method NAME`` runs it for a plugin author; the test suite runs it for
every registered method (tests/test_contract.py). What it checks, on tiny Llama-, OPT- and
GPT-2-shaped models with tiny budgets:

- declarations: a known family, what it may follow (no compression after acceleration),
  whether it needs calibration data or a GPU, and a working config with defaults;
- its config round-trips through YAML (a suite file) unchanged;
- it runs on each model, or refuses in ``check()`` (a ValueError with a reason);
- what it reports is true: sparsity and bits it claims are re-measured from the weights,
  parameter counts it claims are recounted, the stored bytes equal the size of the stored form
  saved to a safetensors file and hold at least the information in the weights, and ``native``
  only if the model really got smaller or holds a real kernel (accelerators: changed execution);
- it draws calibration data only if it declares it (config inherits CalibrationConfig);
- it is deterministic: two runs on the same model give identical weights and stored form.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from slimbench.method import COMPRESSION, FAMILIES, Method, MethodContext, MethodReport
from slimbench.specs import HardwareSpec, ModelSpec

TINY_ARCHS = ("llama", "opt", "gpt2")
# Small budgets for any method with these parameters: the contract checks behaviour, not quality.
FAST_PARAMS: dict[str, Any] = {
    "calib_samples": 4,
    "calib_seqlen": 32,
    "eval_samples": 1,
    "batch_size": 1,
    "steps": 2,
    "train_steps": 2,
    "teacher_batch": 2,
}


@dataclass
class Outcome:
    check: str
    status: str  # "pass", "fail", "refused" (check() gave a reason), "skip"
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.status.upper():7} {self.check}" + (f": {self.detail}" if self.detail else "")


def contract_params(method: Method, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """FAST_PARAMS the config has, then the method's own ``test_params``, then ``extra``."""
    params = {k: v for k, v in FAST_PARAMS.items() if k in method.config.model_fields}
    return {**params, **method.test_params, **(extra or {})}


# -- declarations and config -------------------------------------------------------------------
def declaration_problems(method: Method) -> list[str]:
    problems = []
    if method.family not in FAMILIES:
        problems.append(f"family {method.family!r} not in {FAMILIES}")
    if not method.description.strip():
        problems.append("empty description")
    if not str(method.version).strip():
        problems.append("empty version")
    if method.family != "acceleration" and "acceleration" in method.follows:
        problems.append("only acceleration may follow acceleration (follows lists 'acceleration')")
    if not isinstance(method.requires_gpu, bool):
        problems.append("requires_gpu must be True or False")
    frozen = method.config.model_config.get("frozen") and method.config.model_config.get("extra") == "forbid"
    if not frozen:
        problems.append("config must derive from slimbench.config.Config (frozen, unknown keys rejected)")
    try:
        cfg = method.config()
    except Exception as exc:
        return [*problems, f"the config has no working defaults: {exc}"]
    if method.uses_calibration:
        from slimbench.calibration import resolve_need

        try:
            resolve_need(method, cfg)
        except Exception as exc:
            problems.append(f"calibration_need: {exc}")
    return problems


def roundtrip_problems(method: Method, params: dict[str, Any]) -> list[str]:
    """The config survives a suite file: YAML dump, load, validate -> the same config and run id."""
    from slimbench.specs import StepSpec

    cfg = method.config(**params)
    text = yaml.safe_dump({"name": method.name, **cfg.to_dict()}, sort_keys=True)
    loaded = yaml.safe_load(text)
    loaded.pop("name")
    again = method.config(**loaded)
    problems = []
    if again != cfg or again.to_dict() != cfg.to_dict():
        problems.append(f"config changed through YAML: {cfg.to_dict()} -> {again.to_dict()}")
    a, b = StepSpec(name=method.name, params=cfg.to_dict()), StepSpec(name=method.name, params=again.to_dict())
    if a.to_dict() != b.to_dict():
        problems.append("the step spec (part of the run id) changed through YAML")
    return problems


# -- running on a tiny model -------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _tokenizer() -> Any:
    from slimbench.zoo.models import gpt2_tokenizer

    return gpt2_tokenizer()  # building it takes most of a tiny model's load time; methods never change it


def load_tiny(arch: str):
    """The registered tiny model (same seed, same weights), with one shared tokenizer."""
    from transformers import AutoModelForCausalLM

    from slimbench.zoo.models import tiny_config, wrap

    hw = HardwareSpec(threads=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=hw.torch_dtype)
    lm = wrap(model, _tokenizer(), f"tiny-{arch}", hw, {"source": f"random init from a tiny {arch} config (seed 0)"})
    lm.spec = ModelSpec(name=f"tiny-{arch}")
    return lm


@contextlib.contextmanager
def counting_calibration() -> Iterator[list[int]]:
    """Counts draws of calibration data (slimbench.calibration.calibration_tokens) meanwhile."""
    import slimbench.calibration as calibration

    calls: list[int] = []
    original = calibration.calibration_tokens

    def counted(lm, corpus):
        calls.append(1)
        return original(lm, corpus)

    calibration.calibration_tokens = counted
    try:
        yield calls
    finally:
        calibration.calibration_tokens = original


def run_once(method: Method, arch: str, params: dict[str, Any]) -> tuple[Any, MethodReport | None, str, dict]:
    """(lm, report or None, refusal reason, facts measured around the run)."""
    from slimbench.modeling import memory_bytes
    from slimbench.registry import METHODS

    lm = load_tiny(arch)
    ctx = MethodContext(hardware=HardwareSpec(threads=1))
    try:
        for name in method.requires:  # the steps this method must follow, with their own test params
            before_method = METHODS.get(name)
            before_method.run(lm, before_method.config(**contract_params(before_method)), ctx)
    except ValueError as err:
        return lm, None, f"{', '.join(method.requires)} (required earlier): {err}", {}
    original_model = lm.model
    attention = getattr(getattr(lm.model, "config", None), "_attn_implementation", None)
    before = memory_bytes(lm.model)
    cfg = method.config(**params)
    try:
        method.preflight(lm, cfg)
    except ValueError as err:
        return lm, None, str(err) or type(err).__name__, {}
    with counting_calibration() as calls:
        rep = method.run(lm, cfg, ctx)
    return lm, rep, "", {"bytes_before": before, "original_model": original_model, "attention": attention,
                      "calibration_draws": len(calls)}


def truth_problems(method: Method, lm: Any, rep: MethodReport, facts: dict) -> list[str]:
    """Everything the report claims, measured again from the model and the stored form."""
    from slimbench.method import size_report

    problems = []
    if rep.execution not in ("native", "simulated"):
        return [f"execution {rep.execution!r} is neither 'native' nor 'simulated'"]
    try:
        sizes = size_report(lm.model, rep.storage)
    except Exception as exc:
        return [f"the report cannot be measured: {type(exc).__name__}: {exc}"]
    problems += sparsity_problems(rep, sizes)
    problems += bits_problems(lm, rep)
    problems += parameter_problems(rep, sizes)
    problems += stored_bytes_problems(lm, rep, sizes)
    problems += native_problems(method, lm, rep, facts)
    if facts.get("calibration_draws") and not method.uses_calibration:
        problems.append("it draws calibration data, but its config does not inherit CalibrationConfig")
    return problems


def sparsity_problems(rep: MethodReport, sizes: dict) -> list[str]:
    claimed = rep.details.get("achieved_sparsity", rep.details.get("sparsity"))
    if not isinstance(claimed, int | float) or isinstance(claimed, bool):
        return []
    measured = sizes["sparsity"]
    if abs(claimed - measured) > 1e-3:
        return [f"claims sparsity {claimed:.4f}, the weights hold {measured:.4f} zeros"]
    return []


def bits_problems(lm: Any, rep: MethodReport) -> list[str]:
    """A b-bit grid with groups of g inputs allows at most 2**b values per group: count them."""
    from slimbench.modeling import get_weight, iter_linears

    bits = rep.details.get("bits", rep.details.get("weight_bits"))
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        return []
    group = rep.details.get("group_size")
    problems = []
    for name, mod in iter_linears(lm.model):
        w = get_weight(mod).float()
        input_scale = rep.storage.get(f"{name}.weight", {}).get("input_scale")
        if input_scale is not None and input_scale.numel() == w.shape[1]:  # AWQ-style: the grid is in W·s
            w = w / input_scale.float().reshape(1, -1)
        groups = math.ceil(w.shape[1] / group) if isinstance(group, int) and group > 0 else 1
        allowed = 2**bits * groups + 1  # +1: a pruned zero off the grid
        distinct = int(distinct_per_row(w).max())
        if distinct > allowed:
            problems.append(f"claims {bits}-bit weights, but a row of {name} holds {distinct} distinct values "
                            f"(at most {allowed} with {groups} group(s) per row)")
            break
    return problems


def distinct_per_row(w: torch.Tensor, rel_tol: float = 1e-3) -> torch.Tensor:
    """Distinct values per row; values closer than ``rel_tol`` of the row's largest |value| count
    once (an fp16 scale stored beside fp32 weights leaves that much rounding)."""
    s = torch.sort(w, dim=1).values
    tol = rel_tol * w.abs().amax(dim=1, keepdim=True)
    return 1 + (s[:, 1:] - s[:, :-1] > tol).sum(dim=1)


def parameter_problems(rep: MethodReport, sizes: dict) -> list[str]:
    for key in ("parameters_after", "student_parameters"):
        claimed = rep.details.get(key)
        if isinstance(claimed, int) and claimed != sizes["parameters"]:
            return [f"claims {key} = {claimed:,}, the model has {sizes['parameters']:,}"]
    return []


def stored_bytes_problems(lm: Any, rep: MethodReport, sizes: dict) -> list[str]:
    """Stored bytes = the size of the stored form written to a file, and at least its information."""
    from safetensors.torch import save_file

    from slimbench.modeling import storage_state

    problems = []
    if callable(getattr(lm.model, "slimbench_size", None)):  # an engine reports its own sizes
        files = getattr(lm.model, "slimbench_files", None)
        if callable(files):
            on_disk = sum(p.stat().st_size for p in files())
            if on_disk != sizes["stored_bytes"]:
                problems.append(f"reports {sizes['stored_bytes']:,} stored bytes, its files have {on_disk:,}")
        return problems  # no files of its own: its sizes are the harness-measured model's
    state = storage_state(lm.model, rep.storage)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stored.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path))
        on_disk = path.stat().st_size
    if on_disk != sizes["stored_bytes"]:
        problems.append(f"reports {sizes['stored_bytes']:,} stored bytes, the saved file has {on_disk:,}")
    for key, parts in rep.storage.items():
        weight = weight_for(lm.model, key)
        if weight is None:
            continue
        group_size = rep.details.get("group_size")
        scales = parts.get("scales")
        if scales is not None and scales.numel() % weight.shape[0] == 0:  # the form says how many grids a
            group_size = math.ceil(weight.shape[1] / (scales.numel() // weight.shape[0]))  # row has (mixed plans)
        need = information_bits(weight, group_size)
        have = 8 * sum(t.numel() * t.element_size() for t in parts.values())
        if have < need:
            problems.append(f"the stored form of {key} has {have:,} bits, fewer than the {need:,.0f} bits of "
                            "information its weight values hold")
            break
    return problems


def weight_for(model: torch.nn.Module, key: str) -> torch.Tensor | None:
    """The [out, in] weight a storage key describes (None: not a linear layer's weight)."""
    from slimbench.modeling import LINEAR_TYPES, get_weight

    if not key.endswith(".weight"):
        return None
    try:
        mod = model.get_submodule(key.removesuffix(".weight"))
    except AttributeError:
        return None
    return get_weight(mod).float() if isinstance(mod, LINEAR_TYPES) else None


def information_bits(w: torch.Tensor, group_size: Any) -> float:
    """A lower bound on the bits any lossless code of ``w`` needs: the empirical entropy of the
    values within each row, less what knowing the group of each value could save (log2 of the
    groups per row), summed over the weights."""
    groups = math.ceil(w.shape[1] / group_size) if isinstance(group_size, int) and group_size > 0 else 1
    total = 0.0
    for row in w:
        _, counts = torch.unique(row, return_counts=True)
        p = counts.double() / row.numel()
        entropy = float(-(p * p.log2()).sum())
        total += max(entropy - math.log2(groups), 0.0) * row.numel()
    return total


def native_problems(method: Method, lm: Any, rep: MethodReport, facts: dict) -> list[str]:
    """`native`: the model really got smaller or runs a real kernel (accelerators: new execution)."""
    from slimbench.modeling import CompressedLinear, memory_bytes

    if rep.execution != "native" or method.family not in (*COMPRESSION, "acceleration"):
        return []
    modules = list(lm.model.modules())
    compressed = any(isinstance(m, CompressedLinear) for m in modules) or any(
        type(p).__name__.startswith("SparseSemiStructured") for p in lm.model.parameters()
    )
    if method.family == "acceleration":  # any module that is not stock torch / transformers counts
        kernel = compressed or any(not type(m).__module__.startswith(("torch.nn.", "transformers.")) for m in modules)
        attention = getattr(getattr(lm.model, "config", None), "_attn_implementation", None)
        changed = (lm.model is not facts["original_model"] or lm.cache_factory is not None or lm.generator is not None
                   or attention != facts.get("attention"))
        if changed or kernel:
            return []
        return ["reports native acceleration, but the model, its attention kernel, its cache and its generator "
                "are unchanged and no kernel module is present"]
    if memory_bytes(lm.model) < facts["bytes_before"] or compressed:
        return []
    return ["reports native execution, but the model holds as many bytes as before and no compressed or "
            "kernel module"]


def determinism_problems(method: Method, arch: str, params: dict[str, Any],
                         first: tuple[Any, MethodReport | None] | None = None) -> list[str]:
    """Two runs from the same model and config: identical weights and stored form. ``first``: a
    run already made (the model and report of the contract's run on ``arch``), so one more will do."""
    lm1, rep1 = first if first is not None else run_once(method, arch, params)[:2]
    lm2, rep2, _, _ = run_once(method, arch, params)
    if rep1 is None or rep2 is None:
        return []  # refused: nothing to compare
    problems = []
    s1, s2 = lm1.model.state_dict(), lm2.model.state_dict()
    differ = [k for k in s1 if k not in s2 or not same_tensor(s1[k], s2[k])]
    if differ or set(s1) != set(s2):
        problems.append(f"two runs give different weights ({(differ or sorted(set(s1) ^ set(s2)))[:2]})")
    stored = [
        k for k, parts in rep1.storage.items()
        if k not in rep2.storage or any(not same_tensor(t, rep2.storage[k].get(p)) for p, t in parts.items())
    ]
    if stored or set(rep1.storage) != set(rep2.storage):
        problems.append(f"two runs give different stored forms ({stored[:2]})")
    return problems


def same_tensor(a: Any, b: Any) -> bool:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return a == b
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


# -- everything, for `check-method` -------------------------------------------------------------
# What the user built or installed once into the cache (engines, their environments, wheels):
# seen through links from the throw-away cache, or an engine method would refuse as if unbuilt.
SHARED_CACHE_FOLDERS = ("engines", "envs", "wheels")


@contextlib.contextmanager
def private_cache() -> Iterator[None]:
    """Methods that cache (teacher outputs, checkpoints) write into a throw-away cache folder."""
    from slimbench.zoo.models import cache_dir

    old = os.environ.get("SLIMBENCH_CACHE")
    user_cache = cache_dir()
    with tempfile.TemporaryDirectory(prefix="slimbench-contract-") as tmp:
        for name in SHARED_CACHE_FOLDERS:
            if (user_cache / name).is_dir():
                (Path(tmp) / name).symlink_to(user_cache / name, target_is_directory=True)
        os.environ["SLIMBENCH_CACHE"] = tmp
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("SLIMBENCH_CACHE", None)
            else:
                os.environ["SLIMBENCH_CACHE"] = old


def check_method(method: Method, *, archs: tuple[str, ...] = TINY_ARCHS, extra: dict[str, Any] | None = None,
                 determinism: bool = True) -> list[Outcome]:
    """Every contract check of ``method``; each becomes an Outcome (failures do not stop the rest)."""
    out: list[Outcome] = []

    def record(check: str, problems: list[str]) -> None:
        out.append(Outcome(check, "fail" if problems else "pass", "; ".join(problems)))

    record("declarations", declaration_problems(method))
    try:
        params = contract_params(method, extra)
        record("config round-trips through YAML", roundtrip_problems(method, params))
    except Exception as exc:
        out.append(Outcome("config round-trips through YAML", "fail", f"{type(exc).__name__}: {exc}"))
        return out
    torch.set_num_threads(1)
    first = None  # the run on archs[0], compared with one more run for determinism
    with private_cache():
        for arch in archs:
            check = f"runs on tiny-{arch}, reports the truth"
            try:
                lm, rep, why, facts = run_once(method, arch, params)
            except Exception as exc:
                out.append(Outcome(check, "fail", f"raised {type(exc).__name__}: {exc} (refuse in check() instead)"))
                continue
            if arch == archs[0]:
                first = (lm, rep)
            if rep is None:
                out.append(Outcome(check, "refused", why))
                continue
            record(check, truth_problems(method, lm, rep, facts))
        if determinism:
            try:
                record(f"deterministic on tiny-{archs[0]}", determinism_problems(method, archs[0], params, first))
            except Exception as exc:
                out.append(Outcome(f"deterministic on tiny-{archs[0]}", "fail", f"{type(exc).__name__}: {exc}"))
    return out
