"""The layer-wise calibration loop, written once for every calibration-based method.

GPTQ, SparseGPT, Wanda, AWQ and friends all follow the same sequence (IST-DASLab's
``opt_sequential``), which this module implements with a small adapter per architecture
instead of one copy of the loop per model family:

1. Run the model on the calibration batch and capture the hidden states entering the first
   decoder layer, and the other arguments (attention mask, position embeddings, ...) the model
   gives each layer: they may differ between layers (Gemma's sliding-window and global layers).
2. For each decoder layer in order, for each group of its linear layers (true-sequential
   order: q/k/v, then the attention output, then the MLP input(s), then the MLP output):
   hook the group's linears, run the layer on every calibration sample so each linear's
   ``LayerCompressor`` sees its inputs, then compress the group.
3. Run the now-compressed layer once more; its outputs are the next layer's inputs, so each
   layer is calibrated on the activations of the already-compressed layers before it.

A method provides a factory ``make(name, module) -> LayerCompressor`` with ``add_batch``
(stream one sample's inputs and outputs) and ``compress`` (act, return what it achieved).

:func:`sequential` gives every compressor exactly the calls of :func:`sequential_reference`
(the loop as first written: five full passes per layer with true-sequential groups) and leaves
every layer's output bit-identical, but skips work whose result is already known: a pass stops
once the group's linears have fired; a layer's attention/MLP block whose inputs and modules are
unchanged returns the output it stored last pass, or re-runs only its last linear when that is
all that changed; the last linear of a group is not run at all when its compressor reads
inputs only. :class:`SharedGram` lets Hessian-streaming compressors share one ``xᵀx`` between
linears fed the same tensor (q/k/v, gate/up) and halve wide ones (:func:`gram`). Measured with
``benchmark.py loop-bench``; :func:`loop_variant` switches any of this off.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from slimbench.modeling import LINEAR_TYPES


@dataclass(frozen=True)
class ArchAdapter:
    """Where an architecture keeps its decoder layers and how their linears are grouped."""

    name: str
    model_types: tuple[str, ...]
    layers_path: str  # dotted attribute path from the *ForCausalLM model to the ModuleList
    groups: tuple[tuple[str, ...], ...]  # true-sequential groups of linear names within a layer
    # (norm, linears it feeds): where per-channel scales can be folded (SmoothQuant, AWQ)
    norm_linear_pairs: tuple[tuple[str, tuple[str, ...]], ...] = field(default=())


LLAMA_LIKE = dict(
    layers_path="model.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)

ADAPTERS = (
    ArchAdapter(
        "llama",
        ("llama", "mistral", "qwen2", "qwen3"),
        **LLAMA_LIKE,
        norm_linear_pairs=(
            ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ),
    ),
    ArchAdapter(
        "gemma",
        ("gemma", "gemma2", "gemma3_text", "gemma3"),
        **LLAMA_LIKE,
        norm_linear_pairs=(
            ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ),
    ),
    ArchAdapter(
        "opt",
        ("opt",),
        layers_path="model.decoder.layers",
        groups=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
        norm_linear_pairs=(
            ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("final_layer_norm", ("fc1",)),
        ),
    ),
    ArchAdapter(
        "gpt2",
        ("gpt2",),
        layers_path="transformer.h",
        groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        norm_linear_pairs=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
    ),
)


def adapter_for(model: nn.Module) -> ArchAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for a in ADAPTERS:
        if model_type in a.model_types:
            return a
    known = sorted(t for a in ADAPTERS for t in a.model_types)
    raise ValueError(f"no layer-wise adapter for model_type {model_type!r}; supported: {', '.join(known)}")


def has_adapter(model: nn.Module) -> bool:
    try:
        adapter_for(model)
        return True
    except ValueError:
        return False


def get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return get_path(model, adapter_for(model).layers_path)


class LayerCompressor(Protocol):
    """Optionally ``needs_output = False`` (class attribute): add_batch never reads ``out``, so
    the loop may pass ``None`` and skip computing the output of a group's last linear."""

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor | None) -> None:
        """Inputs [tokens, in_features] and outputs [tokens, out_features] of one sample."""

    def compress(self) -> Any:
        """Compress the layer in place; return what was achieved (stored form, stats)."""


class _StopForward(Exception):
    pass


_VARIANT: ContextVar[dict[str, Any] | None] = ContextVar("slimbench_loop_variant", default=None)


