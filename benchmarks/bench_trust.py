"""What the efficiency task's speed and memory numbers rest on, checked on the benchmark model.

- The machine's limits (the roofline denominators) measured twice from scratch, at the bytes one
  decode step of the model reads, must agree within 10% and be measured quietly.
- One timed cell's peak memory, measured in two separate runs from a clean start (a fresh
  process per reading), must agree within the tolerance its record states, for a dense and a
  compressed model; the parts (runtime + weights + KV + other) must add up to the peak.

Both fail on a busy machine, as they should: run them idle (``make bench``, or the command in
docs/acceleration.md, "Commands").
"""

from __future__ import annotations

import textwrap

import pytest


def bench_limits_agree_at_the_decode_working_set(loaded, threads):
    from slimbench.measure.limits import AGREEMENT, limits_summary, machine_limits
    from slimbench.measure.roofline import weight_bytes_read_per_step

    size = weight_bytes_read_per_step(loaded.model)
    runs = [limits_summary(machine_limits(threads, "cpu", working_set=size, refresh=True)) for _ in range(2)]
    a, b = (r["bandwidth_bytes_per_s"] for r in runs)
    print(f"\nbandwidth at {size / 2**20:.0f} MiB, {threads} threads: {a / 1e9:.1f} and {b / 1e9:.1f} GB/s")
    assert not any(r["noisy"] for r in runs), "measured while other processes used the cores: run it idle"
    assert not any(r["unstable"] for r in runs), [r["unstable"] for r in runs]
    assert abs(a - b) / max(a, b) <= AGREEMENT, (a, b)


SUITE = """
models: [{model}]
methods: [baseline, {{name: rtn, bits: 4, group_size: 64}}]
tasks: [{{name: efficiency, prompt_len: 128, new_tokens: 32}}]
hardware: {{threads: {threads}}}
"""


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, model_name, threads):
    from slimbench.sweep.driver import run_cells
    from slimbench.sweep.store import ResultStore
    from slimbench.sweep.suite import load_suite

    root = tmp_path_factory.mktemp("memory")
    suite = root / "suite.yaml"
    suite.write_text(textwrap.dedent(SUITE.format(model=model_name, threads=threads)))
    cells = load_suite(suite).cells()
    out = []
    for i in range(2):
        store = ResultStore(root / f"run{i}")
        run_cells(cells, store, show_progress=False)
        out.append({r["method"]["label"]: r for r in store.records()})
    return out


@pytest.mark.parametrize("method", ["baseline", "rtn(4-bit, g64)"])
def bench_peak_memory_of_one_cell_twice(two_runs, method):
    recs = [run[method] for run in two_runs]
    peaks = [r["metrics"]["peak_memory_mb"]["value"] for r in recs]
    protos = [r["details"]["memory_protocol"] for r in recs]
    print(f"\n{method}: peak {peaks[0]:.0f} and {peaks[1]:.0f} MiB ({protos[0]['isolation']}, "
          f"tolerance {protos[0]['tolerance_mb']:.0f} MiB)")
    for r, proto in zip(recs, protos, strict=True):
        assert proto["clean"], proto
        parts = sum(r["metrics"][f"memory_{k}_mb"]["value"] for k in ("runtime", "weights", "kv", "other"))
        assert parts == pytest.approx(r["metrics"]["peak_memory_mb"]["value"], abs=1.0)
    assert abs(peaks[0] - peaks[1]) <= min(p["tolerance_mb"] for p in protos), (peaks, protos)
