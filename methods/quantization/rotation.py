"""Rotating a transformer without changing its function (QuaRot, SpinQuant): the model surgery.

Shared by ``quarot`` (random Hadamard rotations) and ``spinquant`` (a learned residual rotation).
With row vectors, a rotation ``R`` (orthogonal) acts on a hidden state as ``x -> x R``. For an
RMSNorm-ed model (Llama, Gemma) the function is kept exactly because:

1. every norm's scale is folded into the linears it feeds (``W <- W diag(γ)``; Gemma's ``1 + w``),
   leaving a weightless RMSNorm, which commutes with any orthogonal ``R`` (``‖xR‖ = ‖x‖``);
2. the residual stream is rotated by ``R1``: linears reading it get ``W <- W R1``, linears writing
   to it get ``W <- R1ᵀ W`` (Llama's o_proj/down_proj). Gemma 3 writes through a *post*-norm with
   its own scale, which does not commute with ``R1``, so that norm's output is rotated online;
3. the embedding's output is rotated online by ``R1`` and the final norm's input by ``R1ᵀ`` (one
   small transform per token each), instead of rewriting the embedding and the head: both models
   tie them, and the final norm's scale would untie them (a second 113 MB matrix for SmolLM2);
4. inside attention, the value heads are rotated by a head-wise Hadamard folded into v_proj
   (output side) and o_proj (input side); the o_proj input gets a full online Hadamard (which
   also mixes heads; QuaRot splits it into a folded head-wise part and an online cross-head part,
   impossible for SmolLM2's 9 heads, so one transform of the whole width is used); queries and
   keys are rotated by a Hadamard after RoPE (``q·k`` unchanged), so the KV cache holds rotated
   keys and values;
5. the down_proj input gets an online Hadamard (``W_down <- W_down H``).

Online transforms are :class:`Rotation` modules (their ±1 signs, or a learned matrix, are buffers:
counted in the stored bytes). The o_proj and q/k transforms run inside the attention function
``slimbench-rotated`` (registered with transformers), which wraps the model's own attention
implementation; activation and KV-cache quantization (``act-quant``) hook in at the same places.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from slimbench.methods.quantization.hadamard import hadamard_matmul, hadamard_plan, random_signs
from torch import nn

from slimbench.layerwise import adapter_for, decoder_layers
from slimbench.modeling import Rebuildable, get_weight, set_weight

ATTENTION = "slimbench-rotated"
ROTATABLE = ("llama", "gemma")


class Rotation(nn.Module, Rebuildable):
    """An orthogonal ``R`` applied as ``x @ R`` (or ``x @ Rᵀ``) over the last dim.

    Either a randomized Hadamard ``diag(s) H / √n`` (buffer: the signs ``s``; ``H`` is rebuilt from
    its construction) or a dense matrix (buffer: ``matrix``), e.g. a learned rotation.
    """

    def __init__(self, n: int, signs: torch.Tensor | None = None, matrix: torch.Tensor | None = None):
        super().__init__()
        self.n = n
        if (signs is None) == (matrix is None):
            raise ValueError("a Rotation is either Hadamard signs or a dense matrix")
        if signs is not None:
            self.plan = hadamard_plan(n)
            self.register_buffer("signs", signs.float().clone())
            self.register_buffer("factor", self.plan.dense_factor(), persistent=False)
        else:
            self.plan = None
            self.register_buffer("matrix", matrix.float().clone())

    @classmethod
    def hadamard(cls, n: int, seed: int) -> Rotation:
        return cls(n, signs=random_signs(n, seed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ R."""
        if self.plan is None:
            return x @ self.matrix.to(x.dtype)
        return hadamard_matmul(x * self.signs.to(x.dtype), self.plan, self.factor)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Rᵀ."""
        if self.plan is None:
            return x @ self.matrix.t().to(x.dtype)
        return hadamard_matmul(x, self.plan, self.factor, transpose=True) * self.signs.to(x.dtype)

    def dense(self) -> torch.Tensor:
        """R as an explicit [n, n] float32 matrix."""
        return self.forward(torch.eye(self.n))

    def extra_repr(self) -> str:
        return f"n={self.n}, " + ("dense" if self.plan is None else f"hadamard {self.plan.m}x{self.plan.p}")

    def artifact_spec(self) -> dict[str, Any]:
        return {"n": self.n, "form": "dense" if self.plan is None else "hadamard"}

    @classmethod
    def from_artifact_spec(cls, spec: dict[str, Any]) -> Rotation:
        n = spec["n"]  # placeholder values: loading the entry sets the signs or the matrix
        return cls(n, matrix=torch.eye(n)) if spec["form"] == "dense" else cls(n, signs=torch.ones(n))


class _Wrapper(Rebuildable):
    """Rebuilt around the module the rebuilt model holds at its place; its rotation is a
    placeholder until the entry's own Rotation (listed after it) replaces it."""

    wraps = True

    def artifact_spec(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_artifact_spec(cls, spec: dict[str, Any], existing: nn.Module | None = None) -> nn.Module:
        return cls(existing, nn.Identity())


class RotateOutput(nn.Module, _Wrapper):
    """``inner(...) @ R``: the embedding's output, Gemma's post-norms."""

    def __init__(self, inner: nn.Module, rotation: Rotation):
        super().__init__()
        self.inner, self.rotation = inner, rotation

    def forward(self, *args, **kwargs):
        return self.rotation(self.inner(*args, **kwargs))

    @property
    def weight(self):  # get_input_embeddings().weight still answers (ties, resizing)
        return self.inner.weight


class RotateInput(nn.Module, _Wrapper):
    """``inner(x @ Rᵀ)``: the final norm reads the un-rotated residual stream."""

    def __init__(self, inner: nn.Module, rotation: Rotation):
        super().__init__()
        self.inner, self.rotation = inner, rotation

    def forward(self, x, *args, **kwargs):
        return self.inner(self.rotation.inverse(x), *args, **kwargs)


class RotatedMLP(nn.Module, _Wrapper):
    """A gated MLP whose down_proj input is rotated online: ``down(R_d(act(gate x) * up x))``.

    Same child names as the model's own MLP (gate_proj, up_proj, down_proj, act_fn), so the
    layer-wise loop and every method find the linears where they were.
    """

    def __init__(self, mlp: nn.Module, rotation: Rotation):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        self.down_rotation = rotation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.down_rotation(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


# -- the attention function --------------------------------------------------------------------
def fake_quantize_tokens(x: torch.Tensor, bits: int, clip: float, symmetric: bool) -> torch.Tensor:
    """Round each vector of the last dim to ``bits`` bits (min-max, scaled by ``clip``), dequantized."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (x.abs().amax(-1, keepdim=True) * clip / qmax).clamp(min=1e-8)
        return torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale
    maxq = 2**bits - 1
    lo, hi = x.amin(-1, keepdim=True) * clip, x.amax(-1, keepdim=True) * clip
    scale = ((hi - lo) / maxq).clamp(min=1e-8)
    zero = torch.round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, maxq) - zero) * scale


class AttentionRoute(nn.Module, Rebuildable):
    """What :func:`rotated_attention` needs of one attention module besides its rotations: the
    implementation it wraps and the KV-cache quantization (``act-quant``). A child of the
    attention (``route``), so the artifact cache saves it; attaching it routes the attention."""

    def __init__(self, inner: str, kv_bits: int | None = None, kv_clip: float = 1.0):
        super().__init__()
        self.inner, self.kv_bits, self.kv_clip = inner, kv_bits, kv_clip

    def artifact_spec(self) -> dict[str, Any]:
        return {"inner": self.inner, "kv_bits": self.kv_bits, "kv_clip": self.kv_clip}

    @classmethod
    def from_artifact_spec(cls, spec: dict[str, Any]) -> AttentionRoute:
        return cls(spec["inner"], spec["kv_bits"], spec["kv_clip"])

    def on_attach(self, parent: nn.Module) -> None:
        from transformers.modeling_utils import AttentionInterface

        AttentionInterface.register(ATTENTION, rotated_attention)
        if getattr(parent.config, "_attn_implementation", None) != ATTENTION:
            cfg = copy.copy(parent.config)  # the model's config (masks) keeps its own implementation
            cfg._attn_implementation = ATTENTION
            parent.config = cfg


def rotated_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """The model's own attention with the rotations (and KV quantization) of this module.

    query [b, heads, q_len, d], key/value [b, kv_heads, kv_len, d] (after RoPE and the cache);
    returns ([b, q_len, heads, d], weights) like every transformers attention function.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    route = module.route
    qk = getattr(module, "qk_rotation", None)
    if qk is not None:
        query, key = qk(query), qk(key)
    if route.kv_bits:  # per token and head, asymmetric (QuaRot); simulated: the cache holds floats
        key = fake_quantize_tokens(key, route.kv_bits, route.kv_clip, symmetric=False)
        value = fake_quantize_tokens(value, route.kv_bits, route.kv_clip, symmetric=False)
    inner = sdpa_attention_forward if route.inner == "sdpa" else ALL_ATTENTION_FUNCTIONS[route.inner]
    out, weights = inner(module, query, key, value, attention_mask, **kwargs)
    o_rot = getattr(module, "o_rotation", None)
    if o_rot is not None:
        b, t = out.shape[:2]
        out = o_rot(out.reshape(b, t, -1)).view_as(out)
    return out, weights


def use_rotated_attention(attn: nn.Module) -> AttentionRoute:
    """Route this attention module (only) through :func:`rotated_attention`; its route."""
    if getattr(attn, "route", None) is None:
        attn.route = AttentionRoute(attn.config._attn_implementation or "eager")
        attn.route.on_attach(attn)
    return attn.route


# -- the surgery --------------------------------------------------------------------------------
def check_rotatable(model: nn.Module) -> None:
    """Refuse, with the reason, what the rotation cannot keep exact; every width must have a Hadamard."""
    adapter = adapter_for(model)
    if adapter.name not in ROTATABLE:
        raise ValueError(f"rotation needs an RMSNorm model (Llama or Gemma families); {adapter.name} uses LayerNorm "
                         "with a mean and bias, which an orthogonal rotation does not commute with")
    cfg = model.config
    heads, hidden = cfg.num_attention_heads, cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    for what, n in (("hidden size", hidden), ("intermediate size", cfg.intermediate_size),
                    ("head dim", head_dim), ("attention width (heads x head dim)", heads * head_dim)):
        try:
            hadamard_plan(n)
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from None


def _fold_norms(layer: nn.Module, adapter) -> None:
    for norm_name, lin_names in adapter.norm_linear_pairs:
        norm = layer.get_submodule(norm_name)
        gemma = "Gemma" in type(norm).__name__
        gamma = (1 + norm.weight.data.float()) if gemma else norm.weight.data.float()
        for n in lin_names:
            mod = layer.get_submodule(n)
            set_weight(mod, get_weight(mod).float() * gamma)
        if getattr(norm, "bias", None) is not None:
            raise ValueError(f"{norm_name} has a bias: not an RMSNorm")
        norm.weight.data.fill_(0.0 if gemma else 1.0)  # now scales by exactly 1 (a zero γ would not divide out)


def _rotate_in(mod: nn.Module, r: torch.Tensor) -> None:
    set_weight(mod, get_weight(mod).double() @ r)


def _rotate_out(mod: nn.Module, r: torch.Tensor) -> None:
    set_weight(mod, r.t() @ get_weight(mod).double())
    if getattr(mod, "bias", None) is not None:
        mod.bias.data.copy_((mod.bias.data.double() @ r).to(mod.bias.dtype))


def _headwise(n_heads: int, h: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*[h] * n_heads)


def residual_linears(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(linears reading the residual stream, linears writing to it directly) of a rotatable model.

    Gemma's attention and MLP outputs reach the stream through a post-norm (rotated online), so
    it has no direct writers.
    """
    readers, writers = [], []
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        readers += [attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj]
        if not hasattr(layer, "post_feedforward_layernorm"):
            writers += [attn.o_proj, mlp.down_proj]
    return readers, writers


@torch.no_grad()
def rotate_residual(model: nn.Module, r: torch.Tensor) -> None:
    """Readers ``W <- W R``, writers ``W <- Rᵀ W`` (the norms must already be folded)."""
    r = r.double()
    readers, writers = residual_linears(model)
    for lin in readers:
        _rotate_in(lin, r)
    for lin in writers:
        _rotate_out(lin, r)


def sandwich_norms(model: nn.Module) -> bool:
    """Whether the layers write through scaled post-norms (Gemma 2/3)."""
    return any(hasattr(layer, "post_feedforward_layernorm") for layer in decoder_layers(model))


def _rotate_norm_outputs(model: nn.Module, adapter, r1: Rotation, r: torch.Tensor) -> None:
    """``online`` residual mode: the stream stays as it is; each pre-norm's output (its scale kept)
    is rotated online and the linears it feeds get ``W <- W R``."""
    for layer in decoder_layers(model):
        for norm_name, lin_names in adapter.norm_linear_pairs:
            for n in lin_names:
                _rotate_in(layer.get_submodule(n), r)
            parent, _, child = norm_name.rpartition(".")
            holder = layer.get_submodule(parent) if parent else layer
            setattr(holder, child, RotateOutput(getattr(holder, child), r1))


@torch.no_grad()
def rotate_model(model: nn.Module, r1: Rotation, *, seed: int, online_o: bool = True, online_down: bool = True,
                 qk: bool = True, v_heads: bool = True, residual: str = "fused") -> dict[str, Any]:
    """Rotate ``model`` in place (function unchanged up to float rounding); returns what was done.

    ``residual``: ``fused`` (QuaRot: norms folded, the residual stream rotated by ``R1``) or
    ``online`` (norms keep their scales; ``R1`` is applied online to each pre-norm's output, two
    transforms per layer). ``online`` is for norm scales of a wide range: folding Gemma 3's
    (0.16 to 234 at the attention input) moves that range behind the activation quantizer, which
    then sees the weightless norm's output, so its rounding noise is multiplied by up to 234.
    """
    check_rotatable(model)
    if residual not in ("fused", "online"):
        raise ValueError(f"residual {residual!r}: fused or online")
    adapter = adapter_for(model)
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    r = r1.dense().double()
    rot_o = Rotation.hadamard(heads * head_dim, seed + 1) if online_o else None
    rot_d = Rotation.hadamard(cfg.intermediate_size, seed + 2) if online_down else None
    rot_qk = Rotation.hadamard(head_dim, seed + 3) if qk else None
    h_v = Rotation.hadamard(head_dim, seed + 4).dense().double() if v_heads else None
    for layer in decoder_layers(model):
        if residual == "fused":
            _fold_norms(layer, adapter)
        attn, mlp = layer.self_attn, layer.mlp
        if h_v is not None:  # v -> v H per head; o_proj reads v H, so W_o <- W_o blockdiag(H)
            _rotate_out(attn.v_proj, _headwise(kv_heads, h_v))
            _rotate_in(attn.o_proj, _headwise(heads, h_v))
        if rot_o is not None:
            _rotate_in(attn.o_proj, rot_o.dense().double())
            attn.o_rotation = rot_o
        if rot_qk is not None:
            attn.qk_rotation = rot_qk
        use_rotated_attention(attn)
        if rot_d is not None:
            _rotate_in(mlp.down_proj, rot_d.dense().double())
            layer.mlp = RotatedMLP(mlp, rot_d)
        if residual == "fused" and hasattr(layer, "post_feedforward_layernorm"):  # Gemma: scaled post-norms
            layer.post_attention_layernorm = RotateOutput(layer.post_attention_layernorm, r1)
            layer.post_feedforward_layernorm = RotateOutput(layer.post_feedforward_layernorm, r1)
    if residual == "online":
        _rotate_norm_outputs(model, adapter, r1, r)
    else:
        rotate_residual(model, r)
        inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        inner.embed_tokens = RotateOutput(inner.embed_tokens, r1)
        inner.norm = RotateInput(inner.norm, r1)
    return {"residual": residual, "r1": r1.extra_repr(), "online_o_proj": online_o, "online_down_proj": online_down,
            "qk_rotation": qk, "v_head_rotation": v_heads, "head_dim": head_dim,
            "hadamard": {n: hadamard_plan(n).recipe + f" x {hadamard_plan(n).p}"
                         for n in sorted({cfg.hidden_size, cfg.intermediate_size, head_dim, heads * head_dim})}}
