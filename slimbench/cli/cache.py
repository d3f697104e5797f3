"""`cache list|prune`: see and reclaim the artifact cache of compressed models (slimbench/sweep/artifacts/cache.py)."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_age(text: str) -> float:
    """Seconds in ``30``, ``30d``, ``12h``, ``45m`` or ``10s`` (a bare number is days)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([dhms]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age: give e.g. 30d, 12h, 45m (a bare number is days)")
    return float(m.group(1)) * UNITS[m.group(2) or "d"]


def size_gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in GiB") from None
    if value < 0:
        raise argparse.ArgumentTypeError("the size limit cannot be negative")
    return value


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return "just now"


def root_of(args: argparse.Namespace) -> Path:
    from slimbench.sweep.artifacts import cache as artifacts

    root = Path(args.artifacts).expanduser() if args.artifacts else artifacts.configured_root()
    return root or artifacts.default_root()


def cmd_list(args: argparse.Namespace) -> int:
    from slimbench.sweep.artifacts import cache as artifacts

    root = root_of(args)
    entries = artifacts.list_entries(root, check_files=args.verify)
    now = time.time()
    print(f"artifact cache {root}: {len(entries)} entries, {human_bytes(sum(e.bytes for e in entries))}")
    if entries:
        print(f"  {'key':<32}  {'size':>10}  {'created':>12}  {'last used':>12}  model | method")
    for e in sorted(entries, key=lambda e: -e.last_activity):
        created = human_age(now - e.created) if e.created else "?"
        used = human_age(now - e.last_used) if e.last_used else "never"
        what = f"BROKEN: {e.problem}" if e.problem else f"{e.model} | {e.method}"
        print(f"  {e.key:<32}  {human_bytes(e.bytes):>10}  {created:>12}  {used:>12}  {what}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from slimbench.sweep.artifacts import cache as artifacts

    root = root_of(args)
    max_bytes = None if args.max_size is None else int(args.max_size * 2**30)
    removed = artifacts.prune(root, older_than_s=args.older_than, max_bytes=max_bytes,
                              check_files=args.verify, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for e, why in removed:
        print(f"  {verb} {e.key}  {human_bytes(e.bytes):>10}  {e.model} | {e.method}  ({why})")
    freed = sum(e.bytes for e, _ in removed)
    left = artifacts.list_entries(root)
    print(f"{'would reclaim' if args.dry_run else 'reclaimed'} {human_bytes(freed)} ({len(removed)} entries); "
          f"{len(left) if not args.dry_run else len(left) - len(removed)} entries left in {root}")
    return 0


def register(sub) -> None:
    c = sub.add_parser("cache", help="list or prune the artifact cache of compressed models")
    csub = c.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--artifacts", metavar="DIR",
                        help="the cache folder (default: $SLIMBENCH_ARTIFACTS, else ~/.cache/slimbench/artifacts)")
    common.add_argument("--verify", action="store_true", help="check every file's sha256 (reads every entry)")
    lst = csub.add_parser("list", parents=[common], help="entries with model, method, size, age and last use")
    lst.set_defaults(fn=cmd_list)
    pr = csub.add_parser("prune", parents=[common],
                         help="remove broken entries, entries unused for a while, and the least recently used "
                              "beyond a size limit")
    pr.add_argument("--older-than", type=parse_age, metavar="AGE",
                    help="remove entries not used for AGE (30d, 12h, 45m; a bare number is days)")
    pr.add_argument("--max-size", type=size_gib, metavar="GiB",
                    help="then remove least recently used entries until the cache holds at most this many GiB")
    pr.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    pr.set_defaults(fn=cmd_prune)
