"""The fast layer-wise loop against the loop as first written: same calls, same bits."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_ARCHS, load_tiny

from slimbench.config import build_config
from slimbench.layerwise import (
    SharedGram,
    decoder_layers,
    loop_variant,
    same_tensor,
    sequential,
    sequential_reference,
)
from slimbench.method import MethodContext
from slimbench.modeling import LINEAR_TYPES, get_weight, set_weight
from slimbench.registry import METHODS
from slimbench.specs import HardwareSpec

CTX = MethodContext(hardware=HardwareSpec(threads=1))
CALIB = {"calib_samples": 3, "calib_seqlen": 48}

# Every method that calibrates through the loop, in the configurations that take different
# paths through it (true-sequential or not, layers replaced or written in place, norms folded).
CALIBRATED = [
    ("gptq", {"bits": 3, "act_order": True}),
    ("gptq", {"bits": 4, "group_size": 16, "format": "packed"}),
    ("gptq", {"bits": 4, "group_size": 16, "act_order": True, "true_sequential": False}),
    ("sparsegpt", {"sparsity": 0.5}),
    ("sparsegpt", {"sparsity": 0.5, "pattern": "2:4", "true_sequential": False, "bits": 4}),
    ("wanda", {"sparsity": 0.5}),
    ("wanda", {"sparsity": 0.5, "true_sequential": True}),
    ("awq", {"bits": 4, "group_size": 16, "grid": 5}),
    # ASVD's rank search with two candidates and one probe sequence (tests/test_asvd.py checks the
    # search itself): it still leaves some linears dense and cuts the others to two kept fractions,
    # so the loop runs over a subset of each layer's linears; the loop is what is compared here.
    ("asvd", {"ratio": 0.3, "search_ratios": [0.4, 0.8], "probe_samples": 1}),
    ("svd-llm", {"ratio": 0.3}),
    ("svd-llm", {"ratio": 0.3, "allocation": "sensitivity"}),
    ("spqr", {"bits": 3}),
    ("quip-sharp", {"block_size": 32}),
]


def compress(arch: str, name: str, params: dict, **variant):
    torch.manual_seed(0)
    lm = load_tiny(arch)
    method = METHODS.get(name)
    cfg = build_config(method.config, {**CALIB, **params}, source="test", field=name)
    with loop_variant(**variant):
        rep = method.apply(lm, cfg, CTX)
    return lm.model.state_dict(), rep.storage, cfg


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert_bit_identical(a[k], b[k])
        else:
            assert same_tensor(a[k].contiguous(), b[k].contiguous()), k


def _cases() -> list:
    """Every configuration on tiny-llama; the first of each method on the other architectures
    (the recorder tests below cover their block structure generically)."""
    first = {n: i for i, (n, _) in reversed(list(enumerate(CALIBRATED)))}
    return [pytest.param(arch, n, p, id=f"{n}-{i}-{arch}") for arch in TINY_ARCHS
            for i, (n, p) in enumerate(CALIBRATED) if arch == "llama" or first[n] == i]


@pytest.mark.parametrize(("arch", "name", "params"), _cases())
def test_every_calibrated_method_is_bit_identical_through_the_fast_loop(arch, name, params):
    stats: dict[str, int] = {}
    state_ref, stored_ref, _ = compress(arch, name, params, reference=True)
    state, stored, cfg = compress(arch, name, params, stats=stats)
    assert_bit_identical(state_ref, state)
    assert_bit_identical(stored_ref, stored)
    if getattr(cfg, "true_sequential", name == "awq"):  # the shortcuts were really taken
        assert stats["early_stops"] > 0 and stats["memo_hits"] > 0 and stats["tail_replays"] > 0, stats


def test_every_loop_user_is_covered():
    """A new calibrated method must join CALIBRATED (its outputs checked against the reference)."""
    import inspect

    users = {n for n in METHODS.names() if "sequential(" in inspect.getsource(inspect.getmodule(METHODS.get(n).apply))
             or "factorize_calibrated" in inspect.getsource(inspect.getmodule(METHODS.get(n).apply))}
    covered = {n for n, _ in CALIBRATED} | set(SAME_COMPRESSORS)
    assert users <= covered, users - covered


# Loop users whose compressors are another method's, run through the loop the same way: `auto`
# runs Wanda's layer compressor, not true-sequential, for the linears its plan prunes with Wanda.
SAME_COMPRESSORS = {"auto": ("wanda", {"sparsity": 0.5})}


def test_loop_users_that_share_compressors_are_covered_by_them():
    for name, covering in SAME_COMPRESSORS.items():
        assert covering in CALIBRATED, (name, covering)


class Recorder:
    """Logs every add_batch call; compress rewrites its weight and, optionally, meddles with
    layers compressed earlier (so stored block outputs go stale in ways the loop must notice)."""

    def __init__(self, log: list, done: list, name: str, module: torch.nn.Module, meddle: bool):
        self.log, self.done, self.name, self.module, self.meddle = log, done, name, module, meddle

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        self.log.append((self.name, inp.clone(), out.clone()))

    def compress(self) -> str:
        set_weight(self.module, torch.round(get_weight(self.module) * 8) / 8)
        if self.meddle:
            for mod in self.done:
                set_weight(mod, get_weight(mod) * 0.75)
        self.done.append(self.module)
        return self.name


def record(arch: str, loop, meddle: bool, true_sequential: bool = True, **kw) -> tuple[list, dict]:
    torch.manual_seed(0)
    lm = load_tiny(arch)
    log: list = []
    done: list = []
    calib = torch.randint(0, 1000, (3, 40), generator=torch.Generator().manual_seed(1))
    loop(lm.model, calib, lambda n, m: Recorder(log, done, n, m, meddle), true_sequential=true_sequential, **kw)
    return log, lm.model.state_dict()


def assert_same_calls(a: list, b: list) -> None:
    assert [n for n, _, _ in a] == [n for n, _, _ in b]
    for (n, xa, ya), (_, xb, yb) in zip(a, b, strict=True):
        assert same_tensor(xa, xb) and same_tensor(ya, yb), n


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("meddle", [False, True])
@pytest.mark.parametrize("true_sequential", [True, False])
def test_compressors_see_the_same_calls_and_the_layers_end_the_same(arch, meddle, true_sequential):
    log_ref, state_ref = record(arch, sequential_reference, meddle, true_sequential)
    stats: dict[str, int] = {}
    log, state = record(arch, sequential, meddle, true_sequential, stats=stats)
    assert_same_calls(log_ref, log)
    assert_bit_identical(state_ref, state)
    if true_sequential and not meddle:
        assert stats["memo_hits"] and stats["tail_replays"] and stats["early_stops"], stats


@pytest.mark.parametrize("settings", [{"memo": False}, {"early_stop": False}, {"memo_bytes": 0}])
def test_each_shortcut_alone_keeps_the_calls(settings):
    log_ref, state_ref = record("llama", sequential_reference, False)
    stats: dict[str, int] = {}
    log, state = record("llama", sequential, False, stats=stats, **settings)
    assert_same_calls(log_ref, log)
    assert_bit_identical(state_ref, state)
    if "memo_bytes" in settings:
        assert stats["memo_full"] > 0 and stats["memo_hits"] == 0


def test_memo_notices_a_changed_norm():
    """A compressor that rescales the norm feeding a stored block (as AWQ does) gets no stale output."""

    def meddler(lm, log):
        def make(name, module):
            rec = Recorder(log, [], name, module, False)
            layer = lm.model.get_submodule(name.split(".self_attn")[0].split(".mlp")[0])

            def compress():
                layer.input_layernorm.weight.data.mul_(1.5)
                return Recorder.compress(rec)

            rec.compress = compress
            return rec

        return make

    logs = []
    for loop in (sequential_reference, sequential):
        torch.manual_seed(0)
        lm = load_tiny("llama")
        log: list = []
        calib = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
        loop(lm.model, calib, meddler(lm, log))
        logs.append(log)
    assert_same_calls(*logs)


class InputsOnly(Recorder):
    needs_output = False

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor | None) -> None:
        self.log.append((self.name, inp.clone(), torch.zeros(0)))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_compressors_reading_inputs_only_get_the_same_inputs_with_the_last_linear_skipped(arch):
    logs, states, stats = [], [], {}
    for loop, kw in ((sequential_reference, {}), (sequential, {"stats": stats})):
        torch.manual_seed(0)
        lm = load_tiny(arch)
        log: list = []
        calib = torch.randint(0, 1000, (3, 40), generator=torch.Generator().manual_seed(1))
        loop(lm.model, calib, lambda n, m, log=log: InputsOnly(log, [], n, m, False), **kw)
        logs.append(log)
        states.append(lm.model.state_dict())
    assert_same_calls(*logs)
    assert_bit_identical(*states)
    assert stats["skipped_linears"] == 2 * 3 * 3, stats  # q/k/v, gate/up and down groups: 2 layers, 3 samples


def test_triangular_gram_streams_the_same_hessian():
    """Wide inputs (n >= 1024) take the upper-triangle product; the streamed Hessian must be the
    reference's bits, and a machine whose BLAS disagrees falls back to the full product."""
    from slimbench.methods.quantization import gptq

    from slimbench.layerwise import hessian

    x = torch.randn(4, 96, 1100)
    hs = {}
    for variant in ({"reference": True}, {}, {"triangle": False}):
        with loop_variant(**variant):
            layer = gptq.GPTQLayer(None, "l", torch.nn.Linear(1100, 4), gptq.GPTQConfig())
            for sample in x:
                layer.add_batch(sample, None)
            hs[str(variant)] = (layer.hessian(), layer.upper_only)
    ref, _ = hs["{'reference': True}"]
    assert same_tensor(ref, hs["{}"][0]) and hs["{}"][1]  # the triangle was used, same bits
    assert same_tensor(ref, hs["{'triangle': False}"][0])
    key = next(k for k in hessian._TRI_OK if k[0] == (96, 1100))
    hessian._TRI_OK[key] = False  # as on a machine whose blocks differ: full products only
    try:
        prod, upper = hessian.gram(x[0] * 0.5)
        assert not upper and same_tensor(prod, (x[0] * 0.5).t() @ (x[0] * 0.5))
    finally:
        hessian._TRI_OK[key] = True


