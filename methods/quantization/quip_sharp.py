"""`quip-sharp`: QuIP# (Tseng et al., ICML 2024) without fine-tuning — incoherence, E8P vectors, BlockLDLQ.

Per linear layer (the shared layer-wise loop streams its Hessian ``H``):

1. **Incoherence processing**: ``W̃ = R_outᵀ W R_in`` and ``H̃ = R_inᵀ H R_in`` with randomized
   Hadamard rotations ``R = diag(s) H / √n`` on both sides (hadamard.py; non-power-of-two widths
   by Kronecker products). The rotated weights are close to Gaussian: no outliers, so one fixed
   codebook fits every layer.
2. **E8P**: each run of 8 consecutive weights of a row is one codeword of the 2^16-point E8P
   codebook (e8p.py), i.e. 16 bits per 8 weights = **2 bits per weight**; one fp32 scale per
   matrix (``W̃ ≈ σ · codeword``), chosen by a 1-D search minimising ``‖W̃ - Q‖²``.
3. **BlockLDLQ**: GPTQ's error feedback with 8-column blocks: quantize a block (nearest codeword),
   then push its error ``(W_B - Q_B) U_BB⁻¹`` through the rows ``U_{B,>B}`` of the upper Cholesky
   factor of ``H̃⁻¹`` (lazy batches of 128 columns). The proxy loss ``tr((W - Q) H (W - Q)ᵀ)``
   then equals the sum of the squared feedback errors (tested).

The layer becomes an :class:`E8Linear` holding the codes (int16 per 8 weights), the scale and the
two sign vectors (bit-packed); the forward decodes the codebook rows (a gather) and runs
``y = ((x R_in) W̃ᵀ) R_outᵀ`` with the fast Hadamard transform. The E8P table itself (65,536 × 8
fp16 = 1 MiB) is counted once, in the first layer's stored form. Memory really is smaller
(``native``), but the decode is a PyTorch gather, not a fused kernel: no speed claim.
Not done: QuIP#'s fine-tuning stage (its later versions) and its RVQ 3/4-bit variants.
"""

from __future__ import annotations

import time
import zlib
from typing import Any

import torch
from pydantic import Field
from slimbench.methods.quantization import e8p
from slimbench.methods.quantization.gptq import inverse_cholesky, prepare_hessian, single_thread
from slimbench.methods.quantization.grid import pack_bits, unpack_bits
from slimbench.methods.quantization.hadamard import hadamard_matmul, hadamard_plan, random_signs
from slimbench.methods.quantization.packed import replace_module

from slimbench.calibration import CalibrationConfig, sample_calibration
from slimbench.layerwise import HessianStream, SharedGram, adapter_for, sequential
from slimbench.method import Method, MethodReport
from slimbench.modeling import CompressedLinear, get_weight, iter_linears

SCALES = tuple(0.5 + 0.1 * i for i in range(12))  # multipliers of rms(W̃) searched for σ


class QuipSharpConfig(CalibrationConfig):
    seed: int = Field(0, ge=0, description="seed of the random signs (each layer's own, derived from its name)")
    percdamp: float = Field(0.01, gt=0, le=1, description="Hessian damping, fraction of its mean diagonal")
    block_size: int = Field(128, ge=8, description="columns per lazy-batch block (a multiple of 8)")


