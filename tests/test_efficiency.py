"""Efficiency v3: roofline arithmetic, machine limits (at the working set, checked against themselves, cached
only when quiet), threads: auto, the task's metrics, sampling minimums, memory split and noise flags."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_tiny

from slimbench.lm import LanguageModel
from slimbench.measure import limits, machine, memory, roofline
from slimbench.registry import TASKS
from slimbench.specs import HardwareSpec
from slimbench.task import TaskContext

FAKE_LIMITS = {
    "identity": {"threads": 1, "device": "cpu"},
    "bandwidth": {"bytes_per_s": 10e9, "method": "fake", "size_bytes": 2**20},
    "flops": {"float32": {"flops_per_s": 50e9, "method": "fake"}, "bfloat16": {"flops_per_s": 100e9, "method": "fake"}},
    "noisy": False,
    "unstable": [],
    "source": "cache",
}


# one intra-op thread (conftest.one_torch_thread): the 2 shared cores are faster that way
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- roofline arithmetic -----------------------------------------------------------------------------
def test_decode_fraction_matches_hand_computation():
    # 100 MB of weights + 10 MB of KV read per step; 50 tokens/s at batch 2 = 25 steps/s.
    # Traffic: 110e6 * 25 = 2.75e9 B/s over a 5e9 B/s machine = 0.55.
    assert roofline.decode_roofline_fraction(100e6, 10e6, 50.0, 2, 5e9) == pytest.approx(0.55)
    # Prefill: 4e9 FLOPs in 0.1 s on a 100 GFLOP/s machine = 0.4.
    assert roofline.prefill_roofline_fraction(4e9, 0.1, 100e9) == pytest.approx(0.4)


def test_kv_read_per_step_grows_for_dynamic_and_not_for_static():
    dyn = {"physical": 1000, "preallocated": False, "held": 100, "positions": 100}
    # 80-token prompt + 20 new: the mean context of the decode is 90 of the 100 positions held at the end.
    assert roofline.kv_read_per_step(dyn, 80, 20) == pytest.approx(900)
    assert roofline.kv_read_per_step({**dyn, "preallocated": True}, 80, 20) == 1000
    assert roofline.kv_read_per_step({**dyn, "held": 40}, 80, 20) == 1000  # an evicting cache stays at its cap


def test_prefill_flops_by_hand_on_tiny_llama():
    lm = load_tiny("llama")  # hidden 64, 4 heads of 16, 2 KV heads (32 wide), ffn 128, 2 layers, vocab 50257
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128
    macs = 2 * per_layer + 64 * 50257
    b, t = 2, 10
    attention = 2 * 2 * 2 * 4 * 16 * b * t * (t + 1) / 2
    assert roofline.linear_macs_per_token(lm.model) == macs
    assert roofline.prefill_flops(lm.model, b, t) == pytest.approx(2 * macs * b * t + attention)


def test_weight_bytes_read_counts_a_tied_head_and_skips_gathered_tables():
    tied = load_tiny("llama")  # tied: the embedding is the output projection, read whole every step
    total = sum(p.numel() * p.element_size() for p in tied.model.parameters())  # parameters() dedups ties
    assert roofline.weight_bytes_read_per_step(tied.model) == total
    from transformers import AutoModelForCausalLM

    from slimbench.zoo.models import tiny_config

    cfg = tiny_config("llama")
    cfg.tie_word_embeddings = False
    untied = AutoModelForCausalLM.from_config(cfg)
    emb = untied.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in untied.parameters())
    assert roofline.weight_bytes_read_per_step(untied) == total - emb.numel() * emb.element_size()


def test_compute_dtype_follows_the_kernels():
    from slimbench.method import MethodContext
    from slimbench.registry import METHODS

    lm = load_tiny("llama")
    assert roofline.compute_dtype(lm.model) == "float32"
    METHODS.get("dynamic-int8").apply(lm, METHODS.get("dynamic-int8").config(), MethodContext(HardwareSpec()))
    assert roofline.compute_dtype(lm.model) == "int8"


# -- machine limits, threads --------------------------------------------------------------------------
def fake_measurements(monkeypatch, outcomes):
    """limits.measure_limits replaced: each call takes the next (noisy, unstable) outcome; returns the calls."""
    calls = []
    outcomes = iter(outcomes)

    def fake(threads, device, working_set=None, **kw):
        noisy, unstable = next(outcomes)
        calls.append((threads, working_set))
        return {**FAKE_LIMITS, "identity": limits.machine_identity(threads, device), "noisy": noisy,
                "unstable": unstable}

    monkeypatch.setattr(limits, "measure_limits", fake)
    return calls


def test_machine_limits_are_measured_once_and_cached_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMBENCH_CACHE", str(tmp_path))
    calls = fake_measurements(monkeypatch, [(False, [])] * 4)
    first = limits.machine_limits(1, working_set=64 * 2**20)
    second = limits.machine_limits(1, working_set=64 * 2**20)
    assert (first["source"], second["source"], len(calls)) == ("measured", "cache", 1)
    files = list((tmp_path / "machine").iterdir())
    assert [f.suffix for f in files] == [".json"]  # no temporary file left behind
    assert json.loads(files[0].read_text())["bandwidth"]["bytes_per_s"] == 10e9
    limits.machine_limits(2, working_set=64 * 2**20)  # another thread count is another key
    limits.machine_limits(1, working_set=128 * 2**20)  # so is another working set: the limit depends on it
    assert [c[0] for c in calls] == [1, 2, 1]


def test_limits_measured_under_load_or_unstable_are_never_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMBENCH_CACHE", str(tmp_path))
    calls = fake_measurements(monkeypatch, [(True, []), (False, ["bandwidth"]), (False, []), (False, [])])
    assert limits.machine_limits(1)["cached"] is False  # under load: used for this cell only
    assert limits.machine_limits(1)["cached"] is False  # measured again, unstable: not kept either
    assert limits.machine_limits(1)["cached"] is True  # quiet and stable: kept
    assert limits.machine_limits(1)["source"] == "cache" and len(calls) == 3
    # a cache file written by an older version that kept a noisy entry is not read
    path = next((tmp_path / "machine").iterdir())
    path.write_text(json.dumps({**json.loads(path.read_text()), "noisy": True}))
    assert limits.machine_limits(1)["source"] == "measured"


def test_real_limits_use_two_kernels_at_the_working_set_and_check_themselves():
    lim = limits.measure_limits(1, working_set=3 * 2**20, matmul_n=64, dtypes=("float32",))
    bw = lim["bandwidth"]
    assert bw["bytes_per_s"] > 0 and set(bw["kernels"]) == {"sum", "matvec"} and bw["size_bytes"] == 3 * 2**20
    assert "3.0 MiB" in bw["method"] and bw["bytes_per_s"] == max(k["bytes_per_s"] for k in bw["kernels"].values())
    assert set(bw["agreement"]) >= {"halves_s", "difference", "ok"} and bw["agreement"]["within"] == 0.10
    assert lim["flops"]["float32"]["flops_per_s"] > 0 and "64x64" in lim["flops"]["float32"]["method"]
    assert lim["identity"]["threads"] == 1 and lim["identity"]["torch"] == torch.__version__
    # past DRAM size the size no longer matters: a 100 GB working set is measured at the cap (or at a quarter of
    # the memory free now), never allocated whole
    assert limits.working_set_size(100 * 2**30, torch.device("cpu")) <= limits.BANDWIDTH_CAP_BYTES


def test_two_measurements_of_a_limit_must_agree_within_ten_percent():
    assert limits.agreement([1.00, 1.05, 1.01, 1.04])["ok"]  # best of the odd rounds 1.00, of the even 1.04
    bad = limits.agreement([1.0, 1.2, 1.1, 1.3])
    assert not bad["ok"] and bad["difference"] == pytest.approx(0.2 / 1.2, abs=1e-3)
    lim = {**FAKE_LIMITS, "unstable": ["bandwidth"], "bandwidth": {**FAKE_LIMITS["bandwidth"], "agreement": bad}}
    assert "differ by 17%" in limits.problems(lim)[0]


def test_threads_auto_probes_and_records_the_fastest(monkeypatch):
    monkeypatch.delenv(machine.THREADS_CAP_ENV, raising=False)  # parallel test workers set one
    assert machine.resolve_threads(HardwareSpec(threads=1)) == 1
    assert machine.last_thread_choice() == {"setting": 1, "used": 1}
    monkeypatch.setattr(machine, "affinity", lambda: [0, 1, 2, 3])
    monkeypatch.setattr(machine, "probe_threads", lambda cands: {c: {1: 0.3, 2: 0.1, 4: 0.2}[c] for c in cands})
    assert machine.resolve_threads(HardwareSpec(threads="auto")) == 2
    assert torch.get_num_threads() == 2
    choice = machine.last_thread_choice()
    assert choice["setting"] == "auto" and choice["used"] == 2 and set(choice["probe_ms"]) == {"1", "2", "4"}


def test_thread_cap_bounds_a_setting_and_the_probe_and_says_so(monkeypatch):
    monkeypatch.setenv(machine.THREADS_CAP_ENV, "1")
    assert machine.resolve_threads(HardwareSpec(threads=2)) == 1
    assert machine.last_thread_choice() == {"setting": 2, "used": 1, "capped_by": machine.THREADS_CAP_ENV}
    monkeypatch.setattr(machine, "affinity", lambda: [0, 1, 2, 3])
    probed = []
    monkeypatch.setattr(machine, "probe_threads", lambda cands: probed.append(cands) or {c: 0.1 for c in cands})
    assert machine.resolve_threads(HardwareSpec(threads="auto")) == 1
    assert probed == []  # one candidate left under the cap: nothing to probe


def test_threads_setting_accepts_an_int_or_auto_only():
    assert HardwareSpec(threads="auto").threads == "auto"
    for bad in (0, "many", 1.5):
        with pytest.raises(ValueError):
            HardwareSpec(threads=bad)


def test_contention_and_snapshot_report_the_machine_state():
    with machine.Contention() as c:
        sum(range(10000))
    assert 0 <= c.other_cores <= len(machine.affinity()) + 1
    snap = machine.snapshot()
    assert snap["affinity"] == machine.affinity() and snap["process_threads"] >= 1


# -- the task ----------------------------------------------------------------------------------------
V2_METRICS = {"ttft_ms", "prefill_ms", "itl_p50_ms", "itl_p90_ms", "itl_p99_ms", "decode_tokens_per_s",
              "e2e_tokens_per_s", "peak_memory_mb", "memory_weights_mb", "memory_kv_mb", "memory_other_mb",
              "kv_cache_bytes_logical", "kv_cache_bytes_physical", "decode_roofline_fraction",
              "prefill_roofline_fraction"}


def run_task(lm, monkeypatch, fake_limits=FAKE_LIMITS, **params):
    monkeypatch.setattr(limits, "machine_limits", lambda *a, **k: dict(fake_limits))
    if "repeats" in params and "max_repeats" not in params:  # exactly that many repeats: counts are checked
        params["max_repeats"] = params["repeats"]
    task = TASKS.get("efficiency")
    ctx = TaskContext(hardware=HardwareSpec(threads=1), method_report={"memory_bytes": 123, "parameters": 7})
    return task.evaluate(lm, task.config(**params), ctx)


def test_efficiency_reports_every_regime_metric(monkeypatch):
    lm = load_tiny("llama")
    res = run_task(lm, monkeypatch, prompt_len=12, new_tokens=5, batch_size=2, repeats=2, warmup=1)
    assert TASKS.get("efficiency").version == "4"
    assert set(res.metrics) >= V2_METRICS
    d = res.details
    assert d["regime"] == {"prompt_len": 12, "new_tokens": 5, "batch_size": 2}
    assert {"noisy", "noise_reasons", "threads", "load_before", "load_after", "machine_limits"} <= set(d)
    assert d["load_before"]["affinity"] and d["load_after"]["process_threads"] >= 1
    # 4 inter-token gaps per repeat (5 tokens arrive one at a time), 2 repeats
    assert len(d["itl_samples_ms"]) == 8
    # The KV cache at the end holds prompt + new tokens - 1 (the last token is never fed back).
    layers, _, kv_heads, head_dim = roofline.attention_shape(lm.model)
    assert res.metrics["kv_cache_bytes_physical"].value == 2 * layers * 2 * kv_heads * 16 * head_dim * 4
    # The fraction is the documented formula of the recorded inputs.
    r = d["roofline"]
    expected = (r["weight_bytes_read_per_step"] + r["kv_bytes_read_per_step"]) * \
        res.metrics["decode_tokens_per_s"].value / 2 / 10e9
    assert res.metrics["decode_roofline_fraction"].value == pytest.approx(expected)
    expected = r["prefill_flops"] / (res.metrics["prefill_ms"].value / 1e3) / 50e9
    assert res.metrics["prefill_roofline_fraction"].value == pytest.approx(expected)
    assert res.metrics["parameters"].value == 7  # size metrics still copied from the method report


def test_noise_flags_name_their_reason(monkeypatch):
    lm = load_tiny("llama")
    strict = run_task(lm, monkeypatch, prompt_len=8, new_tokens=3, repeats=3, warmup=0, cv_threshold=1e-9,
                      load_threshold=100)
    assert strict.details["noisy"] and any("coefficient of variation" in r for r in strict.details["noise_reasons"])
    lax = run_task(lm, monkeypatch, prompt_len=8, new_tokens=3, repeats=3, warmup=0, cv_threshold=1e9,
                   load_threshold=100)
    assert lax.details["noise_reasons"] == [] and lax.details["noisy"] is False


class BurstGenerator:
    """Emits tokens in bursts of 3 (as speculative decoding does), checking the lm's own greedy output."""

    def generate(self, lm, ids, n, on_tokens):
        out = LanguageModel(lm.model, lm.tokenizer, lm.name).generate(ids, n)  # plain greedy
        sizes = [1] + [3] * ((n - 1) // 3) + ([(n - 1) % 3] if (n - 1) % 3 else [])
        for k in sizes:
            if on_tokens is not None:
                on_tokens(k)
        return out


def test_bursty_generators_are_measured_the_same_way(monkeypatch):
    lm = load_tiny("llama")
    lm.generator = BurstGenerator()
    res = run_task(lm, monkeypatch, prompt_len=8, new_tokens=7, repeats=2, warmup=0)
    itl = res.details["itl_samples_ms"]
    assert len(itl) == 2 * 6  # every token after the first, each repeat
    # Bursts 1 | 3 | 3: the first token of a burst carries the gap, the other two arrive with it.
    assert itl[1:3] == [0.0, 0.0] and itl[4:6] == [0.0, 0.0]
    # Several tokens per weight read: the weights' bytes per token would be a false roofline.
    assert "decode_roofline_fraction" not in res.metrics
    assert "generator" in res.details["roofline"]["roofline_skipped"]


def test_an_engine_without_weights_here_gets_no_roofline_and_no_crash(monkeypatch):
    """Worker processes (parallel) hold the weights: nothing to count here, so no fraction."""
    lm = load_tiny("llama")
    monkeypatch.setattr(roofline, "weight_bytes_read_per_step", lambda model: 0)
    monkeypatch.setattr(roofline, "prefill_flops", lambda *a: 0)
    res = run_task(lm, monkeypatch, prompt_len=8, new_tokens=3, repeats=2, warmup=0)
    assert "decode_roofline_fraction" not in res.metrics and "prefill_roofline_fraction" not in res.metrics
    assert "no weights" in res.details["roofline"]["roofline_skipped"]
    assert res.metrics["decode_tokens_per_s"].value > 0


def test_a_suite_with_threads_auto_records_the_choice(tmp_path, monkeypatch):
    from slimbench.sweep.driver import run_cells
    from slimbench.sweep.store import ResultStore
    from slimbench.sweep.suite import load_suite

    monkeypatch.setattr(machine, "probe_threads", lambda cands: {c: 0.1 * c for c in cands})  # 1 thread is fastest
    suite = tmp_path / "s.yaml"
    suite.write_text("models: [tiny-llama]\nmethods: [baseline]\nhardware: {threads: auto}\n"
                     "tasks: [{name: efficiency, prompt_len: 8, new_tokens: 2, repeats: 1, warmup: 0,"
                     " roofline: false}]\n")
    store = ResultStore(tmp_path / "results")
    summary = run_cells(load_suite(suite).cells(), store, show_progress=False)
    assert len(summary.ok) == 1
    (rec,) = store.records()
    assert rec["hardware"]["threads"] == "auto"
    threads = rec["task_details"]["threads"]
    assert threads["torch_threads"] == 1
    assert threads["choice"]["setting"] == "auto" and threads["choice"]["used"] == 1


# -- version 3: denominators, impossible fractions, sampling minimums, memory split -------------------
def test_every_fraction_keeps_its_denominator_and_one_above_1_is_an_error(monkeypatch):
    from slimbench.measure.trust import roofline_denominator, roofline_errors

    lm = load_tiny("llama")
    res = run_task(lm, monkeypatch, prompt_len=8, new_tokens=3, repeats=2, warmup=0, max_repeats=2)
    den = res.details["roofline"]["denominators"]
    assert den["decode"]["bytes_per_s"] == 10e9 and den["decode"]["working_set_bytes"] > 0
    assert den["prefill"] == {"flops_per_s": 50e9, "dtype": "float32", "method": "fake"}
    record = {"task_details": res.details}
    assert roofline_denominator(record, "decode_roofline_fraction") == "of 10.0 GB/s at 1 MiB"
    assert roofline_denominator(record, "prefill_roofline_fraction") == "of 50 GFLOP/s float32"
    # limits measured far too low (under load): every fraction comes out above 1
    tiny = {**FAKE_LIMITS, "bandwidth": {**FAKE_LIMITS["bandwidth"], "bytes_per_s": 1.0},
            "flops": {"float32": {"flops_per_s": 1.0, "method": "fake"}}}
    bad = run_task(lm, monkeypatch, fake_limits=tiny, prompt_len=8, new_tokens=3, repeats=2, warmup=0, max_repeats=2)
    assert "decode_roofline_fraction" not in bad.metrics and "prefill_roofline_fraction" not in bad.metrics
    errors = roofline_errors({"task_details": bad.details})
    assert len(errors) == 2 and all("measurement error, not a result" in e for e in errors)
    assert bad.details["roofline"]["decode_roofline_fraction_value"] > 1


def test_sampling_goes_on_to_the_minimum_duration_and_says_whether_it_is_sufficient(monkeypatch):
    from slimbench.tasks import efficiency

    from slimbench.measure.trust import timing_trust

    lm = load_tiny("llama")
    monkeypatch.setattr(efficiency, "MIN_SECONDS", 0.0)
    few = run_task(lm, monkeypatch, prompt_len=8, new_tokens=3, repeats=2, warmup=0)
    proto = few.details["timing_protocol"]
    assert proto["repeats"] == 2 and proto["min_repeats"] == 5 and proto["sufficient"] is False
    assert set(proto) == {"repeats", "min_repeats", "timed_seconds", "min_seconds", "sufficient"}
    assert timing_trust({"task_details": few.details}).label() in ("under-sampled", "noisy")
    enough = run_task(lm, monkeypatch, prompt_len=8, new_tokens=3, repeats=5, warmup=0)
    assert enough.details["timing_protocol"]["sufficient"] is True
    # a minimum duration the repeats have not reached: more repeats, up to max_repeats
    monkeypatch.setattr(efficiency, "MIN_SECONDS", 1e9)
    longer = run_task(lm, monkeypatch, prompt_len=8, new_tokens=3, repeats=2, warmup=0, max_repeats=7)
    assert longer.details["timing_protocol"]["repeats"] == 7 == len(longer.metrics["prefill_ms"].samples)
    assert longer.details["timing_protocol"]["sufficient"] is False


def test_memory_is_split_into_parts_that_add_up_to_the_peak(monkeypatch):
    memory.note_runtime()  # what a sweep's process does before its first model
    lm = load_tiny("llama")
    res = run_task(lm, monkeypatch, prompt_len=8, new_tokens=3, repeats=2, warmup=0, max_repeats=2)
    m = {k: v.value for k, v in res.metrics.items()}
    parts = m["memory_runtime_mb"] + m["memory_weights_mb"] + m["memory_kv_mb"] + m["memory_other_mb"]
    assert parts == pytest.approx(m["peak_memory_mb"])
    proto = res.details["memory_protocol"]
    assert proto["isolation"] == "same process" and proto["runtime_mb"] == pytest.approx(m["memory_runtime_mb"])
    # what the process held beyond its runtime and this model is left out of the peak, and said
    assert proto["leftover_mb"] >= 0 and "left out of the peak" in proto["note"]


def test_memory_split_by_hand():
    mib = 2**20
    reading = {"peak": 1000 * mib, "start": 900 * mib, "kind": "process_rss", "weights": 500 * mib,
               "kv": {"physical": 10 * mib}, "runtime": 300 * mib, "isolation": "same process"}
    parts, proto = memory.split(reading)
    # 100 MiB held beyond runtime + weights before the generation (compression leftovers): not inference memory
    assert parts["leftover"] == 100 * mib and parts["peak"] == 900 * mib and parts["other"] == 90 * mib
    assert proto["clean"] is False and proto["tolerance_mb"] == 40  # 5% of 800 MiB
    # a fresh process holds only the model: all the rest is its runtime, and the peak is measured as is
    fresh, proto = memory.split({**reading, "runtime": None, "isolation": "fresh process"})
    assert fresh["peak"] == 1000 * mib and fresh["runtime"] == 400 * mib and fresh["leftover"] == 0
    assert proto["clean"] is True and fresh["other"] == 90 * mib


def test_check_limits_measures_twice_and_fails_when_they_disagree(monkeypatch, capsys):
    from slimbench.cli import main

    rates = iter([10e9, 12e9, 10e9, 10.5e9])

    def fake(*a, **k):
        bw = next(rates)
        return {**FAKE_LIMITS, "bandwidth": {**FAKE_LIMITS["bandwidth"], "bytes_per_s": bw, "kernels": {}},
                "identity": {"threads": 1, "device": "cpu"}, "cached": True}

    monkeypatch.setattr(limits, "machine_limits", fake)
    args = ["accel-bench", "--check-limits", "--threads", "1", "--working-set-mib", "8"]
    assert main(args) == 1 and "differ by 16.7% (DISAGREE)" in capsys.readouterr().out
    assert main(args) == 0 and "agree within 10%" in capsys.readouterr().out
