"""Run a command as a child and take its whole process group down when the cell goes away.

``python guard.py CMD ...`` is started in a new session (it leads the process group); it runs
CMD, returns its exit code, and kills the group (CMD and every process CMD started: a load
generator's workers, a server's helpers) when

- it gets SIGTERM (``stop``/``kill`` of the cell's server or load generator), or
- its parent, the cell's process, is gone (killed outright: no ``finally`` ran there).

Standard library only, run by path, so it starts in milliseconds; its CPU time is counted with
the command's (a process' rusage includes the children it reaped).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

POLL_S = 0.5


def main(argv: list[str]) -> int:
    parent = os.getppid()

    def kill_group(*_: object) -> None:
        os.killpg(0, signal.SIGKILL)  # this process too

    signal.signal(signal.SIGTERM, kill_group)
    child = subprocess.Popen(argv)
    while True:
        try:
            return child.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            if os.getppid() != parent:
                kill_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
