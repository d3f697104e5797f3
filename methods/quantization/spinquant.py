"""`spinquant`: SpinQuant-lite (Liu et al., 2024) — QuaRot's rotations with the residual one *learned*.

QuaRot rotates the residual stream by a random Hadamard ``R1``; SpinQuant observes that rotations
differ widely in how well the quantized network does and learns ``R1`` (and the value-head ``R2``)
on calibration data by optimisation on the Stiefel manifold (Cayley SGD), with the network's
activations quantized in the loss. This is the "lite" version:

1. everything QuaRot does except ``R1`` (norms folded, value heads, online Hadamards at the o_proj
   and down_proj inputs and on queries/keys) is applied first, with ``R1 = I``;
2. ``R1`` starts from the same random Hadamard QuaRot would use (``seed``) and is trained for
   ``steps`` Cayley SGD steps: ``A = G Rᵀ - R Gᵀ``, ``R <- (I + η/2 A)⁻¹ (I - η/2 A) R`` (stays
   orthogonal), ``G`` the gradient of the next-token cross-entropy of one calibration window of
   the model with every linear input fake-quantized to ``a_bits`` per token (straight-through
   rounding) — weights full precision, as SpinQuant does before GPTQ;
3. the learned ``R1`` is folded into the linears like QuaRot's and applied online at the
   embedding and the final norm (a dense matrix there: ``d²`` per token instead of a Hadamard).

Only ``R1`` is learned (``R2`` stays a random Hadamard); ``steps: 0`` is QuaRot with a dense
``R1``. The function is unchanged in fp (tested like QuaRot). Compose it the same way:
``[{name: spinquant}, {name: gptq, ...}, {name: act-quant, ...}]``.
"""

from __future__ import annotations

import time

import torch
from pydantic import Field
from slimbench.methods.quantization.rotation import (
    Rotation,
    check_rotatable,
    fake_quantize_tokens,
    rotate_model,
    rotate_residual,
)

from slimbench.calibration import CalibrationConfig, sample_calibration
from slimbench.layerwise import adapter_for, decoder_layers
from slimbench.method import Method, MethodReport
from slimbench.modeling import iter_linears


class SpinQuantConfig(CalibrationConfig):
    seed: int = Field(0, ge=0, description="seed of the random Hadamard R1 starts from (and of the fixed rotations)")
    steps: int = Field(32, ge=0, le=10000, description="Cayley SGD steps (one calibration window each, cycled)")
    lr: float = Field(1.5, gt=0, description="Cayley SGD step size η (SpinQuant: 1.5)")
    a_bits: int = Field(4, ge=2, le=8, description="activation bits in the training loss (per token, symmetric)")
    a_clip: float = Field(0.9, gt=0, le=1, description="activation clipping in the training loss")
    calib_samples: int = Field(8, ge=1, le=100000, description="calibration windows")
    calib_seqlen: int = Field(256, ge=8, le=32768, description="tokens per calibration window")


def ste_quant(x: torch.Tensor, bits: int, clip: float) -> torch.Tensor:
    """Fake quantization with a straight-through gradient."""
    return x + (fake_quantize_tokens(x, bits, clip, symmetric=True) - x).detach()


def cayley_step(r: torch.Tensor, g: torch.Tensor, lr: float) -> torch.Tensor:
    """One Cayley SGD step on the orthogonal group (Wen & Yin 2013): stays exactly orthogonal."""
    a = g @ r.t() - r @ g.t()
    eye = torch.eye(r.shape[0], dtype=r.dtype)
    return torch.linalg.solve(eye + lr / 2 * a, (eye - lr / 2 * a) @ r)


