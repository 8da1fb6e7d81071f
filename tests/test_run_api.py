"""The API runner (`atropos_core/run_api.py`): atroposlib's app as `run-api` serves it, with the
successful polls (`GET /batch`, `/status`, `/status-env` answered 200) left out of its access log
and one read-only route added, the registered environments (`ENVS_PATH`).

- `test_quiet_polls_drops_only_successful_polls`: the filter on uvicorn's access records, in-process.
- `test_api_log_keeps_all_but_successful_polls` (api): a real API process of the test's own: polls
  answered 200 leave no line; a registration (POST), a poll answered otherwise, and any other GET
  each leave one.
- `test_registered_envs_lists_what_atroposlib_recorded`: the route's answer from atroposlib's state,
  in-process; `test_registered_envs_route_of_a_real_api` (api): the same from a real API.
- `test_batch_route_*` (api): the long-poll batch route (`BATCH_WAIT_PATH`) of a real API answers
  as soon as a post completes a batch, empty when its wait passes, at once (atroposlib's error)
  before a trainer registered, 422 for a bad wait; a client that gave up before the batch came loses nothing.
"""
from __future__ import annotations

import logging
import random
import threading
import time

import pytest
import requests

from atropos_core.run_api import (BATCH_WAIT_PATH, ENVS_PATH, POLLED_PATHS, QuietPolls, build_app, log_config,
                                  registered_envs)
from tests.fixtures.atropos_api import make_group, post_groups, register_env

REGISTER = {"wandb_group": "g", "wandb_project": "p", "batch_size": 8, "max_token_len": 64,
            "checkpoint_dir": "c", "save_checkpoint_interval": 10, "starting_step": 0, "num_steps": 10}


def _access(method: str, path: str, status: int) -> logging.LogRecord:
    return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                             ("127.0.0.1:5000", method, path, "1.1", status), None)


def test_quiet_polls_drops_only_successful_polls():
    keep = QuietPolls().filter
    for path in POLLED_PATHS:
        assert not keep(_access("GET", path, 200)), path
        assert not keep(_access("GET", path + "?x=1", 200)), path
        assert keep(_access("GET", path, 500)) and keep(_access("POST", path, 200)), path
    assert keep(_access("GET", "/info", 200)) and keep(_access("POST", "/scored_data", 200))
    assert keep(_access("GET", "/batches", 200))                       # a path that only starts like one
    assert keep(logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, "odd", None, None))
    config = log_config()
    assert "quiet_polls" in config["handlers"]["access"]["filters"]
    from uvicorn.config import LOGGING_CONFIG

    assert "filters" not in LOGGING_CONFIG["handlers"]["access"]       # uvicorn's own left as it was


@pytest.mark.api
def test_api_log_keeps_all_but_successful_polls(own_atropos_api):
    url, log = own_atropos_api.url, own_atropos_api.log_dir / "atropos_api.log"
    assert requests.get(url + ENVS_PATH, timeout=10).json() == {"envs": []}   # nothing registered yet
    for _ in range(20):
        assert requests.get(url + "/status", timeout=10).status_code == 200
        assert requests.get(url + "/batch", timeout=10).status_code == 200
        assert requests.get(url + ENVS_PATH, timeout=10).status_code == 200
    assert requests.get(url + "/status-env", json={"env_id": 7}, timeout=10).status_code != 200  # not registered
    register = {"wandb_group": "g", "wandb_project": "p", "batch_size": 8, "max_token_len": 64,
                "checkpoint_dir": "c", "save_checkpoint_interval": 10, "starting_step": 0, "num_steps": 10}
    assert requests.post(url + "/register", json=register, timeout=10).status_code == 200
    assert requests.get(url + "/info", timeout=10).status_code == 200
    deadline = time.monotonic() + 10
    while '"GET /info' not in log.read_text():                          # the last request's line is written
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.05)
    lines = [ln for ln in log.read_text().splitlines() if '" ' in ln and "HTTP/1.1" in ln]
    assert not [ln for ln in lines if '"GET /status HTTP' in ln or '"GET /batch HTTP' in ln
                or ENVS_PATH in ln], lines
    assert sum('"GET /status-env HTTP/1.1" 500' in ln or '"GET /status-env HTTP/1.1" 4' in ln for ln in lines) == 1, lines
    assert sum('"POST /register HTTP/1.1" 200' in ln for ln in lines) == 1, lines


def test_registered_envs_lists_what_atroposlib_recorded():
    """The added route reads atroposlib's own record of `/register-env` calls, in env_id order;
    adding it twice leaves one route."""
    from types import SimpleNamespace

    assert registered_envs(SimpleNamespace()) == {"envs": []}          # before any trainer registered
    state = SimpleNamespace(envs=[
        {"max_context_len": 256, "weight": 1.0, "desired_name": "env0", "real_name": "env0_0",
         "registered_id": 0, "last_update": 0.0, "connected": True, "min_batch_allocation": 0.25,
         "group_size": 4},
        {"max_context_len": 512, "weight": 2.0, "desired_name": "chat", "real_name": "chat_0",
         "registered_id": 1, "last_update": 0.0, "connected": False, "min_batch_allocation": None,
         "group_size": 8}])
    assert registered_envs(state)["envs"] == [
        {"env_id": 0, "name": "env0", "connected": True, "group_size": 4, "max_token_length": 256, "weight": 1.0,
         "min_batch_allocation": 0.25},
        {"env_id": 1, "name": "chat", "connected": False, "group_size": 8, "max_token_length": 512, "weight": 2.0,
         "min_batch_allocation": None}]
    app = build_app()
    assert build_app() is app and sum(getattr(r, "path", None) == ENVS_PATH for r in app.routes) == 1
    assert sum(getattr(r, "path", None) == BATCH_WAIT_PATH for r in app.routes) == 1
    assert sum(m.cls.__name__ == "NotifyOnQueuePost" for m in app.user_middleware) == 1