class E8Linear(CompressedLinear):
    """``y = ((x R_in) (σ · E8P[codes])ᵀ) R_outᵀ + b``: 2-bit E8P codes between two random Hadamards."""

    def __init__(self, in_features: int, out_features: int, bias: bool, holds_codebook: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.holds_codebook = holds_codebook
        self.register_buffer("codes", torch.zeros(out_features, in_features // 8, dtype=torch.int16))
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("signs_in", torch.zeros((in_features + 7) // 8, dtype=torch.uint8))
        self.register_buffer("signs_out", torch.zeros((out_features + 7) // 8, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        if holds_codebook:  # the shared table, counted once (it is a constant of the format)
            self.register_buffer("codebook", e8p.codebook().half())
        self.plan_in, self.plan_out = hadamard_plan(in_features), hadamard_plan(out_features)
        self._derive()

    def _derive(self) -> None:
        self.register_buffer("s_in", unpack_bits(self.signs_in, 1, self.in_features).float() * 2 - 1, persistent=False)
        self.register_buffer("s_out", unpack_bits(self.signs_out, 1, self.out_features).float() * 2 - 1,
                             persistent=False)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._derive()

    def artifact_spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "holds_codebook": self.holds_codebook}

    @classmethod
    def from_artifact_spec(cls, spec: dict[str, Any]) -> E8Linear:
        return cls(spec["in_features"], spec["out_features"], spec["bias"], spec["holds_codebook"])

    def weight_storage(self) -> dict[str, torch.Tensor]:
        names = ["codes", "scale", "signs_in", "signs_out"] + (["codebook"] if self.holds_codebook else [])
        return {n: getattr(self, n) for n in names}

    def incoherent_weight(self) -> torch.Tensor:
        """σ · E8P[codes] as [out, in]: the weight in the rotated basis."""
        return (e8p.codebook()[self.codes.long() & 0xFFFF] * self.scale).reshape(self.out_features, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        wt = self.incoherent_weight()
        left = hadamard_matmul(wt.t().contiguous(), self.plan_out, transpose=True).t() * self.s_out[:, None]  # R_out W̃
        return hadamard_matmul(left, self.plan_in, transpose=True) * self.s_in  # (R_out W̃) R_inᵀ

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        xt = hadamard_matmul(x2 * self.s_in, self.plan_in)
        yt = xt @ self.incoherent_weight().t()
        y = hadamard_matmul(yt, self.plan_out, transpose=True) * self.s_out
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


def dense_rotation(n: int, signs: torch.Tensor) -> torch.Tensor:
    """R = diag(s) H / √n as a matrix."""
    return hadamard_matmul(torch.diag(signs), hadamard_plan(n))


def choose_scale(wt: torch.Tensor, rows: int = 256) -> float:
    """σ minimising ‖W̃ - σ E8P(W̃/σ)‖² over a seeded sample of rows."""
    g = torch.Generator().manual_seed(0)
    sample = wt[torch.randperm(wt.shape[0], generator=g)[:rows]].reshape(-1, 8)
    rms = float(wt.square().mean().sqrt()) or 1.0
    cb = e8p.codebook()
    errs = [(float((sample - c * rms * cb[e8p.nearest(sample / (c * rms))]).square().sum()), c * rms) for c in SCALES]
    return min(errs)[1]


def block_ldlq(wt: torch.Tensor, ht: torch.Tensor, sigma: float, cfg: QuipSharpConfig) -> dict[str, Any]:
    """E8P codes [out, in/8] of W̃ with BlockLDLQ feedback under H̃; also the feedback errors' energy."""
    with single_thread():
        rows, cols = wt.shape
        w, h = prepare_hessian(wt, ht, cfg.percdamp)
        u = inverse_cholesky(h)
        cb = e8p.codebook()
        codes = torch.zeros(rows, cols // 8, dtype=torch.long)
        energy = 0.0
        bs = cfg.block_size - cfg.block_size % 8
        for i1 in range(0, cols, bs):
            i2 = min(i1 + bs, cols)
            w1, err1 = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1)
            for j in range(0, i2 - i1, 8):
                blk = w1[:, j:j + 8]
                c = e8p.nearest(blk / sigma)
                diff = blk - sigma * cb[c]
                ub = u[i1 + j:i1 + j + 8, i1 + j:i1 + j + 8]
                e = torch.linalg.solve_triangular(ub, diff, upper=True, left=False)  # diff @ U_BB⁻¹
                w1[:, j + 8:] -= e @ u[i1 + j:i1 + j + 8, i1 + j + 8:i2]
                err1[:, j:j + 8] = e
                codes[:, (i1 + j) // 8] = c
                energy += float(e.square().sum())
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
        return {"codes": codes, "feedback_energy": energy, "damped_h": h}


class QuipLayer(HessianStream):
    def __init__(self, model, name: str, module, cfg: QuipSharpConfig, gram: SharedGram, first: list[bool]):
        self.model, self.name, self.module, self.cfg, self.first = model, name, module, cfg, first
        self.start_hessian(get_weight(module).shape[1], gram)

    def compress(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        w = get_weight(self.module).float()
        h = self.hessian()
        self.h = None
        out_f, in_f = w.shape
        seed = self.cfg.seed * 1_000_003 + zlib.crc32(self.name.encode())
        s_in, s_out = random_signs(in_f, seed), random_signs(out_f, seed + 1)
        r_in, r_out = dense_rotation(in_f, s_in), dense_rotation(out_f, s_out)
        wt, ht = r_out.t() @ w @ r_in, r_in.t() @ h @ r_in
        sigma = choose_scale(wt)
        res = block_ldlq(wt, ht, sigma, self.cfg)
        bias = getattr(self.module, "bias", None)
        new = E8Linear(in_f, out_f, bias is not None, holds_codebook=self.first[0])
        self.first[0] = False
        new.codes.copy_(res["codes"].to(torch.int32).to(torch.int16))  # 16-bit codes, two's complement
        new.scale.fill_(sigma)
        new.signs_in.copy_(pack_bits((s_in > 0).to(torch.uint8), 1))
        new.signs_out.copy_(pack_bits((s_out > 0).to(torch.uint8), 1))
        new._derive()
        if bias is not None:
            new.bias.copy_(bias.data.float())
        d = w - new.dequantized_weight()
        proxy = float(torch.einsum("ij,jk,ik->", d, h, d))
        replace_module(self.model, self.name, new)
        return {"proxy_error": proxy, "scale": sigma, "seconds": time.perf_counter() - t0}


def check(lm, cfg: QuipSharpConfig) -> None:
    adapter_for(lm.model)
    for name, mod in iter_linears(lm.model):
        out_f, in_f = get_weight(mod).shape
        if in_f % 8:
            raise ValueError(f"layer {name}: input dimension {in_f} is not a multiple of 8 (E8P codes 8 weights)")
        for what, n in (("input", in_f), ("output", out_f)):
            try:
                hadamard_plan(n)
            except ValueError as err:
                raise ValueError(f"layer {name}, {what} dimension: {err}") from None


def apply(lm, cfg: QuipSharpConfig, ctx) -> MethodReport:
    calib, info = sample_calibration(lm, cfg)
    t0 = time.perf_counter()
    gram, first = SharedGram(), [True]
    results = sequential(lm.model, calib, lambda name, mod: QuipLayer(lm.model, name, mod, cfg, gram, first),
                         device=lm.device, progress=getattr(ctx, "progress", None))
    errors = {n: r["proxy_error"] for n, r in results.items()}
    return MethodReport(
        execution="native",
        details={"codebook": "E8P (2^16 points of E8 + 1/4, 8 weights per 16-bit code)", "code_bits_per_weight": 2,
                 "codebook_bytes": 65536 * 8 * 2, "incoherence": "random Hadamard, both sides",
                 "layers": len(results), "calibration": info, "loop_seconds": time.perf_counter() - t0,
                 "quantize_seconds": sum(r["seconds"] for r in results.values()),
                 "proxy_error_sum": sum(errors.values()), "proxy_error_max_layer": max(errors, key=errors.get)},
        notes=["codes decoded per forward by a PyTorch gather and two fast Hadamard transforms (no fused kernel): "
               "the memory is really smaller, no speed-up is claimed",
               "without QuIP#'s fine-tuning stage"],
    )


METHOD = Method(
    name="quip-sharp",
    family="quantization",
    description="QuIP# (no fine-tuning): random-Hadamard incoherence, E8P lattice codebook (2 bits/weight), BlockLDLQ",
    config=QuipSharpConfig,
    apply=apply,
    check=check,
    calibration_need="hessian",
)