def test_symmetric_from_upper_copies_bits():
    from slimbench.layerwise import symmetric_from_upper

    h = torch.randn(5, 5)
    s = symmetric_from_upper(h)
    assert torch.equal(torch.triu(s), torch.triu(h)) and torch.equal(s, s.t())


def test_shared_gram_reuses_only_the_same_input():
    g = SharedGram()
    x = torch.randn(10, 4)
    a = g.product(x.reshape(10, 4), 0.5)
    b = g.product(x.reshape(10, 4), 0.5)  # another view of the same memory
    assert b is a and g.reused == 1
    assert g.product(x.clone(), 0.5) is not a  # equal values, other memory: recomputed
    c, upper = g.product(x, 0.25)
    assert torch.equal(c, (x * 0.25).t() @ (x * 0.25)) and not upper
    x.mul_(2)  # modified in place: recomputed
    assert torch.equal(g.product(x, 0.25)[0], (x * 0.25).t() @ (x * 0.25))
    with loop_variant(share=False):
        y = g.product(x, 0.25)
        assert g.product(x, 0.25) is not y


def test_loop_variant_rejects_unknown_settings():
    with pytest.raises(ValueError, match="allowed"), loop_variant(fast=True):
        pass


def test_loop_bench_reports_bit_identical_runs(capsys):
    from slimbench.devtools.loopbench import loop_bench

    out = loop_bench(method="gptq", suite=None, model="tiny-llama", samples=2, seqlen=32, threads=1)
    fast = out["runs"]["fast"]
    assert fast["bit_identical"] is True and fast["ratio"] > 0
    assert "bit-identical" in capsys.readouterr().out


