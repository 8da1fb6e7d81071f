"""atropos_core.client against the real trajectory API (`run-api`, atroposlib 0.4.0).

The server's hazards are reproduced, not mocked: NaN/Infinity make its `/batch` answer 500, a
restart or `/reset_data` forgets the trainer, data posted before a registration makes it ignore
the registration, a group larger than a batch never ships. The one "fault" made by hand is an
address where nothing listens.
"""
from __future__ import annotations

import json
import logging
import math
import random
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from atropos_core.data import DataConfig, build_train_batch, groups_from_json_bytes
from atropos_core.client import (AtroposAPIError, AtroposClient, AtroposConfig, AtroposConfigMismatch,
                                 AtroposUnavailable)
from atropos_core.procs import ManagedProcess
from atropos_core.services import free_port
from tests.fixtures.atropos_api import make_group, post_groups, register_env
from tests.fixtures.batches import VOCAB, check_against_reference


def client_for(url: str, **kw) -> AtroposClient:
    kw.setdefault("batch_size", 8)
    kw.setdefault("max_token_len", 64)
    kw.setdefault("max_wait_s", 20.0)
    kw.setdefault("backoff_max_s", 0.2)
    return AtroposClient(AtroposConfig(url=url, **kw))


def groups(seed: int, k: int, n: int = 2, **kw) -> list[dict]:
    rng = random.Random(seed)
    return [make_group(rng, n=n, vocab=VOCAB, **kw) for _ in range(k)]


# ---- config --------------------------------------------------------------------------------------

def test_group_larger_than_batch_refused_at_config_time():
    with pytest.raises(ValueError, match=r"atropos.group_size 16 > atropos.batch_size 8.*blocks its queue forever"):
        AtroposConfig(batch_size=8, group_size=16)
    with pytest.raises(ValueError, match="not a multiple of atropos.group_size"):
        AtroposConfig(batch_size=8, group_size=3)
    AtroposConfig(batch_size=8, group_size=4)  # fine


@pytest.mark.parametrize("bad, match", [
    (dict(url="127.0.0.1:8000"), "atropos.url"), (dict(batch_size=0), "atropos.batch_size"),
    (dict(max_wait_s=0), "atropos.max_wait_s"), (dict(request_timeout_s=float("inf")), "request_timeout_s"),
    (dict(backoff_initial_s=2.0, backoff_max_s=1.0), "backoff_initial_s"), (dict(num_steps=0), "num_steps"),
    (dict(group_size=0), "atropos.group_size"), (dict(starting_step=-1), "starting_step"),
    (dict(long_poll_s=-0.1), "atropos.long_poll_s"), (dict(long_poll_s=31.0), "atropos.long_poll_s"),
])
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        AtroposConfig(**bad)


@pytest.mark.api
def test_why_group_larger_than_batch_is_refused(atropos_api):
    """The server hazard the config check prevents: such a group stays queued forever."""
    client = client_for(atropos_api.url, batch_size=4)
    client.register()
    post_groups(atropos_api.url, groups(0, k=1, n=8))
    for _ in range(3):
        assert client.get_batch() is None
    assert client.status()["queue_size"] == 1


# ---- the whole input chain, exact -------------------------------------------------------------

@pytest.mark.api
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_fetch_validate_pack_exact(atropos_api, layout):
    """register → post with /scored_data_list → fetch → validate → advantages → micro-batches,
    checked position by position against the plain-loop reference."""
    client = client_for(atropos_api.url, batch_size=8, group_size=2)
    client.register()
    assert client.info() == {"batch_size": 8, "max_token_len": 64}
    posted = groups(10, k=3) + groups(11, k=1, token_advantages=True)
    posted[0]["overrides"] = [{"set_advantage_to_zero": True}, {}]
    post_groups(atropos_api.url, posted[:2])
    assert client.get_batch() is None          # 4 of 8 sequences: not a batch yet
    posted += groups(12, k=4)
    post_groups(atropos_api.url, posted[2:])  # now two batches: the API serves the newer first
    batch = client.wait_for_batch()
    assert len(batch) == 4 and all(len(g) == 14 for g in batch)  # atroposlib's 14 keys
    assert groups_from_json_bytes(client.last_raw) == batch      # what rank 0 forwards to the others
    got = {json.dumps(g["tokens"]) for g in batch}
    sent = [g for g in posted if json.dumps(g["tokens"]) in got]
    assert len(sent) == 4 and all(g[k] == s[k] for g, s in zip(sorted(batch, key=lambda g: g["tokens"]),
                                                                   sorted(sent, key=lambda g: g["tokens"]))
                                  for k in ("tokens", "masks", "scores", "inference_logprobs"))
    cfg = DataConfig(max_token_len=64, vocab_size=VOCAB, layout=layout, max_tokens_per_micro_batch=20,
                     advantage_scale="group", use_inference_logprobs=True, use_ref_logprobs=True)
    tb = build_train_batch(batch, cfg)
    assert tb.metrics["data/dropped"] == 0 and tb.num_groups == 4 and tb.num_sequences == 8
    check_against_reference(tb, batch, cfg)
    assert client.wait_for_batch() != batch    # the second batch: the other 4 groups
    m = client.metrics()
    assert m["data/batches"] == 2 and m["data/api_errors"] == 0 and all("/" in k for k in m)


