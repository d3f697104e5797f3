"""Per-layer sensitivity: what compressing one linear (or one decoder layer) alone costs.

For every *unit* (a linear layer, or all linears of one decoder layer) and every candidate
setting, the unit alone is compressed and two quality losses are measured against the
uncompressed model:

- ``kl``: KL(P_ref || P_probe) of the next-token distributions, nats per position, averaged
  over ``probe_windows`` calibration windows of ``probe_seqlen`` tokens (the search's objective);
- ``val_nll_delta``: the change of the mean next-token NLL on ``val_windows`` validation windows
  of the same length (the validation split's perplexity is ``exp`` of the NLL).

Cost, and why it is measured this way: a probe is a real forward pass with only that unit
swapped, so the numbers are the losses themselves, not a proxy (the output error of a linear on
its own inputs ignores what the rest of the network does with that error: a q_proj and a
down_proj with the same output error differ by orders of magnitude in KL). What makes it
affordable on two CPU cores:

1. one reference pass caches the hidden states entering every decoder layer (and the per-layer
   keyword arguments the model computes itself: masks, rotary embeddings of sliding-window and
   global layers); a probe of layer ``i`` replaces layers ``0..i-1`` by pass-throughs and feeds
   the cached input to layer ``i``, so it runs only the tail of the model (~60% of a forward
   on average for SmolLM2, its 49k-word output layer included);
2. the calibration and validation windows run as one short batch (defaults: 4 + 2 windows of
   128 tokens); differences between settings of one unit are paired on the same tokens, which
   is what a search compares;
3. the profile is cached on disk, one JSON per model fingerprint, family, probe settings, data
   hashes and code version, with one entry per (unit, setting): a search asking for settings
   not measured yet measures only those, and an interrupted profile resumes (it is saved after
   every decoder layer).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from slimbench.config import Config, stable_hash
from slimbench.modeling import get_weight, iter_linears, set_weight, unique_tensors

VERSION = "1"  # bump when a change changes the measured numbers: old profiles are not reused


class ProbeConfig(Config):
    """How sensitivity is measured (part of the profile's cache key)."""

    probe_windows: int = Field(4, ge=1, le=1024, description="calibration windows for the KL of each probe")
    probe_seqlen: int = Field(128, ge=8, le=8192, description="tokens per probe window")
    probe_seed: int = Field(0, description="seed of the probe windows' start positions (calibration split)")
    val_windows: int = Field(2, ge=0, le=1024, description="validation windows for the NLL change of each probe")
    unit: Literal["linear", "layer"] = Field(
        "linear", description="what is compressed alone: one linear, or all linears of a decoder layer"
    )


# -- the probe batch ---------------------------------------------------------------------------
def probe_batch(lm, cfg: ProbeConfig, corpus: str) -> tuple[torch.Tensor, int, dict[str, Any]]:
    """[probe_windows + val_windows, probe_seqlen] ids, how many rows are calibration, and the data record."""
    from slimbench.tasks.perplexity import JOIN, windows

    from slimbench.calibration import CalibrationConfig, sample_calibration
    from slimbench.registry import CORPORA
    from slimbench.zoo.corpora import encode_split

    calib, info = sample_calibration(
        lm, CalibrationConfig(calib_corpus=corpus, calib_samples=cfg.probe_windows,
                              calib_seqlen=cfg.probe_seqlen, calib_seed=cfg.probe_seed)
    )
    rows = [calib]
    data = {"calibration": info}
    if cfg.val_windows:
        val = windows(encode_split(lm, corpus, "validation", JOIN), cfg.probe_seqlen, cfg.val_windows)
        rows.append(val)
        data["validation"] = {"windows": len(val), "seqlen": cfg.probe_seqlen,
                              "data_sha256": CORPORA.get(corpus).manifest("validation")["sha256"]}
    ids = torch.cat(rows)
    data["ids_sha256"] = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    return ids, len(calib), data


# -- running the model from one decoder layer on ---------------------------------------------
class _PassThrough(nn.Module):
    """Stands in for a decoder layer before the probed one: returns its input unchanged."""

    def __init__(self, layer: nn.Module, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple
        if hasattr(layer, "attention_type"):  # some models read it from the layer object
            self.attention_type = layer.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.returns_tuple else hidden_states


@torch.no_grad()
def reference_pass(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor) -> tuple[list, torch.Tensor, bool]:
    """(hidden states entering each layer, reference logits, whether layers return tuples)."""
    inputs: list[torch.Tensor | None] = [None] * len(layers)
    returns_tuple = [False]

    def pre(i):
        def hook(module, args, kwargs):
            inputs[i] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        return hook

    def post(module, args, out):
        returns_tuple[0] = isinstance(out, tuple)

    handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[0].register_forward_hook(post))
    try:
        logits = model(input_ids=ids, use_cache=False).logits.float()
    finally:
        for h in handles:
            h.remove()
    return inputs, logits, returns_tuple[0]


@contextlib.contextmanager
def from_layer(layers: nn.ModuleList, i: int, hidden: torch.Tensor, returns_tuple: bool) -> Iterator[None]:
    """Within the block, a model forward skips layers ``0..i-1`` and feeds ``hidden`` to layer ``i``.

    The model still computes its embeddings, masks and rotary tables itself (cheap), so every
    layer gets exactly the keyword arguments a full forward gives it.
    """
    saved = [layers[j] for j in range(i)]

    def feed(module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    for j in range(i):
        layers[j] = _PassThrough(saved[j], returns_tuple)
    handle = layers[i].register_forward_pre_hook(feed, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for j in range(i):
            layers[j] = saved[j]


def kl_and_nll(logits: torch.Tensor, ref_logits: torch.Tensor, ids: torch.Tensor, n_kl: int) -> tuple[float, float]:
    """Mean KL(ref || probe) over the first ``n_kl`` rows' positions; mean next-token NLL of the rest."""
    kls = []
    for r in range(n_kl):  # row by row: the [T, V] log-softmaxes stay small
        ref = F.log_softmax(ref_logits[r], dim=-1)
        lp = F.log_softmax(logits[r].float(), dim=-1)
        kls.append((ref.exp() * (ref - lp)).sum(-1).mean().item())
    nll = float("nan")
    if ids.shape[0] > n_kl:
        val = logits[n_kl:, :-1].float()
        nll = F.cross_entropy(val.reshape(-1, val.shape[-1]), ids[n_kl:, 1:].reshape(-1)).item()
    return sum(kls) / len(kls), nll


# -- the profile and its cache ----------------------------------------------------------------
def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of every weight's bytes (names, shapes, dtypes included)."""
    h = hashlib.sha256()
    for name, t in sorted(unique_tensors(model).items()):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(memoryview(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def profile_dir() -> Path:
    from slimbench.zoo.models import cache_dir

    return cache_dir() / "sensitivity"


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


Compress = Callable[[str, torch.Tensor, str], "tuple[torch.Tensor, int] | None"]


def units_of(model: nn.Module, layers_path: str, unit: str) -> dict[str, list[str]]:
    """Unit name -> its linears, in layer order: each decoder-layer linear, or each decoder layer."""
    units: dict[str, list[str]] = {}
    for name, _ in iter_linears(model):
        if not name.startswith(layers_path + "."):
            continue  # outside the decoder layers (none in the supported models besides lm_head)
        layer = ".".join(name.split(".")[: len(layers_path.split(".")) + 1])
        units.setdefault(name if unit == "linear" else layer, []).append(name)
    return units


def layer_index(unit_name: str, layers_path: str) -> int:
    return int(unit_name[len(layers_path) + 1 :].split(".")[0])


@torch.no_grad()
def sensitivity_profile(
    lm,
    *,
    family: str,
    candidates: list[str],
    compress: Compress,
    probe: ProbeConfig,
    corpus: str = "shakespeare",
    key_extra: dict[str, Any] | None = None,
    progress: Callable[..., Any] | None = None,
    log: Callable[[str], None] | None = None,
    prepare: Callable[[set[str]], None] | None = None,
) -> dict[str, Any]:
    """The profile ``{"meta": ..., "units": {unit: {"linears", "numel", "candidates": {key: entry}}}}``.

    ``compress(linear_name, weight [out, in], candidate)`` returns the compressed weight and the
    bytes its stored form takes, or None where the candidate does not apply to that linear. An
    entry is ``{"kl", "val_nll_delta", "bytes"}``; a candidate not applicable to a unit has none.
    Entries already in the cache file are not measured again. ``prepare(candidates)`` is called
    with the candidates still to be measured, before any probe (for statistics ``compress``
    needs, computed on the intact model).
    """
    from slimbench.layerwise import adapter_for, get_path

    model = lm.model
    adapter = adapter_for(model)
    layers = get_path(model, adapter.layers_path)
    ids, n_kl, data = probe_batch(lm, probe, corpus)
    key = {
        "version": VERSION,
        "model": lm.name,
        "fingerprint": model_fingerprint(model),
        "family": family,
        "probe": probe.to_dict(),
        "data": data,
        "extra": key_extra or {},
    }
    path = profile_dir() / f"{lm.name}-{family}-{stable_hash(key)}.json"
    prof = json.loads(path.read_text()) if path.exists() else {"meta": {"key": key, "path": str(path)}, "units": {}}
    mods = dict(iter_linears(model))
    units = units_of(model, adapter.layers_path, probe.unit)
    for u, names in units.items():
        prof["units"].setdefault(u, {"linears": names, "numel": sum(get_weight(mods[n]).numel() for n in names),
                                     "candidates": {}, "not_applicable": []})
    todo = {u: [c for c in candidates if c not in e["candidates"] and c not in e["not_applicable"]]
            for u, e in prof["units"].items() if u in units}
    total = sum(len(v) for v in todo.values())
    if total:
        if prepare is not None:
            prepare({c for v in todo.values() for c in v})
        _measure(lm, layers, adapter.layers_path, units, todo, compress, ids, n_kl, prof, path, progress, log)
    prof["meta"]["path"] = str(path)
    return prof


def _measure(lm, layers, layers_path, units, todo, compress, ids, n_kl, prof, path, progress, log) -> None:
    model = lm.model
    ids = ids.to(lm.device)
    t0 = time.perf_counter()
    inputs, ref_logits, returns_tuple = reference_pass(model, layers, ids)
    _, ref_nll = kl_and_nll(ref_logits, ref_logits, ids, n_kl)
    prof["meta"].setdefault("reference_val_nll", ref_nll)
    mods = dict(iter_linears(model))
    total = sum(len(v) for v in todo.values())
    bar = progress(total=total, desc="sensitivity", unit="probe") if progress else None
    done = 0
    by_layer: dict[int, list[str]] = {}
    for u in todo:
        if todo[u]:
            by_layer.setdefault(layer_index(u, layers_path), []).append(u)
    for i in sorted(by_layer):
        with from_layer(layers, i, inputs[i], returns_tuple):
            for u in by_layer[i]:
                entry = prof["units"][u]
                for cand in todo[u]:
                    m = _probe_one(model, mods, units[u], cand, compress, ids, ref_logits, n_kl)
                    if m is None:
                        entry["not_applicable"].append(cand)
                    else:
                        kl, nll, nbytes = m
                        delta = None if math.isnan(ref_nll) else nll - ref_nll  # None: no validation windows
                        entry["candidates"][cand] = {"kl": kl, "val_nll_delta": delta, "bytes": nbytes}
                    done += 1
                    if bar is not None:
                        bar.update(1)
        prof["meta"]["seconds"] = prof["meta"].get("seconds", 0.0) + (time.perf_counter() - t0)
        t0 = time.perf_counter()
        write_json_atomic(path, prof)  # after every layer: an interrupted profile resumes here
        if log is not None:
            log(f"sensitivity: layer {i} done ({done}/{total} probes)")
    if bar is not None:
        bar.close()


def _probe_one(model, mods, names, cand, compress, ids, ref_logits, n_kl):
    """Swap the unit's linears for ``cand``, run the tail, restore; (kl, val nll, bytes) or None."""
    originals = {n: get_weight(mods[n]).clone() for n in names}
    try:
        nbytes = 0
        for n in names:
            out = compress(n, originals[n], cand)
            if out is None:
                return None
            w_hat, b = out
            set_weight(mods[n], w_hat)
            nbytes += b
        logits = model(input_ids=ids, use_cache=False).logits
        kl, nll = kl_and_nll(logits, ref_logits, ids, n_kl)
        if not math.isfinite(kl):
            kl = float("inf")
        return kl, nll, nbytes
    finally:
        for n in names:
            set_weight(mods[n], originals[n])
