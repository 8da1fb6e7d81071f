"""The CPU budget (`atropos_core.cpu_budget`) as a pure function, the vLLM spin setting our server
applies in every process of its tree, and the per-step time split (`atropos_core.steptime`)."""
import itertools

import pytest

from atropos_core.cpu_budget import SPIN_ENV, _ranges, plan_cpu_budget, trainer_cpus
from atropos_core.steptime import PHASES, RunTime, StepClock


def _bound(plan) -> set[int]:
    """The cores a server's vLLM worker is bound to (VLLM_CPU_OMP_THREADS_BIND, cpu-list syntax)."""
    out = set()
    for part in plan.env["VLLM_CPU_OMP_THREADS_BIND"].split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


@pytest.mark.parametrize("cores,servers", [(2, 1), (3, 1), (4, 1), (16, 1), (16, 3), (7, 2)])
def test_cpu_machine_never_oversubscribes(cores, servers):
    b = plan_cpu_budget(range(cores), num_servers=servers, user_env={})
    bound = [_bound(s) for s in b.servers]
    for s, cpus in zip(b.servers, bound):
        assert s.threads == len(cpus) >= 1
        assert s.env["OMP_NUM_THREADS"] == "1" and float(s.env[SPIN_ENV]) < 1  # light parts of vLLM
    for x, y in itertools.combinations(bound, 2):
        assert not x & y, "two vLLM workers bound to one core"
    light = set(b.environment.cpus or ())
    assert not light & set().union(*bound)
    # Compute threads fit in the cores (one left to the light processes from 4 cores up).
    assert b.trainer.threads + sum(s.threads for s in b.servers) == cores - (1 if cores >= 4 else 0)
    assert b.environment.env["OMP_NUM_THREADS"] == b.api.env["OMP_NUM_THREADS"] == "1"
    assert not b.oversubscribed


def test_two_cores_one_thread_each():
    b = plan_cpu_budget([0, 1], num_servers=1, user_env={})
    assert (b.trainer.threads, b.servers[0].threads) == (1, 1)
    assert _bound(b.servers[0]) == {1} and b.trainer.cpus is None
    assert "trainer 1 thread" in b.describe() and "bound to 1" in b.describe()


def test_more_servers_than_cores_share_and_say_so():
    b = plan_cpu_budget([0, 1], num_servers=3, user_env={})
    assert b.oversubscribed and "share" in b.describe()
    assert all(s.threads == 1 for s in b.servers)


def test_user_settings_win():
    user = {"OMP_NUM_THREADS": "2", "VLLM_CPU_OMP_THREADS_BIND": "0-1", SPIN_ENV: "0.5"}
    b = plan_cpu_budget([0, 1, 2, 3], num_servers=1, user_env=user)
    for plan in (*b.servers, b.environment, b.api):
        assert not set(user) & set(plan.env), f"{plan.name} overrides the user's {set(user) & set(plan.env)}"
        assert plan.env["MKL_NUM_THREADS"] == "1"  # what the user did not set is still planned
    assert b.trainer.threads == 2
    assert set(b.user_kept) == set(user) and "kept from your environment" in b.describe()


def test_budget_off():
    b = plan_cpu_budget([0, 1], num_servers=1, user_env={"ATROPOS_CPU_BUDGET": "off"})
    assert not b.enabled and b.child("vllm0") is None and "off" in b.describe()


def test_gpu_machine_keeps_cpu_work_off_the_trainers_cores():
    b = plan_cpu_budget(range(32), num_servers=2, trainer_ranks=2, trainer_on_gpu=True, servers_on_gpu=True,
                        user_env={})
    t = set(b.trainer.cpus)
    r0, r1 = set(trainer_cpus(b, 0)), set(trainer_cpus(b, 1))
    assert r0 and r1 and not r0 & r1 and r0 | r1 == t
    servers = [set(s.cpus) for s in b.servers]
    assert all(s and not s & t for s in servers) and not servers[0] & servers[1]
    assert set(b.environment.cpus) == set(b.api.cpus)
    assert not set(b.environment.cpus) & (t | servers[0] | servers[1])
    assert all("VLLM_CPU_OMP_THREADS_BIND" not in s.env for s in b.servers)  # GPU workers: not CPU OMP


def test_small_gpu_machine_still_reserves_the_trainer():
    b = plan_cpu_budget([0, 1], num_servers=1, trainer_on_gpu=True, servers_on_gpu=True, user_env={})
    assert b.trainer.cpus == (0,) and 0 not in b.environment.cpus and 0 not in b.servers[0].cpus


def test_bad_input():
    with pytest.raises(ValueError):
        plan_cpu_budget([], num_servers=1)
    with pytest.raises(ValueError):
        plan_cpu_budget([0], num_servers=-1)


def test_ranges():
    assert _ranges((0, 1, 2, 3, 6, 8, 9)) == "0-3,6,8-9" and _ranges((5,)) == "5"


