"""The artifact cache: every method's compressed model saved in its own format and reloaded
bit-identically; checksums, atomic entries, concurrent writers; reuse across runs; the CLI."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch

from slimbench.cli import main
from slimbench.method import apply_method
from slimbench.modeling import memory_bytes
from slimbench.registry import METHODS
from slimbench.specs import CellSpec, HardwareSpec, MethodSpec, ModelSpec, StepSpec, TaskSpec
from slimbench.sweep.artifacts import cache as artifacts
from slimbench.sweep.artifacts import identity
from slimbench.sweep.artifacts import serialize as artifact_format
from slimbench.sweep.driver import run_cells
from slimbench.sweep.runner import load_model
from slimbench.sweep.store import ResultStore
from slimbench.sweep.suite import load_suite

USER_CACHE = os.environ.get("SLIMBENCH_CACHE")  # where real models are converted, once per machine
C = {"calib_samples": 4, "calib_seqlen": 32}  # a calibration budget tiny models run in a second

# Every built-in method, with settings that exercise each stored format it can produce.
CASES: dict[str, list[tuple[str, list[tuple[str, dict]]]]] = {
    "baseline": [("tiny-llama", [("baseline", {})])],
    "cast": [("tiny-llama", [("cast", {"dtype": "bfloat16"})]), ("tiny-gpt2", [("cast", {"dtype": "float16"})])],
    "rtn": [
        ("tiny-llama", [("rtn", {"bits": 4, "group_size": 32})]),
        ("tiny-gpt2", [("rtn", {"bits": 3, "group_size": 32})]),
        ("tiny-llama", [("rtn", {"bits": 4, "group_size": 32, "format": "packed"})]),  # int4 kernel
        ("tiny-opt", [("rtn", {"bits": 8, "symmetric": True, "group_size": None, "format": "packed"})]),  # int8
        ("tiny-gpt2", [("rtn", {"bits": 3, "group_size": 32, "format": "packed"})]),  # bit-packed, dequant
    ],
    "gptq": [
        ("tiny-llama", [("gptq", {"bits": 4, "group_size": 32, **C})]),
        ("tiny-opt", [("gptq", {"bits": 3, "group_size": 32, "act_order": True, **C})]),  # g_idx
        ("tiny-llama", [("gptq", {"bits": 4, "group_size": 32, "act_order": True, "format": "packed", **C})]),
    ],
    "awq": [("tiny-llama", [("awq", {"group_size": 32, "grid": 4, **C})])],
    "smoothquant": [("tiny-llama", [("smoothquant", C)])],
    "w8a8": [("tiny-opt", [("w8a8", {})])],
    "dynamic-int8": [("tiny-llama", [("dynamic-int8", {})]), ("tiny-gpt2", [("dynamic-int8", {"kernel": "int_mm"})])],
    "magnitude": [
        ("tiny-gpt2", [("magnitude", {"sparsity": 0.5})]),
        ("tiny-llama", [("magnitude", {"pattern": "2:4"})]),
    ],
    "wanda": [("tiny-opt", [("wanda", {"sparsity": 0.5, **C})])],
    "sparsegpt": [
        ("tiny-llama", [("sparsegpt", {"sparsity": 0.5, **C})]),
        ("tiny-llama", [("sparsegpt", {"pattern": "2:4", "bits": 4, **C})]),  # jointly quantized
    ],
    "svd": [("tiny-gpt2", [("svd", {"ratio": 0.3})])],
    "asvd": [("tiny-llama", [("asvd", {"ratio": 0.3, **C})])],
    "svd-llm": [("tiny-opt", [("svd-llm", {"ratio": 0.3, **C})])],
    "structured": [
        ("tiny-llama", [("structured", {"mlp_ratio": 0.25, "attn_ratio": 0.5, "drop_layers": 1, **C})]),
        ("tiny-gpt2", [("structured", {"mlp_ratio": 0.25, "importance": "magnitude"})]),
    ],
    "layer-drop": [("tiny-opt", [("layer-drop", {"keep_every": 2})])],
    "distill": [("tiny-llama", [("distill", {"keep_every": 2, "train_steps": 2, "batch_size": 2,
                                             "calib_samples": 4, "calib_seqlen": 32, "teacher_topk": 8})])],
    "auto": [("tiny-llama", [("auto", {"bits": [2, 4], "group_sizes": [32], "budget_bits": 3.5, "objectives": ["kl"],
                                       "probe_windows": 2, "probe_seqlen": 32, "val_windows": 1,
                                       "verify_windows": 2, "verify_seqlen": 32})])],
    "finetune": [("tiny-llama", [("magnitude", {"sparsity": 0.5}),
                                 ("finetune", {"steps": 2, "calib_samples": 4, "eval_samples": 2,
                                               "calib_seqlen": 32})])],
    "hqq": [("tiny-llama", [("hqq", {"bits": 3, "group_size": 32})])],
    "spqr": [("tiny-opt", [("spqr", C)])],
    "quip-sharp": [("tiny-llama", [("quip-sharp", C)])],
    "llamacpp-quant": [("tiny-llama", [("llamacpp-quant", {"type": "Q8_0", "imatrix": "none", "check_windows": 1,
                                                          "check_seqlen": 32, "n_ctx": 256})])],
    # rotations (their online transforms, routed attention and wrapped modules) and activation/KV
    # quantization after them: fake-quantized linears re-typed, KV bits on the attention route
    "quarot": [("tiny-llama", [("quarot", {}), ("rtn", {"bits": 4, "group_size": 32})])],
    "spinquant": [("tiny-llama", [("spinquant", {"steps": 2, "calib_samples": 2, "calib_seqlen": 32})])],
    "act-quant": [
        ("tiny-llama", [("rtn", {"bits": 4, "group_size": 32}), ("act-quant", {"a_bits": 8})]),  # int8 kernel
        ("tiny-llama", [("quarot", {}), ("rtn", {"bits": 4, "symmetric": True}),
                        ("act-quant", {"a_bits": 4, "kv_bits": 4})]),  # QuaRot's W4A4KV4
        ("tiny-gpt2", [("act-quant", {"a_bits": 4})]),  # Conv1D re-typed
    ],
    "composed": [
        ("tiny-llama", [("magnitude", {"sparsity": 0.5}), ("rtn", {"bits": 4, "group_size": 32})]),
        ("tiny-gpt2", [("cast", {"dtype": "bfloat16"}), ("rtn", {"bits": 4, "group_size": 32})]),
        ("tiny-llama", [("svd", {"ratio": 0.3}), ("dynamic-int8", {"include_lm_head": False})]),
    ],
}
# Refusals checked on a model another test file compresses anyway (one NNCF run, not two).
REFUSED_ELSEWHERE = {"nncf-weights": "tests/test_engines_openvino.py::test_nncf_weights_compresses_and_runs"}
# Stored forms the cache cannot decode back to the in-memory weight exactly: saved dense, saying so.
DENSE_FALLBACK = {"awq", "hqq", "spqr"}
ROUND_TRIPS = [pytest.param(m, s, id=f"{k}-{i}-{m}") for k, v in CASES.items() for i, (m, s) in enumerate(v)]
IDS = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(1))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (torch.equal calls -0.0 and 0.0 equal)."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return a.dtype == b.dtype and torch.equal(a.view(ints[a.element_size()]), b.view(ints[b.element_size()]))


def make_cell(model: str, steps: list[tuple[str, dict]], task: str = "perplexity") -> CellSpec:
    specs = tuple(StepSpec(name=n, params=METHODS.get(n).config(**p).to_dict()) for n, p in steps)
    return CellSpec(model=ModelSpec(name=model), method=MethodSpec(steps=specs),
                    task=TaskSpec(name=task, version="1", params={}), hardware=HardwareSpec(threads=1))


def compress_and_save(cell: CellSpec):
    entry = artifacts.lookup(cell, log=lambda s: None)
    lm = load_model(cell)
    storage: dict = {}
    report = apply_method(lm, cell.method, cell.hardware, None, storage)
    entry.save(lm, report, storage)
    return lm, report, entry


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "artifacts"
    monkeypatch.setenv(artifacts.ENV, str(root))
    monkeypatch.setenv("SLIMBENCH_CACHE", str(tmp_path / "cache"))  # distill's checkpoints
    monkeypatch.setenv(artifacts.MIN_FREE_ENV, "0")
    return root


def test_every_built_in_method_has_a_round_trip_case():
    acceleration = {n for n in METHODS.names() if METHODS.get(n).family == "acceleration"}
    assert set(METHODS.names()) - acceleration <= set(CASES) | set(REFUSED_ELSEWHERE)


def test_every_built_in_model_says_what_identifies_its_weights():
    # Without an identity the cache refuses the model, and every cell on it compresses again.
    from slimbench.registry import MODELS

    built_in = {n for n in MODELS.names() if MODELS.provider(n) is None}
    assert built_in <= set(identity.BUILTIN_SOURCES)


@pytest.mark.parametrize("model,steps", ROUND_TRIPS)
def test_round_trip_is_bit_identical(cache, model, steps):
    for name, _ in steps:  # an optional engine not installed here (llama.cpp): its install command
        why = METHODS.get(name).unavailable() if METHODS.get(name).unavailable is not None else None
        if why:
            pytest.skip(f"{name} cannot run here: {why}")
    cell = make_cell(model, steps)
    lm, report, entry = compress_and_save(cell)
    art = report["artifact"]
    if steps[0][0] == "baseline":
        assert art["nothing_to_cache"] and not art["saved"] and not (cache / "entries").exists()
        return
    assert art["saved"], art.get("reason")
    again = artifacts.lookup(cell, log=lambda s: None)
    assert again.hit and again.key == entry.key
    lm2, report2 = again.load()
    assert lm2.model is not lm.model
    assert same_bits(lm.logits(IDS), lm2.logits(IDS))
    assert torch.equal(lm.greedy(IDS[:1, :8], 4), lm2.greedy(IDS[:1, :8], 4))  # the KV-cache path too
    assert memory_bytes(lm2.model) == report["memory_bytes"]  # same tensors, same dtypes
    # the record of a reuse: the original report, with the original compression cost
    assert report2["artifact"]["reused"] and report2["compress_seconds"] == report["compress_seconds"]
    assert {k: v for k, v in report2.items() if k != "artifact"} == json.loads(
        json.dumps({k: v for k, v in report.items() if k != "artifact"}, default=str))
    # the weights file is what the record's stored_bytes counts, except layers saved dense, said why
    weights = (again.folder / artifact_format.WEIGHTS).stat().st_size
    fallback = art["dense_fallback"]
    assert (weights == report["stored_bytes"]) == (not fallback) == art["weights_match_stored_bytes"]
    assert all(why.startswith("saved dense: ") for why in fallback.values())
    if steps[0][0] not in DENSE_FALLBACK:  # e.g. AWQ's fp16 1/s of unfolded layers cannot give Q(W s)/s back
        assert not fallback


def test_packed_layers_come_back_as_packed_layers(cache):
    from slimbench.methods.quantization.packed import PackedLinear, kernel_counts

    cell = make_cell("tiny-llama", [("rtn", {"bits": 4, "group_size": 32, "format": "packed"})])
    lm, _, _ = compress_and_save(cell)
    lm2, _ = artifacts.lookup(cell).load()
    assert kernel_counts(lm2.model) == kernel_counts(lm.model) == {"int4pack": 14}
    for (n1, m1), (n2, m2) in zip(lm.model.named_modules(), lm2.model.named_modules(), strict=True):
        assert n1 == n2 and type(m1) is type(m2)
        if isinstance(m1, PackedLinear):
            assert torch.equal(m1.qweight, m2.qweight) and torch.equal(m1.scales, m2.scales)


def test_sparse_weights_are_stored_sparse(cache):
    cell = make_cell("tiny-llama", [("magnitude", {"pattern": "2:4"})])
    entry = compress_and_save(cell)[2]
    forms = entry.manifest["layout"]["forms"]
    assert len(forms) == 14 and {f["codec"] for f in forms.values()} == {"sparse"}
    from safetensors import safe_open

    with safe_open(str(entry.folder / artifact_format.WEIGHTS), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.up_proj.weight.indices" in keys and "model.layers.0.mlp.up_proj.weight" not in keys


# -- what is not cached ------------------------------------------------------------------------
def test_acceleration_hooks_and_foreign_modules_are_not_cached(cache):
    cell = make_cell("tiny-llama", [("rtn", {"bits": 4, "group_size": 32})])
    for spoil, expected in [
        (lambda lm: setattr(lm, "generator", object()), "acceleration hook"),
        (lambda lm: lm.model.model.layers[0].register_forward_hook(lambda *a: None), "forward hooks"),
        (lambda lm: setattr(lm.model.model.layers[0], "mlp", torch.nn.Identity()), "another structure"),
        (lambda lm: setattr(lm, "model", torch.nn.Sequential(lm.model)), "not a transformers model class"),
    ]:
        entry = artifacts.lookup(cell)
        lm = load_model(cell)
        report = apply_method(lm, cell.method, cell.hardware)
        spoil(lm)
        entry.save(lm, report, {})
        assert not report["artifact"]["saved"] and expected in report["artifact"]["reason"]
        assert not list((cache / "entries").glob("*")) and not list((cache / "tmp").glob("*"))


def test_cache_off_and_unknown_hub_revision(monkeypatch, cache):
    cell = make_cell("tiny-llama", [("rtn", {})])
    monkeypatch.setenv(artifacts.ENV, "off")
    assert artifacts.lookup(cell).reason == "the artifact cache is off"
    monkeypatch.setenv(artifacts.ENV, str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache.parent / "empty-hub"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache.parent / "empty-hub"))
    hub = cell.model_copy(update={"model": ModelSpec(name="org/model")})
    assert "pin `revision` to a commit" in artifacts.lookup(hub).reason
    pinned = cell.model_copy(update={"model": ModelSpec(name="org/model", revision="a" * 40)})
    assert artifacts.lookup(pinned).key is not None


# -- the key ---------------------------------------------------------------------------------------
def test_key_follows_what_decides_the_weights(cache, tmp_path):
    base = make_cell("tiny-llama", [("gptq", {"bits": 4, "group_size": 32, **C})])
    key = artifacts.lookup(base).key
    # a new task or another thread count is the same compressed model
    gptq = [("gptq", {"bits": 4, "group_size": 32, **C})]
    assert artifacts.lookup(make_cell("tiny-llama", gptq, "lambada")).key == key
    assert artifacts.lookup(base.model_copy(update={"hardware": HardwareSpec(threads=2)})).key == key
    # explicit defaults are the same config
    explicit = [("gptq", {"bits": 4, "group_size": 32, "percdamp": 0.01, **C})]
    assert artifacts.lookup(make_cell("tiny-llama", explicit)).key == key
    others = [
        make_cell("tiny-llama", [("gptq", {"bits": 3, "group_size": 32, **C})]),
        make_cell("tiny-llama", [("gptq", {"bits": 4, "group_size": 32, **{**C, "calib_seed": 1}})]),
        make_cell("tiny-opt", [("gptq", {"bits": 4, "group_size": 32, **C})]),
        base.model_copy(update={"hardware": HardwareSpec(threads=1, dtype="bfloat16")}),
    ]
    step = base.method.steps[0]
    bumped = step.model_copy(update={"version": "99"})
    others.append(base.model_copy(update={"method": MethodSpec(steps=(bumped,))}))
    plugin = step.model_copy(update={"provider": "someone-gptq==2.0"})
    others.append(base.model_copy(update={"method": MethodSpec(steps=(plugin,))}))
    keys = {artifacts.lookup(c).key for c in others}
    assert len(keys) == len(others) and key not in keys
    material = artifacts.lookup(base).material
    assert material["steps"][0]["calibration"]["data_sha256"] and material["libraries"]["torch"] == torch.__version__


def test_folder_model_is_keyed_by_its_files(cache, tmp_path):
    from slimbench.zoo.models import gpt2_tokenizer, make_tiny_loader

    folder = tmp_path / "my-model"
    lm = make_tiny_loader("gpt2")(ModelSpec(name="tiny-gpt2"), HardwareSpec())
    lm.model.save_pretrained(folder)
    gpt2_tokenizer().save_pretrained(folder)
    cell = make_cell(str(folder), [("rtn", {"bits": 4, "group_size": 32})])
    lm, _, entry = compress_and_save(cell)
    lm2, _ = artifacts.lookup(cell).load()
    assert torch.equal(lm.logits(IDS), lm2.logits(IDS))
    assert lm2.encode("To be, or not") == lm.encode("To be, or not")
    with open(folder / "model.safetensors", "r+b") as f:  # other weights: another key
        f.seek(-4, os.SEEK_END)
        f.write(b"\x01\x02\x03\x04")
    assert artifacts.lookup(cell).key != entry.key


# -- integrity -----------------------------------------------------------------------------------------
def flip_byte(path: Path, offset: int = -100) -> None:
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("damage", ["flip", "truncate", "no-manifest", "manifest-edit", "missing-file"])
def test_damaged_entry_is_detected_and_rebuilt(cache, damage):
    cell = make_cell("tiny-llama", [("rtn", {"bits": 4, "group_size": 32, "format": "packed"})])
    lm, _, entry = compress_and_save(cell)
    weights = entry.folder / artifact_format.WEIGHTS
    if damage == "flip":
        flip_byte(weights)
    elif damage == "truncate":
        os.truncate(weights, weights.stat().st_size // 2)
    elif damage == "no-manifest":
        (entry.folder / artifacts.MANIFEST).unlink()
    elif damage == "manifest-edit":  # still valid JSON, but no longer what was written
        text = (entry.folder / artifacts.MANIFEST).read_text()
        (entry.folder / artifacts.MANIFEST).write_text(text.replace('"bits": 4', '"bits": 5', 1))
    else:
        (entry.folder / artifact_format.BUFFERS).unlink()
    warnings: list[str] = []
    broken = artifacts.lookup(cell, log=warnings.append)
    assert not broken.hit and not broken.folder.exists() and "is broken" in warnings[0]
    assert not list((cache / "trash").iterdir())
    # the runner's path: compress again and save; the new entry is whole
    lm2 = load_model(cell)
    storage: dict = {}
    report = apply_method(lm2, cell.method, cell.hardware, None, storage)
    broken.save(lm2, report, storage)
    assert report["artifact"]["saved"] and "is broken" in report["artifact"]["replaced_broken_entry"]
    fresh = artifacts.lookup(cell)
    assert fresh.hit
    assert torch.equal(fresh.load()[0].logits(IDS), lm.logits(IDS))


def test_publish_keeps_the_first_writer(cache):
    cell = make_cell("tiny-llama", [("rtn", {"bits": 4, "group_size": 32})])
    _, _, entry = compress_and_save(cell)
    before = (entry.folder / artifacts.MANIFEST).read_bytes()
    late = cache / "tmp" / "late"
    late.mkdir(parents=True)
    (late / "x").write_text("a second writer's copy")
    assert artifacts.publish(late, entry.folder) is False
    assert not late.exists() and (entry.folder / artifacts.MANIFEST).read_bytes() == before
    assert artifacts.verify(entry.folder, entry.key)


def _write_one(barrier) -> None:
    cell = make_cell("tiny-llama", [("rtn", {"bits": 4, "group_size": 32, "format": "packed"})])
    entry = artifacts.lookup(cell, log=lambda s: None)
    lm = load_model(cell)
    storage: dict = {}
    report = apply_method(lm, cell.method, cell.hardware, None, storage)
    barrier.wait()  # both save at once
    entry.save(lm, report, storage)
    assert report["artifact"]["saved"]


def _writer(root: str, barrier) -> None:
    os.environ[artifacts.ENV] = root
    os.environ[artifacts.MIN_FREE_ENV] = "0"
    torch.set_num_threads(1)
    _write_one(barrier)


def test_concurrent_writers_of_one_key(cache):
    # Two processes: a fresh one (spawned) and this one (its environment points at the same cache
    # through the fixture), saving the same key at the same moment.
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2, timeout=300)
    other = ctx.Process(target=_writer, args=(str(cache), barrier))
    other.start()
    try:
        _write_one(barrier)
    finally:
        other.join(300)
        if other.exitcode is None:
            other.kill()
    assert other.exitcode == 0
    (folder,) = (cache / "entries").iterdir()
    assert artifacts.verify(folder, folder.name)
    assert not list((cache / "tmp").iterdir())
    cell = make_cell("tiny-llama", [("rtn", {"bits": 4, "group_size": 32, "format": "packed"})])
    assert artifacts.lookup(cell).load() is not None


# -- bad input -------------------------------------------------------------------------------------------
def test_preflight_refuses_a_full_or_unwritable_cache(tmp_path, monkeypatch):
    root = tmp_path / "artifacts"
    monkeypatch.setenv(artifacts.MIN_FREE_ENV, "1e9")  # a billion GiB: the disk is "full"
    with pytest.raises(artifacts.ArtifactCacheError, match="GiB free, below"):
        artifacts.preflight(root)
    assert not root.exists()
    monkeypatch.setenv(artifacts.MIN_FREE_ENV, "0")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(artifacts.ArtifactCacheError, match="not a folder"):
        artifacts.preflight(blocker / "artifacts")
    artifacts.preflight(root)
    assert root.is_dir() and not list(root.iterdir())


SUITE = """
models: [tiny-llama]
methods:
  - baseline
  - {name: rtn, bits: 4, group_size: 32, format: packed}
  - {name: magnitude, sparsity: 0.5}
