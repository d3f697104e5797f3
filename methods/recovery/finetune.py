"""`finetune`: short, bounded recovery training after compression, with pruning masks held fixed.

Trains on the corpus' calibration split (``sample_calibration``: never the test text) for at
most ``steps`` optimizer steps and, if given, ``max_tokens`` tokens, with the causal-LM loss.

- ``mode: full``: every float parameter trains (AdamW); after each step the weights of every
  linear layer that held exact zeros when training began are multiplied by their mask again,
  and gradients are masked before the step, so pruned weights stay exactly zero.
- ``mode: lora``: each linear layer's weight becomes ``W + mask ⊙ (B A) · alpha / rank``
  (a parametrization; ``B`` starts at zero so training starts from the compressed model); only
  ``A`` and ``B`` train, and the delta is merged into ``W`` at the end. The mask inside the
  delta keeps pruned weights zero.

Layers already held in a compressed form (``CompressedLinear``) are left frozen. Weights that
an earlier simulated quantizer put on a grid leave it when trained: their stored form is
re-encoded here as what they now are (sparse format when they hold zeros, else dense), so the
reported bytes stay true; quantize after fine-tuning to keep them quantized.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import torch
from pydantic import Field
from slimbench.methods.pruning.masks import nm_violations
from slimbench.methods.pruning.sparse_format import encode_module
from torch import nn
from torch.nn.utils import parametrize

from slimbench.calibration import CalibrationConfig, sample_calibration
from slimbench.measure.clocks import PeakMemory
from slimbench.method import Method, MethodReport
from slimbench.modeling import get_weight, iter_linears, unique_tensors


class FinetuneConfig(CalibrationConfig):
    steps: int = Field(20, ge=1, le=100000, description="optimizer steps (upper bound)")
    max_tokens: int | None = Field(None, ge=1, description="stop once this many training tokens were seen")
    batch_size: int = Field(2, ge=1, le=1024, description="sequences per step")
    lr: float = Field(1e-4, gt=0, le=1.0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay")
    mode: Literal["full", "lora"] = Field(
        "lora", description="train every parameter, or low-rank adapters merged at the end"
    )
    lora_rank: int = Field(8, ge=1, le=4096, description="LoRA rank")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scale numerator (delta scaled by alpha / rank)")
    eval_samples: int = Field(4, ge=1, le=1024, description="held-back calibration sequences for the loss before/after")
    calib_samples: int = Field(32, ge=1, le=100000, description="calibration sequences drawn (training + eval)")


class LoraDelta(nn.Module):
    """Parametrization ``W -> W + keep ⊙ (B A) · scale`` in the parameter's own layout."""

    def __init__(self, shape: torch.Size, rank: int, alpha: float, keep: torch.Tensor | None):
        super().__init__()
        rows, cols = shape
        self.a = nn.Parameter(torch.randn(rank, cols) / math.sqrt(cols))
        self.b = nn.Parameter(torch.zeros(rows, rank))
        self.scale = alpha / rank
        self.register_buffer("keep", keep, persistent=False)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        delta = (self.b @ self.a) * self.scale
        if self.keep is not None:
            delta = delta * self.keep
        return w + delta.to(w.dtype)


def trainable_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Linear layers with a float ``weight`` parameter (compressed modules stay frozen)."""
    return {n: m for n, m in iter_linears(model) if isinstance(getattr(m, "weight", None), nn.Parameter)}


def zero_masks(linears: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Keep-masks (in the parameter's layout) of the layers that hold exact zeros now."""
    return {n: (m.weight.data != 0) for n, m in linears.items() if bool((m.weight.data == 0).any())}


def batches(ids: torch.Tensor, batch_size: int, steps: int):
    for s in range(steps):
        idx = [(s * batch_size + j) % ids.shape[0] for j in range(batch_size)]
        yield ids[idx]


@torch.no_grad()
def mean_loss(model: nn.Module, ids: torch.Tensor, device: torch.device) -> float:
    losses = [
        float(model(input_ids=x.unsqueeze(0).to(device), labels=x.unsqueeze(0).to(device), use_cache=False).loss)
        for x in ids
    ]
    return sum(losses) / len(losses)


def setup_params(model: nn.Module, cfg: FinetuneConfig, linears: dict, masks: dict) -> list[nn.Parameter]:
    """Mark what trains; for LoRA, attach the adapters. Returns the optimizer's parameters."""
    if cfg.mode == "full":
        params = [p for p in model.parameters() if p.is_floating_point()]
        for p in params:
            p.requires_grad_(True)
        return params
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for name, mod in linears.items():
        delta = LoraDelta(mod.weight.shape, cfg.lora_rank, cfg.lora_alpha, masks.get(name)).to(mod.weight.device)
        parametrize.register_parametrization(mod, "weight", delta)
        params += [delta.a, delta.b]
    return params


