"""Compress once, evaluate many, across runs: a content-addressed cache of compressed models.

A suite's cells that share a model, a method config and hardware form a group that is
compressed once (runner.py). This cache carries that across runs: a later suite (a new task,
another results folder) that needs the same compressed model loads it instead of compressing
again, and its records say so (``method_report.artifact.reused``) while keeping the original
compression cost (the method report is the one saved with the artifact).

Where: ``$SLIMBENCH_ARTIFACTS``; ``benchmark.py run`` sets it to ``--artifacts DIR``, to ``off``
with ``--no-artifact-cache``, and to ``<cache_dir()>/artifacts`` (``~/.cache/slimbench/artifacts``)
when unset. Unset in a library call (``run_cells``, tests) means off.

The key (``key_material``) covers everything that decides the compressed weights: the model's
content (file hashes of its folder, a hub commit, or a built-in model's recipe), the method
steps with their validated configs, versions and plugin providers, the calibration corpus split
(its text sha256; the sampling parameters are in the config, the tokenizer in the model's
content), the hardware dtype and device, and the torch / transformers / safetensors versions.
Not the thread count: a different count may change a calibrated method's weights at the
rounding level, which the saved record shows (``method_report.artifact.compressed_with``).

Layout: ``<root>/entries/<key>/`` holds the model files (slimbench/sweep/artifacts/serialize.py),
``manifest.json`` (key material, specs, layout, the method report, sha256 and size of every
file), ``manifest.sha256`` and ``last_used`` (touched on each reuse). An entry is written into
``<root>/tmp/`` and renamed into place, so it appears whole or not at all; of two writers of
one key the first rename wins and the second discards its copy. An entry whose manifest or any
file fails its checksum (a flipped byte, a truncated file, a missing manifest) is moved to
``<root>/trash/``, deleted, and rebuilt: never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from slimbench.errors import SuiteError
from slimbench.specs import CellSpec
from slimbench.sweep.artifacts import serialize as artifact_format
from slimbench.sweep.artifacts.identity import (
    FORMAT,
    FileHashes,
    ModelSource,
    artifact_key,
    key_material,
    model_source,
    sha256_file,
    skip_reason,
)
from slimbench.sweep.artifacts.serialize import NotCacheable
from slimbench.sweep.store import utc_now
from slimbench.zoo.models import cache_dir

ENV = "SLIMBENCH_ARTIFACTS"
MIN_FREE_ENV = "SLIMBENCH_ARTIFACTS_MIN_FREE_GB"
DEFAULT_MIN_FREE_GB = 1.0
MANIFEST, MANIFEST_SUM, LAST_USED = "manifest.json", "manifest.sha256", "last_used"
OFF = ("off", "none", "0", "false", "no")


class ArtifactCacheError(SuiteError):
    """The cache folder cannot take entries: said before any cell starts."""


class BrokenEntry(Exception):
    """An entry that fails its checks (partial, truncated, corrupted): rebuilt, never used."""


# -- where the cache is ---------------------------------------------------------------------------
def default_root() -> Path:
    return cache_dir() / "artifacts"


def configured_root() -> Path | None:
    """The cache folder ``$SLIMBENCH_ARTIFACTS`` names; None when unset or off."""
    value = os.environ.get(ENV, "").strip()
    if not value or value.lower() in OFF:
        return None
    return Path(value).expanduser()


def configure(root: str | Path | None, *, disabled: bool = False) -> Path | None:
    """What ``run`` does with ``--artifacts`` / ``--no-artifact-cache``: set the variable, which
    worker processes inherit. Without either, an unset variable becomes the default folder."""
    if disabled:
        os.environ[ENV] = "off"
    elif root is not None:
        os.environ[ENV] = str(Path(root).expanduser().absolute())
    elif not os.environ.get(ENV, "").strip():
        os.environ[ENV] = str(default_root())
    return configured_root()


def min_free_bytes() -> int:
    raw = os.environ.get(MIN_FREE_ENV, str(DEFAULT_MIN_FREE_GB))
    try:
        return int(float(raw) * 2**30)
    except ValueError:
        raise ArtifactCacheError(f"{MIN_FREE_ENV}={raw!r} is not a number of GiB") from None


def existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def preflight(root: Path | None = None) -> None:
    """Raise ArtifactCacheError if the cache folder is full or not writable (nothing is written)."""
    root = root or configured_root()
    if root is None:
        return
    advice = "free some space or prune it (`benchmark.py cache prune`), choose another folder with " \
             "--artifacts DIR, or run without it (--no-artifact-cache)"
    parent = existing_parent(root)
    if not parent.is_dir():
        raise ArtifactCacheError(f"artifact cache {root}: {parent} is not a folder; {advice}")
    free, need = shutil.disk_usage(parent).free, min_free_bytes()
    if free < need:
        raise ArtifactCacheError(
            f"artifact cache {root}: only {free / 2**30:.2f} GiB free, below the {need / 2**30:.2f} GiB "
            f"minimum ({MIN_FREE_ENV}); {advice}"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ArtifactCacheError(f"artifact cache {root} is not writable ({exc.strerror or exc}); {advice}") from None


# -- entries -------------------------------------------------------------------------------------------
def entries_dir(root: Path) -> Path:
    return root / "entries"


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest, checked against its own checksum (no file hashing: see ``verify``)."""
    mpath, spath = folder / MANIFEST, folder / MANIFEST_SUM
    if not mpath.is_file():
        raise BrokenEntry("no manifest (a partial or damaged entry)")
    text = mpath.read_bytes()
    if not spath.is_file() or spath.read_text().strip() != hashlib.sha256(text).hexdigest():
        raise BrokenEntry("the manifest does not match its checksum")
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise BrokenEntry(f"the manifest is not JSON: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise BrokenEntry(f"entry format {manifest.get('format')!r}, this version reads {FORMAT!r}")
    return manifest


def verify(folder: Path, key: str | None = None) -> dict[str, Any]:
    """The manifest of an entry whose every file has its recorded size and sha256; else BrokenEntry."""
    manifest = read_manifest(folder)
    if key is not None and manifest.get("key") != key:
        raise BrokenEntry(f"the manifest is for key {manifest.get('key')}, not {key}")
    for name, info in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise BrokenEntry(f"{name} is missing")
        if path.stat().st_size != info["bytes"]:
            raise BrokenEntry(f"{name} has {path.stat().st_size} bytes, not {info['bytes']} (truncated?)")
        if sha256_file(path) != info["sha256"]:
            raise BrokenEntry(f"{name} does not match its sha256 (corrupted)")
    return manifest


def remove(folder: Path, root: Path) -> bool:
    """Move an entry out of the way (atomic), then delete it; False if another process did first."""
    trash = root / "trash"
    trash.mkdir(parents=True, exist_ok=True)
    dest = trash / f"{folder.name}.{uuid.uuid4().hex[:8]}"
    try:
        os.rename(folder, dest)
    except FileNotFoundError:
        return False
    shutil.rmtree(dest, ignore_errors=True)
    return True


def fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        p.chmod(0o644)  # safetensors writes 0600; a cache may be shared by several users
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    manifest["files"] = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(folder.iterdir()) if p.is_file()
    }
    text = json.dumps(manifest, indent=1, sort_keys=True, default=str).encode()
    (folder / MANIFEST).write_bytes(text)
    (folder / MANIFEST_SUM).write_text(hashlib.sha256(text).hexdigest() + "\n")
    fsync_tree(folder)


