"""The environment runner (`atropos_core/envs/run_env.py`): atroposlib's fixed 5 s start-up wait is
shortened for the environments we launch, overridable by `ATROPOS_ENV_STARTUP_WAIT_S`.

- `test_startup_wait_maps_only_atroposlib_wait`: in-process, the proxy `asyncio` seen by
  `atroposlib.envs.base` shortens its 5 s sleep and no other; bad values leave atroposlib alone.
- `test_environments_started_together_one_shortened_one_not` (api, vllm): two real `repeat_env`
  processes started together through the launcher's `start_environment`, against the real API and
  the session's vLLM server: the one with the default samples its first group sooner after
  registering than atroposlib's 5 s would allow, the one told `ATROPOS_ENV_STARTUP_WAIT_S=5` does
  not (so the measurement sees the wait), and the groups of both reach the trainer. Two
  environments of one run, both with the default, train together in `test_first_contact.py`'s
  end-to-end test.
"""
from __future__ import annotations

import asyncio
import time

import pytest
import requests

from atropos_core.envs import run_env

ATROPOSLIB_WAIT_S = 5.0


@pytest.fixture
def envs_base(monkeypatch):
    """atroposlib's `envs.base` module, its `asyncio` restored to the real one after the test."""
    from atroposlib.envs import base

    monkeypatch.setattr(base, "asyncio", asyncio)
    return base


def _sleep_s(base, delay: float) -> float:
    async def timed() -> float:
        t0 = time.monotonic()
        await base.asyncio.sleep(delay)
        return time.monotonic() - t0

    return asyncio.run(asyncio.wait_for(timed(), timeout=ATROPOSLIB_WAIT_S - 1))


def test_startup_wait_maps_only_atroposlib_wait(envs_base):
    base = envs_base
    assert run_env.shorten_startup_wait({}) == run_env.STARTUP_WAIT_S == 0.0
    assert base.asyncio is not asyncio and base.asyncio.Event is asyncio.Event   # the rest is the real module
    assert _sleep_s(base, 5) < 1.0                                               # atroposlib's 5 s: shortened
    assert _sleep_s(base, 0.3) >= 0.3                                            # any other sleep: as asked
    # The variable sets it; applying it again replaces the proxy instead of wrapping it.
    assert run_env.shorten_startup_wait({run_env.STARTUP_WAIT_ENV: "0.5"}) == 0.5
    assert base.asyncio._real is asyncio and 0.5 <= _sleep_s(base, 5) < 2.0
    for bad in ("soon", "-1", "inf", "nan"):
        base.asyncio = asyncio
        assert run_env.shorten_startup_wait({run_env.STARTUP_WAIT_ENV: bad}) is None, bad
        assert base.asyncio is asyncio, bad
    # The one call it replaces is where the docstring says (atroposlib 0.4.0): else it would be left alone.
    import inspect

    assert run_env._ATROPOSLIB_STARTUP_CALL in inspect.getsource(base.BaseEnv.env_manager)


def _status_env(url: str, env_id: int) -> dict | None:
    try:
        r = requests.get(url + "/status-env", json={"env_id": env_id}, timeout=5)
    except requests.RequestException:
        return None
    return r.json() if r.status_code == 200 else None   # 500 until that env has registered


@pytest.mark.api
@pytest.mark.vllm
def test_environments_started_together_one_shortened_one_not(tmp_path, atropos_api, vllm_server):
    from atropos_core.client import AtroposClient, AtroposConfig
    from atropos_core.services import BUILTIN_ENV, start_environment

    client = AtroposClient(AtroposConfig(url=atropos_api.url, batch_size=8, max_token_len=64, max_wait_s=30))
    client.register()
    assert requests.get(atropos_api.url + "/batch", timeout=10).status_code == 200  # environments may join now
    waits = {"env0": None, "env1": str(ATROPOSLIB_WAIT_S)}   # the default; atroposlib's own, by the variable
    procs = []
    try:
        for name, wait in waits.items():
            procs.append(start_environment(
                BUILTIN_ENV, api_url=atropos_api.url, inference_urls=[vllm_server.url],
                tokenizer_dir=str(vllm_server.model_dir), group_size=4, max_token_len=64, log_dir=tmp_path,
                env_name=name, child_env={run_env.STARTUP_WAIT_ENV: wait} if wait else None))
        # As a trainer does, take every batch as it comes (an environment stops sampling while the
        # queue holds its max_batches_offpolicy batches, whoever queued them), noting when each
        # environment registered and when its first group reached us.
        registered: dict[int, float] = {}
        first_group: dict[int, float] = {}
        deadline = time.monotonic() + 240
        while len(first_group) < 2:
            assert time.monotonic() < deadline, (registered, first_group, [p.log_tail(20) for p in procs])
            for p in procs:
                assert p.alive(), p.log_tail(40)
            for env_id in (0, 1):
                if env_id not in registered and _status_env(atropos_api.url, env_id) is not None:
                    registered[env_id] = time.monotonic()
            while (batch := client.get_batch()):
                now = time.monotonic()
                for group in batch:   # registered since the last look, if not seen yet: a gap of 0
                    registered.setdefault(group["env_id"], now)
                    first_group.setdefault(group["env_id"], now)
            time.sleep(0.05)
        # env_id follows the order of registration: tell them apart by the wait each was given. Seen
        # through polls (each round ~0.1 s), a gap can read up to a round short or long: 1 s of margin.
        gaps = sorted(first_group[i] - registered[i] for i in (0, 1))
        assert gaps[0] < ATROPOSLIB_WAIT_S - 1, f"the default still waited: {gaps}"
        assert gaps[1] >= ATROPOSLIB_WAIT_S - 1, f"ATROPOS_ENV_STARTUP_WAIT_S=5 did not wait: {gaps}"
    finally:
        for p in procs:
            p.stop()
        client.close()
