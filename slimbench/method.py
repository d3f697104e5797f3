"""What a method is: a frozen config plus one transform that reports what it achieved.

A method file declares one ``METHOD = Method(...)``. Most fields have defaults derived from
the method's ``family``, so a typical declaration names only ``name``, ``family``,
``description``, ``config``, ``apply`` and, where shapes matter, ``check``::

    METHOD = Method(name="my-pruner", family="pruning", description="...", config=MyConfig,
                    apply=apply, check=check)

``Method.run`` is how the harness (runner, contract tests, ``check-method``) applies a
method: the method's own checks, the GPU and calibration-budget guards, a seeded ``apply``,
and warnings about a report that would mislead (a simulated method with no stored form).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from slimbench.config import Config, build_config
from slimbench.lm import LanguageModel
from slimbench.measure.clocks import PeakMemory
from slimbench.modeling import (
    CompressedLinear,
    count_parameters,
    iter_linears,
    linear_numel,
    memory_bytes,
    serialized_bytes,
    sparsity_stats,
    storage_state,
    unique_tensors,
)
from slimbench.registry import METHODS
from slimbench.specs import HardwareSpec, MethodSpec

Execution = Literal["native", "simulated"]
FAMILIES = (
    "baseline", "precision", "quantization", "pruning", "lowrank", "distillation", "recovery", "acceleration", "search",
    "rotation",
)
# Families whose methods make the model smaller (stored bytes, effective bits, parameters).
COMPRESSION = ("precision", "quantization", "pruning", "lowrank", "distillation", "search")

# Which families may come *before* a method of each family in a `steps` chain (every earlier
# step must be one of them). The reasons, so a plugin author can judge an exception:
# - acceleration changes how the model executes, not its weights: it may follow anything, and
#   only acceleration may follow it (a compression step cannot rewrite a compiled or
#   kernel-swapped model).
# - quantization ends a compression chain: later weight edits would leave its grid, so only
#   recovery (which re-encodes what it changed) and acceleration may follow it.
# - pruning may follow pruning (e.g. structured then unstructured), low-rank (the factors are
#   linear layers), a smaller student, a cast, and recovery.
# - low-rank and precision replace or re-type weights that earlier sparse or quantized stored
#   forms describe, so they only follow steps that leave no such stored form.
# - recovery (fine-tuning) follows compression; baseline is the unchanged reference: alone only.
# - rotation (QuaRot, SpinQuant) changes the basis of dense weights without changing the function,
#   so that a quantizer or pruner after it meets no outliers: it is its own step, which quantization,
#   pruning, search and a cast may follow; it follows only steps that leave dense weights (not
#   pruning or quantization, whose zeros or grid it would destroy).
DEFAULT_FOLLOWS: dict[str, tuple[str, ...]] = {
    "baseline": (),
    "precision": ("lowrank", "distillation", "recovery", "rotation"),
    "quantization": ("pruning", "lowrank", "distillation", "recovery", "precision", "rotation"),
    "pruning": ("pruning", "lowrank", "distillation", "recovery", "precision", "rotation"),
    "lowrank": ("distillation", "recovery", "precision"),
    "distillation": ("precision",),
    # search (`auto`) allocates per-layer quantization or sparsity on the model it is given,
    # like those families, so it follows what they follow
    "search": ("lowrank", "distillation", "recovery", "precision", "rotation"),
    "rotation": ("lowrank", "distillation", "recovery", "precision"),
    "recovery": COMPRESSION,
    "acceleration": tuple(f for f in FAMILIES if f != "baseline"),
}
# Families whose methods change layer shapes, so later steps' shape checks cannot be run on
# the original model's shapes at validation time (they still run before each step).
SHAPE_CHANGING = ("lowrank", "distillation")


@dataclass
class MethodReport:
    """What a method achieved, as the method knows it.

    ``execution``: ``native`` when a real kernel or a really smaller model saves time or
    memory; ``simulated`` when the compression lives only as masks or fake-quant values inside
    a dense model. ``storage`` maps parameter names (``"model.layers.0.mlp.up_proj.weight"``)
    to the tensors of their stored form (packed codes, scales, zero-points, sparse values and
    indices); the harness serialises it with safetensors to count real bytes. A simulated
    method must fill it: with an empty ``storage`` every weight counts as the dense tensor the
    model holds, and the harness adds a warning saying so. A native method whose modules
    already hold the compressed tensors (a smaller model, packed layers) may leave it empty.
    ``details`` holds method-specific achieved values (bits, group size, ...).
    """

    execution: Execution
    storage: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Conditions that may make the result misleading (a calibration budget below what the
    # algorithm needs, ...): copied into the record and shown in the leaderboard.
    warnings: list[str] = field(default_factory=list)


@dataclass
class MethodContext:
    """What a method may use besides the model: hardware and a progress-bar factory.

    Calibration data is drawn by the method itself (slimbench.calibration.sample_calibration),
    from its config.
    """

    hardware: HardwareSpec
    progress: Callable[..., Any] | None = None
    # The stored forms earlier steps of the chain reported ({weight name: parts}, read-only;
    # empty for a chain's first step): an exporting step (GGUF, compressed-tensors) writes a
    # method's own integer grid from them; a step that executes what an earlier one encoded
    # (act-quant running a weight grid through an integer kernel) reads the codes here.
    stored_forms: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    name: str
    family: str
    description: str
    config: type[Config]
    apply: Callable[[LanguageModel, Any, MethodContext], MethodReport]
    # Checks that need the model's shapes (e.g. a group size dividing every layer): a
    # ValueError becomes a clear error. They run before compressing, and during `validate` on a
    # weightless skeleton of the model (meta tensors built from its config), unless
    # `check_reads_weights` says the check needs real weight values.
    check: Callable[[LanguageModel, Any], None] | None = None
    check_reads_weights: bool = False
    # Bump when a change changes what the method produces: the version is part of every run
    # id, so old records of this method are not reused for the new code.
    version: str = "1"
    # Families that may come before this method in a `steps` chain; None: DEFAULT_FOLLOWS.
    follows: tuple[str, ...] | None = None
    # Whether the method changes layer shapes; None: the family's default (SHAPE_CHANGING).
    changes_shapes: bool | None = None
    # Methods that must come earlier in the same chain (e.g. ort-int8 quantizes the graph that
    # onnx-runtime exported). Validation refuses a chain without them; the contract runs them first.
    requires: tuple[str, ...] = ()
    # True: refuses to run without a CUDA device (validation rejects a CPU suite).
    requires_gpu: bool = False
    # False: no registered tiny model has a shape the method can run (vLLM's CPU attention takes
    # head sizes of 32 and more; the tiny models' are 16): the contract then accepts refusals on
    # all of them, and the method's own tests run it on a model it takes.
    runs_on_tiny: bool = True
    # For calibration-based methods (config inherits CalibrationConfig): what the budget must
    # cover, as a name in slimbench.calibration.NEEDS ("hessian", "activation-statistics",
    # "training"), a CalibrationNeed, or a function of the config returning either (None: no
    # data used by this config). None: "activation-statistics".
    calibration_need: Any = None
    # Parameters that make the method fast on tiny models and exercise what it does, for the
    # contract tests (`check-method`); tiny calibration budgets and training steps are set by
    # the tests themselves. Example: {"group_size": 32} where the default does not fit.
    test_params: dict[str, Any] = field(default_factory=dict, hash=False)
    # What the method needs beyond the suite's hardware, e.g. {"gpus": 1, "memory_gb": 16}
    # (keys cpus, gpus, memory_gb): the scheduler reserves the larger of the two.
    resources: dict[str, float] | None = None
    # Why the method cannot run on this machine at all (an optional engine not installed or not
    # built: the install command), or None. Its check() refuses with the same reason; the
    # contract tests skip such a method instead of failing.
    unavailable: Callable[[], str | None] | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"method {self.name}: family {self.family!r} not in {FAMILIES}")
        if self.follows is None and self.family not in DEFAULT_FOLLOWS:
            raise ValueError(f"method {self.name}: family {self.family!r} has no default chain rule; set follows=")
        follows = DEFAULT_FOLLOWS[self.family] if self.follows is None else tuple(self.follows)
        unknown = [f for f in follows if f not in FAMILIES]
        if unknown:
            raise ValueError(f"method {self.name}: follows names unknown families {unknown}; allowed: {FAMILIES}")
        object.__setattr__(self, "follows", follows)
        if self.changes_shapes is None:
            object.__setattr__(self, "changes_shapes", self.family in SHAPE_CHANGING)

    # -- declarations ------------------------------------------------------------------
    @property
    def uses_calibration(self) -> bool:
        """True when the config inherits CalibrationConfig (the method draws calibration data)."""
        from slimbench.calibration import CalibrationConfig  # lazy: calibration imports the registry

        return issubclass(self.config, CalibrationConfig)

    def chain_problem(self, earlier: list[Method]) -> str | None:
        """Why this method may not follow the ``earlier`` steps of a chain; None if it may."""
        missing = [r for r in self.requires if r not in {prev.name for prev in earlier}]
        if missing:
            need = ", ".join(missing)
            return f"{self.name} needs {need} earlier in the chain: steps [{need}, {self.name}]"
        for prev in earlier:
            if prev.family == "baseline":
                return f"{prev.name} is the unchanged model, a reference on its own: drop it from the chain"
            if prev.family not in self.follows:
                allowed = ", ".join(self.follows) or "nothing (it must be used alone)"
                return (
                    f"{self.name} ({self.family}) may not follow {prev.name} ({prev.family}); "
                    f"a {self.family} method may follow: {allowed}"
                )
        return None

    def check_config(self, model: Any, cfg: Any) -> None:
        """This method's shape checks against a model's config alone, no weights: ``model`` is a
        ModelSpec (a registered name, hub id or folder), a transformers config, or a skeleton.
        Raises ValueError like ``check``; does nothing if the check needs weight values."""
        from slimbench.specs import ModelSpec
        from slimbench.zoo.shapes import Skeleton, skeleton, skeleton_of_config

        if self.check is None or self.check_reads_weights:
            return
        if isinstance(model, ModelSpec):
            model = skeleton(model)
        elif not isinstance(model, Skeleton):
            model = skeleton_of_config(model)
        self.check(model, cfg)

    # -- running -----------------------------------------------------------------------
    def preflight(self, lm: LanguageModel, cfg: Any) -> list[str]:
        """Every check before compressing: raises ValueError with the reason, returns warnings."""
        if self.requires_gpu and lm.device.type != "cuda":
            raise ValueError(f"method {self.name} needs a CUDA GPU; this cell runs on {lm.device.type}")
        if self.check is not None:
            self.check(lm, cfg)
        if self.uses_calibration:
            from slimbench.calibration import budget_warnings

            return budget_warnings(lm.model, cfg, self)
        return []

    def run(self, lm: LanguageModel, cfg: Any, ctx: MethodContext) -> MethodReport:
        """Check, apply (seeded), and add the harness' warnings to the method's report."""
        from slimbench.modeling import memory_bytes  # lazy: keeps `import slimbench.method` light

        warnings = self.preflight(lm, cfg)
        bytes_before = memory_bytes(lm.model)
        torch.manual_seed(0)
        rep = self.apply(lm, cfg, ctx)
        if not isinstance(rep, MethodReport):
            raise TypeError(f"method {self.name}: apply returned {type(rep).__name__}, not a MethodReport")
        rep.warnings[:0] = warnings + self.report_warnings(lm, rep, bytes_before)
        return rep

    def report_warnings(self, lm: LanguageModel, rep: MethodReport, bytes_before: int) -> list[str]:
        """A compression method whose report would count the model as dense, said out loud."""

        if self.family not in COMPRESSION or rep.storage:
            return []
        if rep.execution == "simulated":
            return [
                "reports simulated execution but no stored form (MethodReport.storage is empty): "
                "its stored bytes and effective bits are those of the dense model"
            ]
        smaller = memory_bytes(lm.model) < bytes_before
        if not smaller and not any(isinstance(m, CompressedLinear) for m in lm.model.modules()):
            return [
                "reports native execution, but the model holds as many bytes as before and no compressed "
                "layer: nothing was made smaller"
            ]
        return []


# -- applying a chain of steps, and measuring what it achieved ----------------------------
def apply_method(lm: LanguageModel, spec: MethodSpec, hw, progress=None, storage=None) -> dict[str, Any]:
    """Apply every step, then measure what was achieved: the method report of the record.

    ``storage`` (optional, filled in): the stored forms the steps reported, for the artifact cache.
    """
    filled = storage  # the caller's dict, refilled at the end (renames rebind the local one)
    storage: dict[str, dict[str, torch.Tensor]] = {}
    steps, execution = [], "native"
    t0 = time.perf_counter()
    with PeakMemory(lm.device) as mem:
        for step in spec.steps:
            method = METHODS.get(step.name)
            cfg = build_config(method.config, step.params, source="record", field=step.name)
            ctx = MethodContext(hardware=hw, progress=progress, stored_forms=dict(storage))
            t_step = time.perf_counter()
            held = tensor_ids(lm.model, storage)
            rep: MethodReport = method.run(lm, cfg, ctx)  # checks, budget guard, seeded apply, report warnings
            storage = follow_renames(lm.model, storage, held)
            storage.update(rep.storage)  # a later step's stored form of a weight replaces an earlier one
            execution = "simulated" if rep.execution == "simulated" else execution
            if rep.execution == "native" and rep.details.get("executes_stored_forms"):
                # an engine step that runs the earlier steps' stored forms (a quantizer's own
                # codes) with real kernels makes the chain native (a GGUF Q4_0 of RTN's grid)
                execution = "native"
            steps.append(
                {
                    "name": step.name,
                    "execution": rep.execution,
                    "seconds": time.perf_counter() - t_step,
                    "details": rep.details,
                    "notes": rep.notes,
                    "warnings": rep.warnings,
                }
            )
    seconds = time.perf_counter() - t0
    if filled is not None:
        filled.clear()
        filled.update(storage)
    return {
        "execution": execution,
        "steps": steps,
        "warnings": [f"{s['name']}: {w}" for s in steps for w in s["warnings"]],
        "compress_seconds": seconds,
        "compress_peak_memory_mb": mem.peak_bytes / 2**20,
        "compress_memory_kind": mem.kind,
        **size_report(lm.model, storage),
    }


def tensor_ids(model: torch.nn.Module, storage: dict[str, Any]) -> dict[str, int]:
    """Storage key -> the data pointer of the parameter it describes."""
    tensors = unique_tensors(model)
    return {k: tensors[k].untyped_storage().data_ptr() for k in storage if k in tensors}


def follow_renames(model: torch.nn.Module, storage: dict[str, Any], held: dict[str, int]) -> dict[str, Any]:
    """Earlier steps' stored forms, keyed by the names their tensors have now: a step that
    wraps the model (an accelerator replacing ``lm.model``) renames every parameter."""
    tensors = unique_tensors(model)
    name_of = {t.untyped_storage().data_ptr(): k for k, t in tensors.items()}
    out = {}
    for k, v in storage.items():
        if k in held and held[k] not in name_of and k not in tensors:
            continue  # the weight itself is gone (a later step replaced its module): its old form too
        out[name_of.get(held.get(k), k)] = v
    return out


SIZE_KEYS = ("parameters", "memory_bytes", "stored_bytes", "stored_format", "effective_bits", "bits_per_parameter")


def size_report(model: torch.nn.Module, storage: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Parameters, bytes in memory, bytes of the stored form, effective bits, sparsity."""
    own = getattr(model, "slimbench_size", None)
    if callable(own):  # an execution engine whose weights live outside this process' torch modules
        return {**dict.fromkeys(SIZE_KEYS), **own()}
    state = storage_state(model, storage)
    linear_bits = numel = 0
    for name, mod in iter_linears(model):
        key = f"{name}.weight"
        if key in storage:
            tensors = storage[key].values()
        elif isinstance(mod, CompressedLinear):
            tensors = mod.weight_storage().values()
        else:
            tensors = [mod.weight.data]
        linear_bits += 8 * sum(t.numel() * t.element_size() for t in tensors)
        numel += linear_numel(mod)
    params = count_parameters(model)
    stored = serialized_bytes(state)
    return {
        "parameters": params,
        "memory_bytes": memory_bytes(model),
        "stored_bytes": stored,
        "stored_format": "packed" if storage else "dense",
        "effective_bits": linear_bits / numel if numel else None,
        "bits_per_parameter": 8 * stored / params,
        **sparsity_stats(model),
    }