@pytest.mark.api
def test_first_batch_call_lets_environments_register(atropos_api):
    client = client_for(atropos_api.url)
    client.register()
    assert register_env(atropos_api.url, 2)["status"] == "wait for trainer to start"
    assert client.get_batch() is None
    assert register_env(atropos_api.url, 2)["status"] == "success"


# ---- survived server errors ---------------------------------------------------------------------

@pytest.mark.api
@pytest.mark.parametrize("field, value", [("scores", float("nan")), ("inference_logprobs", float("inf")),
                                          ("advantages", float("-inf"))])
def test_nan_batch_500_is_survived(atropos_api, field, value):
    """A NaN/Infinity in a queued group makes atroposlib's /batch answer 500 (the batch is lost):
    the client counts it, keeps polling, and returns the next good batch."""
    client = client_for(atropos_api.url, batch_size=4)
    client.register()
    bad = groups(20, k=2, token_advantages=field == "advantages")
    if field == "scores":
        bad[0]["scores"][1] = value
    else:
        bad[1][field][0][-1] = value
    post_groups(atropos_api.url, bad, allow_nan=True)
    good = groups(21, k=2)
    timer = threading.Timer(0.5, post_groups, args=(atropos_api.url, good))
    timer.start()
    try:
        batch = client.wait_for_batch()
    finally:
        timer.join()
    assert [g["tokens"] for g in batch] == [g["tokens"] for g in good]
    m = client.metrics()
    assert m["data/api_errors"] == 1 and m["data/reregistered"] == 0 and m["data/batches"] == 1


@pytest.mark.api
def test_reset_data_mid_run_reregisters(atropos_api):
    client = client_for(atropos_api.url)
    client.register()
    requests.get(atropos_api.url + "/reset_data", timeout=10)
    assert client.get_batch() is None          # 500 (its queue is gone), then /info says -1
    assert client.metrics()["data/reregistered"] == 1
    assert client.info()["batch_size"] == 8
    post_groups(atropos_api.url, groups(30, k=4))
    assert len(client.wait_for_batch()) == 4


@pytest.mark.api
def test_data_posted_before_registration(atropos_api, caplog):
    """atroposlib ignores a registration that comes after data; the client resets and registers."""
    post_groups(atropos_api.url, groups(40, k=1))
    client = client_for(atropos_api.url)
    with caplog.at_level(logging.WARNING, logger="atropos_core.client"):
        client.register()
    assert "ignored the registration" in caplog.text
    assert client.metrics()["data/api_resets"] == 1 and client.info()["batch_size"] == 8
    post_groups(atropos_api.url, groups(41, k=4))
    assert len(client.wait_for_batch()) == 4


@pytest.mark.api
def test_other_registration_is_a_clear_error(atropos_api):
    client_for(atropos_api.url, batch_size=8).register()
    with pytest.raises(AtroposConfigMismatch, match="batch_size=8.*ours: batch_size=16"):
        client_for(atropos_api.url, batch_size=16).register()


@pytest.mark.api
def test_restart_between_polls_reregisters_and_continues(own_atropos_api):
    """Kill the API between polls; it comes back (empty) on the same port while the client waits:
    the client rides out the connection errors, registers again and gets the next batch."""
    server = own_atropos_api
    client = client_for(server.url, batch_size=4, starting_step=5)
    client.register()
    post_groups(server.url, groups(50, k=2))
    first = client.wait_for_batch()
    server.stop()
    with pytest.raises(requests.ConnectionError):
        client.get_batch()

    second = groups(51, k=2)
    result: dict = {}

    def wait():
        try:
            result["batch"] = client.wait_for_batch()
        except Exception as e:  # noqa: BLE001 - reported by the test below
            result["error"] = e

    # The client waits in a thread; the server is restarted from this (main) thread: services.py
    # asks Linux to SIGTERM a child when the *thread* that started it exits (PR_SET_PDEATHSIG).
    waiter = threading.Thread(target=wait)
    waiter.start()
    try:
        time.sleep(0.5)
        server.start()
        deadline = time.monotonic() + 15
        while requests.get(server.url + "/info", timeout=5).json()["batch_size"] == -1:
            assert time.monotonic() < deadline, "the client did not register again"
            time.sleep(0.05)
        post_groups(server.url, second)
    finally:
        waiter.join()
    assert "error" not in result, result
    batch = result["batch"]
    assert [g["tokens"] for g in batch] == [g["tokens"] for g in second] != [g["tokens"] for g in first]
    m = client.metrics()
    assert m["data/reregistered"] == 1 and m["data/connection_errors"] >= 2 and m["data/batches"] == 2
    # registered again at the step it had reached: the server counts on from there
    assert client.status()["current_step"] == 5 + 1 + 1