def _variant() -> dict[str, Any]:
    return _VARIANT.get() or {}


@contextlib.contextmanager
def loop_variant(**settings: Any) -> Iterator[None]:
    """Run the loop differently inside the block, whichever method calls it (benchmarks, tests).

    ``reference=True``: :func:`sequential_reference`, no shared products and full Gram products,
    i.e. the loop as first written. ``memo``, ``early_stop``, ``share`` (SharedGram reuse),
    ``triangle`` (:func:`gram`'s half product): switch one shortcut off. ``stats``: a dict that
    :func:`sequential` fills with its counters.
    """
    allowed = {"reference", "memo", "early_stop", "share", "triangle", "stats"}
    if set(settings) - allowed:
        raise ValueError(f"unknown loop setting(s) {sorted(set(settings) - allowed)}; allowed: {sorted(allowed)}")
    token = _VARIANT.set({**_variant(), **settings})
    try:
        yield
    finally:
        _VARIANT.reset(token)


def _enabled(setting: str) -> bool:
    """A shortcut outside the loop itself (``share``, ``triangle``): off in the reference variant."""
    v = _variant()
    return v.get(setting, True) and not v.get("reference", False)


TRI_BLOCK = 256  # rows of xᵀ per block of the upper-triangular Gram product
_TRI_OK: dict[tuple, bool] = {}  # (shape, strides, dtype, device, threads) -> the blocks give the same bits


def gram(x: torch.Tensor, buffers: dict | None = None) -> tuple[torch.Tensor, bool]:
    """``(xᵀx, upper_only)`` for ``x`` [tokens, n].

    For wide ``x`` only the blocks of rows on and above the diagonal are multiplied, written in
    place into a zeroed buffer (about 0.55 of the full product's time at n = 1536, 1 thread):
    the result is exact on and above the diagonal and zero below (``upper_only``); a sum of such
    products is completed by :func:`symmetric_from_upper`. Whether the blocks give exactly the
    bits of the full product (and the full product is exactly symmetric) depends on how the BLAS
    orders its sums for each shape, so it is checked once per (shape, strides, dtype, device,
    threads) against the full product, and the blocks are used only where identical (with this
    machine's MKL they were, for every shape tried). ``buffers`` keeps the zeroed buffers.
    """
    n = x.shape[1]
    if n < 4 * TRI_BLOCK or not _enabled("triangle"):
        return x.t() @ x, False
    key = (tuple(x.shape), x.stride(), x.dtype, x.device, torch.get_num_threads())
    ok = _TRI_OK.get(key)
    if ok is None:
        full = x.t() @ x
        upper = _upper(x, torch.zeros(n, n, dtype=x.dtype, device=x.device))
        _TRI_OK[key] = (torch.equal(_bits(torch.triu(upper)), _bits(torch.triu(full)))
                        and torch.equal(_bits(full), _bits(full.t().contiguous())))
        return full, False
    if not ok:
        return x.t() @ x, False
    buffers = {} if buffers is None else buffers
    buf = buffers.get((n, x.dtype, x.device))
    if buf is None:  # zeroed once: only the upper blocks are ever written
        buf = buffers[(n, x.dtype, x.device)] = torch.zeros(n, n, dtype=x.dtype, device=x.device)
    return _upper(x, buf), True


