"""`distill`: knowledge distillation of a shallower student from the model itself (the teacher).

Student: the teacher with only every k-th decoder layer (or n evenly spaced layers) kept,
initialised with the teacher's weights (student.drop_layers): a really smaller model (native).
Training, on the calibration split (slimbench.calibration.sample_calibration):

    loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, next tokens)
           + hidden_weight * mean_l (1 - cos(h_student_l, h_teacher_matched_l))

The T^2 factor keeps the soft-label gradients' scale independent of T (Hinton et al., 2015).
The KL uses the teacher's top-k logits from an on-disk cache keyed by the teacher's weights and
the data (kd.cached_teacher_topk), so several students on the same data do not re-run the
teacher; ``alpha = 0`` is plain fine-tuning with cross-entropy and needs no teacher at all.
Hidden-state matching pairs student layer i's output with the teacher's output at the end of
the block it replaces (the layer before the next kept one); it runs the teacher online.

Bounded by ``train_steps`` and optionally ``max_tokens``. AdamW, linear warm-up then cosine decay
to 10%, gradient clipping. Dropout is off (eval mode) so a run is deterministic and a resumed
run follows the same batches: batch order is a function of (seed, step), and a checkpoint
(student, optimizer, step, tokens, loss trace, time) is written atomically every
``checkpoint_every`` steps under <cache>/distill/run-<hash of config, teacher and data>; an
interrupted run resumes from it, a finished one is reloaded instead of retrained.
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator
from slimbench.methods.distillation.kd import (
    cached_teacher_topk,
    hidden_cosine,
    model_digest,
    next_token_ce,
    tensor_digest,
    topk_kl,
)
from slimbench.methods.distillation.layer_drop import DepthConfig, check, depth_details
from slimbench.methods.distillation.student import kept_layers

from slimbench.calibration import CalibrationConfig, sample_calibration
from slimbench.config import stable_hash
from slimbench.layerwise import drop_layers, teacher_depth
from slimbench.measure.clocks import PeakMemory
from slimbench.method import Method, MethodReport
from slimbench.modeling import count_parameters
from slimbench.zoo.models import cache_dir


class DistillConfig(DepthConfig, CalibrationConfig):
    calib_samples: int = Field(256, ge=1, le=100000, description="training sequences from the calibration split")
    calib_seqlen: int = Field(128, ge=8, le=131072, description="tokens per training sequence")
    train_steps: int = Field(100, description="optimizer steps (>= 1); not `steps`, which suites read as composition")
    max_tokens: int | None = Field(None, description="stop once this many training tokens were seen (>= 1)")
    batch_size: int = Field(4, ge=1, description="sequences per step")
    lr: float = Field(1e-4, gt=0.0, lt=1.0, description="peak AdamW learning rate")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0.0, description="max gradient norm")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the KD term; 1 - alpha weights the CE term")
    temperature: float = Field(2.0, gt=0.0, description="distillation temperature T")
    hidden_weight: float = Field(0.0, ge=0.0, description="weight of the hidden-state cosine loss (0 = off)")
    teacher_topk: int = Field(64, ge=1, description="teacher logits kept per position in the cache")
    teacher_batch: int = Field(8, ge=1, description="sequences per teacher forward when filling the cache")
    checkpoint_every: int = Field(25, ge=1, description="steps between checkpoints")
    seed: int = Field(0, description="seed of the batch order")

    @field_validator("train_steps", "max_tokens")
    @classmethod
    def _budget(cls, v: int | None, info) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"{info.field_name} must be >= 1: a zero training budget trains nothing "
                             "(use method layer-drop for the untrained student)")
        return v


def lr_at(step: int, cfg: DistillConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to 10% of it at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.train_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_rows(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Rows of step ``step``: a fresh seeded permutation every epoch (a function of seed and step)."""
    per_epoch = max(n // batch_size, 1)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[pos * batch_size : (pos + 1) * batch_size]


def hidden_targets(keep: list[int], depth: int) -> list[int]:
    """Teacher hidden-state index matched to student hidden states 1..n (see module docstring)."""
    return [*keep[1:], depth]


# -- checkpoints -----------------------------------------------------------------------------
def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The saved training state, or None. ``weights_only``: tensors, numbers, strings and
    containers only, so a pickle planted at this path cannot run code; it is refused."""
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refusing to load the distillation checkpoint {path}: it holds more than tensors and plain "
            f"values ({str(err).splitlines()[0]}); delete it to train from the start"
        ) from None


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


# -- training --------------------------------------------------------------------------------
def step_loss(student, teacher, ids, top, cfg: DistillConfig, targets: list[int]) -> tuple[torch.Tensor, dict]:
    want_hidden = cfg.hidden_weight > 0
    out = student(input_ids=ids, use_cache=False, output_hidden_states=want_hidden)
    logits = out.logits[:, :-1]
    parts: dict[str, torch.Tensor] = {}
    if cfg.alpha < 1:
        parts["ce"] = next_token_ce(logits, ids)
    if cfg.alpha > 0:
        parts["kd"] = topk_kl(logits, top, cfg.temperature)
    if want_hidden:
        with torch.no_grad():
            t_hidden = teacher(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
        parts["hidden"] = hidden_cosine(list(out.hidden_states[1:]), [t_hidden[i] for i in targets])
    loss = (
        cfg.alpha * cfg.temperature**2 * parts.get("kd", 0.0)
        + (1 - cfg.alpha) * parts.get("ce", 0.0)
        + cfg.hidden_weight * parts.get("hidden", 0.0)
    )
    return loss, {k: float(v.detach()) for k, v in parts.items()}


def train(student, teacher, ids, top, cfg: DistillConfig, targets, ckpt: Path, progress, device) -> dict[str, Any]:
    optim = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = load_checkpoint(ckpt) or {"step": 0, "tokens": 0, "seconds": 0.0, "losses": [], "parts": []}
    resumed_from = state["step"]
    if resumed_from:
        student.load_state_dict(state["student"])
        optim.load_state_dict(state["optim"])
    student.eval()  # no dropout: deterministic, resumable (gradients still flow)
    max_tokens = cfg.max_tokens or float("inf")
    bar = progress(total=cfg.train_steps, initial=state["step"], desc="distill", unit="step") if progress else None
    t0, tokens0 = time.perf_counter(), state["tokens"]
    while state["step"] < cfg.train_steps and state["tokens"] < max_tokens:
        rows = batch_rows(state["step"], len(ids), cfg.batch_size, cfg.seed)
        batch = ids[rows].to(device)
        for group in optim.param_groups:
            group["lr"] = lr_at(state["step"], cfg)
        loss, parts = step_loss(student, teacher, batch, top.batch(rows) if top else None, cfg, targets)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        optim.step()
        state["step"] += 1
        state["tokens"] += batch.numel()
        state["losses"].append(float(loss.detach()))
        state["parts"].append(parts)
        if bar is not None:
            rate = (state["tokens"] - tokens0) / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{state['losses'][-1]:.3f}", tok_s=f"{rate:.0f}")
            bar.update(1)
        if state["step"] % cfg.checkpoint_every == 0 or state["step"] >= cfg.train_steps:
            elapsed = state["seconds"] + time.perf_counter() - t0
            save_checkpoint(ckpt, {**state, "seconds": elapsed, "student": student.state_dict(),
                                   "optim": optim.state_dict()})
    if bar is not None:
        bar.close()
    this_run = time.perf_counter() - t0
    if state["step"] > resumed_from and state["step"] % cfg.checkpoint_every and state["step"] < cfg.train_steps:
        save_checkpoint(ckpt, {**state, "seconds": state["seconds"] + this_run, "student": student.state_dict(),
                               "optim": optim.state_dict()})  # stopped by max_tokens between checkpoints
    return {**state, "resumed_from_step": resumed_from, "seconds_this_run": this_run,
            "tokens_this_run": state["tokens"] - tokens0}


def summarize_training(run: dict[str, Any], peak_mb: float, cfg: DistillConfig) -> dict[str, Any]:
    losses = run["losses"]
    head, tail = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10) :]
    seconds = run["seconds"] + (run["seconds_this_run"] if run["tokens_this_run"] else 0.0)
    last_parts = run["parts"][-len(tail):]
    return {
        "steps": run["step"],
        "tokens": run["tokens"],
        "train_seconds": seconds,
        "tokens_per_s": run["tokens_this_run"] / run["seconds_this_run"] if run["tokens_this_run"] else None,
        "train_peak_memory_mb": peak_mb,
        "resumed_from_step": run["resumed_from_step"],
        "loss_first_10pct": sum(head) / len(head),
        "loss_last_10pct": sum(tail) / len(tail),
        "loss_parts_last_10pct": {k: sum(p[k] for p in last_parts) / len(last_parts) for k in last_parts[0]},
        "loss_trace": losses[:: max(1, len(losses) // 50)],
        "objective": {"alpha": cfg.alpha, "temperature": cfg.temperature, "hidden_weight": cfg.hidden_weight},
    }


def apply(lm, cfg: DistillConfig, ctx) -> MethodReport:
    teacher = lm.model
    teacher.requires_grad_(False)
    depth = teacher_depth(teacher)
    keep = kept_layers(depth, cfg.keep_every, cfg.student_layers)
    ids, info = sample_calibration(lm, cfg)
    folder = cache_dir() / "distill"
    t_digest, d_digest = model_digest(teacher), tensor_digest({"ids": ids})
    top, cache_info = None, {"used": False}
    t_cache = time.perf_counter()
    if cfg.alpha > 0:
        top, cache_info = cached_teacher_topk(teacher, ids, cfg.teacher_topk, cfg.temperature, cfg.teacher_batch,
                                              lm.device, folder, t_digest)
    cache_info["seconds"] = time.perf_counter() - t_cache
    student = drop_layers(copy.deepcopy(teacher), keep)
    student.requires_grad_(True)
    run_key = stable_hash({"config": cfg.to_dict(), "teacher": t_digest, "data": d_digest})
    ckpt = folder / f"run-{run_key}" / "checkpoint.pt"
    with PeakMemory(lm.device) as mem:
        run = train(student, teacher, ids, top, cfg, hidden_targets(keep, depth), ckpt,
                    ctx.progress if ctx is not None else None, lm.device)
    before = count_parameters(teacher)
    student.requires_grad_(False)
    lm.model = student
    details = {
        **depth_details(depth, keep, before, count_parameters(student)),
        **summarize_training(run, mem.peak_bytes / 2**20, cfg),
        "teacher_cache": cache_info,
        "checkpoint": str(ckpt),
        "calibration": info,
    }
    notes = ["layers really removed; student trained from the teacher's weights"]
    if run["resumed_from_step"]:
        notes.append(f"resumed from a checkpoint at step {run['resumed_from_step']}")
    return MethodReport(execution="native", details=details, notes=notes)


METHOD = Method(
    name="distill",
    family="distillation",
    description="KD of a layer-dropped student: alpha*T^2*KL(top-k teacher) + (1-alpha)*CE (+ hidden cosine) (native)",
    config=DistillConfig,
    apply=apply,
    check=check,
    calibration_need="training",
)
