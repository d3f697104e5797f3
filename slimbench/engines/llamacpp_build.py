"""llama.cpp built once from source, in the user cache: the library and its tools.

``llama-cpp-python==0.3.36`` is an sdist that compiles llama.cpp (minutes on 2 idle
cores, an hour on busy ones). Its own build gives the Python bindings' library but not llama.cpp's tools
(``llama-quantize``, ``llama-imatrix``, ``llama-server``, ``llama-bench``). One CMake build of
the llama.cpp commit that release vendors gives both; then the Python package installs in
seconds without compiling (``-DLLAMA_BUILD=OFF``) and loads the library from the build
(``LLAMA_CPP_LIB_PATH``, which its loader reads). ``build()`` does exactly that::

    python benchmark.py engines build llama.cpp    # or: slimbench.engines.llamacpp_build.build()

A llama-cpp-python built the ordinary way (its lib inside the package) works too: the Python
side then needs nothing from here, and only the tools come from this build.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

PY_PACKAGE = "llama-cpp-python==0.3.36"
LLAMA_CPP_COMMIT = "0c1e57098"  # what llama-cpp-python 0.3.36 vendors (its CHANGELOG)
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench", "llama-server")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
)
INSTALL_HINT = (
    "build llama.cpp once (minutes on idle cores; cached): `python benchmark.py engines build llama.cpp`, "
    f"then `CMAKE_ARGS=\"-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF\" pip install {PY_PACKAGE}` (seconds); "
    f"or `pip install {PY_PACKAGE}` alone for the Python side (compiles its own copy)"
)


def root() -> Path:
    from slimbench.zoo.models import cache_dir

    return cache_dir() / "engines" / f"llama.cpp-{LLAMA_CPP_COMMIT[:7]}"


def bin_dir() -> Path:
    return root() / "build" / "bin"


def tool_path(name: str) -> Path | None:
    """A built llama.cpp tool (``llama-quantize``, ``llama-server``, ...), or None."""
    p = bin_dir() / name
    return p if p.is_file() and os.access(p, os.X_OK) else None


def package_lib() -> Path | None:
    """The library inside an ordinarily built llama-cpp-python, if there is one."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    found = sorted(lib.glob("libllama.*")) if lib.is_dir() else []
    return found[0] if found else None


def lib_env() -> dict[str, str]:
    """Variables a process needs for ``import llama_cpp`` to find the library ({} if it has its own)."""
    if os.environ.get("LLAMA_CPP_LIB_PATH") or package_lib() is not None:
        return {}
    if (bin_dir() / "libllama.so").exists():
        return {"LLAMA_CPP_LIB_PATH": str(bin_dir())}
    return {}


def python_unavailable() -> str | None:
    """Why ``import llama_cpp`` would fail in an engine process (checked without importing it)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python is not installed: {INSTALL_HINT}"
    if not (lib_env() or package_lib() or os.environ.get("LLAMA_CPP_LIB_PATH")):
        return f"llama-cpp-python is installed without its library and llama.cpp is not built: {INSTALL_HINT}"
    return None


def tool_unavailable(*names: str) -> str | None:
    missing = [n for n in names if tool_path(n) is None]
    if missing:
        return f"llama.cpp's {', '.join(missing)} not built in {bin_dir()}: {INSTALL_HINT}"
    return None


def build_info() -> dict[str, Any]:
    """What the build was made with (written by ``build``; compiler, flags, commit)."""
    path = root() / "build_info.json"
    return json.loads(path.read_text()) if path.exists() else {"commit": LLAMA_CPP_COMMIT, "note": "built elsewhere"}


def _run(cmd: list[str], cwd: Path, log) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, cwd=cwd, check=True)


def build(*, jobs: int = 1, nice: int = 15, log=print) -> Path:
    """Fetch the llama-cpp-python sdist with pip, build llama.cpp's library and tools from its
    vendored source; returns the folder of the binaries. Resumes an interrupted build."""
    top = root()
    src = top / "src"
    if not (src / "CMakeLists.txt").exists():
        with tempfile.TemporaryDirectory(prefix="llama-sdist-") as tmp:
            # pip reads the sdist's metadata through its build backend (scikit-build-core), which it
            # fetches into an isolated build environment: nothing is compiled and SlimBench's stays as it is
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                  "-d", tmp, PY_PACKAGE], Path(tmp), log)
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            with tarfile.open(sdist) as tar:
                tar.extractall(tmp, filter="data")
            vendored = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
            top.mkdir(parents=True, exist_ok=True)
            shutil.copytree(vendored, src, dirs_exist_ok=True)
    build_dir = top / "build"
    build_dir.mkdir(exist_ok=True)
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    prefix = ["nice", "-n", str(nice)] if nice else []
    _run([*prefix, "cmake", str(src), *gen, *CMAKE_FLAGS], build_dir, log)
    env_jobs = ["-j", str(jobs)]
    _run([*prefix, "cmake", "--build", ".", *env_jobs, "--target", "llama", *TOOLS], build_dir, log)
    compiler = subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    info = {"commit": LLAMA_CPP_COMMIT, "source": f"{PY_PACKAGE} (vendor/llama.cpp)", "cmake_flags": list(CMAKE_FLAGS),
            "compiler": compiler[0] if compiler else "?", "machine": platform.machine()}
    (top / "build_info.json").write_text(json.dumps(info, indent=1))
    return bin_dir()