def _upper(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    n, b = x.shape[1], TRI_BLOCK
    for i in range(0, n, b):  # rows i..i+b, columns i.. (the diagonal square included)
        torch.mm(x[:, i : i + b].t(), x[:, i:], out=out[i : i + b, i:])
    return out


def symmetric_from_upper(h: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is ``h``'s: bits copied."""
    upper = torch.ones(h.shape, dtype=torch.bool, device=h.device).triu()
    return torch.where(upper, h, h.t())


class SharedGram:
    """``x̃ᵀx̃`` with ``x̃ = x·scale``, computed once for successive linears fed the same input.

    q/k/v (and gate/up) receive one and the same normed tensor, so a Hessian-streaming
    compressor can reuse the product the previous linear computed: it is a pure function of
    (input bits, scale), so reusing it is bit-identical to recomputing it. The input is held
    until the next call, so its memory cannot be recycled under an equal ``data_ptr``.
    """

    def __init__(self) -> None:
        self.inp: torch.Tensor | None = None
        self.key: tuple = ()
        self.value: tuple[torch.Tensor, bool] | None = None
        self.buffers: dict = {}
        self.reused = 0

    def product(self, inp: torch.Tensor, scale: float) -> tuple[torch.Tensor, bool]:
        """:func:`gram` of ``inp·scale``: (product, upper_only). Add it to the running sum at
        once: the next call may overwrite it."""
        key = (inp.data_ptr(), inp.shape, inp.stride(), inp.dtype, inp.device, inp._version, scale)
        if self.inp is not None and key == self.key and _enabled("share"):
            self.reused += 1
            return self.value
        x = inp.float() * scale
        self.inp, self.key, self.value = inp, key, gram(x, self.buffers)
        return self.value


@dataclass
class LayerInputs:
    """What the calibration samples feed the decoder layers, as the model's own forward gives it.

    ``hidden[j]``: the hidden states entering layer 0 for sample ``j``. ``kwargs[j][i]``: every
    other argument layer ``i`` receives for sample ``j`` (attention mask, rotary position
    embeddings, position ids, ...), by name. Layers do not all get the same ones: Gemma 2/3
    alternate sliding-window layers (local rotary base, banded mask) with global layers (another
    rotary base, full causal mask), so each layer is calibrated with its own. Equal arguments are
    one and the same dict (every layer of Llama, OPT and GPT-2; every sample of one length).
    """

    hidden: list[torch.Tensor]
    kwargs: list[list[dict[str, Any]]]

    def for_layer(self, i: int) -> list[dict[str, Any]]:
        """Layer ``i``'s keyword arguments, one dict per sample."""
        return [per_layer[i] for per_layer in self.kwargs]


# Arguments never replayed: the loop runs each layer with no KV cache.
_CACHE_ARGS = ("past_key_values", "cache", "layer_past", "past_key_value")


def _by_name(layer: nn.Module, args: tuple, kw: dict) -> dict[str, Any]:
    """The call's arguments other than the hidden states, all by name (GPT-2's blocks get their
    mask positionally), without the cache, with ``use_cache=False``."""
    named = {k: v for k, v in kw.items() if k != "hidden_states"}
    if len(args) > 1:
        params = [p for p in inspect.signature(layer.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(params) < len(args) or any(p.kind is p.POSITIONAL_ONLY for p in params[1 : len(args)]):
            raise ValueError(f"{type(layer).__name__}.forward takes positional arguments the layer-wise loop "
                             "cannot pass by name")
        named = {**{p.name: a for p, a in zip(params[1:], args[1:], strict=False)}, **named}
    for k in _CACHE_ARGS:
        named.pop(k, None)
    named["use_cache"] = False
    return named


def _same_args(a: dict[str, Any], b: dict[str, Any]) -> bool:
    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    return sa == sb and len(la) == len(lb) and all(_same_leaf(x, y) for x, y in zip(la, lb, strict=True))


def _forward_capture(model: nn.Module, layers: nn.ModuleList, sample: torch.Tensor, device,
                     depth: int) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Forward one sample until layer ``depth - 1`` is entered: (hidden states entering layer 0,
    the arguments of layers ``0..depth-1``). The layers after it, and the head, never run."""
    hidden: list[torch.Tensor] = []
    got: dict[int, dict[str, Any]] = {}

    def pre_hook(i):
        def hook(module, args, kw):
            if i == 0:  # a copy if the layers run on: one of them might write it in place
                x = (args[0] if args else kw["hidden_states"]).detach()
                hidden.append(x.clone() if depth > 1 else x)
            got.setdefault(i, _by_name(module, args, kw))
            if len(got) == depth:
                raise _StopForward

        return hook

    handles = [layers[i].register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i in range(depth)]
    try:
        with contextlib.suppress(_StopForward):
            model(input_ids=sample.unsqueeze(0).to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if len(got) < depth or not hidden:
        missing = sorted(set(range(depth)) - set(got))
        raise ValueError(f"the model's forward never ran decoder layer(s) {missing}; the layer-wise loop "
                         "calibrates every layer of the adapter's layer list")
    return hidden[0], [got[i] for i in range(depth)]


def _shared(per_layer: list[dict[str, Any]], seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each layer's arguments, replaced by an equal dict already in ``seen`` where there is one."""
    out = []
    for kw in per_layer:
        same = next((s for s in seen if s is kw or _same_args(s, kw)), None)
        if same is None:
            seen.append(kw)
            same = kw
        out.append(same)
    return out


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, calib: torch.Tensor, device) -> LayerInputs:
    """Hidden states entering layer 0 for each calibration sample, and every layer's arguments.

    The first sample runs through the whole stack (up to the last layer's entry) to record what
    the model gives each layer; each other sample runs only up to layer 0. A sample whose layer-0
    arguments differ from the first's (another length, a padding mask) gets its own full capture:
    what a layer is given depends on the token ids and positions, never on the hidden states (the
    loop replays it on compressed activations), so equal layer-0 arguments mean equal ones for
    every layer.
    """
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict[str, Any]]] = []
    seen: list[dict[str, Any]] = []
    for j, sample in enumerate(calib):
        x, first = _forward_capture(model, layers, sample, device, len(layers) if j == 0 else 1)
        hidden.append(x)
        if j > 0 and _same_args(first[0], kwargs[0][0]):
            kwargs.append(kwargs[0])
            continue
        if len(first) < len(layers):
            first = _forward_capture(model, layers, sample, device, len(layers))[1]
        kwargs.append(_shared(first, seen))
    return LayerInputs(hidden, kwargs)


def run_layer(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _as_tokens(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


@torch.no_grad()
def sequential_reference(
    model: nn.Module,
    calib: torch.Tensor,
    make: Callable[[str, nn.Module], LayerCompressor],
    *,
    true_sequential: bool = True,
    device: torch.device | str = "cpu",
    progress: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """The loop as first written: every pass runs the whole layer on every sample.

    Kept as the definition :func:`sequential` must reproduce bit for bit (tests, loop-bench).
    """
    adapter = adapter_for(model)
    layers = get_path(model, adapter.layers_path)
    captured = capture_layer_inputs(model, layers, calib, device)
    inps = captured.hidden
    results: dict[str, Any] = {}
    bar = progress(total=len(layers), desc="layers", unit="layer") if progress else None
    for i, layer in enumerate(layers):
        prefix = f"{adapter.layers_path}.{i}."
        kwargs = captured.for_layer(i)
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, LINEAR_TYPES)}
        groups = adapter.groups if true_sequential else (tuple(linears),)
        missing = {n for g in groups for n in g} - set(linears)
        if missing:
            raise ValueError(f"layer {i}: adapter {adapter.name} names linears {sorted(missing)} the layer lacks")
        for group in groups:
            comps = {n: make(prefix + n, linears[n]) for n in group}
            handles = [
                linears[n].register_forward_hook(
                    lambda mod, args, out, c=comps[n]: c.add_batch(_as_tokens(args[0]), _as_tokens(out))
                )
                for n in group
            ]
            try:
                for x, kw in zip(inps, kwargs, strict=True):
                    run_layer(layer, x, kw)
            finally:
                for h in handles:
                    h.remove()
            for n, comp in comps.items():
                results[prefix + n] = comp.compress()
        inps = [run_layer(layer, x, kw) for x, kw in zip(inps, kwargs, strict=True)]  # feeds the next layer
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return results


# -- the fast loop ---------------------------------------------------------------------------
# ``sequential`` must give every compressor exactly the calls ``sequential_reference`` gives it
# (same samples, same order, bit-identical tensors) and leave the layers' outputs bit-identical;
# it only skips work whose result is already known. Three mechanisms, all generic (a probe
# forward of one sample per layer learns the structure they rely on: the order the linears run
# in, that each runs once, and which linear's output each block returns):
#
# * early stop: a pass ends once every hooked linear of the group has fired for the sample
#   (a private exception from the last hook), unless that linear is the last op of its block
#   and the block returns a tuple (o_proj): then the block returns first, so its output can be
#   memoised.
# * skip the last linear: when the group's last linear's compressor declares
#   ``needs_output = False`` (GPTQ), its inputs are taken by a pre-hook and it never runs; if
#   it is its block's last op (down_proj), the block's inputs and that linear's input are kept.
# * block memo: a layer's direct children that hold linears ("blocks": attention, MLP, or bare
#   linears as in OPT) remember, per sample, their inputs and output. Next pass, a block whose
#   inputs are bit-identical and whose modules are unchanged returns the stored output; if only
#   its last linear changed (compressed since), only that linear is re-run on its stored input.
#   Modules are compared by identity and parameter/buffer bits, so a compressor that changes
#   anything (a weight, a norm it folded scales into, a replaced module) invalidates the memo.
#
# Batching the samples into one forward was measured (smollm2-135m, 512 tokens, 1 thread, CPU
# time): no gain (50 ms per sample one at a time, 54 ms in batches of 8), so samples still run
# one at a time, which also keeps every GEMM's row count what the reference loop used.

MEMO_BYTES = 4 * 2**30  # default cap on what the block memo holds (per decoder layer)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor reinterpreted as integers, so equality is bitwise (-0.0 != 0.0, NaN == NaN)."""
    if t.is_floating_point() or t.is_complex():
        return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, with the same dtype, shape, strides and device."""
    if a is b:
        return True
    return (a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and a.device == b.device
            and torch.equal(_bits(a), _bits(b)))


def _same_leaf(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and same_tensor(a, b)
    if a is b:
        return True
    return type(a) is type(b) and isinstance(a, (bool, int, float, str)) and a == b


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + ".")


class _Tracker:
    """Generation numbers of a block's submodules: bumped whenever one is replaced or its
    parameters/buffers change bits (compressors write weights in place through ``.data``,
    which leaves ``_version`` alone, so values are compared, once per pass)."""

    def __init__(self) -> None:
        self.snap: dict[str, tuple[nn.Module, Any, list[torch.Tensor]]] = {}
        self.gen: dict[str, int] = {}

    def update(self, block: nn.Module) -> dict[str, int]:
        current = dict(block.named_modules())
        for path, mod in current.items():
            own = [t.detach() for t in (*mod.parameters(recurse=False), *mod.buffers(recurse=False))]
            fwd = mod.__dict__.get("forward")
            old = self.snap.get(path)
            same = (old is not None and old[0] is mod and old[1] is fwd and len(old[2]) == len(own)
                    and all(same_tensor(a, b) for a, b in zip(old[2], own, strict=True)))
            if not same:
                self.gen[path] = self.gen.get(path, 0) + 1
                self.snap[path] = (mod, fwd, [t.clone() for t in own])
        for path in set(self.snap) - set(current):
            del self.snap[path]
            self.gen[path] += 1
        return {p: self.gen[p] for p in current}


@dataclass
class _Entry:
    """One block call of one sample: its inputs, output and (if any) its last linear's input."""

    leaves: list[Any]
    spec: Any
    out: Any
    gens: dict[str, int]
    tail_input: torch.Tensor | None
    tail_pos: int | None  # None: the output is the tail linear's output; 0: output[0] is
    versions: list[tuple[torch.Tensor, int]]
    nbytes: int

    def fresh(self) -> bool:
        """Nothing held was modified in place since it was stored."""
        return all(t._version == v for t, v in self.versions)


class _LayerRunner:
    """Runs one decoder layer over the calibration samples, pass after pass, skipping known work."""

    def __init__(self, layer: nn.Module, kwargs: list[dict], *, memo: bool, early_stop: bool, memo_bytes: int,
                 stats: dict[str, int]):
        self.layer, self.kwargs, self.memo, self.early_stop = layer, kwargs, memo, early_stop
        self.memo_bytes, self.stats = memo_bytes, stats
        self.blocks = {n: m for n, m in layer.named_children() if any(isinstance(x, LINEAR_TYPES) for x in m.modules())}
        self.shared = {id(t) for t in _tensors(kwargs)}  # the layer's kwargs (per sample): held by the caller
        self.trackers = {n: _Tracker() for n in self.blocks}
        self.entries: dict[tuple[str, int, int], _Entry] = {}
        self.bytes = 0
        self.tails: dict[str, str] = {}
        self.tail_pos: dict[str, int | None] = {}
        self.order: list[str] = []  # the layer's linears in the order they first run
        self.current: dict[str, tuple] = {}  # block -> (key, args, kwargs) of the call under way
        self.once = False  # every linear runs exactly once per forward: early stop is safe
        self.now: dict[str, dict[str, int]] = {}
        self.hooked: dict[str, set[str]] = {}
        self.record: dict[str, bool] = {}
        self.calls: dict[str, int] = {}
        self.last: dict[str, tuple[str, Any, Any] | None] = {}
        self.sample, self.stop_pending, self.probing = 0, False, False
        self.wrapped: dict[str, tuple[nn.Module, bool, Any]] = {}
        for name, block in self.blocks.items():
            had = "forward" in block.__dict__
            orig = block.forward
            block.forward = self._wrapper(name, orig)
            self.wrapped[name] = (block, had, orig)

    def close(self) -> None:
        for block, had, orig in self.wrapped.values():
            if had:
                block.forward = orig
            else:
                del block.forward
        self.entries.clear()

    # -- where a linear of the layer lives ----------------------------------------------------
    def locate(self, name: str) -> tuple[str, str]:
        """(block, path inside the block) of a linear named relative to the layer."""
        for b in self.blocks:
            if _under(name, b):
                return b, name[len(b) + 1 :]
        raise ValueError(f"linear {name} is in no block of the layer")

    def _watch_hooks(self) -> list:
        handles = []
        for b in self.blocks:
            block = self.layer.get_submodule(b)
            for rel, mod in block.named_modules():
                if isinstance(mod, LINEAR_TYPES):
                    handles.append(mod.register_forward_hook(
                        lambda m, args, out, b=b, rel=rel: self.last.__setitem__(
                            b, (rel, args[0] if len(args) == 1 else None, out))))
        return handles

    # -- the block wrapper ---------------------------------------------------------------------
    def _wrapper(self, name: str, orig: Callable) -> Callable:
        def forward(*args, **kwargs):
            return self._call(name, orig, args, kwargs)

        return forward

    def _call(self, name: str, orig: Callable, args: tuple, kwargs: dict) -> Any:
        k = self.calls.get(name, 0)
        self.calls[name] = k + 1
        key = (name, self.sample, k)
        out = None
        entry = self.entries.get(key) if self.memo else None
        if entry is not None:
            out = self._reuse(key, entry, args, kwargs)
        if out is None:
            self.last[name] = None
            self.current[name] = (key, args, kwargs)
            out = orig(*args, **kwargs)
            if self.probing:
                self._learn_tail(name, out)
            elif self.memo and self.record[name]:
                self._store(key, args, kwargs, out)
        if self.stop_pending:
            raise _StopForward
        return out

    def _learn_tail(self, name: str, out: Any) -> None:
        last = self.last.get(name)
        pos = _tail_pos(out, last[2]) if last is not None and last[1] is not None else False
        if pos is not False:
            self.tails[name], self.tail_pos[name] = last[0], pos

    def _changed(self, name: str, gens: dict[str, int]) -> set[str]:
        now = self.now[name]
        return {p for p in gens.keys() | now.keys() if gens.get(p) != now.get(p)}

    def _reuse(self, key: tuple[str, int, int], e: _Entry, args: tuple, kwargs: dict) -> Any:
        name = key[0]
        leaves, spec = tree_flatten((args, kwargs))
        if not (e.fresh() and spec == e.spec and len(leaves) == len(e.leaves)
                and all(_same_leaf(a, b) for a, b in zip(leaves, e.leaves, strict=True))):
            self._drop(key)
            return None
        changed, hooked, tail = self._changed(name, e.gens), self.hooked[name], self.tails.get(name)
        if not changed and not hooked and e.out is not None:
            self.stats["memo_hits"] += 1
            return e.out
        if (tail is not None and e.tail_input is not None and all(_under(p, tail) for p in changed)
                and hooked <= {tail}):
            self.current[name] = (key, args, kwargs)
            new = self.layer.get_submodule(name).get_submodule(tail)(e.tail_input)
            out = new if e.tail_pos is None else (new, *e.out[1:])
            self.stats["tail_replays"] += 1
            if self.record[name]:
                self._store(key, args, kwargs, out, tail=(e.tail_input, e.tail_pos))
            return out
        return None

    def _store(self, key: tuple[str, int, int], args: tuple, kwargs: dict, out: Any,
               tail: tuple[torch.Tensor, int | None] | None = None) -> None:
        name = key[0]
        if tail is None:
            last, t = self.last.get(name), self.tails.get(name)
            if last is not None and last[0] == t and last[1] is not None:
                pos = _tail_pos(out, last[2])
                tail = None if pos is False else (last[1], pos)
        leaves, spec = tree_flatten((args, kwargs))
        held = {id(x): x for x in (*_tensors(leaves), *_tensors(out), *([tail[0]] if tail else []))}
        nbytes = sum(x.numel() * x.element_size() for i, x in held.items() if i not in self.shared)
        self._drop(key)
        if self.bytes + nbytes > self.memo_bytes:
            self.stats["memo_full"] += 1
            return
        self.entries[key] = _Entry(leaves, spec, out, self.now[name], tail[0] if tail else None,
                                   tail[1] if tail else None, [(x, x._version) for x in held.values()], nbytes)
        self.bytes += nbytes

    def store_partial(self, name: str, tail_input: torch.Tensor) -> None:
        """The block's call under way stops before its last linear runs (its output is not
        needed now): keep its inputs and that linear's input, enough to replay it next pass."""
        key, args, kwargs = self.current[name]
        self._store(key, args, kwargs, None, tail=(tail_input, None))

    def _drop(self, key: tuple[str, int, int]) -> None:
        e = self.entries.pop(key, None)
        if e is not None:
            self.bytes -= e.nbytes

    # -- passes --------------------------------------------------------------------------------
    def probe(self, x: torch.Tensor) -> None:
        """One plain forward of a sample to learn each block's last linear and whether every
        linear runs exactly once (early stop would otherwise drop a second call's inputs)."""
        counts: dict[str, int] = {}
        handles = self._watch_hooks()
        for name, mod in self.layer.named_modules():
            if isinstance(mod, LINEAR_TYPES):
                handles.append(mod.register_forward_hook(
                    lambda m, a, o, name=name: counts.__setitem__(name, counts.get(name, 0) + 1)))
        handles += [mod.register_forward_pre_hook(lambda m, a, name=name: self.order.append(name))
                    for name, mod in self.layer.named_modules() if isinstance(mod, LINEAR_TYPES)]
        self.probing, self.calls, self.order = True, {}, []
        try:
            run_layer(self.layer, x, self.kwargs[0])
        finally:
            self.probing = False
            for h in handles:
                h.remove()
        linears = [n for n, m in self.layer.named_modules() if isinstance(m, LINEAR_TYPES)]
        self.once = all(counts.get(n) == 1 for n in linears)

    def _skippable(self, group: dict[str, nn.Module], needs_output: Callable[[str], bool],
                   tail_of: dict[str, tuple[str, int | None]]) -> str | None:
        """The group's linear that runs last, if its output need not be computed at all: its
        compressor does not read outputs, and it is not the last op of a block whose output is
        a tuple (that block must return, so its other outputs can be memoised)."""
        last = [n for n in self.order if n in group]
        if not group or len(last) != len(group):
            return None
        n = last[-1]
        if needs_output(n) or (n in tail_of and tail_of[n][1] is not None):
            return None
        return n

    def run(self, inps: list[torch.Tensor], group: dict[str, nn.Module] | None = None,
            add: Callable[[str, torch.Tensor, torch.Tensor | None], None] | None = None,
            needs_output: Callable[[str], bool] = lambda n: True) -> list[torch.Tensor]:
        """One pass over every sample. With a group: feed its linears' inputs/outputs to ``add``
        (early stop allowed); without: the final pass, returning the layer's outputs."""
        group = group or {}
        self._begin(group)
        fired: set[str] = set()
        stop = self.early_stop and self.once
        tail_of = {n: (b, self.tail_pos.get(b)) for n in group for b, rel in [self.locate(n)]
                   if rel and self.tails.get(b) == rel}
        skip = self._skippable(group, needs_output, tail_of) if stop else None

        def hook(mod, args, out, n):
            add(n, _as_tokens(args[0]), _as_tokens(out))
            fired.add(n)
            if stop and len(fired) == len(group):
                self.stats["early_stops"] += 1
                if n not in tail_of:
                    raise _StopForward
                self.stop_pending = True  # let the block return first: its output is memoised

        def pre_hook(mod, args, n):  # the last linear, whose output nothing needs: never run it
            add(n, _as_tokens(args[0]), None)
            fired.add(n)
            if len(fired) == len(group):
                self.stats["early_stops"] += 1
                self.stats["skipped_linears"] += 1
                if n in tail_of and self.memo and self.record[tail_of[n][0]]:
                    self.store_partial(tail_of[n][0], args[0])
                raise _StopForward

        handles = self._watch_hooks() if self.memo else []
        handles += [m.register_forward_pre_hook(lambda mod, a, n=n: pre_hook(mod, a, n)) if n == skip
                    else m.register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n)) for n, m in group.items()]
        outs = []
        try:
            for j, x in enumerate(inps):
                self.sample, self.calls, self.stop_pending = j, {}, False
                fired.clear()
                try:
                    y = run_layer(self.layer, x, self.kwargs[j])
                except _StopForward:
                    y = None
                if not group:
                    outs.append(y)
        finally:
            for h in handles:
                h.remove()
        return outs

    def _begin(self, group: dict[str, nn.Module]) -> None:
        """Per pass: which modules changed, which blocks are hooked, what is worth storing."""
        for name in self.blocks:
            if self.layer.get_submodule(name) is not self.blocks[name]:
                self.now[name] = {}  # replaced: its wrapper is gone, nothing to memoise
                continue
            self.now[name] = self.trackers[name].update(self.blocks[name])
        located = [self.locate(n) for n in group]
        for name in self.blocks:
            self.hooked[name] = {rel for b, rel in located if b == name}
            tail = self.tails.get(name)
            # Store only what the next pass can use: a block the group leaves alone, or whose
            # only linear compressed after this pass is its last one.
            self.record[name] = bool(group) and (not self.hooked[name] or self.hooked[name] == {tail})
        for key in list(self.entries):
            changed, tail = self._changed(key[0], self.entries[key].gens), self.tails.get(key[0])
            if changed and (tail is None or not all(_under(p, tail) for p in changed)):
                self._drop(key)


