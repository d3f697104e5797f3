"""Distillation: the KD loss, the layer-dropped student, training, the cache, resume, bad input."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from slimbench.methods.distillation.distill import DistillConfig, batch_rows, hidden_targets
from slimbench.methods.distillation.kd import TeacherTopK, teacher_topk, topk_kl
from slimbench.methods.distillation.layer_drop import DepthConfig
from slimbench.methods.distillation.student import kept_layers

from slimbench.calibration import CalibrationConfig, sample_calibration
from slimbench.layerwise import drop_layers
from slimbench.method import MethodContext
from slimbench.modeling import count_parameters
from slimbench.registry import METHODS
from slimbench.specs import HardwareSpec, MethodSpec, StepSpec
from slimbench.zoo.models import gpt2_tokenizer, tiny_config, wrap

HW = HardwareSpec(threads=1)
SMALL = {"calib_samples": 8, "calib_seqlen": 16, "teacher_topk": 16}


@pytest.fixture(autouse=True)
def one_thread_and_own_cache(monkeypatch, tmp_path):
    """One intra-op thread (the 2 CI cores are shared); checkpoints and caches under tmp_path."""
    monkeypatch.setenv("SLIMBENCH_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def shared_tokenizer():
    """One tokenizer object for every test model: calibration tokens are cached per tokenizer
    object, and tokenizing the calibration split anew takes ~20 s on the shared CI cores."""
    return gpt2_tokenizer()


def deep_llama(layers: int = 4, seed: int = 0):
    """A tiny Llama with more layers than the shared fixture (which has 2)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.num_hidden_layers = layers
    torch.manual_seed(seed)
    return wrap(AutoModelForCausalLM.from_config(cfg), shared_tokenizer(), "tiny-llama-deep", HW, {})


def run_method(lm, name: str, params: dict):
    lm.tokenizer = shared_tokenizer()  # the same GPT-2 BPE (see shared_tokenizer)
    method = METHODS.get(name)
    cfg = method.config(**params)
    method.check(lm, cfg)
    return method.apply(lm, cfg, MethodContext(hardware=HW))


# -- the loss ---------------------------------------------------------------------------------
def test_kd_loss_is_zero_when_student_equals_teacher(tiny_lm):
    ids = torch.randint(0, 50257, (2, 12))
    top = teacher_topk(tiny_lm.model, ids, 16, 2.0, 2, "cpu")
    with torch.no_grad():
        logits = tiny_lm.model(input_ids=ids).logits[:, :-1]
    assert abs(float(topk_kl(logits, top, 2.0))) < 1e-6


def test_topk_kl_equals_full_kl_at_full_k_and_bounds_it_below():
    torch.manual_seed(0)
    t_logits, s_logits = torch.randn(2, 5, 30) * 3, torch.randn(2, 5, 30) * 3
    temp = 1.5

    def top_of(k):
        top = t_logits.topk(k, -1)
        return TeacherTopK(top.values, top.indices, torch.logsumexp(t_logits / temp, -1))

    p_t = F.softmax(t_logits / temp, -1)
    full = (p_t * (F.log_softmax(t_logits / temp, -1) - F.log_softmax(s_logits / temp, -1))).sum(-1).mean()
    torch.testing.assert_close(topk_kl(s_logits, top_of(30), temp), full, rtol=1e-5, atol=1e-6)
    for k in (1, 5, 20):
        assert 0 <= float(topk_kl(s_logits, top_of(k), temp)) <= float(full) + 1e-6


# -- the student ------------------------------------------------------------------------------
def test_kept_layers_rules():
    assert kept_layers(30, 2, None) == list(range(0, 30, 2))
    assert kept_layers(30, None, 15)[0] == 0 and kept_layers(30, None, 15)[-1] == 29
    assert len(kept_layers(30, None, 15)) == 15
    assert kept_layers(5, None, 5) == [0, 1, 2, 3, 4]
    assert hidden_targets([0, 2, 4], 6) == [2, 4, 6]