def test_block_wrappers_are_removed():
    lm = load_tiny("llama")
    calib = torch.randint(0, 1000, (2, 16))
    sequential(lm.model, calib, lambda n, m: Recorder([], [], n, m, False))
    for layer in decoder_layers(lm.model):
        assert all("forward" not in m.__dict__ for m in layer.modules())
        assert all(not m._forward_hooks for m in layer.modules() if isinstance(m, LINEAR_TYPES))


def truncated_copy(lm, layers: int) -> torch.nn.Module:
    """A deep copy of ``lm.model`` with only its first ``layers`` decoder layers (the shared model
    is left whole: the rest are held aside while copying, so they are never copied)."""
    import copy

    held = decoder_layers(lm.model)
    rest = list(held[layers:])
    del held[layers:]
    try:
        return copy.deepcopy(lm.model)
    finally:
        held.extend(rest)


@pytest.mark.slow
def test_gptq_on_the_real_model_is_bit_identical_through_the_fast_loop(smollm2):
    """Real shapes through MKL at two threads, as a cell on this machine runs (512-token rows,
    n = 1536 Gram blocks, so the triangular Gram product too): not one bit of GPTQ's weights may
    change. One decoder layer and two samples keep it short: every shortcut is taken within the
    layer (replayed and memoised block outputs feed the later groups' Hessians, so a wrong bit
    shows in their weights); a layer fed by the compressed one before it is compared bit for bit
    on the tiny models above."""
    from slimbench.methods.quantization import gptq

    cfg = gptq.GPTQConfig(bits=3, act_order=True)
    calib = torch.randint(0, 49152, (2, 512), generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    states, stats = [], {}
    try:
        for variant in ({"reference": True}, {"stats": stats}):
            model = truncated_copy(smollm2, 1)
            gram = SharedGram()
            with loop_variant(**variant):
                sequential(model, calib, lambda n, m, model=model, gram=gram: gptq.GPTQLayer(model, n, m, cfg, gram))
            states.append(model.state_dict())
    finally:
        torch.set_num_threads(threads)
    assert_bit_identical(*states)
    assert stats["memo_hits"] and stats["tail_replays"] and stats["skipped_linears"], stats
    assert len(decoder_layers(smollm2.model)) == 30  # the shared model is whole


class InputRecorder:
    """A compressor that leaves its linear alone and keeps every input it is shown."""

    def __init__(self, seen: list):
        self.seen = seen

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor | None) -> None:
        self.seen.append(inp.detach().clone())

    def compress(self) -> None:
        return None


