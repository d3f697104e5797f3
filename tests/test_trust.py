"""Which timings a report may read as results."""

from slimbench.measure.trust import is_timed, timing_trust


def test_timed_metrics_are_recognised_by_unit_or_name():
    assert is_timed("decode_tokens_per_s", {"unit": "tokens/s"})
    assert is_timed("decode_roofline_fraction", {"unit": "fraction"})
    assert not is_timed("perplexity", {"unit": "ppl"})
    assert not is_timed("peak_memory_mb", {"unit": "MiB"})


def test_noisy_or_under_sampled_records_are_not_trusted():
    quiet = {"task_details": {"noisy": False, "timing_protocol": {"sufficient": True}}}
    noisy = {"task_details": {"noisy": True, "noise_reasons": ["other processes held 0.9 cores"]}}
    thin = {"task_details": {"noisy": False, "timing_protocol": {"sufficient": False, "repeats": 2, "min_repeats": 5,
                                                                  "timed_seconds": 0.4, "min_seconds": 2.0}}}
    old = {"task_details": {"noisy": False}}
    assert timing_trust(quiet).trusted and timing_trust(quiet).label() == ""
    assert not timing_trust(noisy).trusted and timing_trust(noisy).label() == "noisy"
    assert not timing_trust(thin).trusted and "minimum of 5 repeats" in timing_trust(thin).reasons[0]
    assert timing_trust(old).trusted and timing_trust(old).sufficient is None


def test_a_throughput_measured_by_an_untimed_task_is_not_trusted():
    ppl = {"task": {"name": "perplexity"}, "task_info": {"timed": False}, "task_details": {}}
    assert timing_trust(ppl).noisy and "untimed task" in timing_trust(ppl).reasons[0]
    old = {"task": {"name": "perplexity"}, "task_details": {}}  # before task_info: the registry says
    assert timing_trust(old).noisy