def test_spin_setting_reaches_vllm_queue_readers():
    """What our server runs at import in every process of its tree: readers stop spinning."""
    pytest.importorskip("vllm")
    from vllm.distributed.device_communicators import shm_broadcast

    from atropos_core.inference.server import quiet_idle_readers

    original = getattr(shm_broadcast.SpinCondition.__init__, "_atropos_original", shm_broadcast.SpinCondition.__init__)
    try:
        assert quiet_idle_readers({}) is None
        assert quiet_idle_readers({SPIN_ENV: "zero"}) is None  # logged and ignored
        assert quiet_idle_readers({SPIN_ENV: "0.05"}) == 0.05
        import zmq

        ctx = zmq.Context()
        try:
            path = "ipc:///tmp/atropos-spin-test-" + str(id(ctx))
            writer = shm_broadcast.SpinCondition(False, ctx, path)
            reader = shm_broadcast.SpinCondition(True, ctx, path)
            assert reader.busy_loop_s == 0.05
            reader.record_read()
            writer.notify()
            reader.wait(timeout_ms=2000)  # returns on the notification, no 1 s of spinning first
            for s in (writer, reader):
                s.local_notify_socket.close(0)
            for s in (reader.read_cancel_socket, reader.write_cancel_socket):
                s.close(0)
        finally:
            ctx.term()
    finally:
        shm_broadcast.SpinCondition.__init__ = original


def test_step_clock_phases_add_up():
    t = iter([0.0, 0.5, 0.7, 1.0, 1.4, 1.45, 2.0, 3.0, 3.1, 3.3])
    clock = StepClock(clock=lambda: next(t))          # starts at 0.0
    clock.lap("other"), clock.lap("wait_data"), clock.lap("train"), clock.lap("sync")  # 0.5 .2 .3 .4
    first = clock.split()                              # other += 0.05
    assert first["perf/wait_data_s"] == pytest.approx(0.2) and first["perf/sync_s"] == pytest.approx(0.4)
    assert first["perf/step_s"] == pytest.approx(1.45) and first["perf/log_s"] == 0.0
    clock.lap("log")                                   # 0.55, charged to the next record
    clock.lap("wait_data"), clock.lap("train")         # 1.0, 0.1
    second = clock.split()                             # other 0.2
    for rec in (first, second):
        assert set(rec) == {f"perf/{p}_s" for p in PHASES} | {"perf/step_s"}
        assert sum(rec[f"perf/{p}_s"] for p in PHASES) == pytest.approx(rec["perf/step_s"])
    assert second["perf/log_s"] == pytest.approx(0.55) and second["perf/step_s"] == pytest.approx(3.3 - 1.45)


def _record(wait: float, train: float, stale=None) -> dict:
    rec = {"perf/log_s": 0.01, "perf/wait_data_s": wait, "perf/train_s": train, "perf/sync_s": 0.02,
           "perf/other_s": 0.01}
    rec["perf/step_s"] = sum(rec.values())
    if stale is not None:
        rec["data/staleness_mean"] = stale
    return rec


def test_run_time_adds_up_the_records_and_names_the_biggest_share_first():
    rt = RunTime()
    assert rt.summary() is None, "no line before the first step"
    for i in range(4):
        rt.add(_record(wait=0.1, train=0.3, stale=[0.0, 1.0, float("nan"), None][i]))
    assert rt.steps == 4 and rt.total_s == pytest.approx(4 * 0.44)
    assert rt.phases["train"] == pytest.approx(1.2) and rt.share("wait_data") == pytest.approx(0.4 / 1.76)
    assert rt.staleness == pytest.approx(0.5), "NaN and missing staleness are left out of the mean"
    line = rt.summary()
    assert line.startswith("time over 4 steps (1.8 s): training 68%, waiting for data 23%, weight sync 5%")
    assert "0.50 steps stale" in line and "one batch ahead" not in line


@pytest.mark.parametrize("wait, stale, steps, ahead, hint", [
    (0.5, 0.1, 20, None, True),    # waiting most of the time for fresh data: say what would overlap it
    (0.5, 0.1, 20, 1, True),       # ... and its environments are known to run on policy
    (0.5, 0.1, 20, 2, False),      # they already have room for a batch ahead: generation is the slow side
    (0.5, 0.9, 20, None, False),   # the environment already runs ahead
    (0.05, 0.1, 20, None, False),  # waiting is not most of the run
    (0.5, None, 20, None, False),  # no staleness measured (e.g. synthetic batches): nothing to say
    (0.5, 0.1, 5, None, False),    # too few steps to say it
])
def test_run_time_suggests_running_ahead_only_when_waiting_on_policy(wait, stale, steps, ahead, hint):
    rt = RunTime()
    for _ in range(steps):
        rt.add(_record(wait=wait, train=0.1, stale=stale))
    assert rt.waits_on_policy() is (hint or ahead == 2)
    assert ("--env.max_batches_offpolicy 2" in rt.summary(ahead)) is hint


def test_each_environment_has_its_own_plan_by_name():
    from atropos_core.cpu_budget import env_names

    one = plan_cpu_budget([0, 1, 2, 3], num_servers=1, user_env={})
    assert [p.name for p in one.environments] == env_names(1) == ["env"] and one.child("env") is one.environment
    three = plan_cpu_budget([0, 1, 2, 3], num_servers=1, num_envs=3, user_env={})
    assert [p.name for p in three.environments] == env_names(3) == ["env0", "env1", "env2"]
    for name in env_names(3):
        plan = three.child(name)
        assert plan is not None and plan.env["OMP_NUM_THREADS"] == "1" and plan.cpus == three.api.cpus
    assert three.child("env") is None and three.child("env3") is None  # planned by name, not by prefix