tasks:
  - {name: perplexity, seqlen: 32, max_windows: 2}
hardware: {threads: 1}
"""


def test_cli_run_stops_before_any_cell_on_a_bad_cache(tmp_path, monkeypatch, capsys):
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.delenv(artifacts.ENV, raising=False)
    code = main(["run", str(suite), "--results", str(tmp_path / "r"), "--artifacts", str(blocker / "x"),
                 "--no-progress", "--no-report"])
    assert code == 2 and "artifact cache" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# -- across runs -------------------------------------------------------------------------------------------
def test_second_run_into_another_folder_compresses_nothing(cache, tmp_path, monkeypatch, capsys, frozen_heap):
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE)
    argv = ["run", str(suite), "--artifacts", str(cache), "--no-progress", "--no-report"]
    assert main([*argv, "--results", str(tmp_path / "first")]) == 0
    out = capsys.readouterr().out
    assert "compressed 2, reused 0 from the artifact cache (compressing" in out and "loading artifacts 0.0 s" in out
    assert main([*argv, "--results", str(tmp_path / "second")]) == 0
    out = capsys.readouterr().out
    assert "compressed 0, reused 2 from the artifact cache (compressing 0.0 s" in out
    first = {r["run_id"]: r for r in ResultStore(tmp_path / "first").records()}
    second = {r["run_id"]: r for r in ResultStore(tmp_path / "second").records()}
    assert first.keys() == second.keys() and len(first) == 3
    for rid, r1 in first.items():
        r2 = second[rid]
        untimed = [k for k, m in r1["metrics"].items() if not m["unit"].endswith("/s")]
        assert untimed and all(r1["metrics"][k] == r2["metrics"][k] for k in untimed)
        a1, a2 = r1["method_report"]["artifact"], r2["method_report"]["artifact"]
        if r1["method"]["name"] == "baseline":
            assert a1["nothing_to_cache"] and a2["nothing_to_cache"]
            continue
        assert a1["saved"] and not a1["reused"] and a2["reused"] and a2["key"] == a1["key"]
        assert a2["saved_at"] == a1["saved_at"]
        assert r2["method_report"]["compress_seconds"] == r1["method_report"]["compress_seconds"]
    # --no-artifact-cache: compresses again, says the cache is off
    assert main([*argv[:2], "--no-artifact-cache", "--no-progress", "--no-report",
                 "--results", str(tmp_path / "third")]) == 0
    out = capsys.readouterr().out
    assert "compressed 2, reused 0 from the artifact cache" in out and out.rstrip().endswith("the cache is off")


def test_library_default_is_off(tmp_path, monkeypatch, frozen_heap):
    monkeypatch.delenv(artifacts.ENV, raising=False)
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE)
    store = ResultStore(tmp_path / "r")
    run_cells(load_suite(suite).cells()[1:2], store, show_progress=False, log=lambda s: None)
    (rec,) = store.records()
    assert rec["method_report"]["artifact"]["reason"] == "the artifact cache is off"


# -- list and prune ------------------------------------------------------------------------------------------
def test_cache_list_and_prune(cache, capsys):
    cells = [make_cell("tiny-llama", [("rtn", {"bits": b, "group_size": 32})]) for b in (2, 3, 4)]
    entries = [compress_and_save(c)[2] for c in cells]
    now = entries[0].folder.stat().st_mtime
    # entry 0 was used long ago, entry 1 yesterday, entry 2 never since it was written
    for e, age_days in ((entries[0], 40), (entries[1], 1)):
        (e.folder / artifacts.LAST_USED).touch()
        t = now - age_days * 86400
        os.utime(e.folder / artifacts.LAST_USED, (t, t))
    assert main(["cache", "list", "--artifacts", str(cache)]) == 0
    out = capsys.readouterr().out
    assert out.count("tiny-llama") == 3 and "rtn(3-bit, g32)" in out and "40 d ago" in out
    sizes = [artifacts.folder_bytes(e.folder) for e in entries]
    assert main(["cache", "prune", "--artifacts", str(cache), "--older-than", "30d"]) == 0
    assert not entries[0].folder.exists() and entries[1].folder.exists()
    flip_byte(entries[2].folder / artifacts.MANIFEST)
    assert main(["cache", "prune", "--artifacts", str(cache), "--max-size", str(sizes[1] / 2**30)]) == 0
    assert entries[1].folder.exists() and not entries[2].folder.exists()  # the broken one goes first
    assert main(["cache", "prune", "--artifacts", str(cache), "--max-size", "0"]) == 0
    assert not list((cache / "entries").iterdir())
    assert "reclaimed" in capsys.readouterr().out


@pytest.mark.slow
def test_real_model_round_trip(cache, monkeypatch):
    """SmolLM2-135M in packed int4 (the real kernel), saved and reloaded bit for bit."""
    # The model itself comes from the user cache, converted once for every test that loads it,
    # not again into this test's throw-away one (nothing here writes there: no distillation).
    if USER_CACHE is None:
        monkeypatch.delenv("SLIMBENCH_CACHE")
    else:
        monkeypatch.setenv("SLIMBENCH_CACHE", USER_CACHE)
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    cell = make_cell("smollm2-135m", [("rtn", {"bits": 4, "group_size": 64, "format": "packed"})])
    lm, report, _ = compress_and_save(cell)
    assert report["artifact"]["saved"] and report["artifact"]["weights_match_stored_bytes"]
    loaded = artifacts.lookup(cell).load()
    assert loaded is not None and torch.equal(lm.logits(ids), loaded[0].logits(ids))
