"""The perturbation-floor tool against a plain recomputation, and its fp32 floor."""

from __future__ import annotations

import torch

from slimbench.devtools import perturb_sensitivity
from slimbench.devtools.contract import load_tiny


def test_deltas_are_a_plain_recomputation_and_the_embeddings_come_back(one_torch_thread):
    lm = load_tiny("llama")
    win = torch.randint(0, lm.model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    emb = lm.model.get_input_embeddings().weight
    kept = emb.data.clone()
    base, deltas = perturb_sensitivity.perturbed_deltas(lm, win, 1e-3, 2)
    assert torch.equal(emb.data, kept)
    noise = torch.randn(kept.shape, generator=torch.Generator().manual_seed(1))  # seed 1, by hand
    emb.data.copy_(kept * (1 + 1e-3 * noise))
    plain = [float(lm.token_nll(r[None]).double().mean()) for r in win]
    emb.data.copy_(kept)
    assert deltas[1] == [p - b for p, b in zip(plain, base, strict=True)]
    assert max(abs(d) for d in deltas[1]) > 1e-6  # 1e-3 of the embeddings does move an fp32 model
    _, none = perturb_sensitivity.perturbed_deltas(lm, win, 0.0, 1)
    assert none == [[0.0, 0.0]]  # deterministic: the floor is the perturbation's, not the run's
    _, tiny = perturb_sensitivity.perturbed_deltas(lm, win, 1e-7, 2)
    assert max(abs(d) for row in tiny for d in row) < 1e-5  # an fp32 model stays at rounding level


def test_bad_input_is_one_line_before_any_model_loads():
    import pytest

    with pytest.raises(SystemExit, match="--method: malformed YAML"):
        perturb_sensitivity.main(["--model", "tiny-llama", "--method", "{name: rtn, bits: ["])
    with pytest.raises(SystemExit, match="unknown model '<script>'"):
        perturb_sensitivity.main(["--model", "<script>"])