# ---- bounded waits ------------------------------------------------------------------------------

def test_unreachable_url_one_clear_error_within_bounded_wait():
    url = f"http://127.0.0.1:{free_port()}"
    client = client_for(url, max_wait_s=1.5)
    t0 = time.monotonic()
    with pytest.raises(AtroposUnavailable) as info:
        client.register()
    elapsed = time.monotonic() - t0
    assert elapsed < 1.5 + 1.0, elapsed
    msg = str(info.value)
    assert url in msg and "POST /register" in msg and "tried" in msg and "ConnectionError" in msg
    assert info.value.__suppress_context__  # no chain of retry/urllib3 tracebacks
    t0 = time.monotonic()
    with pytest.raises(AtroposUnavailable, match="GET /batch"):
        client.wait_for_batch()
    assert time.monotonic() - t0 < 2.5


@pytest.mark.api
def test_no_batch_times_out_with_progress_lines(atropos_api, caplog):
    client = client_for(atropos_api.url, max_wait_s=1.0, log_every_s=0.3)
    client.register()
    post_groups(atropos_api.url, groups(60, k=1))
    with caplog.at_level(logging.INFO, logger="atropos_core.client"), \
            pytest.raises(TimeoutError, match=f"no batch of 8 sequences from the Atropos API at {atropos_api.url}"):
        client.wait_for_batch()
    assert "queue holds 1 groups" in caplog.text
    assert math.isclose(client.metrics()["data/total_wait_s"], 1.0, abs_tol=0.5)


@pytest.mark.api
def test_non_api_answer_is_a_clear_error(atropos_api):
    client = client_for(atropos_api.url + "/nothing-here")
    with pytest.raises(AtroposAPIError, match="POST /register.*HTTP 404"):
        client.register()


@pytest.mark.api
def test_wait_ends_when_the_abort_check_raises(atropos_api):
    """The caller's abort check (the driver passes `RunServices.check`) runs before every poll: the
    error it raises ends the wait at once, as it is, long before max_wait_s; without it the same
    wait runs until its timeout."""
    client = client_for(atropos_api.url, max_wait_s=30.0)
    client.register()
    calls = []

    def child_died():
        calls.append(time.monotonic())
        if len(calls) == 3:
            raise RuntimeError("vLLM server http://127.0.0.1:1 (pid 1) exited with code -9")

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with code -9"):
        client.wait_for_batch(abort_check=child_died)
    assert len(calls) == 3 and time.monotonic() - t0 < 5.0
    assert client.metrics()["data/polls"] == 2  # checked before each poll, the third check stopped it
    client.cfg = AtroposConfig(url=atropos_api.url, batch_size=8, max_token_len=64, max_wait_s=0.5,
                               backoff_max_s=0.2)
    with pytest.raises(TimeoutError):
        client.wait_for_batch(abort_check=lambda: None)


@pytest.mark.api
@pytest.mark.parametrize("long_poll_s", [0.5, 0.0])
def test_a_batch_is_taken_as_soon_as_it_is_complete(atropos_api, long_poll_s):
    """Long-polling our API, the wait ends when the post that completes the batch lands, however
    long the pause between polls is; with `long_poll_s` 0 the client polls, and that pause is what
    the batch waits."""
    client = client_for(atropos_api.url, backoff_initial_s=3.0, backoff_max_s=3.0, backoff_jitter_s=0.0,
                        long_poll_s=long_poll_s)
    client.register()
    sent = groups(80, k=4)
    posted: dict = {}

    def post_later():
        time.sleep(0.7)
        posted["at"] = time.monotonic()   # before: the batch may reach the client before the POST returns
        post_groups(atropos_api.url, sent)

    threading.Thread(target=post_later, daemon=True).start()
    t0 = time.monotonic()
    batch = client.wait_for_batch()
    got = time.monotonic()
    assert [g["tokens"] for g in batch] == [g["tokens"] for g in sent]
    m = client.metrics()
    if long_poll_s:
        assert got - posted["at"] < 1.5, got - posted["at"]
        assert m["data/polls"] <= 4 and m["data/polls"] == m["data/empty_polls"] + 1, m
    else:
        assert got - t0 >= 2.9 and m["data/polls"] == 2, (got - t0, m)   # the 3 s pause, then the poll


