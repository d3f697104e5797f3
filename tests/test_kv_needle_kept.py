"""The needle-kept diagnostic counts the KV heads that hold the answer's span after a policy."""

from __future__ import annotations

import pytest
from conftest import load_tiny

from slimbench.devtools.kv_needle_kept import answer_span, needle_kept


def test_answer_span_finds_the_first_occurrence_or_refuses():
    assert answer_span([5, 1, 2, 3, 1, 2], [1, 2]) == [1, 2]
    with pytest.raises(ValueError, match="do not occur"):
        answer_span([1, 2, 3], [2, 1])


def test_heads_hold_the_needle_without_eviction_and_lose_it_to_the_window(one_torch_thread, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMBENCH_CACHE", str(tmp_path))
    lm = load_tiny("llama")  # 2 layers x 2 KV heads
    task = {"lengths": [256], "depths": [0], "max_new_tokens": 4}
    whole = needle_kept(lm, "niah-single", task, ["kv-streaming"], {"budget": 1024})
    assert [(r["held"], r["heads"]) for r in whole] == [(4, 4)]  # nothing evicted: every head holds it
    window = needle_kept(lm, "niah-single", task, ["kv-streaming"], {"budget": 16, "sinks": 4})
    assert [(r["held"], r["heads"]) for r in window] == [(0, 4)]  # a needle at depth 0 is outside sinks + recent
