"""The fast loop's memory of each block's calls: what it reuses, replays or skips."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from slimbench.layerwise.bits import same_leaf, same_tensor, tensors_in
from slimbench.layerwise.capture import StopForward, as_tokens, run_layer
from slimbench.modeling import LINEAR_TYPES

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
        self.shared = {id(t) for t in tensors_in(kwargs)}  # the layer's kwargs (per sample): held by the caller
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
            raise StopForward
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
                and all(same_leaf(a, b) for a, b in zip(leaves, e.leaves, strict=True))):
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
        held = {id(x): x for x in (*tensors_in(leaves), *tensors_in(out), *([tail[0]] if tail else []))}
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
            add(n, as_tokens(args[0]), as_tokens(out))
            fired.add(n)
            if stop and len(fired) == len(group):
                self.stats["early_stops"] += 1
                if n not in tail_of:
                    raise StopForward
                self.stop_pending = True  # let the block return first: its output is memoised

        def pre_hook(mod, args, n):  # the last linear, whose output nothing needs: never run it
            add(n, as_tokens(args[0]), None)
            fired.add(n)
            if len(fired) == len(group):
                self.stats["early_stops"] += 1
                self.stats["skipped_linears"] += 1
                if n in tail_of and self.memo and self.record[tail_of[n][0]]:
                    self.store_partial(tail_of[n][0], args[0])
                raise StopForward

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
                except StopForward:
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
