"""Acceleration methods: kv-cache (lossless = no cache; int8 < int4 error; sinks + window kept exactly),
attention (equal logits), compile (equal logits, composes with compressed models, refuses CUDA graphs on CPU),
perplexity through the cache, fidelity through a lossy cache, and the accel-bench command."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_ARCHS, load_tiny
from slimbench.tasks.perplexity_cached import logits_through_cache, new_cache

from slimbench.errors import SuiteError
from slimbench.measure.roofline import compute_dtype
from slimbench.method import MethodContext
from slimbench.registry import METHODS, TASKS
from slimbench.specs import HardwareSpec, ModelSpec
from slimbench.task import TaskContext

CTX = MethodContext(hardware=HardwareSpec(threads=1))
HAS_CUDA = torch.cuda.is_available()


# one intra-op thread (conftest.one_torch_thread): the 2 shared cores are faster that way
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def apply(lm, name: str, **params):
    method = METHODS.get(name)
    cfg = method.config(**params)
    if method.check is not None:
        method.check(lm, cfg)
    return method.apply(lm, cfg, CTX)


def ids_for(lm, n=2, t=40, seed=0):
    return torch.randint(0, 5000, (n, t), generator=torch.Generator().manual_seed(seed))


# -- kv-cache -------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_lossless_caches_give_the_logits_of_no_cache(arch, kind):
    lm = load_tiny(arch)
    ids = ids_for(lm)
    ref_logits, ref_gen = lm.logits(ids), lm.generate(ids[:, :20], 8)
    apply(lm, "kv-cache", implementation=kind)
    torch.testing.assert_close(logits_through_cache(lm, ids, 7), ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(lm.generate(ids[:, :20], 8), ref_gen)


@pytest.mark.skipif(not HAS_CUDA, reason="offloading moves the KV cache off a GPU")
def test_offloaded_cache_gives_the_logits_of_no_cache():
    lm = load_tiny("llama")
    lm.model.cuda()
    lm.device = torch.device("cuda")
    ids = ids_for(lm).cuda()
    ref = lm.logits(ids)
    apply(lm, "kv-cache", implementation="offloaded")
    torch.testing.assert_close(logits_through_cache(lm, ids, 7), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(HAS_CUDA, reason="on CPU only")
def test_offloaded_cache_is_refused_on_cpu():
    with pytest.raises(ValueError, match="nothing to offload"):
        apply(load_tiny("llama"), "kv-cache", implementation="offloaded")


def test_int8_kv_error_is_small_and_int4_larger():
    lm = load_tiny("llama")
    ids = ids_for(lm, t=48)
    ref = lm.logits(ids)
    errors = {}
    for bits in (8, 4):
        for axis in ("token", "channel"):
            apply(lm, "kv-cache", implementation="quantized", bits=bits, key_axis=axis, value_axis="token",
                  token_block=8)
            errors[bits, axis] = (logits_through_cache(lm, ids, 4) - ref).abs().max().item()
    scale = ref.abs().max().item()
    for axis in ("token", "channel"):
        assert 0 < errors[8, axis] < 0.01 * scale, errors
        assert errors[4, axis] > 3 * errors[8, axis], errors


def test_quantized_kv_holds_fewer_bytes_as_reported():
    from slimbench.measure.roofline import kv_cache_bytes

    lm = load_tiny("llama")
    rep = apply(lm, "kv-cache", implementation="quantized", bits=4)
    _, cache = lm.prefill(ids_for(lm, n=1, t=64))
    kv = kv_cache_bytes(cache)
    per = rep.details["kv_bytes_per_position_physical"] / rep.details["kv_bytes_per_position_logical"]
    assert kv["logical"] == rep.details["kv_bytes_per_position_logical"] * 64
    assert kv["physical"] / kv["logical"] == pytest.approx(per)
    assert per < 0.5  # 4-bit codes + fp16 scale and minimum per 16-channel head, vs fp32


def test_sliding_window_keeps_exactly_sinks_and_window():
    lm = load_tiny("llama")
    ids = ids_for(lm, n=1, t=30)
    sinks, window = 3, 8
    _, full = lm.prefill(ids)
    apply(lm, "kv-cache", implementation="sliding-window", sinks=sinks, window=window)
    cache = None
    for start in range(0, 30, 5):  # chunks of 5: eviction happens between calls
        cache = cache or new_cache(lm, 1, 30)
        out = lm.model(input_ids=ids[:, start : start + 5], cache=cache, use_cache=True)
        cache = out.cache
    expected = list(range(sinks)) + list(range(30 - window, 30))
    for layer in cache.layers:
        assert layer.kept_positions == expected and layer.keys.shape[-2] == sinks + window
    # Layer 0's keys depend only on token and position: the kept ones are the full cache's at those positions.
    torch.testing.assert_close(cache.layers[0].keys, full.layers[0].keys[:, :, expected])
    assert cache.get_seq_length() == 30  # positions keep counting


def test_lossy_cache_configs_are_checked():
    with pytest.raises(ValueError, match="int4 codes pack in pairs"):
        METHODS.get("kv-cache").config(implementation="quantized", bits=4, channel_group=3)
    lm = load_tiny("llama")  # head dim 16
    with pytest.raises(ValueError, match="does not divide the head dimension 16"):
        apply(lm, "kv-cache", implementation="quantized", channel_group=6)


def test_perplexity_through_an_exact_cache_equals_the_perplexity_task():
    lm = load_tiny("llama")
    ctx = TaskContext(hardware=HardwareSpec(threads=1))
    plain = TASKS.get("perplexity")
    cached = TASKS.get("perplexity-cached")
    a = plain.evaluate(lm, plain.config(seqlen=64, max_windows=2), ctx)
    b = cached.evaluate(lm, cached.config(seqlen=64, max_windows=2, chunk=10, reference="on"), ctx)
    assert b.metrics["perplexity"].value == pytest.approx(a.metrics["perplexity"].value, rel=1e-5)
    assert b.metrics["kl_to_exact_cache"].value < 1e-6
    apply(lm, "kv-cache", implementation="quantized", bits=4)
    c = cached.evaluate(lm, cached.config(seqlen=64, max_windows=2, chunk=10), ctx)  # auto: lossy -> reference
    assert c.details["reference"] and c.metrics["kl_to_exact_cache"].value > 1e-6
    assert c.metrics["perplexity"].value != pytest.approx(a.metrics["perplexity"].value, rel=1e-6)


def test_fidelity_scores_a_lossy_cache_through_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMBENCH_CACHE", str(tmp_path))
    lm = load_tiny("llama")
    lm.spec = ModelSpec(name="tiny-llama")
    task = TASKS.get("fidelity")
    cfg = task.config(n_prompts=2, prompt_len=32, gen_prompt_len=8, gen_tokens=4)
    report = {"steps": [{"name": "kv-cache"}]}
    ctx = TaskContext(hardware=HardwareSpec(threads=1), method_report=report)
    apply(lm, "kv-cache", implementation="static")
    floor = task.evaluate(lm, cfg, ctx).metrics["kl"].value  # lossless: only the stored baseline's fp16 rounding
    assert floor < 1e-5
    apply(lm, "kv-cache", implementation="quantized", bits=4, score_chunk=4)
    res = task.evaluate(lm, cfg, ctx)
    assert res.details["scored_through_cache_chunk"] == 4 and res.metrics["kl"].value > 2 * floor


# -- attention ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_attention_implementations_agree(arch):
    lm = load_tiny(arch)
    ids = ids_for(lm, t=24)
    apply(lm, "attention", implementation="eager")
    ref = lm.logits(ids)
    apply(lm, "attention", implementation="sdpa")
    assert lm.model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(lm.logits(ids), ref, rtol=1e-5, atol=1e-5)


def test_attention_refuses_what_the_hardware_or_model_lacks():
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="CUDA kernels"):
            apply(load_tiny("llama"), "attention", implementation="flash")
    with pytest.raises(ValueError, match="does not support flex_attention"):
        apply(load_tiny("gpt2"), "attention", implementation="flex")


# -- compile --------------------------------------------------------------------------------------
@pytest.mark.skipif(HAS_CUDA, reason="on a CPU-only machine")
def test_cuda_graph_modes_fail_validation_without_cuda(tmp_path):
    from slimbench.sweep.suite import load_suite

    suite = tmp_path / "s.yaml"
    suite.write_text("models: [tiny-llama]\nmethods: [{name: compile, mode: max-autotune}]\n"
                     "tasks: [efficiency]\nhardware: {threads: 1}\n")
    with pytest.raises(SuiteError, match=r"captures CUDA graphs.*max-autotune-no-cudagraphs"):
        load_suite(suite)


def test_compile_refuses_cuda_graphs_on_a_cpu_cell():
    cfg = METHODS.get("compile").config.model_construct(mode="reduce-overhead", scope="model")
    with pytest.raises(ValueError, match="need a CUDA device"):
        METHODS.get("compile").check(load_tiny("llama"), cfg)


def test_compiled_logits_and_generation_equal_eager():
    """The compiled model (fp32, static cache, freezing) within 1e-4 of eager, same greedy tokens."""
    lm = load_tiny("llama")
    ids = ids_for(lm, n=1, t=12)
    ref_prefill, _ = lm.prefill(ids, capacity=18)
    ref_gen = lm.generate(ids, 6)
    apply(lm, "kv-cache", implementation="static")
    rep = apply(lm, "compile", freezing=True, warmup_prompt=12, warmup_tokens=6)
    assert rep.details["graph_breaks"] == 0 and rep.details["compile_seconds"] > 0
    assert rep.details["graphs_compiled"] >= 1
    logits, _ = lm.prefill(ids, capacity=18)
    torch.testing.assert_close(logits, ref_prefill, rtol=1e-4, atol=1e-4)
    assert torch.equal(lm.generate(ids, 6), ref_gen)


SMALL_CALIB = {"calib_samples": 2, "calib_seqlen": 32}
COMPRESSED = {
    "cast": ("cast", {"dtype": "bfloat16"}, 2e-2),
    "dynamic-int8": ("dynamic-int8", {}, 1e-3),
    "rtn-packed": ("rtn", {"bits": 4, "group_size": 32, "format": "packed"}, 1e-3),
    "gptq-packed": ("gptq", {"bits": 8, "format": "packed", "symmetric": True, **SMALL_CALIB}, 1e-3),
    "svd": ("svd", {"ratio": 0.5}, 1e-4),
}


@pytest.mark.slow
@pytest.mark.parametrize("prior", list(COMPRESSED))
def test_compile_on_top_of_compressed_models(prior):
    """Compile each compressed form (one prefill graph each: compiling is slow) without graph breaks."""
    name, params, tol = COMPRESSED[prior]
    lm = load_tiny("llama")
    apply(lm, name, **params)
    ids = ids_for(lm, n=1, t=10)
    ref, _ = lm.prefill(ids, capacity=11)
    rep = apply(lm, "compile", warmup_prompt=10, warmup_tokens=1)  # 1 token: the prefill only
    got, _ = lm.prefill(ids, capacity=11)
    assert rep.details["graph_breaks"] == 0, rep.details["graph_break_reasons"]
    if prior == "dynamic-int8":
        assert rep.details["traced_dynamic_int8_layers"] > 0
        assert compute_dtype(lm.model) == "int8"  # the roofline still sees int8 compute through the wrapper
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol * ref.abs().max().item())


def test_compile_refuses_an_already_compiled_model():
    lm = load_tiny("llama")
    lm.model = torch.compile(lm.model)
    with pytest.raises(ValueError, match="already runs as"):
        apply(lm, "compile")


# -- accel-bench ----------------------------------------------------------------------------------
def test_accel_bench_rejects_unknown_variants():
    from slimbench.cli import parser
    from slimbench.cli.accel_bench import parse_variants

    args = parser().parse_args(["accel-bench", "--variants", "eager-fp32,warp-speed"])
    with pytest.raises(SuiteError, match="unknown variant 'warp-speed'"):
        parse_variants(args)
    args = parser().parse_args(["accel-bench", "--variant", "x=[{name: compile, mode: turbo}]"])
    with pytest.raises(SuiteError, match="mode"):
        parse_variants(args)


def test_accel_bench_interleaves_variants(monkeypatch, capsys, tmp_path):
    from slimbench.cli import main

    fake = {"identity": {"threads": 1, "device": "cpu"},
            "bandwidth": {"bytes_per_s": 1e10, "method": "fake", "size_bytes": 2**20},
            "flops": {"float32": {"flops_per_s": 1e11, "method": "fake"}}, "noisy": False, "source": "cache"}
    from slimbench.measure import limits

    monkeypatch.setattr(limits, "machine_limits", lambda *a, **k: dict(fake))
    out = tmp_path / "ab.json"
    rc = main(["accel-bench", "--model", "tiny-llama", "--variants", "eager-fp32,eager-bf16", "--prompt-len", "8",
               "--new-tokens", "3", "--repeats", "2", "--warmup", "0", "--threads", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "| eager-bf16 |" in text and "1.00x" in text and "round 2 (of at least 2)" in text
    assert "% of 10.0 GB/s at 1 MiB" in text and "GFLOP/s float32" in text  # every fraction beside its denominator
    import json

    data = json.loads(out.read_text())
    assert [v["label"] for v in data["variants"]] == ["eager-fp32", "eager-bf16"]
    assert data["variants"][1]["details"]["interleaving"]["labels"] == ["eager-fp32"]
    assert "decode_roofline_fraction" in data["variants"][0]["metrics"]


def test_accel_bench_compiles_on_the_regime_shape():
    from slimbench.cli import parser
    from slimbench.cli.accel_bench import parse_variants

    args = parser().parse_args(["accel-bench", "--variants", "compile-static-fp32", "--prompt-len", "100",
                                "--new-tokens", "20", "--batch-size", "4",
                                "--variant", "own=[{name: compile, warmup_prompt: 7}]"])
    (_, preset), (_, own) = parse_variants(args)
    step = preset.steps[-1].params
    assert (step["warmup_prompt"], step["warmup_tokens"], step["warmup_batch"]) == (100, 20, 4)
    assert own.steps[0].params["warmup_prompt"] == 7  # what a variant sets wins
