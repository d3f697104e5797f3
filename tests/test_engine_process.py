"""An engine in its own process: replies, an engine that raises, dies or hangs becomes an
EngineError naming what it was doing, and no engine process outlives close()."""

from __future__ import annotations

import os

import pytest

from slimbench.engines.engine_process import EngineError, EngineProcess, peak_rss_bytes

TARGET = "slimbench.engines.engine_process:EchoEngine"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().split()[2] != "Z"


def test_request_reply_and_close():
    proc = EngineProcess(TARGET, {"x": 1}, name="echo", timeout_s=30)
    assert proc.info["payload"] == {"x": 1} and proc.info["pid"] == proc.pid != os.getpid()
    assert proc.request({"op": "echo", "value": [1, 2]}) == [1, 2]
    assert peak_rss_bytes(proc.pid)["peak_rss_bytes"] > 0
    proc.close()
    assert not alive(proc.pid)
    with pytest.raises(EngineError, match="shut down"):
        proc.request({"op": "echo"})


def test_the_engines_cpu_is_the_measurements_own_not_contention():
    """A cell's engine process does its measured work: the efficiency task must not read its CPU as
    another process on the cores (which would mark every engine cell noisy)."""
    from slimbench.measure import machine

    proc = EngineProcess(TARGET, None, name="echo", timeout_s=30)
    try:
        with machine.Contention() as c:
            proc.request({"op": "burn", "seconds": 0.3})
        assert c.own_cpu >= 0.3 - 0.02  # the engine's CPU (less a tick), whatever the machine's load
    finally:
        proc.close()
    assert proc.pid not in machine._MEASURED_PIDS


def test_an_engine_cells_memory_is_read_in_the_engine_process():
    """The efficiency task reads an engine cell's memory in the engine's process: the peak of one
    generation there (the engine's lifetime peak reset first), not the cell's own process."""
    from types import SimpleNamespace

    from slimbench.tasks.efficiency import EfficiencyRun

    from slimbench.measure import memory

    proc = EngineProcess(TARGET, None, name="echo", timeout_s=30)
    try:
        proc.request({"op": "touch", "bytes": 400 * 2**20})  # a lifetime peak the reading must not see
        size = 96 * 2**20
        lm = SimpleNamespace(model=SimpleNamespace(proc=proc),
                             generate=lambda ids, n: proc.request({"op": "touch", "bytes": size}))
        run = SimpleNamespace(lm=lm, ids=None, cfg=SimpleNamespace(new_tokens=4),
                              ctx=SimpleNamespace(method_report={"memory_bytes": 10 * 2**20}))
        reading = EfficiencyRun._engine_memory(run, proc.pid)
        assert reading["isolation"] == "engine process" and reading["weights"] == 10 * 2**20
        assert reading["peak_covers"] == "this generation"
        assert 0.9 * size < reading["peak"] - reading["start"] < size + 32 * 2**20 < 400 * 2**20
        parts, proto = memory.split(reading)
        assert parts["peak"] == reading["peak"] and "runtime" not in parts and "engine" in proto["note"]
    finally:
        proc.close()


@pytest.mark.parametrize(("op", "message"), [("raise", "requested failure"), ("die", "exit code 3")])
def test_engine_failure_becomes_an_error_and_the_process_is_gone(op, message):
    proc = EngineProcess(TARGET, None, name="echo", timeout_s=30)
    with pytest.raises(EngineError, match=message):
        proc.request({"op": op})
    assert not alive(proc.pid)


def test_hang_is_killed_after_the_timeout():
    proc = EngineProcess(TARGET, None, name="echo", timeout_s=0.5)
    with pytest.raises(EngineError, match=r"no answer within 0\.5 s"):
        proc.request({"op": "sleep", "seconds": 60})
    assert proc.proc.returncode == -9  # killed in its sleep, not finished
    assert not alive(proc.pid)