def publish(tmp: Path, final: Path) -> bool:
    """Rename a finished entry into place; False (and the copy discarded) if one is already there."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, final)
        return True
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another writer of this key won: same content
        return False


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


@dataclass
class Entry:
    """The cache's answer for one group: reuse (``hit``), or compress and ``save``, or not cached."""

    cell: CellSpec
    root: Path | None = None
    key: str | None = None
    material: dict[str, Any] | None = None
    source: ModelSource | None = None
    manifest: dict[str, Any] | None = None
    reason: str | None = None  # why the result is not cached
    replaced: str | None = None  # what was wrong with an entry that is being rebuilt
    log: Callable[[str], None] = print
    verify_seconds: float = 0.0  # checking the checksums, part of what a reuse costs

    @property
    def hit(self) -> bool:
        return self.manifest is not None

    @property
    def folder(self) -> Path:
        return entries_dir(self.root) / self.key

    def not_cached(self) -> dict[str, Any]:
        out = {"key": self.key, "reused": False, "saved": False, "reason": self.reason}
        if self.reason and self.reason.startswith("nothing to cache"):
            out["nothing_to_cache"] = True
        return out

    # -- reuse ------------------------------------------------------------------------------------
    def load(self):
        """(LanguageModel, method report) from the entry; None (entry removed) if it cannot be loaded."""
        from slimbench.zoo.models import wrap

        if not self.hit:
            return None
        hw = self.cell.hardware
        t0 = time.perf_counter()
        try:
            from slimbench.measure.machine import resolve_threads

            resolve_threads(hw)  # as load_model does: a number, or "auto" probed now
            model = artifact_format.load(self.folder, self.manifest["layout"])
            about = self.manifest["lm"]
            lm = wrap(model, self.source.tokenizer(), about["name"], hw, about["provenance"])
        except Exception as exc:  # a damaged or unreadable entry is rebuilt, never a failed cell
            return self._discard(f"could not be loaded ({type(exc).__name__}: {exc})")
        lm.spec = self.cell.model
        with contextlib.suppress(OSError):  # a read-only cache still serves entries
            (self.folder / LAST_USED).touch()
        report = dict(self.manifest["method_report"])
        seconds = self.verify_seconds + time.perf_counter() - t0
        report["artifact"] = {**self.summary(), "reused": True, "load_seconds": seconds}
        return lm, report

    def stored_forms(self) -> dict[str, dict[str, torch.Tensor]]:
        """The stored forms the entry kept (packed codes and scales, sparse values, ...) by weight name."""
        return artifact_format.stored_forms(self.folder, self.manifest["layout"]) if self.hit else {}

    def _discard(self, why: str) -> None:
        self.log(f"warning: artifact {self.key} {why}; compressing again")
        self.replaced, self.manifest = why, None
        with contextlib.suppress(OSError):  # a read-only cache: the entry stays, unused
            remove(self.folder, self.root)
        return None

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "key": self.key,
            "saved_at": m["created_at"],
            "bytes": sum(f["bytes"] for f in m["files"].values()),
            "weights_bytes": m["files"][artifact_format.WEIGHTS]["bytes"],
            "weights_match_stored_bytes": m["weights_match_stored_bytes"],
            "dense_fallback": m["layout"]["dense_fallback"],
            "compressed_with": m["hardware"],
        }

    # -- save ---------------------------------------------------------------------------------------
    def save(self, lm, report: dict[str, Any], storage: dict[str, dict[str, torch.Tensor]]) -> None:
        """Save the compressed model (best effort: a failure is said in ``report['artifact']``)."""
        if self.key is None:
            report["artifact"] = self.not_cached()
            return
        tmp = self.root / "tmp" / f"{self.key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        t0 = time.perf_counter()
        try:
            self._check_space(lm)
            tmp.mkdir(parents=True)
            manifest = self._write(tmp, lm, report, storage)
            fresh = publish(tmp, self.folder)
        except NotCacheable as exc:
            self.reason = f"not cacheable: {exc}"
        except Exception as exc:  # disk full mid-write, a bug: the cell goes on, the entry is not kept
            self.reason = f"the artifact could not be saved ({type(exc).__name__}: {exc})"
            self.log(f"warning: {self.reason}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if self.reason:
            report["artifact"] = self.not_cached()
            return
        self.manifest = manifest
        if not fresh:  # the entry on disk is the first writer's: describe that one
            with contextlib.suppress(Exception):
                self.manifest = read_manifest(self.folder)
        seconds = time.perf_counter() - t0
        report["artifact"] = {**self.summary(), "reused": False, "saved": True, "save_seconds": seconds}
        if not fresh:
            report["artifact"]["written_by_another_process"] = True
        if self.replaced:
            report["artifact"]["replaced_broken_entry"] = self.replaced

    def _check_space(self, lm) -> None:
        from slimbench.modeling import memory_bytes

        need = memory_bytes(lm.model) + min_free_bytes()
        free = shutil.disk_usage(existing_parent(self.root)).free
        if free < need:
            raise OSError(f"{free / 2**30:.2f} GiB free in {self.root}, the entry needs up to "
                          f"{need / 2**30:.2f} GiB with the reserve")

    def _write(self, tmp: Path, lm, report: dict[str, Any], storage) -> dict[str, Any]:
        layout = artifact_format.save(lm, storage, tmp)
        weights = (tmp / artifact_format.WEIGHTS).stat().st_size
        manifest = {
            "format": FORMAT,
            "key": self.key,
            "key_material": self.material,
            "created_at": utc_now(),
            "model": self.cell.model.to_dict(),
            "method": self.cell.method.to_record(),
            "hardware": self.cell.hardware.to_dict(),
            "lm": {"name": lm.name, "provenance": lm.provenance},
            "layout": layout,
            "method_report": {k: v for k, v in report.items() if k != "artifact"},
            "weights_match_stored_bytes": weights == report.get("stored_bytes"),
        }
        write_manifest(tmp, manifest)
        return json.loads(json.dumps(manifest, default=str))


def lookup(cell: CellSpec, log: Callable[[str], None] = print) -> Entry:
    """The cache entry of a group's compressed model; never raises (a problem disables the cache)."""
    root = configured_root()
    entry = Entry(cell, root=root, log=log)
    entry.reason = skip_reason(cell) or (None if root else "the artifact cache is off")
    if entry.reason:
        return entry
    hashes = FileHashes(root)
    try:
        entry.source = model_source(cell.model, hashes)
        entry.material = key_material(cell, entry.source)
        entry.key = artifact_key(entry.material)
    except NotCacheable as exc:
        entry.reason = f"not cacheable: {exc}"
        return entry
    except Exception as exc:  # the cache must never fail a cell
        entry.reason = f"the artifact key could not be computed ({type(exc).__name__}: {exc})"
        return entry
    finally:
        hashes.flush()
    if entry.folder.exists():
        t0 = time.perf_counter()
        try:
            entry.manifest = verify(entry.folder, entry.key)
            entry.verify_seconds = time.perf_counter() - t0
        except Exception as exc:  # BrokenEntry, an unreadable file, a manifest of the wrong shape
            entry._discard(f"is broken ({exc})")
    return entry


# -- listing and pruning ----------------------------------------------------------------------------------
@dataclass
class EntryInfo:
    key: str
    folder: Path
    bytes: int
    model: str = "?"
    method: str = "?"
    created: float | None = None  # POSIX time
    last_used: float | None = None
    problem: str | None = None

    @property
    def last_activity(self) -> float:
        return self.last_used or self.created or self.folder.stat().st_mtime


def parse_time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def list_entries(root: Path, *, check_files: bool = False) -> list[EntryInfo]:
    """Every entry folder, with what its manifest says (``problem`` set for a broken one)."""
    out = []
    base = entries_dir(root)
    for folder in sorted(base.iterdir()) if base.is_dir() else []:
        if not folder.is_dir():
            continue
        info = EntryInfo(folder.name, folder, folder_bytes(folder))
        try:
            m = verify(folder, folder.name) if check_files else read_manifest(folder)
            info.model, info.method = m["model"]["name"], m["method"]["label"]
            info.created = parse_time(m["created_at"])
        except Exception as exc:  # BrokenEntry, unreadable, or a manifest of the wrong shape
            info.problem = str(exc) or type(exc).__name__
        used = folder / LAST_USED
        info.last_used = used.stat().st_mtime if used.exists() else None
        out.append(info)
    return out


STALE_TMP_SECONDS = 24 * 3600  # a writer that has not finished in a day is dead


def prune(root: Path, *, older_than_s: float | None = None, max_bytes: int | None = None,
          check_files: bool = False, dry_run: bool = False, now: float | None = None) -> list[tuple[EntryInfo, str]]:
    """Remove broken entries, entries unused for ``older_than_s``, then the least recently used
    until the rest fit in ``max_bytes``. Returns (entry, why) of what was (or would be) removed."""
    now = time.time() if now is None else now
    entries = list_entries(root, check_files=check_files)
    doomed: list[tuple[EntryInfo, str]] = []
    keep = []
    for e in entries:
        if e.problem:
            doomed.append((e, f"broken: {e.problem}"))
        elif older_than_s is not None and now - e.last_activity > older_than_s:
            doomed.append((e, f"unused for {(now - e.last_activity) / 86400:.1f} days"))
        else:
            keep.append(e)
    if max_bytes is not None:
        keep.sort(key=lambda e: e.last_activity)  # least recently used first
        total = sum(e.bytes for e in keep)
        while keep and total > max_bytes:
            e = keep.pop(0)
            total -= e.bytes
            doomed.append((e, f"over the size limit (least recently used, {e.bytes / 2**20:.1f} MiB)"))
    if not dry_run:
        for e, _ in doomed:
            remove(e.folder, root)
        for sub in ("tmp", "trash"):
            for p in (root / sub).iterdir() if (root / sub).is_dir() else []:
                if sub == "trash" or now - p.stat().st_mtime > STALE_TMP_SECONDS:
                    shutil.rmtree(p, ignore_errors=True)
    return doomed
