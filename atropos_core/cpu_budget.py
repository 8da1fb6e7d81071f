"""How many CPU threads, and which cores, each process of a run gets: decided once, logged once.

A run is up to five kinds of process on one machine: the trainer (one per rank), each vLLM server
(an API process, its EngineCore and one worker per tensor-parallel rank), the built-in or user
environment, and Atropos's trajectory API. Left alone, every one of them sizes its OpenMP / torch
pool to the whole machine and vLLM's queue readers spin on `sched_yield` for 1 s after every
message, so on a small box they fight over the cores and the trainer's step inside the loop is many
times what it is alone (numbers: docs/loop-speed-2026-12-01.md). `plan_cpu_budget` is the one place
that decides:

* **Compute processes** get threads in proportion: the trainer (on CPU) and each vLLM worker share
  the cores left after one core is set aside for the light processes (only on machines with >= 4
  cores: below that a reserved core is a lost core). Each vLLM worker is bound to its own cores
  with `VLLM_CPU_OMP_THREADS_BIND` (vLLM 0.32 `utils/ompmultiprocessing.py`: a cpu list such as
  "3" or "2-5" per worker, "|" between workers; its thread count is the list's length; "auto" would
  reserve a core for the EngineCore and take the rest). The trainer's count goes to
  `torch.set_num_threads`.
* **Light processes** (Atropos API, environment, vLLM's API process and EngineCore) are event
  loops that hand work on: `OMP_NUM_THREADS=1` (and MKL), `TOKENIZERS_PARALLELISM=false`, so an
  incidental torch op never wakes a pool of spinning threads.
* **No busy-waiting while idle**: `ATROPOS_VLLM_SPIN_S` (`SPIN_S`, 10 ms) tells our server (every
  process of its tree imports it, see `inference/server.py`) to let vLLM's shared-memory queue
  readers spin that long after a message, not 1 s (`SpinCondition.busy_loop_s`, which vLLM does not
  expose as a setting), then sleep on their notification socket.
* **GPU machines**: the trainer's process is pinned to the first cores (the ones that launch its
  kernels and feed the GPU), each vLLM server to the next ones, and the environment and the API
  to the rest, so data, HTTP and scoring never preempt the threads that keep a GPU busy.
* **The user wins**: a variable already set in the environment (e.g. `OMP_NUM_THREADS`,
  `VLLM_CPU_OMP_THREADS_BIND`) is left as it is for every process (listed in the log line), and
  `ATROPOS_CPU_BUDGET=off` turns the whole plan off.

`plan_cpu_budget` is pure (cores, what is started, the user's environment → settings); the caller
applies it: `apply_to_trainer` in the driver, `services.RunServices` for the children it starts.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

logger = logging.getLogger(__name__)

#: Our variables: the switch for the whole plan, and the vLLM queue readers' spin time (seconds).
BUDGET_ENV = "ATROPOS_CPU_BUDGET"
SPIN_ENV = "ATROPOS_VLLM_SPIN_S"
#: How long vLLM's queue readers spin after a message before they sleep on their socket. vLLM 0.32
#: spins 1 s; 0 stalls generation (a reader that sleeps after every message misses wake-ups). 10 ms
#: is longer than the gap between a busy engine's steps, so generation keeps spinning, and short
#: enough that a worker does not spin away the core after each burst: on the echo task, where the
#: engine idles between short bursts every step, 50 ms had the worker spinning half its CPU time
#: (measurements: docs/loop-speed-2026-12-01.md, "vLLM queue readers" and session 7).
SPIN_S = 0.01
#: Thread-count variables of the usual runtimes (OpenMP, MKL, OpenBLAS, numexpr).
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
#: Cores pinned to the trainer on a GPU machine, per rank (it launches kernels and packs batches).
GPU_TRAINER_CORES = 2
#: Cores pinned to each vLLM server on a GPU machine (API process, EngineCore, worker).
GPU_SERVER_CORES = 2


@dataclass(frozen=True)
class ProcessPlan:
    """One process's share: `threads` for its compute pool, `cpus` its affinity (None: unpinned),
    `env` the variables to set in it (the user's own settings already removed)."""

    name: str
    threads: int
    cpus: tuple[int, ...] | None = None
    env: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        where = f" on cpus {_ranges(self.cpus)}" if self.cpus else ""
        bind = self.env.get("VLLM_CPU_OMP_THREADS_BIND")
        bind = f" (vLLM worker bound to {bind})" if bind else ""
        return f"{self.name} {self.threads} thread{'s' if self.threads != 1 else ''}{where}{bind}"


@dataclass(frozen=True)
class CpuBudget:
    cpus: tuple[int, ...]
    trainer: ProcessPlan
    servers: tuple[ProcessPlan, ...]
    environments: tuple[ProcessPlan, ...]
    """One plan per environment process, each under the name it is started with (`env_names`)."""
    api: ProcessPlan
    user_kept: tuple[str, ...] = ()
    """Variables the user set, which the plan leaves alone everywhere."""
    enabled: bool = True
    oversubscribed: bool = False

    @property
    def environment(self) -> ProcessPlan:
        """The first environment's plan (the only one in a single-environment run)."""
        return self.environments[0]

    def describe(self) -> str:
        if not self.enabled:
            return f"CPU budget off ({BUDGET_ENV}=off): every process keeps its runtime's defaults"
        parts = [self.trainer.describe(), *(s.describe() for s in self.servers),
                 *(e.describe() for e in self.environments), self.api.describe()]
        out = f"CPU budget for {len(self.cpus)} core(s) {_ranges(self.cpus)}: " + "; ".join(parts)
        if self.user_kept:
            out += f"; kept from your environment: {', '.join(self.user_kept)}"
        if self.oversubscribed:
            out += "; more compute processes than cores: they share"
        return out

    def child(self, name: str) -> ProcessPlan | None:
        """The plan of child `name` ("api", "env" or "env0", "env1", ..., "vllm0", "vllm1", ...), or
        None (not planned)."""
        if not self.enabled:
            return None
        for p in (*self.servers, *self.environments, self.api):
            if p.name == name:
                return p
        return None


def env_names(count: int) -> list[str]:
    """The names of a run's `count` environment processes: "env" alone, else "env0", "env1", ..."""
    return ["env"] if count == 1 else [f"env{i}" for i in range(count)]


def _ranges(cpus: Sequence[int] | None) -> str:
    """"0-3,6" for (0, 1, 2, 3, 6): the cpu-list syntax of taskset and VLLM_CPU_OMP_THREADS_BIND."""
    if not cpus:
        return ""
    out, ids = [], sorted(set(cpus))
    start = prev = ids[0]
    for c in ids[1:] + [None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if c is not None:
            start = prev = c
    return ",".join(out)


def _light_env(user_env: Mapping[str, str]) -> dict[str, str]:
    env = {v: "1" for v in THREAD_VARS}
    env["TOKENIZERS_PARALLELISM"] = "false"
    return {k: v for k, v in env.items() if k not in user_env}


def _split(pool: Sequence[int], shares: Sequence[int]) -> list[tuple[int, ...]]:
    """Consecutive slices of `pool` of the given sizes, wrapping round when the pool is too small."""
    out, i = [], 0
    for n in shares:
        out.append(tuple(pool[(i + k) % len(pool)] for k in range(n)))
        i += n
    return out


def plan_cpu_budget(cpus: Sequence[int], *, num_servers: int = 1, trainer_ranks: int = 1,
                    trainer_on_gpu: bool = False, servers_on_gpu: bool = False,
                    start_env: bool = True, start_api: bool = True, num_envs: int = 1,
                    user_env: Mapping[str, str] = {}) -> CpuBudget:  # noqa: B006 - read only
    """The thread counts and bindings of every process of a run.

    Args:
        cpus: the cores this run may use (`os.sched_getaffinity(0)`), at least one.
        num_servers: vLLM servers started (0 when the run uses servers it did not start).
        trainer_ranks: trainer processes on this machine (torchrun's local world size).
        trainer_on_gpu / servers_on_gpu: where the trainer / the vLLM workers compute.
        start_env / start_api: whether those children are started (their plans exist either way).
        num_envs: environment processes (one plan each, named by `env_names`).
        user_env: the environment the run was started with; variables set there are never changed.
    """
    cpus = tuple(sorted(set(int(c) for c in cpus)))
    if not cpus:
        raise ValueError("plan_cpu_budget: no cpus")
    if num_servers < 0 or trainer_ranks < 1:
        raise ValueError(f"plan_cpu_budget: bad num_servers={num_servers} / trainer_ranks={trainer_ranks}")
    kept = tuple(sorted(k for k in (*THREAD_VARS, "VLLM_CPU_OMP_THREADS_BIND", "TOKENIZERS_PARALLELISM",
                                     SPIN_ENV) if k in user_env))
    if str(user_env.get(BUDGET_ENV, "")).lower() in ("0", "off", "false", "no"):
        none = ProcessPlan("-", 0)
        return CpuBudget(cpus, none, (), (none,), none, kept, enabled=False)
    n = len(cpus)
    light = _light_env(user_env)
    spin = {} if SPIN_ENV in user_env else {SPIN_ENV: str(SPIN_S)}
    oversubscribed = False

    if trainer_on_gpu:
        # Pin: trainer ranks first, then each server, the rest (at least one core) to env + API.
        want_trainer = GPU_TRAINER_CORES * trainer_ranks
        want_servers = GPU_SERVER_CORES * num_servers
        if want_trainer + want_servers + 1 <= n:
            t_cpus, *s_cpus = _split(cpus, [want_trainer] + [GPU_SERVER_CORES] * num_servers)
            rest = cpus[want_trainer + want_servers:]
        else:  # a small GPU box: the trainer keeps its own core(s), everything else shares the rest
            t_n = max(1, min(want_trainer, n - 1)) if n > 1 else 1
            t_cpus = cpus[:t_n]
            rest = cpus[t_n:] or cpus
            s_cpus = [rest] * num_servers
            oversubscribed = n < 2
        per_rank = max(1, len(t_cpus) // trainer_ranks)
        trainer = ProcessPlan("trainer", per_rank, t_cpus)
        servers = []
        for i, sc in enumerate(s_cpus):
            env = dict(light, **spin)
            if not servers_on_gpu and "VLLM_CPU_OMP_THREADS_BIND" not in user_env:
                env["VLLM_CPU_OMP_THREADS_BIND"] = _ranges(sc)
            servers.append(ProcessPlan(f"vllm{i}", len(sc) if not servers_on_gpu else 1, tuple(sc), env))
        return CpuBudget(cpus, trainer, tuple(servers), _env_plans(num_envs, tuple(rest), light),
                         ProcessPlan("api", 1, tuple(rest), light), kept, oversubscribed=oversubscribed)

    # CPU trainer. One core for the light processes only where it is a small share of the machine.
    reserve = 1 if n >= 4 else 0
    pool = cpus[:n - reserve]
    light_cpus = tuple(cpus[n - reserve:]) or None
    cpu_servers = 0 if servers_on_gpu else num_servers
    parts = trainer_ranks + cpu_servers
    if len(pool) < parts:
        oversubscribed = True
    per_server = max(1, len(pool) // (cpu_servers + 1)) if cpu_servers else 0
    trainer_cores = max(trainer_ranks, len(pool) - per_server * cpu_servers)
    per_rank = max(1, trainer_cores // trainer_ranks)
    # Servers take the last cores of the pool, the trainer the first: vLLM binds its worker hard
    # (OMP_PROC_BIND), the trainer stays unpinned and the scheduler fills gaps around the workers.
    server_cpus = _split(pool[::-1], [per_server] * cpu_servers)
    user_threads = str(user_env.get("OMP_NUM_THREADS", ""))
    if user_threads.isdigit() and int(user_threads) > 0:  # the count torch will use
        per_rank = int(user_threads)
    trainer = ProcessPlan("trainer", per_rank, None)
    servers = []
    for i in range(num_servers):
        env = dict(light, **spin)
        if i < cpu_servers:
            sc = tuple(sorted(server_cpus[i]))
            if "VLLM_CPU_OMP_THREADS_BIND" not in user_env:
                env["VLLM_CPU_OMP_THREADS_BIND"] = _ranges(sc)
            servers.append(ProcessPlan(f"vllm{i}", len(sc), None, env))
        else:
            servers.append(ProcessPlan(f"vllm{i}", 1, None, env))
    return CpuBudget(cpus, trainer, tuple(servers), _env_plans(num_envs, light_cpus, light),
                     ProcessPlan("api", 1, light_cpus, light), kept, oversubscribed=oversubscribed)


def _env_plans(count: int, cpus, env: dict[str, str]) -> tuple[ProcessPlan, ...]:
    """Environments are light processes: each gets the light share, under its own name."""
    return tuple(ProcessPlan(name, 1, cpus, env) for name in env_names(max(count, 1)))


def available_cpus() -> tuple[int, ...]:
    """The cores this process may run on (its affinity mask), or 0..cpu_count-1."""
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


def plan_for_run(cfg, device, local_world: int | None = None) -> CpuBudget:
    """`plan_cpu_budget` for a run's config (`TrainConfig`), this machine and this environment
    (`local_world`: trainer ranks on this machine, torchrun's `LOCAL_WORLD_SIZE` by default)."""
    if local_world is None:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return plan_cpu_budget(
        available_cpus(), num_servers=cfg.inference.num_servers if cfg.inference.start else 0,
        trainer_ranks=local_world, trainer_on_gpu=getattr(device, "type", str(device)) == "cuda",
        servers_on_gpu=getattr(device, "type", str(device)) == "cuda",
        start_env=cfg.env.start, start_api=cfg.run.start_api, num_envs=len(cfg.env.module_specs),
        user_env=dict(os.environ))


def trainer_cpus(budget: CpuBudget, local_rank: int = 0) -> tuple[int, ...] | None:
    """The cores trainer rank `local_rank` is pinned to (its slice of the trainer's), or None."""
    plan = budget.trainer
    if not budget.enabled or not plan.cpus:
        return None
    n = plan.threads
    mine = plan.cpus[local_rank * n:(local_rank + 1) * n]
    return mine or plan.cpus


def apply_to_trainer(budget: CpuBudget, local_rank: int = 0) -> None:
    """Size this (trainer) process's torch pool and pin it as planned; the user's settings win."""
    if not budget.enabled:
        return
    import torch

    if "OMP_NUM_THREADS" not in budget.user_kept:
        torch.set_num_threads(budget.trainer.threads)
    cpus = trainer_cpus(budget, local_rank)
    if cpus and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as e:  # a cpuset that forbids it: run unpinned
            logger.warning("could not pin the trainer to cpus %s: %s", _ranges(cpus), e)