# ---- waiting for the run's environments ------------------------------------------------------------

def _register_later(url: str, names: list[str], delay_s: float) -> threading.Thread:
    """Register `names` one by one, `delay_s` apart, as environments that start at different speeds
    do (each retries "wait for trainer to start" every 0.05 s, as atroposlib's does every 1 s)."""
    def run():
        for name in names:
            time.sleep(delay_s)
            while register_env(url, 2, name=name)["status"] != "success":
                time.sleep(0.05)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.api
def test_wait_for_envs_returns_once_every_environment_registered(atropos_api, caplog):
    """The start poll lets environments in; the wait lasts until the last of them has registered
    (not the first), and says which ones it still waits for."""
    client = client_for(atropos_api.url, log_every_s=0.2)
    client.register()
    assert client.registered_envs() == []
    t = _register_later(atropos_api.url, ["env0", "env1"], delay_s=0.6)
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="atropos_core.client"):
        envs = client.wait_for_envs(["env0", "env1"])
    waited = time.monotonic() - t0
    t.join(5)
    assert [e["name"] for e in envs] == ["env0", "env1"] and [e["env_id"] for e in envs] == [0, 1]
    assert all(e["connected"] and e["group_size"] == 2 and e["max_token_length"] == 512 for e in envs)
    assert 1.1 < waited < 5.0, waited
    assert "not yet: env1" in caplog.text or "not yet: env0, env1" in caplog.text
    assert "2 environment(s) registered" in caplog.text
    assert client.metrics()["data/polls"] == 1  # the start poll only; /batch is not polled meanwhile


@pytest.mark.api
def test_wait_for_envs_keeps_a_batch_its_start_poll_got(atropos_api):
    """A batch already queued when the wait starts is not lost: the next wait_for_batch returns it."""
    client = client_for(atropos_api.url)
    client.register()
    assert client.get_batch() is None and register_env(atropos_api.url, 2, name="env0")["status"] == "success"
    sent = groups(70, k=4)
    post_groups(atropos_api.url, sent)
    assert [e["name"] for e in client.wait_for_envs(["env0"])] == ["env0"]
    batch = client.wait_for_batch()
    assert [g["tokens"] for g in batch] == [g["tokens"] for g in sent]
    assert client.metrics()["data/batches"] == 1


@pytest.mark.api
def test_wait_for_envs_times_out_naming_the_missing_one(atropos_api):
    client = client_for(atropos_api.url, max_wait_s=1.0)
    client.register()
    t = _register_later(atropos_api.url, ["env0"], delay_s=0.0)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"1 of 2 registered \(env0\); not yet: env1"):
        client.wait_for_envs(["env0", "env1"])
    assert time.monotonic() - t0 < 3.0
    t.join(5)


@pytest.mark.api
def test_wait_for_envs_ends_when_the_abort_check_raises(atropos_api):
    client = client_for(atropos_api.url, max_wait_s=30.0)
    client.register()
    calls = []

    def env_died():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("env1 (pid 1) exited with code 1")

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="env1 .* exited"):
        client.wait_for_envs(["env0", "env1"], abort_check=env_died)
    assert time.monotonic() - t0 < 5.0


@pytest.mark.api
def test_wait_for_envs_does_not_wait_on_an_api_that_cannot_tell(tmp_path, caplog):
    """atroposlib's own `run-api` (what a user may run) has no route listing the environments: the
    client says so and returns at once, after the poll that lets environments in. Nor has it the
    long-poll batch route: the client falls back to polling `/batch`."""
    port = free_port()
    proc = ManagedProcess("run-api", [str(Path(sys.executable).with_name("run-api")), "--port", str(port)],
                          tmp_path / "run_api.log").start()
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/status", 60)
        url = f"http://127.0.0.1:{port}"
        client = client_for(url)
        client.register()
        assert client.registered_envs() is None
        t0 = time.monotonic()
        assert client.wait_for_envs(["env0", "env1"]) is None
        assert time.monotonic() - t0 < 2.0
        assert register_env(url, 2)["status"] == "success"  # the start poll let environments in
        # no long-poll route there either: one 404, then /batch polled as before
        post_groups(url, groups(90, k=4))
        with caplog.at_level(logging.INFO, logger="atropos_core.client"):
            assert len(client.wait_for_batch()) == 4
        assert "has no /trainer/batch" in caplog.text and client.metrics()["data/batches"] == 1
        post_groups(url, groups(91, k=4))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="atropos_core.client"):
            assert len(client.wait_for_batch()) == 4
        assert "has no /trainer/batch" not in caplog.text      # asked once
    finally:
        proc.stop()