def train(lm, cfg: FinetuneConfig, train_ids: torch.Tensor, linears: dict, masks: dict, params: list) -> dict[str, Any]:
    model = lm.model
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    tokens, losses = 0, []
    for batch in batches(train_ids, cfg.batch_size, cfg.steps):
        if cfg.max_tokens is not None and tokens >= cfg.max_tokens:
            break
        batch = batch.to(lm.device)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.mode == "full":  # masked gradients: Adam never sees a pruned weight move
            for name, keep in masks.items():
                grad = linears[name].weight.grad
                if grad is not None:
                    grad.mul_(keep)
        opt.step()
        if cfg.mode == "full":  # and weight decay / numerical drift cannot revive one either
            with torch.no_grad():
                for name, keep in masks.items():
                    linears[name].weight.mul_(keep)
        tokens += batch.numel()
        losses.append(loss.item())
    model.eval()
    return {"steps": len(losses), "tokens": tokens, "train_loss_first": losses[0], "train_loss_last": losses[-1]}


def merge_lora(linears: dict) -> None:
    for mod in linears.values():
        if parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)


def detect_nm(w: torch.Tensor) -> tuple[int, int] | None:
    for n, m in ((2, 4), (4, 8)):
        if w.shape[1] % m == 0 and not nm_violations(w, n, m):
            return n, m
    return None


def nbytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


def stored_forms(model: nn.Module, linears: dict, masks: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Re-encode what training changed, replacing any earlier step's (now stale) stored form."""
    key_of = {t.untyped_storage().data_ptr(): k for k, t in unique_tensors(model).items()}
    out = {}
    for name, mod in linears.items():
        key = key_of.get(mod.weight.untyped_storage().data_ptr())
        if key is None:
            continue
        dense = {"dense": mod.weight.data}
        sparse = encode_module(mod, detect_nm(get_weight(mod))) if name in masks else None
        # A layer with a few stray zeros (dequantized checkpoints have some) is smaller dense.
        out[key] = sparse if sparse is not None and nbytes(sparse) < nbytes(dense) else dense
    return out


def apply(lm, cfg: FinetuneConfig, ctx) -> MethodReport:
    if cfg.eval_samples >= cfg.calib_samples:
        raise ValueError(f"eval_samples ({cfg.eval_samples}) must be fewer than calib_samples ({cfg.calib_samples})")
    ids, info = sample_calibration(lm, cfg)
    train_ids, eval_ids = ids[: -cfg.eval_samples], ids[-cfg.eval_samples :]
    model = lm.model
    linears = trainable_linears(model)
    masks = zero_masks(linears)
    loss_before = mean_loss(model, eval_ids, lm.device)
    t0 = time.perf_counter()
    with PeakMemory(lm.device) as mem, torch.enable_grad():
        params = setup_params(model, cfg, linears, masks)
        run = train(lm, cfg, train_ids, linears, masks, params)
    seconds = time.perf_counter() - t0
    merge_lora(linears)
    for p in model.parameters():
        p.requires_grad_(False)
    revived = sum(int((linears[n].weight.data[~k] != 0).sum()) for n, k in masks.items())
    if revived:  # an invariant of this method, not a user error
        raise RuntimeError(f"{revived} pruned weights became non-zero during fine-tuning")
    details = {
        "mode": cfg.mode,
        **run,
        "seconds": seconds,
        "tokens_per_s": run["tokens"] / seconds,
        "peak_memory_mb": mem.peak_bytes / 2**20,
        "memory_kind": mem.kind,
        "trainable_parameters": sum(p.numel() for p in params),
        "masked_layers": len(masks),
        "pruned_weights_revived": revived,
        "eval_loss_before": loss_before,
        "eval_loss_after": mean_loss(model, eval_ids, lm.device),
        "eval": {"samples": cfg.eval_samples, "from": "the last calibration samples drawn (not trained on)"},
        "calibration": info,
    }
    notes = ["trained on the calibration split; pruning masks held fixed"]
    if cfg.mode == "lora":
        notes.append(f"LoRA rank {cfg.lora_rank} merged into the weights")
    return MethodReport(execution="native", storage=stored_forms(model, linears, masks), details=details, notes=notes)


METHOD = Method(
    name="finetune",
    family="recovery",
    description="bounded recovery fine-tuning (full or LoRA) on the calibration split, pruning masks held fixed",
    config=FinetuneConfig,
    apply=apply,
    calibration_need="training",
)
