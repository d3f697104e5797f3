"""A real low-bit weight format: packed codes + scales (+ zero-points) held as the checkpoint.

``PackedLinear`` is a :class:`slimbench.modeling.CompressedLinear` whose registered buffers are
the stored form of the weight, so ``state_dict()`` *is* the compressed checkpoint. Which buffers
it holds depends on the kernel that executes it (chosen from what torch's CPU build provides):

- ``int8pack``: 8-bit, symmetric, per output channel -> ``torch.ops.aten._weight_int8pack_mm``.
  Buffers: ``qweight`` int8 ``[out, in]``, ``scales`` fp16 ``[out, 1]``.
- ``int4pack``: 4-bit, grouped (32/64/128/256), out divisible by 16, in a multiple of the
  group -> ``torch.ops.aten._weight_int4pack_mm_for_cpu``. Buffers: ``qweight`` in the kernel's
  own (blocked) uint8 layout ``[out, in/2]`` (so memory holds the packed codes once),
  ``scales`` fp16 ``[out, groups]`` and ``qzeros`` (integer zero-points, bit-packed).
- ``dequant``: anything else (3 bits, act-order groups, per-channel int4, ...): ``qweight`` is
  bit-packed (:func:`grid.pack_bits`) and the float weight is rebuilt on every forward. Memory
  really is smaller, compute is a dense fp32 matmul.

Both kernels are fast in this torch build only with bf16 activations (measured on this
2-core AVX-512 CPU, 1536x576 weight: int4 bf16 37 us vs fp32 772 us per decode token; the fp32
paths are 10-100x slower than a dense fp32 matmul), so the kernel paths cast the activations to
bf16 and the output back: numerically that is one bf16 rounding of the inputs and outputs.

The int4 kernel computes ``w = (q - 8) * scale + zero_f``; our grid stores ``w = scale * (q - z)``,
so ``zero_f = scale * (8 - z)`` (checked by experiment on this build and by the tests).
"""

from __future__ import annotations

import json
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors import safe_open
from safetensors.torch import save_file
from slimbench.methods.quantization.grid import SCALE_DTYPE, QuantParams, pack_bits, stored_form, unpack_bits
from torch import nn

from slimbench.config import Config
from slimbench.modeling import CompressedLinear, set_weight, unique_tensors

KERNEL_DTYPE = torch.bfloat16
INT4_GROUPS = (32, 64, 128, 256)


def choose_kernel(bits: int, group_size: int | None, symmetric: bool, shape: tuple[int, int], g_idx: bool) -> str:
    """The fastest real kernel that can execute this layout, else ``dequant``."""
    out_f, in_f = shape
    if g_idx:  # act-order groups are scattered over the input channels: no kernel takes that
        return "dequant"
    if bits == 8 and symmetric and group_size is None:
        return "int8pack"
    if bits == 4 and group_size in INT4_GROUPS and in_f % group_size == 0 and out_f % 16 == 0:
        return "int4pack"
    return "dequant"