def test_layer_dropped_student_copies_the_kept_layers_exactly():
    import copy

    teacher = deep_llama(4)
    student = drop_layers(copy.deepcopy(teacher.model), [0, 2])
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    for new, old in ((0, 0), (1, 2)):
        s_state, t_state = student.model.layers[new].state_dict(), teacher.model.model.layers[old].state_dict()
        assert s_state.keys() == t_state.keys()
        assert all(torch.equal(s_state[k], t_state[k]) for k in s_state)
    # and the student is the teacher's computation with layers 1 and 3 skipped
    ids = torch.randint(0, 50257, (1, 9))
    with torch.no_grad():
        h = teacher.model.model.embed_tokens(ids)
        pos = torch.arange(9)[None]
        rope = teacher.model.model.rotary_emb(h, pos)
        mask = torch.full((9, 9), float("-inf")).triu(1)[None, None]
        for i in (0, 2):
            h = teacher.model.model.layers[i](h, attention_mask=mask, position_embeddings=rope, position_ids=pos)
            h = h[0] if isinstance(h, tuple) else h
        ref = teacher.model.lm_head(teacher.model.model.norm(h))
        torch.testing.assert_close(student(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_layer_drop_method_runs_and_decodes_with_a_kv_cache(tiny_lm, tmp_path):
    before = count_parameters(tiny_lm.model)
    rep = run_method(tiny_lm, "layer-drop", {"student_layers": 1})
    assert rep.details["student_layers"] == 1 and tiny_lm.model.config.num_hidden_layers == 1
    assert count_parameters(tiny_lm.model) == rep.details["student_parameters"] < before
    out = tiny_lm.greedy(torch.tensor([tiny_lm.encode("Once more unto the breach")]), 4)  # uses the KV cache
    assert out.shape[-1] >= 4
    # an ordinary HF model: save_pretrained / from_pretrained round-trips it
    from transformers import AutoModelForCausalLM

    tiny_lm.model.save_pretrained(tmp_path / "student")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    ids = torch.tensor([tiny_lm.encode("Once more unto the breach")])
    assert again.config.num_hidden_layers == 1
    assert torch.equal(again(input_ids=ids).logits, tiny_lm.logits(ids))


# -- training ---------------------------------------------------------------------------------
def heldout_kd(student, teacher, ids, temp: float) -> float:
    top = teacher_topk(teacher, ids, 50257, temp, 4, "cpu")
    with torch.no_grad():
        return float(topk_kl(student(input_ids=ids).logits[:, :-1], top, temp))


def test_short_training_lowers_heldout_kd_loss():
    import copy

    lm = deep_llama(4, seed=1)
    with torch.no_grad():  # sharpen the random teacher's outputs, so there is something to learn
        lm.model.model.norm.weight.mul_(8)
    teacher = copy.deepcopy(lm.model)
    held, _ = sample_calibration(lm, CalibrationConfig(calib_samples=4, calib_seqlen=32, calib_seed=99))
    # 10 steps at 6e-4 end at ~0.82 of the untrained student's held-out loss (20 at 3e-4: ~0.76)
    params = {"student_layers": 2, "train_steps": 10, "lr": 6e-4, "alpha": 1.0, "temperature": 1.0,
              "calib_samples": 16, "calib_seqlen": 32, "teacher_topk": 64}
    untrained = drop_layers(copy.deepcopy(teacher), kept_layers(4, None, 2))
    rep = run_method(lm, "distill", params)
    assert rep.details["steps"] == 10 and rep.details["tokens"] == 10 * 4 * 32
    assert heldout_kd(lm.model, teacher, held, 1.0) < 0.9 * heldout_kd(untrained, teacher, held, 1.0)


@pytest.mark.parametrize("extra", [{}, {"alpha": 0.0}, {"hidden_weight": 1.0}], ids=["kd+ce", "ce", "hidden"])
def test_distill_runs_on_each_architecture(tiny_lm, extra):
    before = count_parameters(tiny_lm.model)
    rep = run_method(tiny_lm, "distill", {"keep_every": 2, "train_steps": 2, **SMALL, **extra})
    d = rep.details
    assert rep.execution == "native"
    assert d["student_layers"] == 1 and d["steps"] == 2 and d["tokens"] == 2 * 4 * 16
    assert count_parameters(tiny_lm.model) == d["student_parameters"] < before
    assert d["teacher_cache"]["used"] is False if extra.get("alpha") == 0.0 else d["teacher_cache"]["hit"] is False
    assert d["train_seconds"] > 0 and d["train_peak_memory_mb"] > 0


def test_max_tokens_bounds_training(tiny_llama):
    rep = run_method(tiny_llama, "distill", {"train_steps": 50, "max_tokens": 150, **SMALL})
    assert rep.details["steps"] == 3 and rep.details["tokens"] == 192  # stops at the first step past 150


def test_teacher_cache_is_reused_by_another_student():
    first = run_method(deep_llama(4), "distill", {"student_layers": 2, "train_steps": 1, **SMALL})
    second = run_method(deep_llama(4), "distill", {"student_layers": 3, "train_steps": 1, "lr": 1e-3, **SMALL})
    assert first.details["teacher_cache"]["hit"] is False
    assert second.details["teacher_cache"]["hit"] is True
    assert second.details["teacher_cache"]["key"] == first.details["teacher_cache"]["key"]


class _Interrupt(Exception):
    pass


def test_interrupted_training_resumes_to_the_same_student(monkeypatch, tmp_path):
    params = {"student_layers": 2, "train_steps": 4, "checkpoint_every": 2, "lr": 1e-3, **SMALL}
    cfg = DistillConfig(**params)
    method = METHODS.get("distill")

    class Bar:  # a progress bar that dies after the third step
        def __init__(self, **kw):
            self.n = kw.get("initial", 0)

        def set_postfix(self, **kw):
            pass

        def update(self, k):
            self.n += k
            if self.n == 3:
                raise _Interrupt

        def close(self):
            pass

    lm = deep_llama(4)
    with pytest.raises(_Interrupt):
        method.apply(lm, cfg, MethodContext(hardware=HW, progress=Bar))
    resumed = deep_llama(4)
    rep = method.apply(resumed, cfg, MethodContext(hardware=HW))
    assert rep.details["resumed_from_step"] == 2 and rep.details["steps"] == 4
    assert any("resumed" in n for n in rep.notes)
    # an uninterrupted run in a fresh cache reaches the same weights
    monkeypatch.setenv("SLIMBENCH_CACHE", str(tmp_path / "fresh-cache"))
    straight = deep_llama(4)
    method.apply(straight, cfg, MethodContext(hardware=HW))
    for (name, a), (_, b) in zip(resumed.model.state_dict().items(), straight.model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_batch_order_is_a_function_of_seed_and_step():
    assert torch.equal(batch_rows(7, 20, 4, 0), batch_rows(7, 20, 4, 0))
    epoch = torch.cat([batch_rows(s, 20, 4, 0) for s in range(5)])
    assert sorted(epoch.tolist()) == list(range(20))  # one epoch sees every sequence once


def test_composes_with_quantization(tiny_llama):
    from slimbench.method import apply_method

    spec = MethodSpec(steps=(StepSpec(name="distill", params={"train_steps": 1, **SMALL}),
                             StepSpec(name="rtn", params={"bits": 8})))
    tiny_llama.tokenizer = shared_tokenizer()
    rec = apply_method(tiny_llama, spec, HW)
    assert [s["name"] for s in rec["steps"]] == ["distill", "rtn"]
    assert rec["parameters"] < 3290496  # the 2-layer tiny llama's count: the student is smaller


# -- bad input ----------------------------------------------------------------------------------
def test_zero_training_budget_is_rejected():
    with pytest.raises(ValidationError, match="zero training budget"):
        DistillConfig(train_steps=0)
    with pytest.raises(ValidationError, match="zero training budget"):
        DistillConfig(max_tokens=0)


def test_student_deeper_than_teacher_fails_check(tiny_llama):
    for name in ("distill", "layer-drop"):
        method = METHODS.get(name)
        with pytest.raises(ValueError, match="student_layers 3 is deeper than the teacher's 2 decoder layers"):
            method.check(tiny_llama, method.config(student_layers=3))


def test_keep_every_and_student_layers_together_are_rejected():
    with pytest.raises(ValidationError, match="either keep_every or student_layers"):
        DepthConfig(keep_every=2, student_layers=3)
    with pytest.raises(ValidationError, match="either keep_every or student_layers"):
        DistillConfig(keep_every=2, student_layers=3)