def training_hooks(model: torch.nn.Module, r: torch.Tensor, cfg: SpinQuantConfig) -> list:
    """Quantize every linear input in the loss: the folded norms' outputs through R1 (x -> Q(x R) Rᵀ),
    the other linears' inputs as they are (their fixed Hadamards run inside the model)."""
    adapter = adapter_for(model)
    handles, fed = [], set()
    for layer in decoder_layers(model):
        for norm_name, lin_names in adapter.norm_linear_pairs:
            norm = layer.get_submodule(norm_name)
            handles.append(norm.register_forward_hook(
                lambda m, a, out: ste_quant(out @ r, cfg.a_bits, cfg.a_clip) @ r.t()))
            fed |= {id(layer.get_submodule(n)) for n in lin_names}
    for _, lin in iter_linears(model):
        if id(lin) not in fed:
            handles.append(lin.register_forward_pre_hook(lambda m, a: (ste_quant(a[0], cfg.a_bits, cfg.a_clip),)))
    return handles


def learn_rotation(model: torch.nn.Module, calib: torch.Tensor, r0: torch.Tensor, cfg: SpinQuantConfig,
                   progress=None) -> tuple[torch.Tensor, list[float]]:
    """Cayley SGD on R1 from r0; returns (R1, the loss of each step)."""
    r = r0.clone().float()
    losses: list[float] = []
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    bar = progress(total=cfg.steps, desc="cayley", unit="step") if progress and cfg.steps else None
    try:
        for step in range(cfg.steps):
            rr = r.clone().requires_grad_(True)
            handles = training_hooks(model, rr, cfg)
            try:
                ids = calib[step % len(calib)].unsqueeze(0)
                logits = model(input_ids=ids, use_cache=False).logits
                loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
                loss.backward()
            finally:
                for h in handles:
                    h.remove()
            losses.append(float(loss.detach()))
            r = cayley_step(r, rr.grad, cfg.lr)
            if bar is not None:
                bar.update(1)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        if bar is not None:
            bar.close()
    return r, losses


def check(lm, cfg: SpinQuantConfig) -> None:
    check_rotatable(lm.model)


def apply(lm, cfg: SpinQuantConfig, ctx) -> MethodReport:
    calib, info = sample_calibration(lm, cfg)
    t0 = time.perf_counter()
    d = lm.model.config.hidden_size
    r1 = Rotation(d, matrix=torch.eye(d))
    done = rotate_model(lm.model, r1, seed=cfg.seed)  # every fixed rotation; the residual one is I
    r0 = Rotation.hadamard(d, cfg.seed).dense()
    was_training = lm.model.training
    lm.model.eval()
    r, losses = learn_rotation(lm.model, calib, r0, cfg, getattr(ctx, "progress", None))
    lm.model.train(was_training)
    # orthogonality holds to float rounding after the steps; re-orthonormalise (polar) before folding
    u, _, vh = torch.linalg.svd(r.double())
    r = u @ vh
    rotate_residual(lm.model, r)
    r1.matrix.copy_(r.float())
    return MethodReport(
        execution="native",
        details={"rotation": "learned R1 (Cayley SGD)" if cfg.steps else "random Hadamard R1 (dense, untrained)",
                 **done, "residual": f"dense {d}x{d}", "steps": cfg.steps, "lr": cfg.lr,
                 "train_a_bits": cfg.a_bits, "loss_first": losses[0] if losses else None,
                 "loss_last": losses[-1] if losses else None, "losses": losses,
                 "orthogonality_error": float((r.t() @ r - torch.eye(d, dtype=r.dtype)).abs().max()),
                 "calibration": info, "train_seconds": time.perf_counter() - t0},
        notes=["function-preserving rotation: quantizes nothing by itself; follow it with a weight quantizer and "
               "optionally act-quant", "only the residual rotation R1 is learned (R2 stays a random Hadamard)"],
    )


METHOD = Method(
    name="spinquant",
    family="rotation",
    description="SpinQuant-lite: QuaRot's rotations with the residual rotation learned by Cayley SGD (A4 loss)",
    config=SpinQuantConfig,
    apply=apply,
    check=check,
    calibration_need="training",
    test_params={"steps": 2, "calib_samples": 2},
)