class PackedLinear(CompressedLinear):
    """A linear layer stored as packed integer codes; see the module docstring for layouts."""

    def __init__(self, meta: dict[str, Any]):
        super().__init__()
        self.meta = dict(meta)
        self.in_features, self.out_features = meta["in_features"], meta["out_features"]
        self.bits, self.group_size, self.symmetric = meta["bits"], meta["group_size"], meta["symmetric"]
        self.kernel = meta["kernel"]
        groups = 1 if self.group_size is None else self.in_features // self.group_size
        if meta.get("g_idx"):
            groups = meta["groups"]
        n = self.out_features * self.in_features
        if self.kernel == "int8pack":
            self.register_buffer("qweight", torch.zeros(self.out_features, self.in_features, dtype=torch.int8))
        elif self.kernel == "int4pack":
            self.register_buffer("qweight", torch.zeros(self.out_features, self.in_features // 2, dtype=torch.uint8))
        else:
            self.register_buffer("qweight", torch.zeros((n * self.bits + 7) // 8, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(self.out_features, groups, dtype=SCALE_DTYPE))
        if not self.symmetric:
            nz = (self.out_features * groups * self.bits + 7) // 8
            self.register_buffer("qzeros", torch.zeros(nz, dtype=torch.uint8))
        if meta.get("g_idx"):
            self.register_buffer("g_idx", torch.zeros(self.in_features, dtype=torch.int16))
        if meta.get("bias"):
            self.register_buffer("bias", torch.zeros(self.out_features))
        else:
            self.bias = None
        self._derived: dict[str, torch.Tensor] | None = None  # kernel-side scales, rebuilt after load

    # -- building ------------------------------------------------------------------------
    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, params: QuantParams, group_size: int | None, bias: torch.Tensor | None,
        g_idx: torch.Tensor | None = None,
    ) -> PackedLinear:
        """codes [out, in] on grid ``params`` (scale/zero [out, groups]); g_idx maps column -> group."""
        out_f, in_f = codes.shape
        scale = params.scale.reshape(out_f, -1)
        kernel = choose_kernel(params.bits, group_size, params.symmetric, (out_f, in_f), g_idx is not None)
        meta = {
            "in_features": in_f, "out_features": out_f, "bits": params.bits, "group_size": group_size,
            "symmetric": params.symmetric, "kernel": kernel, "bias": bias is not None,
            "g_idx": g_idx is not None, "groups": scale.shape[1],
        }
        layer = cls(meta)
        layer.scales.copy_(scale.to(SCALE_DTYPE))
        if not params.symmetric:
            layer.qzeros.copy_(pack_bits(params.zero.reshape(-1), params.bits))
        if g_idx is not None:
            layer.g_idx.copy_(g_idx.to(torch.int16))
        if bias is not None:
            layer.bias.copy_(bias.float())
        if kernel == "int8pack":  # symmetric zero is 128: int8 code = q - 128
            layer.qweight.copy_((codes.to(torch.int16) - 128).to(torch.int8))
        elif kernel == "int4pack":
            layer.qweight.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1))
        else:
            layer.qweight.copy_(pack_bits(codes, params.bits))
        return layer

    # -- the artifact cache: the layout is ``meta``, the tensors are the buffers ----------------
    def artifact_spec(self) -> dict[str, Any]:
        return dict(self.meta)

    @classmethod
    def from_artifact_spec(cls, spec: dict[str, Any]) -> PackedLinear:
        return cls(spec)

    def _load_from_state_dict(self, *args, **kwargs):
        self._derived = None  # scales changed: the kernel's view of them must be rebuilt
        super()._load_from_state_dict(*args, **kwargs)

    # -- reading the stored form -----------------------------------------------------------
    def zeros(self) -> torch.Tensor:
        """Integer zero-points [out, groups] (symmetric: the grid's fixed mid-point)."""
        if self.symmetric:
            return torch.full(self.scales.shape, float(2 ** (self.bits - 1)))
        return unpack_bits(self.qzeros, self.bits, self.scales.numel()).float().view(self.scales.shape)

    def codes(self) -> torch.Tensor:
        """Unsigned integer codes [out, in] (uint8), decoded from whichever layout is stored."""
        if self.kernel == "int8pack":
            return (self.qweight.to(torch.int16) + 128).to(torch.uint8)
        if self.kernel == "int4pack":
            # Run the kernel on the identity with scale 1 and zero 8: w = (q - 8) + 8 = q exactly
            # (small integers are exact in bf16), so the kernel itself decodes its layout.
            groups = self.in_features // self.group_size
            sz = torch.stack([torch.ones(groups, self.out_features), torch.full((groups, self.out_features), 8.0)], -1)
            eye = torch.eye(self.in_features, dtype=KERNEL_DTYPE)
            q = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qweight, self.group_size, sz.to(KERNEL_DTYPE))
            return q.t().round().to(torch.uint8)
        n = self.out_features * self.in_features
        return unpack_bits(self.qweight, self.bits, n).view(self.out_features, self.in_features)

    def _column_groups(self) -> torch.Tensor:
        if "g_idx" in self._buffers:
            return self.g_idx.long()
        if self.group_size is None:
            return torch.zeros(self.in_features, dtype=torch.long)
        return torch.arange(self.in_features) // self.group_size

    def dequantized_weight(self) -> torch.Tensor:
        cols = self._column_groups()
        scale, zero = self.scales.float()[:, cols], self.zeros()[:, cols]
        return scale * (self.codes().float() - zero)

    def weight_storage(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self._buffers.items() if k != "bias" and v is not None}

    # -- execution ------------------------------------------------------------------------
    def _kernel_inputs(self) -> dict[str, torch.Tensor]:
        if self._derived is None:
            s = self.scales.float()
            if self.kernel == "int8pack":
                self._derived = {"scales": s[:, 0].to(KERNEL_DTYPE).contiguous()}
            elif self.kernel == "int4pack":
                zero_f = s * (8.0 - self.zeros())  # see the module docstring
                sz = torch.stack([s.t(), zero_f.t()], -1).to(KERNEL_DTYPE).contiguous()
                self._derived = {"scale_and_zeros": sz}
            else:
                self._derived = {}
        return self._derived

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        d = self._kernel_inputs()
        if self.kernel == "int8pack":
            y = torch.ops.aten._weight_int8pack_mm(x2.to(KERNEL_DTYPE), self.qweight, d["scales"]).to(x.dtype)
        elif self.kernel == "int4pack":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(KERNEL_DTYPE), self.qweight, self.group_size, d["scale_and_zeros"]
            ).to(x.dtype)
        else:
            y = F.linear(x2, self.dequantized_weight().to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        shape = f"in={self.in_features}, out={self.out_features}"
        return f"{shape}, bits={self.bits}, group={self.group_size}, kernel={self.kernel}"


# -- model-level helpers ---------------------------------------------------------------------
def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def linear_bias(mod: nn.Module) -> torch.Tensor | None:
    b = getattr(mod, "bias", None)
    return None if b is None else b.data


def packed_layout(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{module name: meta} of every PackedLinear: what a loader needs to rebuild the structure."""
    return {n: m.meta for n, m in model.named_modules() if isinstance(m, PackedLinear)}


def kernel_counts(model: nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, PackedLinear):
            counts[m.kernel] = counts.get(m.kernel, 0) + 1
    return counts


def save_packed(model: nn.Module, path: str) -> None:
    """Save the model's tensors (tied ones once) with the packed layout in the header."""
    tensors = {k: v.detach().contiguous() for k, v in unique_tensors(model).items()}
    save_file(tensors, path, metadata={"slimbench_packed_layout": json.dumps(packed_layout(model))})


def load_packed(model: nn.Module, path: str) -> nn.Module:
    """Rebuild the PackedLinear structure recorded in ``path`` inside ``model`` and load it."""
    with safe_open(path, framework="pt") as f:
        layout = json.loads(f.metadata()["slimbench_packed_layout"])
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    for name, meta in layout.items():
        replace_module(model, name, PackedLinear(meta))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise KeyError(f"checkpoint tensors the model does not have: {unexpected[:3]}")
    # Tied weights were saved once: a missing key is fine only if it aliases a loaded tensor.
    current = model.state_dict()
    loaded = {current[k].untyped_storage().data_ptr() for k in state}
    really_missing = [k for k in missing if current[k].untyped_storage().data_ptr() not in loaded]
    if really_missing:
        raise KeyError(f"checkpoint lacks tensors: {really_missing[:3]}")
    return model


def pack_linear(model: nn.Module, name: str, codes: torch.Tensor, params: QuantParams, group_size: int | None,
                g_idx: torch.Tensor | None = None) -> PackedLinear:
    """Replace linear ``name`` by a PackedLinear holding ``codes`` on grid ``params``."""
    mod = model.get_submodule(name)
    layer = PackedLinear.from_codes(codes, params, group_size, linear_bias(mod), g_idx)
    replace_module(model, name, layer)
    return layer


def finish_layer(model: nn.Module, name: str, codes: torch.Tensor, params: QuantParams, group_size: int | None,
                 fmt: str, g_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor] | None:
    """Commit one quantized layer in the requested format.

    ``fake``: write the dequantized weight into the dense layer and return the stored form the
    harness counts. ``packed``: replace the layer by a PackedLinear (its buffers are the stored
    form, so nothing is returned).
    """
    if fmt == "packed":
        pack_linear(model, name, codes, params, group_size, g_idx)
        return None
    mod = model.get_submodule(name)
    cols = torch.arange(codes.shape[1]) if g_idx is None else g_idx.long()
    if g_idx is None and group_size is not None:
        cols = cols // group_size
    elif g_idx is None:
        cols = torch.zeros_like(cols)
    scale, zero = params.scale.reshape(codes.shape[0], -1), params.zero.reshape(codes.shape[0], -1)
    set_weight(mod, scale[:, cols] * (codes.float() - zero[:, cols]))
    stored = stored_form(codes, QuantParams(scale, zero, params.bits, params.symmetric))
    if g_idx is not None:
        stored["g_idx"] = g_idx.to(torch.int16)
    return stored


def format_report(model: nn.Module, fmt: str) -> tuple[str, list[str], dict[str, Any]]:
    """(execution, notes, details) for a quantizer that ran in format ``fmt``."""
    if fmt == "fake":
        return "simulated", ["fake-quant: dequantized weights in a dense fp32 model"], {"format": "fake"}
    counts = kernel_counts(model)
    notes = [f"packed weights; kernels: {counts}"]
    if counts.get("dequant"):
        notes.append(f"{counts['dequant']} layers have no real low-bit kernel here: dequantized on the fly "
                     "(memory is really smaller, compute is dense fp32)")
    if counts.get("int8pack") or counts.get("int4pack"):
        notes.append("kernel layers run with bf16 activations (the kernels' fast path on CPU)")
    return "native", notes, {"format": "packed", "kernels": counts}


class FormatConfig(Config):
    """The ``format`` option weight quantizers share."""

    format: Literal["fake", "packed"] = Field(
        "fake", description="fake: dequantized dense weights (simulated); packed: PackedLinear with real kernels"
    )
