"""The engine bench's report pieces and the engines command (no engine needed)."""

from __future__ import annotations

from slimbench.cli.engine_bench import pareto, table
from slimbench.cli.engines import status


def fabricated():
    speed = {"decode_tokens_per_s": {"median": 50.0, "samples": [50.0]},
             "prefill_tokens_per_s": {"median": 400.0, "samples": [400.0]}}
    row = {"label": "llama-q4_0", "engine": "llama.cpp", "format": "gguf Q4_0",
           "quality": {"perplexity": 33.2, "perplexity_in_process": 33.1, "delta_nll": 0.003},
           "speed": {**speed, "native_decode_tokens_per_s": {"median": 60.0, "samples": [60.0]}},
           "memory": {"engine_peak_rss_mb": 120.0, "where": "engine process"}, "roofline_fraction": 0.5,
           "stored_bytes": 90 * 2**20}
    failed = {"label": "ov-int4", "error": "RuntimeError: a | b"}
    return {"model": "smollm2-135m", "weights_note": "dequantized from Q4_1", "threads": 2, "prompt_len": 128,
            "new_tokens": 64, "repeats": 3, "windows": 8, "seqlen": 512, "bandwidth_bytes_per_s": 4e10,
            "load_before": [0.1, 0, 0], "load_after": [0.2, 0, 0], "rows": [row, failed]}


def test_table_and_plot(tmp_path):
    text = table(fabricated())
    assert "dequantized from Q4_1" in text and "| llama-q4_0 | llama.cpp | gguf Q4_0 | 33.200 |" in text
    assert "60.0" in text and "50%" in text and "failed: RuntimeError: a / b" in text
    pareto([fabricated()], tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_engines_status_names_every_engine_and_why():
    rows = dict(status())
    assert set(rows) >= {"OpenVINO (openvino)", "vLLM"}
    assert all(text for text in rows.values())
    assert "torch 2.13.0+cpu" in rows["vLLM"]
