"""Loopback-only network namespaces for tests that start networked engines (Ray, servers, a
Hub stand-in): nothing they bind can be reached from, or reach, anything but this namespace."""

from __future__ import annotations

import shutil
import subprocess


def loopback_namespace_problem() -> str | None:
    """None where `unshare --net` gives a namespace with loopback up; else why not."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs `unshare` and `ip` (util-linux, iproute2)"
    try:
        probe = subprocess.run(["unshare", "--net", "sh", "-c", "ip link set lo up"], capture_output=True, text=True,
                               timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"cannot create a network namespace: {err}"
    if probe.returncode != 0:
        return f"cannot create a network namespace (needs root): {probe.stderr.strip()}"
    return None
