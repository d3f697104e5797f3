"""Pipeline and tensor parallelism: equal logits, communication counters, refusals, worker
crashes and timeouts as errors (never hangs), and no orphaned worker processes."""

from __future__ import annotations

import gc
import os
import signal
import time

import psutil
import pytest
import torch

from slimbench.engines.parallel import DistributedModel, launch
from slimbench.engines.sharding import check_split
from slimbench.engines.workers import EchoState, WorkerError, WorkerGroup
from slimbench.method import MethodContext
from slimbench.registry import METHODS
from slimbench.specs import HardwareSpec
from tests.conftest import load_tiny

IDS = torch.tensor([[464, 3797, 3332, 319, 262, 2603, 13, 383, 3290], [40, 1842, 345, 11, 290, 314, 588, 340, 13]])


# one intra-op thread (conftest.one_torch_thread): the 2 shared cores are faster that way
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gone(pids, wait_s: float = 10.0) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def reference(arch: str):
    lm = load_tiny(arch)
    return lm, lm.logits(IDS), lm.generate(IDS, 6)


def check_split_model(lm, ref_logits, ref_tokens, dm: DistributedModel, mode: str) -> None:
    """Logits, greedy tokens, a cropped cache and the communication counters of a split model."""
    assert torch.allclose(lm.logits(IDS), ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(lm.generate(IDS, 6), ref_tokens)
    # a cropped cache continues exactly like a fresh one (what speculative decoding needs)
    _, cache = lm.prefill(IDS[:, :6])
    lm.decode(IDS[:, 6:8], cache)
    cache.crop(-2)
    logits, _ = lm.decode(IDS[:, 6:8], cache)
    assert torch.allclose(logits, ref_logits[:, 7], atol=1e-5, rtol=0)
    stats = dm.stats()
    assert stats["comm_bytes"] > 0 and stats["comm_seconds"] > 0 and 0 < stats["comm_share"] < 1
    if mode == "pipeline":  # rank 0 sends [B, T, H] float32 activations once per forward
        assert stats["ranks"][0]["comm_bytes"] % (4 * lm.model.config.hidden_size) == 0
        assert stats["ranks"][1]["comm_bytes"] == 0  # the last stage only receives
    else:  # every rank all-reduces the same tensors
        assert stats["ranks"][0]["comm_bytes"] == stats["ranks"][1]["comm_bytes"]


# Each launch spawns processes that import torch and transformers (seconds each on 2 busy cores):
# one launch per test, one test per mode, tensor parallelism also on a second architecture.
@pytest.mark.parametrize(("arch", "mode"), [("llama", "pipeline"), ("opt", "tensor")])
def test_split_model_equals_single_process(arch, mode):
    lm, ref_logits, ref_tokens = reference(arch)
    dm = launch(lm.model, mode, 2, threads=1, timeout_s=300)
    pids = dm.group.pids
    try:
        lm.model = dm
        check_split_model(lm, ref_logits, ref_tokens, dm, mode)
    finally:
        dm.close()
    assert gone(pids)


def test_method_reports_equal_logits_and_communication():
    lm, ref_logits, ref_tokens = reference("llama")
    params = sum(p.numel() for p in lm.model.parameters())
    method = METHODS.get("parallel")
    cfg = method.config(mode="tensor", world_size=2, check_prompt_len=16, check_new_tokens=4, timeout_s=300)
    method.check(lm, cfg)
    report = method.apply(lm, cfg, MethodContext(hardware=HardwareSpec(threads=2)))
    pids = lm.model.group.pids
    check = report.details["self_check"]
    assert check["logits_max_abs_diff"] < 1e-5 and check["greedy_identical"]
    assert check["comm_bytes"] > 0 and report.details["heads_per_rank"] == {"query": 2, "key_value": 1}
    check_split_model(lm, ref_logits, ref_tokens, lm.model, "tensor")
    from slimbench.method import size_report

    assert size_report(lm.model, {})["parameters"] == params
    del lm, report
    gc.collect()  # releasing the model shuts its workers down (the end of a cell group)
    assert gone(pids)


@pytest.mark.parametrize(
    ("arch", "mode", "world", "message"),
    [
        ("llama", "tensor", 4, "4 query and 2 key/value heads, not both divisible by 4"),
        ("llama", "tensor", 3, "not both divisible by 3"),
        ("gpt2", "tensor", 2, "does not support model type 'gpt2'"),
        ("llama", "pipeline", 3, "needs at least 3 decoder layers"),
    ],
)
def test_impossible_splits_are_refused_before_any_process_starts(arch, mode, world, message):
    lm = load_tiny(arch)
    with pytest.raises(ValueError, match=message):
        check_split(lm.model, mode, world, None)
    method = METHODS.get("parallel")
    with pytest.raises(ValueError, match=message):
        method.check(lm, method.config(mode=mode, world_size=world))


def test_refuses_a_model_it_cannot_split():
    lm = load_tiny("llama")
    METHODS.get("dynamic-int8").apply(
        lm, METHODS.get("dynamic-int8").config(), MethodContext(hardware=HardwareSpec(threads=1))
    )
    method = METHODS.get("parallel")
    with pytest.raises(ValueError, match=r"shards nn\.Linear weights"):
        method.check(lm, method.config(mode="tensor"))
    with pytest.raises(ValueError, match="layers_per_stage"):
        method.config(mode="tensor", layers_per_stage=[1, 1])


# -- the worker group's mechanics, on model-free workers ----------------------------------------
@pytest.fixture
def echo_group():
    group = WorkerGroup(EchoState, [None, None], name="echo", timeout_s=30, env={"SLIMBENCH_ECHO_TEST": "set"})
    yield group
    group.close()
    assert gone(group.pids)


def test_requests_and_the_environment_reach_every_worker_and_their_cpu_is_the_measurements(echo_group):
    from slimbench.measure import machine

    # one group for both (each group spawns two processes that import torch)
    assert [r["rank"] for r in echo_group.request({"op": "echo", "value": 7})] == [0, 1]
    # the group's environment reaches the workers (forked from a server that started earlier)
    assert [r["echo"] for r in echo_group.request({"op": "env", "name": "SLIMBENCH_ECHO_TEST"})] == ["set", "set"]
    assert "SLIMBENCH_ECHO_TEST" not in os.environ
    with machine.Contention() as c:
        echo_group.request({"op": "burn", "seconds": 0.3})
    assert c.own_cpu >= 2 * 0.3 - 0.05  # both workers' CPU (less a tick each), whatever the load
    # once shut down, a group's processes no longer count as the measurement's
    pids = echo_group.pids
    echo_group.close()
    assert not set(pids) & machine._MEASURED_PIDS


def test_a_killed_worker_becomes_an_error_and_the_group_is_shut_down(echo_group):
    os.kill(echo_group.pids[1], signal.SIGKILL)
    with pytest.raises(WorkerError, match=r"worker 1 \(pid \d+\) died .* exit code -9 \(signal 9\)"):
        echo_group.request({"op": "echo"})
    assert gone(echo_group.pids)
    with pytest.raises(WorkerError, match="shut down"):
        echo_group.request({"op": "echo"})


def test_a_worker_exception_carries_its_traceback(echo_group):
    with pytest.raises(WorkerError, match=r"worker 0 .* RuntimeError: requested failure on rank 0"):
        echo_group.request({"op": "raise", "rank": 0})
    assert gone(echo_group.pids)


def test_a_hung_worker_times_out():
    group = WorkerGroup(EchoState, [None, None], name="echo", timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"no reply from worker\(s\) \[1\] within 1.0 s"):
        group.request({"op": "sleep", "seconds": 60, "ranks": [1]})
    assert time.monotonic() - t0 < 30  # killed, not waited for
    assert gone(group.pids)


def test_a_worker_crash_inside_a_cell_becomes_a_failed_record(tmp_path):
    from slimbench.specs import CellSpec, MethodSpec, ModelSpec, StepSpec, TaskSpec
    from slimbench.sweep.driver import run_cells
    from slimbench.sweep.store import ResultStore

    cfg = METHODS.get("parallel").config(mode="pipeline", check_prompt_len=8, check_new_tokens=2, timeout_s=300)
    cell = CellSpec(
        model=ModelSpec(name="tiny-llama"),
        method=MethodSpec(steps=(StepSpec(name="parallel", params=cfg.to_dict()),)),
        task=TaskSpec(
            name="efficiency", version="1", params={"prompt_len": 8, "new_tokens": 2, "repeats": 1, "warmup": 0}
        ),
        hardware=HardwareSpec(threads=1),
    )
    killed = []
    real_stats = DistributedModel.stats

    def kill_a_worker(self):  # the worker dies during the method's self-check
        os.kill(self.group.pids[1], signal.SIGKILL)
        killed.extend(self.group.pids)
        return real_stats(self)

    DistributedModel.stats = kill_a_worker
    try:
        store = ResultStore(tmp_path)
        summary = run_cells([cell], store, show_progress=False, log=lambda s: None)
    finally:
        DistributedModel.stats = real_stats
    assert summary.failed == [cell.run_id]
    (record,) = store.records(include_failed=True)
    assert record["status"] == "failed" and record["error"]["type"] == "WorkerError"
    assert "worker 1" in record["error"]["message"] and "died" in record["error"]["message"]
    assert gone(killed)