def _tail_pos(out: Any, tail_out: Any) -> int | bool | None:
    """Where a block's output is its last linear's output: None (itself), 0 (first of a
    tuple), or False (elsewhere / not at all)."""
    if out is tail_out:
        return None
    if type(out) is tuple and out and out[0] is tail_out:
        return 0
    return False


@torch.no_grad()
def sequential(
    model: nn.Module,
    calib: torch.Tensor,
    make: Callable[[str, nn.Module], LayerCompressor],
    *,
    true_sequential: bool = True,
    device: torch.device | str = "cpu",
    progress: Callable[..., Any] | None = None,
    memo: bool = True,
    early_stop: bool = True,
    memo_bytes: int = MEMO_BYTES,
    stats: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Run the loop; returns ``{full linear name: what its compressor's compress() returned}``.

    Same calls to every compressor and same layer outputs, bit for bit, as
    :func:`sequential_reference`; ``memo``/``early_stop`` only switch the shortcuts off (for
    measuring them). ``memo_bytes`` caps what one layer's memo holds. ``stats``, if given, is
    filled with counters (memo hits, tail replays, early stops, ...).
    """
    variant = _variant()
    if variant.get("reference"):
        return sequential_reference(model, calib, make, true_sequential=true_sequential, device=device,
                                    progress=progress)
    memo, early_stop = variant.get("memo", memo), variant.get("early_stop", early_stop)
    stats = variant.get("stats", stats)
    adapter = adapter_for(model)
    layers = get_path(model, adapter.layers_path)
    captured = capture_layer_inputs(model, layers, calib, device)
    inps = captured.hidden
    results: dict[str, Any] = {}
    counters = {"memo_hits": 0, "tail_replays": 0, "early_stops": 0, "skipped_linears": 0, "memo_full": 0}
    bar = progress(total=len(layers), desc="layers", unit="layer") if progress else None
    for i, layer in enumerate(layers):
        prefix = f"{adapter.layers_path}.{i}."
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, LINEAR_TYPES)}
        groups = adapter.groups if true_sequential else (tuple(linears),)
        missing = {n for g in groups for n in g} - set(linears)
        if missing:
            raise ValueError(f"layer {i}: adapter {adapter.name} names linears {sorted(missing)} the layer lacks")
        runner = _LayerRunner(layer, captured.for_layer(i), memo=memo, early_stop=early_stop, memo_bytes=memo_bytes,
                              stats=counters)
        try:
            if inps and (memo or early_stop):
                runner.probe(inps[0])
            for group in groups:
                comps = {n: make(prefix + n, linears[n]) for n in group}
                runner.run(inps, {n: linears[n] for n in group}, lambda n, x, y, c=comps: c[n].add_batch(x, y),
                           lambda n, c=comps: getattr(c[n], "needs_output", True))
                for n, comp in comps.items():
                    results[prefix + n] = comp.compress()
            inps = runner.run(inps)  # the compressed layer feeds the next
        finally:
            runner.close()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if stats is not None:
        stats.update(counters)
    return results
