"""KV eviction policies: each keeps the positions its paper's rule picks, given attention scores
laid out by hand; the attention hook leaves outputs unchanged; recorded prefills replay to the
same bits; bytes and refusals.

The hand-made attention: with one-hot keys (key ``j`` = ``e_j``) and scaling 1, query row ``i``'s
logit for key ``j`` is ``q_i[j]``, so choosing ``q_i = log(p_i)`` sets the attention row to ``p_i``
(renormalised over the keys it may see). Expected kept sets are written out from those numbers.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import load_tiny
from slimbench.methods.kvcache.h2o import H2O, H2OConfig
from slimbench.methods.kvcache.hook import CallView
from slimbench.methods.kvcache.knorm import KNorm, KNormConfig
from slimbench.methods.kvcache.layer import EvictionLayer
from slimbench.methods.kvcache.policy import EvictionFactory, kv_bytes_at, record_prefill
from slimbench.methods.kvcache.pyramidkv import PyramidKV, PyramidKVConfig
from slimbench.methods.kvcache.snapkv import SnapKV, SnapKVConfig
from slimbench.methods.kvcache.streaming import Streaming, StreamingConfig
from slimbench.methods.kvcache.tova import TOVA, TOVAConfig

from slimbench.config import build_config
from slimbench.method import MethodContext
from slimbench.registry import METHODS
from slimbench.specs import HardwareSpec

POLICIES = ["kv-h2o", "kv-snapkv", "kv-pyramidkv", "kv-tova", "kv-streaming", "kv-knorm"]
# each policy on one architecture, alternating (Llama: GQA, all layers evict; Gemma 3: sliding-window
# layers around a global one), both for every test that runs whole models
ON_MODELS = [(name, "llama" if i % 2 == 0 else "gemma3") for i, name in enumerate(POLICIES)]
ON_MODELS_SWAPPED = [(name, "gemma3" if arch == "llama" else "llama") for name, arch in ON_MODELS]


def one_call(policy, probs_rows: list[list[float]], heads_q: int = 1, held: EvictionLayer | None = None):
    """Run one call of ``len(probs_rows)`` new positions through an EvictionLayer whose attention
    rows are ``probs_rows`` (one list per query row, over every key it sees; GQA: the same rows
    for each of ``heads_q`` query heads unless rows are given per head as a 3-level list)."""
    layer = held or EvictionLayer(policy, 0, 1, None)
    q = len(probs_rows) if not isinstance(probs_rows[0][0], list) else len(probs_rows[0])
    t = (layer.held if layer.is_initialized else 0) + q
    d = 16  # head dim: room for a one-hot key per position
    keys, values = layer.update(torch.zeros(1, 1, q, d), torch.randn(1, 1, q, d))
    keys = torch.eye(t, d)[None, None]  # what attention sees: one-hot keys over the t positions
    layer._call = (keys, values, q)
    rows = probs_rows if isinstance(probs_rows[0][0], list) else [probs_rows] * heads_q
    query = torch.full((1, heads_q, q, d), -1e9)
    for h, head_rows in enumerate(rows):
        for i, row in enumerate(head_rows):
            for j, p in enumerate(row):
                query[0, h, i, j] = math.log(p) if p > 0 else -1e9
    layer.after_attention(CallView(query, keys, 1.0))
    return layer


def kept(layer) -> list[int]:
    return layer.positions[0, 0].tolist()


# -- each policy against its definition ---------------------------------------------------------
def test_h2o_keeps_heavy_hitters_by_accumulated_attention_and_the_recent_window():
    # 6 prompt positions, causal rows. Column sums (accumulated attention):
    # col0 = 1 + .5 + .6 + .1 + .1 + .1 = 2.4, col1 = .5 + .1 + .1 + .1 + .1 = 0.9,
    # col2 = .3 + .7 + .1 + .6 = 1.7, col3 = .1 + .1 + .1 = 0.3, col4 = .6 + .1 = 0.7, col5 = 0
    rows = [[1.0], [0.5, 0.5], [0.6, 0.1, 0.3], [0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.1, 0.1, 0.6],
            [0.1, 0.1, 0.6, 0.1, 0.1, 0.0]]
    layer = one_call(H2O(H2OConfig(budget=4)), rows)
    # heavy = 2 of positions 0..3 (recent = 4, 5): the two largest sums there are 0 (2.4) and 2 (1.7)
    assert kept(layer) == [0, 2, 4, 5]
    assert torch.allclose(layer.score[0, 0], torch.tensor([2.4, 1.7, 0.7, 0.0]), atol=1e-5)
    # a decode step (position 6) attends .1 .7 .1 .1 over the held 0, 2, 4, 5 and 0 to itself:
    # accumulated 2.5, 2.4, 0.8, 0.1, 0 -> keep 2 heavy from {0, 2, 4} = 0, 2; recent 5, 6
    one_call(layer.policy, [[0.1, 0.7, 0.1, 0.1, 1e-12]], held=layer)
    assert kept(layer) == [0, 2, 5, 6]


def test_tova_keeps_what_the_last_query_attends_to_averaged_over_heads():
    # two query heads on one KV head; last rows (over 5 keys) average to .25 .05 .3 .25 .15
    last = [[0.4, 0.1, 0.1, 0.2, 0.2], [0.1, 0.0, 0.5, 0.3, 0.1]]
    causal = [[1.0], [0.5, 0.5], [0.3, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]
    layer = one_call(TOVA(TOVAConfig(budget=3)), [[*causal, last[0]], [*causal, last[1]]], heads_q=2)
    assert kept(layer) == [0, 2, 3]


def test_snapkv_keeps_the_window_and_the_pooled_window_attention_top_k():
    # 8 positions, window 2 (rows 6, 7), kernel 3 average pooling with zero padding over keys 0..5.
    rows = [[1.0]] + [[1.0 / (i + 1)] * (i + 1) for i in range(1, 6)]
    rows += [[0.02, 0.02, 0.4, 0.02, 0.02, 0.02, 0.5], [0.02, 0.3, 0.02, 0.02, 0.02, 0.02, 0.3, 0.3]]
    # window sums over keys 0..5 (each row renormalised, row 6 sums to 1.0, row 7 to 1.0):
    # s = [.04, .32, .42, .04, .04, .04]; avg-pool(3, pad 1): [.12, .26, .2667, .1667, .04, .0267]
    # top 2 of keys 0..5: 2 (.2667), 1 (.26); plus the window 6, 7
    layer = one_call(SnapKV(SnapKVConfig(budget=4, window=2, kernel=3)), rows)
    assert kept(layer) == [1, 2, 6, 7]
    # max pooling instead: [.32, .42, .42, .42, .04, .04] -> 1, 2 tie with 3; top-k breaks by index order
    layer = one_call(SnapKV(SnapKVConfig(budget=5, window=2, kernel=3, pooling="max")), rows)
    assert kept(layer) == [1, 2, 3, 6, 7]


def test_pyramidkv_budgets_shrink_linearly_and_average_to_the_uniform_budget():
    policy = PyramidKV(PyramidKVConfig(budget=20, window=4, beta=2))
    # rest 16: min 16/2 = 8, max 2*16 - 8 = 24, three layers in steps of 8: 4+24, 4+16, 4+8
    budgets = [policy.layer_budget(SimpleNamespace(rank=r, ranks=3), 100) for r in range(3)]
    assert budgets == [28, 20, 12] and sum(budgets) / 3 == 20
    # a prompt too short for the bottom layer's share: max capped at 26 - 4 = 22, min = 32 - 22 = 10
    assert [policy.layer_budget(SimpleNamespace(rank=r, ranks=3), 26) for r in range(3)] == [26, 20, 14]


def test_knorm_keeps_the_lowest_key_norms():
    layer = EvictionLayer(KNorm(KNormConfig(budget=2)), 0, 1, None)
    keys = torch.tensor([3.0, 0.5, 2.0, 0.1, 1.0])[None, None, :, None] * torch.ones(1, 1, 5, 4)
    layer.update(keys, keys.clone())
    layer.after_attention(CallView(torch.zeros(1, 1, 5, 4), layer._call[0], 1.0))
    assert kept(layer) == [1, 3]


def test_streaming_keeps_sinks_and_recent():
    layer = one_call(Streaming(StreamingConfig(budget=5, sinks=2)), [[1.0 / (i + 1)] * (i + 1) for i in range(9)])
    assert kept(layer) == [0, 1, 6, 7, 8]


# -- on real (tiny) models ------------------------------------------------------------------------
def apply(lm, name: str, **params):
    m = METHODS.get(name)
    cfg = build_config(m.config, params, source="test", field=name)
    m.check(lm, cfg)
    return m.run(lm, cfg, MethodContext(hardware=HardwareSpec(threads=1)))


def params_for(name: str, **kw) -> dict:
    return {**({"window": 4} if name in ("kv-snapkv", "kv-pyramidkv") else {}), **kw}


@pytest.mark.parametrize(("name", "arch"), ON_MODELS)
def test_a_budget_over_the_context_changes_nothing(one_torch_thread, name, arch):
    lm = load_tiny(arch)
    ids = torch.randint(0, 1000, (1, 24))
    with torch.inference_mode():
        ref = lm.model(input_ids=ids, use_cache=True)
        ref_next = lm.model(input_ids=ids[:, :5], cache=ref.cache, use_cache=True).logits
    apply(lm, name, **params_for(name, budget=64))
    with torch.inference_mode():
        out = lm.model(input_ids=ids, cache=lm.cache_factory(lm, 1, 40), use_cache=True)
        nxt = lm.model(input_ids=ids[:, :5], cache=out.cache, use_cache=True).logits
    assert torch.allclose(out.logits, ref.logits, atol=1e-5)
    assert torch.allclose(nxt, ref_next, atol=1e-5)  # a 5-position chunk after the prompt: the per-layer mask


def test_the_hook_masks_a_chunk_after_eviction_per_layer():
    """The second call's attention over the held positions and its own causal ones, against a
    plain softmax attention computed here."""
    from slimbench.methods.kvcache import hook

    module = SimpleNamespace(is_causal=True, num_key_value_groups=2, scaling=0.5)
    seen = {}
    layer = SimpleNamespace(after_attention=lambda view: seen.setdefault("view", view))
    held, q = 5, 3
    query, key, value = torch.randn(1, 4, q, 8), torch.randn(1, 2, held + q, 8), torch.randn(1, 2, held + q, 8)
    hook.hand_off(layer, key)
    out, _ = hook.attention(module, query, key, value, None, scaling=0.5)
    k, v = key.repeat_interleave(2, dim=1), value.repeat_interleave(2, dim=1)
    logits = query @ k.transpose(-1, -2) * 0.5
    allowed = torch.tensor([[j < held or j - held <= i for j in range(held + q)] for i in range(q)])
    ref = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1) @ v
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-5)
    assert seen["view"].q == q and seen["view"].t == held + q


@pytest.mark.parametrize(("name", "arch"), ON_MODELS_SWAPPED)
def test_a_recorded_prefill_replays_to_the_same_bits(one_torch_thread, name, arch):
    lm = load_tiny(arch)
    apply(lm, name, **params_for(name, ratio=4, quantize="int8" if name == "kv-knorm" else "none"))
    ids, question = torch.randint(0, 1000, (1, 48)), torch.randint(0, 1000, (1, 6))
    caches = []
    with torch.inference_mode():
        live = lm.model(input_ids=ids, cache=lm.cache_factory(lm, 1, 60), use_cache=True, logits_to_keep=1)
        record = record_prefill(lm, ids)
        assert torch.equal(live.logits[:, -1].float(), record["tensors"]["logits"])
        for cache in (live.cache, lm.cache_factory.from_record(lm, record)):
            out = lm.model(input_ids=question, cache=cache, use_cache=True)
            logits = [out.logits]
            for _ in range(3):
                out = lm.model(input_ids=out.logits[:, -1:].argmax(-1), cache=out.cache, use_cache=True)
                logits.append(out.logits)
            caches.append((out.cache, torch.cat(logits, 1)))
    (a, la), (b, lb) = caches
    assert torch.equal(la, lb)
    for x, y in zip(a.layers, b.layers, strict=True):
        if isinstance(x, EvictionLayer):
            assert torch.equal(x.positions, y.positions) and x.held < x.seen


def test_the_exact_cache_from_a_record_is_the_plain_cache(one_torch_thread):
    lm = load_tiny("gemma3")  # sliding-window layers around a global one
    ids, question = torch.randint(0, 1000, (1, 30)), torch.randint(0, 1000, (1, 4))
    with torch.inference_mode():
        plain = lm.model(input_ids=ids, use_cache=True)
        ref = lm.model(input_ids=question, cache=plain.cache, use_cache=True).logits
        cache = EvictionFactory.exact_from_record(lm, record_prefill(lm, ids))
        out = lm.model(input_ids=question, cache=cache, use_cache=True).logits
    assert lm.model.config._attn_implementation == "sdpa"  # recording put the model's attention back
    assert torch.allclose(out, ref, atol=1e-6)


def test_streaming_equals_the_sliding_window_cache(one_torch_thread):
    lm = load_tiny("llama")
    ids = torch.randint(0, 1000, (1, 40))
    apply(lm, "kv-cache", implementation="sliding-window", sinks=4, window=12)
    window_factory = lm.cache_factory
    lm2 = load_tiny("llama")
    apply(lm2, "kv-streaming", budget=16, sinks=4)
    with torch.inference_mode():
        a, b = window_factory(lm, 1, 40), lm2.cache_factory(lm2, 1, 40)
        for start in range(0, 40, 8):
            la = lm.model(input_ids=ids[:, start : start + 8], cache=a, use_cache=True).logits
            lb = lm2.model(input_ids=ids[:, start : start + 8], cache=b, use_cache=True).logits
            assert torch.allclose(la, lb, atol=1e-5)
    for x, y in zip(a.layers, b.layers, strict=True):
        assert x.kept_positions == y.positions[0, 0].tolist()


def test_evict_then_quantize_holds_codes_within_half_a_step(one_torch_thread):
    lm = load_tiny("llama")
    apply(lm, "kv-snapkv", budget=10, window=4, quantize="int4")
    ids = torch.randint(0, 1000, (1, 30))
    with torch.inference_mode():
        cache = lm.model(input_ids=ids, cache=lm.cache_factory(lm, 1, 30), use_cache=True).cache
        exact = lm.model(input_ids=ids, use_cache=True).cache  # the keys every position had
    layer = cache.layers[0]
    codes, scale, _ = layer.store.parts["k"]
    b, h, d = layer.shape
    assert codes.dtype == torch.uint8 and codes.shape == (b, h, 10, d // 2)  # two 4-bit codes per byte
    assert layer.kv_bytes()["physical"] == 2 * b * h * 10 * (d // 2 + 2 + 2)  # codes + fp16 scale + minimum
    deq, _ = layer.store.past(exact.layers[0].keys)
    want = exact.layers[0].keys.gather(2, layer.positions[..., None].expand(-1, -1, -1, d))
    assert ((deq - want).abs() <= scale.float() / 2 + 1e-6).all()


def test_bytes_at_a_context_match_what_the_cache_holds(one_torch_thread):
    from slimbench.tasks._long_context import layer_bytes

    lm = load_tiny("gemma3")  # one evicting layer, two sliding ones of window 8
    rep = apply(lm, "kv-h2o", ratio=4)
    with torch.inference_mode():
        cache = lm.model(input_ids=torch.randint(0, 1000, (1, 64)), cache=lm.cache_factory(lm, 1, 64),
                         use_cache=True).cache
    measured = layer_bytes(cache)
    analytic = kv_bytes_at(lm.model.config, lm.cache_factory.policy, 64, 4)
    assert measured["kept_physical"] == analytic["kept_physical"] and measured["full"] == analytic["full"]
    per_pos = 2 * 1 * 32 * 4  # K and V, one KV head of 32, fp32
    assert analytic["full"] == 64 * per_pos + 2 * 7 * per_pos  # the sliding layers hold window - 1 positions
    assert analytic["kept_logical"] == 16 * per_pos + 2 * 7 * per_pos
    assert rep.details["compresses"] == "prefill and decode" and rep.execution == "native"


def test_refusals(one_torch_thread):
    with pytest.raises(ValueError, match="supports model types"):
        apply(load_tiny("gpt2"), "kv-h2o")
    lm = load_tiny("llama")
    lm.model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="wrap SDPA"):
        apply(lm, "kv-tova")
    with pytest.raises(ValueError, match="below the policy's minimum"):
        apply(load_tiny("llama"), "kv-snapkv", budget=16)  # window 32 needs at least 33
    with pytest.raises(ValueError, match="exactly one of ratio"):
        build_config(METHODS.get("kv-h2o").config, {"ratio": None}, source="t", field="kv-h2o")
    cfg = build_config(METHODS.get("kv-h2o").config, {"budget": 512}, source="t", field="kv-h2o")
    assert cfg.ratio is None and cfg.context_problem(400) and not cfg.context_problem(1000)


def test_the_hook_notices_a_bypassed_attention(one_torch_thread):
    lm = load_tiny("llama")
    apply(lm, "kv-h2o", ratio=4)
    cache = lm.cache_factory(lm, 1, 20)
    lm.model.set_attn_implementation("sdpa")  # something replaced the attention after the policy
    with torch.inference_mode(), pytest.raises(RuntimeError, match="hook did not run"):
        lm.model(input_ids=torch.randint(0, 1000, (1, 8)), cache=cache, use_cache=True)
        lm.model(input_ids=torch.randint(0, 1000, (1, 8)), cache=cache, use_cache=True)


def test_a_policy_composes_after_weight_quantization(tmp_path, monkeypatch):
    from slimbench.sweep.driver import run_cells
    from slimbench.sweep.store import ResultStore
    from slimbench.sweep.suite import suite_from_mapping

    monkeypatch.setenv("SLIMBENCH_CACHE", str(tmp_path / "cache"))
    suite = suite_from_mapping({"models": ["tiny-llama"], "methods": [[{"name": "rtn", "bits": 8, "group_size": 32},
                                                                        {"name": "kv-h2o", "ratio": 4}]],
                                "tasks": [{"name": "passkey", "lengths": [256], "depths": [50]}],
                                "hardware": {"threads": 1}}, "test", "t")
    summary = run_cells(suite.cells(), ResultStore(tmp_path / "runs"), show_progress=False, log=lambda s: None)
    assert summary.ok and not summary.failed