@pytest.mark.api
def test_registered_envs_route_of_a_real_api(atropos_api):
    url = atropos_api.url
    register = {"wandb_group": "g", "wandb_project": "p", "batch_size": 8, "max_token_len": 64,
                "checkpoint_dir": "c", "save_checkpoint_interval": 10, "starting_step": 0, "num_steps": 10}
    assert requests.post(url + "/register", json=register, timeout=10).status_code == 200
    assert requests.get(url + "/batch", timeout=10).status_code == 200   # lets environments in
    assert register_env(url, 2, name="a")["status"] == "success" and register_env(url, 4, name="b")["env_id"] == 1
    envs = requests.get(url + ENVS_PATH, timeout=10).json()["envs"]
    assert [(e["env_id"], e["name"], e["group_size"], e["connected"]) for e in envs] == [(0, "a", 2, True),
                                                                                       (1, "b", 4, True)]


def _groups(seed: int, k: int) -> list[dict]:
    rng = random.Random(seed)
    return [make_group(rng, n=4) for _ in range(k)]


def _post_after(url: str, groups: list, delay_s: float) -> dict:
    """POST `groups` from a thread after `delay_s`; the returned dict gets the time the post was
    sent ("at", set before it: the batch it completes may reach a waiting client before the POST
    returns)."""
    done: dict = {}

    def run():
        time.sleep(delay_s)
        done["at"] = time.monotonic()
        post_groups(url, groups)

    threading.Thread(target=run, daemon=True).start()
    return done


@pytest.mark.api
def test_batch_route_answers_when_a_post_completes_a_batch(atropos_api):
    url = atropos_api.url
    assert requests.post(url + "/register", json=REGISTER, timeout=10).status_code == 200
    half, rest = _groups(1, 1), _groups(2, 1)                   # 4 + 4 sequences: one batch of 8
    post_groups(url, half)
    posted = _post_after(url, rest, 0.5)
    t0 = time.monotonic()
    body = requests.get(url + BATCH_WAIT_PATH, params={"wait_s": 20}, timeout=60).json()
    got = time.monotonic()
    assert [g["tokens"] for g in body["batch"]] == [g["tokens"] for g in half + rest]
    assert got - t0 >= 0.45 and got - posted["at"] < 2.0, (got - t0, got - posted["at"])
    t0 = time.monotonic()
    assert requests.get(url + BATCH_WAIT_PATH, params={"wait_s": 0.4}, timeout=30).json() == {"batch": None}
    assert 0.35 <= time.monotonic() - t0 < 5
    assert requests.get(url + "/status", timeout=10).json() == {"current_step": 1, "queue_size": 0}


@pytest.mark.api
def test_batch_route_answers_at_once_before_any_trainer_registered(own_atropos_api):
    """A fresh API (no trainer ever registered): atroposlib's `/batch` error answer, without the wait."""
    t0 = time.monotonic()
    body = requests.get(own_atropos_api.url + BATCH_WAIT_PATH, params={"wait_s": 10}, timeout=30).json()
    assert body["status"] == "error" and "register" in body["message"].lower(), body
    assert time.monotonic() - t0 < 5
    assert body == requests.get(own_atropos_api.url + "/batch", timeout=10).json()


@pytest.mark.api
@pytest.mark.parametrize("wait_s", ["-1", "31", "nan", "inf", "soon"])
def test_batch_route_refuses_a_bad_wait(atropos_api, wait_s):
    r = requests.get(atropos_api.url + BATCH_WAIT_PATH, params={"wait_s": wait_s}, timeout=10)
    assert r.status_code == 422 and "wait_s" in r.text, (r.status_code, r.text[:300])


@pytest.mark.api
def test_batch_route_loses_no_batch_to_a_client_that_gave_up(atropos_api):
    """A trainer whose long poll ended on its side (read timeout, or gone) before the batch came: the
    waiting route notices and pops nothing, so the next poll gets the whole batch."""
    url = atropos_api.url
    assert requests.post(url + "/register", json=REGISTER, timeout=10).status_code == 200
    assert requests.get(url + "/batch", timeout=10).json() == {"batch": None}
    session = requests.Session()
    with pytest.raises(requests.ReadTimeout):
        session.get(url + BATCH_WAIT_PATH, params={"wait_s": 10}, timeout=(5, 0.3))
    session.close()
    sent = _groups(3, 2)
    post_groups(url, sent)                                       # wakes the route that still waits
    time.sleep(0.3)
    assert requests.get(url + "/status", timeout=10).json()["queue_size"] == 2   # still queued
    body = requests.get(url + "/batch", timeout=10).json()
    assert [g["tokens"] for g in body["batch"]] == [g["tokens"] for g in sent]
