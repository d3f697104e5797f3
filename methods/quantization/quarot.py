"""`quarot`: QuaRot's rotations (Ashkboos et al., 2024) — an exact change of basis before quantizing.

Folds every RMSNorm's scale into the linears after it, rotates the residual stream by a
randomized Hadamard matrix ``R1 = diag(s) H / √d``, rotates value heads (folded), and adds online
Hadamard transforms at the o_proj and down_proj inputs and on queries/keys after RoPE
(rotation.py has the details and the argument for exactness). The rotated fp model computes the
same function as the original, to float rounding (the test: its logits equal the original's).
What it buys: activations and weights without outlier channels, so a quantizer that follows meets
a flat distribution. It quantizes nothing itself; compose it:

    steps: [{name: quarot}, {name: gptq, bits: 4, symmetric: true}, {name: act-quant, a_bits: 4, kv_bits: 4}]

Gemma 3's norm scales span 0.16 to 234; folding them (step 1 of QuaRot) puts that range behind the
activation quantizer, whose rounding noise the folded weights then multiply by up to 234 (measured:
W16A4 perplexity 2.5e7 with folding vs 9.6e3 without rotation). ``residual: auto`` therefore keeps
the norms and rotates each pre-norm's output online on sandwich-norm models (Gemma), and folds and
rotates the residual stream, as QuaRot does, on the others.

Hadamard orders that are not powers of two come from Paley constructions and Kronecker products
(hadamard.py): SmolLM2's 576 = 36·16 and 1,536 = 12·128, Gemma 3's 640 = 20·32. A width none
covers is refused in ``check`` (validation). Execution is ``native``: the online transforms run
(fast Walsh–Hadamard butterflies plus a small dense factor, in PyTorch); the stored form adds the
sign vectors only.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from slimbench.methods.quantization.rotation import Rotation, check_rotatable, rotate_model, sandwich_norms

from slimbench.config import Config
from slimbench.method import Method, MethodReport


class QuaRotConfig(Config):
    seed: int = Field(0, ge=0, description="seed of the random ±1 signs of every Hadamard rotation")
    online_o_proj: bool = Field(True, description="online Hadamard on the o_proj input (and head-wise on values)")
    online_down_proj: bool = Field(True, description="online Hadamard on the down_proj input")
    qk_rotation: bool = Field(True, description="Hadamard on queries and keys after RoPE (rotated KV cache)")
    residual: Literal["auto", "fused", "online"] = Field(
        "auto", description="fused: fold norms, rotate the residual stream (QuaRot); online: rotate each pre-norm's "
        "output online, norm scales kept; auto: online for sandwich-norm models (Gemma), fused otherwise")


def check(lm, cfg: QuaRotConfig) -> None:
    check_rotatable(lm.model)


def apply(lm, cfg: QuaRotConfig, ctx) -> MethodReport:
    r1 = Rotation.hadamard(lm.model.config.hidden_size, cfg.seed)
    residual = cfg.residual if cfg.residual != "auto" else ("online" if sandwich_norms(lm.model) else "fused")
    done = rotate_model(lm.model, r1, seed=cfg.seed, online_o=cfg.online_o_proj, online_down=cfg.online_down_proj,
                        qk=cfg.qk_rotation, v_heads=cfg.online_o_proj, residual=residual)
    return MethodReport(
        execution="native",
        details={"rotation": "random Hadamard", **done},
        notes=["function-preserving rotation: quantizes nothing by itself; follow it with a weight quantizer "
               "(rtn, gptq, ...) and optionally act-quant",
               "online Hadamard transforms run as PyTorch butterflies (no fused kernel)"],
    )


METHOD = Method(
    name="quarot",
    family="rotation",
    description="QuaRot: fold RMSNorms, rotate residual stream and attention/MLP inputs by random Hadamards (exact)",
    config=QuaRotConfig,
    apply=apply,
    check=check,
)