@pytest.mark.parametrize("arch", (*TINY_ARCHS, "gemma3"))
@pytest.mark.parametrize("loop", [sequential, sequential_reference], ids=["fast", "reference"])
def test_every_compressor_sees_what_the_full_forward_feeds_its_linear(arch, loop):
    """Each linear's calibration inputs, through the loop with compressors that change nothing,
    against that linear's inputs in the model's own forward: Gemma 3's global layer needs its
    own rotary table and mask (the samples are longer than its sliding window of 8)."""
    torch.manual_seed(0)
    model = load_tiny(arch).model
    calib = torch.randint(0, 1000, (3, 24), generator=torch.Generator().manual_seed(1))
    seen: dict[str, list] = {}
    loop(model, calib, lambda name, module: InputRecorder(seen.setdefault(name, [])))
    expected: dict[str, list] = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: expected.setdefault(n, []).append(a[0].detach().clone()))
             for n, m in model.named_modules() if n in seen]
    try:
        with torch.no_grad():
            for sample in calib:
                model(input_ids=sample.unsqueeze(0))
    finally:
        for h in hooks:
            h.remove()
    assert seen and seen.keys() == expected.keys()
    for name in seen:
        got = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen[name]])
        want = torch.cat([x.reshape(-1, x.shape[-1]) for x in expected[name]])
        torch.testing.assert_close(got, want, msg=f"{arch}: inputs of {name}")
