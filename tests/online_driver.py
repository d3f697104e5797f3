"""Runs SlimBench commands against the Hub stand-in, inside a loopback-only network namespace.

``tests/test_online.py`` starts this script through ``unshare -n`` (only ``lo``, brought up: no
route leaves the machine). It starts the stand-in (tests/hub_server.py) on a free port of
127.0.0.1, points ``HF_ENDPOINT`` at it *before* anything imports ``huggingface_hub`` (which
reads the variable once), then runs each scenario of ``--plan`` (a JSON list) through the same
entry point as ``benchmark.py`` (``slimbench.cli.main``), one after the other in this process:

    {"name": ..., "argv": [...], "env": {VAR: value}, "drop_after": {FILE: BYTES}, "remove": [PATH]}

``env`` is set for that scenario only; ``drop_after`` makes the server cut that file's download
after BYTES bytes and go away (the next scenario gets a fresh server on the same port);
``remove`` deletes files first (a record lost, say). For
each scenario ``--out`` receives its exit status, stdout, stderr and the requests the server saw.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from hub_server import HubServer  # noqa: E402


def warm_imports() -> None:
    """Import what every scenario uses, then freeze the heap: the runner calls gc.collect() twice
    per cell, and walking the million objects torch, transformers and the registries create at
    import costs a second per call on a busy machine; frozen objects are skipped. Everything
    imported later (SlimBench's methods and tasks, the model classes) would not be frozen, so it
    is imported here first. Only the test's process."""
    import gc

    import datasets
    import datasets.packaged_modules.json.json
    import datasets.packaged_modules.parquet.parquet  # noqa: F401
    import transformers
    import transformers.models.gpt2.tokenization_gpt2
    import transformers.models.llama.modeling_llama
    import transformers.models.opt.modeling_opt  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from slimbench.registry import CORPORA, METHODS, MODELS, TASKS

    for registry in (METHODS, TASKS, MODELS, CORPORA):
        registry.names()
    gc.collect()
    gc.freeze()


def hf_files() -> list[str]:
    """Every file in the Hugging Face hub cache now (relative paths): what a scenario left there."""
    root = Path(os.environ["HF_HOME"]) / "hub"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


def progress(line: str, log: Path | None) -> None:
    print(f"[driver] {line}", file=sys.__stderr__, flush=True)
    if log is not None:
        with open(log, "a") as f:
            f.write(line + "\n")


def run(plan: list[dict], repos: Path, log: Path | None = None) -> list[dict]:
    server = HubServer(repos).start()
    port = server.server_address[1]
    os.environ["HF_ENDPOINT"] = server.url
    from slimbench.cli import main  # imported after HF_ENDPOINT is set

    t0, c0 = time.perf_counter(), time.process_time()
    warm_imports()
    progress(f"imports: {time.perf_counter() - t0:.1f} s ({time.process_time() - c0:.1f} s of CPU)", log)

    out = []
    for step in plan:
        if server.gone.is_set():  # the last scenario sent it away: a new one on the same address
            server.server_close()
            server = HubServer(repos, port=port).start()
        server.drop_after = dict(step.get("drop_after") or {})
        server.requests = []
        for path in step.get("remove", []):
            Path(path).unlink(missing_ok=True)  # absent: the test reports what the scenarios did
        saved = {k: os.environ.get(k) for k in step.get("env", {})}
        os.environ.update(step.get("env", {}))
        stdout, stderr = io.StringIO(), io.StringIO()
        t0, c0 = time.perf_counter(), time.process_time()
        progress(f"{step['name']}: start", log)
        try:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                rc = main(step["argv"], prog="benchmark.py")
        except BaseException:  # a crash is a result the test reports, not the end of the plan
            rc, stderr = -1, io.StringIO(stderr.getvalue() + traceback.format_exc())
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        progress(f"{step['name']}: exit {rc} after {seconds:.1f} s ({cpu:.1f} s of CPU)", log)
        out.append({"name": step["name"], "rc": rc, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(),
                    "requests": list(server.requests), "server_went_away": server.gone.is_set(),
                    "seconds": seconds, "hf_files": hf_files()})
    if not server.gone.is_set():
        server.shutdown()
    server.server_close()
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--repos", required=True)
    p.add_argument("--plan", required=True, help="JSON file: the scenarios")
    p.add_argument("--out", required=True, help="JSON file written with each scenario's outcome")
    args = p.parse_args()
    results = run(json.loads(Path(args.plan).read_text()), Path(args.repos), Path(args.out + ".log"))
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
