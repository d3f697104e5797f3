"""What every engine environment SlimBench builds beside its own shares (GuideLLM's, vLLM's)."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path


def move_into_place(tmp: Path, root: Path) -> None:
    """Replace ``root`` by the environment built in ``tmp``.

    A virtual environment's scripts name their interpreter by absolute path, so after the rename
    they are rewritten to point at ``root``: the build never leaves a half-built ``root``."""
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    for script in (root / "bin").iterdir():
        if script.is_file() and not script.is_symlink():
            with contextlib.suppress(UnicodeDecodeError, OSError):
                text = script.read_text()
                if str(tmp) in text:
                    script.write_text(text.replace(str(tmp), str(root)))
