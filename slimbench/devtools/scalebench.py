"""Measure the executors on one suite: sequential vs N workers vs Ray, and a rerun.

    python -m slimbench.devtools.scalebench configs/scale.yaml [--workers 2] [--out /tmp/slimbench-scale]

Each run is a fresh `benchmark.py run` process into its own results folder, timed from the
outside (start-up included, as a user sees it). Ray runs in a network namespace of its own
with only loopback (``unshare --net``, root), because Ray binds to the machine's network
address otherwise; without it the Ray run is skipped (``--ray-here`` runs it anyway). The
records of all runs are compared with the volatile fields (clock times, timings, memory
readings) left out. Run it on an idle machine: the wall-clock ratio is the figure.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from slimbench.sweep.store import ResultStore, comparable_record

ROOT = Path(__file__).resolve().parent.parent


def timed_run(cmd: list[str], label: str) -> tuple[float, str]:
    print(f"-- {label}: {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"{label} failed (exit {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    print(f"   {wall:.1f} s", flush=True)
    return wall, out.stdout + out.stderr


def comparable(folder: Path) -> dict:
    return {r["run_id"]: comparable_record(r) for r in ResultStore(folder).records(include_failed=True)}


def namespace_ok() -> bool:
    try:
        probe = subprocess.run(["unshare", "--net", "sh", "-c", "ip link set lo up"], capture_output=True)
        return probe.returncode == 0
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", nargs="?", default="configs/scale.yaml")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="/tmp/slimbench-scale", help="results folders go here (emptied first)")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray run")
    ap.add_argument("--ray-here", action="store_true", help="run Ray in this network namespace (not isolated)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="suite override, as for run")
    args = ap.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    sets = [x for kv in args.set for x in ("--set", kv)]
    # No artifact cache: each executor compresses for itself, or the later runs would only load.
    base = [sys.executable, str(ROOT / "benchmark.py"), "run", args.suite, *sets, "--no-artifact-cache",
            "--no-progress", "--no-report"]
    # Convert/cache the model once, outside every timing.
    subprocess.run([*base, "--results", str(out / "warmup"), "--set", "tasks.0.max_windows=1",
                    "--set", "methods=[baseline]"], check=True, capture_output=True, cwd=ROOT)

    rows = []
    seq, _ = timed_run([*base, "--results", str(out / "seq")], "sequential")
    rows.append(("sequential (in one process)", seq, ""))
    par, _ = timed_run([*base, "--results", str(out / "workers"), "--workers", str(args.workers)],
                       f"{args.workers} workers")
    rows.append((f"--workers {args.workers}", par, f"ratio to sequential {par / seq:.2f}"))
    same = {"workers": comparable(out / "workers") == comparable(out / "seq")}

    if not args.no_ray:
        ray_cmd = [*base, "--results", str(out / "ray"), "--executor", "ray", "--workers", str(args.workers)]
        if args.ray_here:
            pass
        elif namespace_ok():
            ray_cmd = ["unshare", "--net", "sh", "-c", "ip link set lo up && exec " + shlex.join(ray_cmd)]
        else:
            ray_cmd = None
            print("-- Ray skipped: needs `unshare --net` as root (or --ray-here)")
        if ray_cmd:
            wall, text = timed_run(ray_cmd, "ray")
            m = re.search(r"local Ray started in ([0-9.]+) s", text)
            startup = float(m.group(1)) if m else float("nan")
            rows.append((f"--executor ray ({args.workers} at a time)", wall,
                         f"ratio to sequential {wall / seq:.2f}; Ray start-up {startup:.1f} s"))
            same["ray"] = comparable(out / "ray") == comparable(out / "seq")

    # A user's first run wrote the report; the rerun finds it up to date.
    subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "report", "--results", str(out / "seq")],
                   check=True, capture_output=True, cwd=ROOT)
    rerun, text = timed_run([*base[:-1], "--results", str(out / "seq")], "rerun of the finished suite")
    note = "nothing to run" if "nothing to run" in text else "cells were run again?"
    rows.append(("rerun of the finished suite (as `run` does it)", rerun, note))

    n = len(comparable(out / "seq"))
    print(f"\n{args.suite}: {n} cells")
    print(f"{'run':<48} {'wall s':>8}  notes")
    for name, wall, note in rows:
        print(f"{name:<48} {wall:>8.1f}  {note}")
    for k, v in same.items():
        print(f"records of {k} identical to sequential (timings aside): {'yes' if v else 'NO'}")
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
