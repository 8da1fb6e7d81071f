"""Run atroposlib's trajectory API as its `run-api` console script does, with the access log kept to
what a person reads: `python -m atropos_core.run_api --host 127.0.0.1 --port 8000`.

The launcher starts the run's API through this module (`services.start_atropos_api`). The app is
atroposlib's own (`atroposlib.api:app`) under uvicorn, as `run-api` runs it; three things differ:

* The access log leaves out successful polls: `GET /batch`, `/status` and `/status-env` answered
  200. The trainer polls `/batch` at most 20 ms apart while it waits for data
  (`AtroposConfig.backoff_max_s`) and every environment polls `/status-env` every 0.1 s, so with
  every request logged the API's log grew by ~50 lines a second for as long as the trainer waited
  (~2,700 lines for the one-minute demo; up to ~4 million a day). Everything else is logged as
  before: every POST (groups, registrations), every answer that is not 200, and start-up and
  errors (uvicorn's error log).
* `--host` defaults to 127.0.0.1 (run-api's default is 0.0.0.0); the launcher always passes it.
* One read-only route is added, `GET /trainer/registered-envs` (`ENVS_PATH`): the environments
  that have registered, in `env_id` order. atroposlib 0.4.0 has no way to ask this (`/status-env`
  needs an id and answers 500 for one not registered yet), and a trainer that launched several
  environments needs it: the API builds every batch from the environments registered at that
  moment, so a trainer that takes batches while one environment is still starting (importing
  torch and atroposlib alone takes seconds) trains its first steps on the others alone; in a
  short test run every batch was the faster one's (docs/loop-speed-2026-12-01.md). The trainer
  waits on this route before its first batch (`AtroposClient.wait_for_envs`). Nothing of
  atroposlib's state is changed by it; an API without it (a `run-api` the user started) answers
  404 and the trainer does not wait.
* One more route, `GET /trainer/batch?wait_s=S` (`BATCH_WAIT_PATH`): atroposlib's own `/batch`,
  but when no batch is ready it waits up to S seconds (at most `MAX_BATCH_WAIT_S`) and answers as
  soon as a `POST /scored_data` or `/scored_data_list` lets one be built. Polled, a batch that is
  complete waits for the trainer's next poll (up to `backoff_max_s`, ~10 ms on average with the
  default 20 ms); the long poll also replaces ~50 empty polls a second, each costing the API and
  the trainer CPU on cores the environment and vLLM share. What it answers is what `/batch`
  would answer at that moment (the handler is atroposlib's), so a batch is popped only for a
  client still connected: the wait ends silently, popping nothing, once the trainer has gone.
  The trainer's client uses this route when it answers, and `/batch` when it is 404 (`run-api`).
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import logging

from fastapi import Query, Request  # at module level: the route's annotations are resolved here

# the routes this runner adds, read by the trainer's client
from atropos_core.client import BATCH_WAIT_PATH, ENVS_PATH, MAX_BATCH_WAIT_S
from atropos_core.procs import exit_with_parent

#: Paths whose successful GETs are polls: left out of the access log.
POLLED_PATHS = frozenset({"/batch", "/status", "/status-env", ENVS_PATH, BATCH_WAIT_PATH})
#: atroposlib's routes that add groups to its queue: each POST wakes the waiting `BATCH_WAIT_PATH`.
QUEUE_POSTS = frozenset({"/scored_data", "/scored_data_list"})


class QuietPolls(logging.Filter):
    """Drops uvicorn access records of a successful GET of one of `POLLED_PATHS`.

    uvicorn (0.55, read in its HTTP protocols) logs an access with `(client_addr, method,
    full_path, http_version, status_code)` as `record.args`; a record of any other shape is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5:
            _, method, path, _, status = args
            if method == "GET" and status == 200 and str(path).split("?", 1)[0] in POLLED_PATHS:
                return False
        return True


def log_config() -> dict:
    """uvicorn's default logging configuration with `QuietPolls` on the access handler."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["quiet_polls"] = {"()": QuietPolls}
    config["handlers"]["access"].setdefault("filters", []).append("quiet_polls")
    return config


def registered_envs(state) -> dict:
    """`{"envs": [...]}`: each registered environment as atroposlib's `/register-env` recorded it
    (`app.state.envs`; none before a trainer has registered), under the names of its request."""
    envs = getattr(state, "envs", None) or []
    return {"envs": [{"env_id": e.get("registered_id"), "name": e.get("desired_name"),
                      "connected": bool(e.get("connected")), "group_size": e.get("group_size"),
                      "max_token_length": e.get("max_context_len"), "weight": e.get("weight"),
                      "min_batch_allocation": e.get("min_batch_allocation")} for e in envs]}


class QueueChanged:
    """Wakes whoever waits for the API's queue to change. `event()` is the current one; `notify()`
    sets it and starts a new one, so a waiter that took its event before looking at the queue
    cannot miss a change that comes after the look (all of it runs on the server's one loop)."""

    def __init__(self):
        self._event = asyncio.Event()

    def event(self) -> asyncio.Event:
        return self._event

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()


class NotifyOnQueuePost:
    """ASGI middleware: after a POST to one of `QUEUE_POSTS` is handled (atroposlib has put its
    groups in the queue or its buffer by then), `changed.notify()`. Everything else passes as is."""

    def __init__(self, app, changed: QueueChanged):
        self.app, self.changed = app, changed

    async def __call__(self, scope, receive, send):
        try:
            await self.app(scope, receive, send)
        finally:
            if scope["type"] == "http" and scope.get("method") == "POST" and scope.get("path") in QUEUE_POSTS:
                self.changed.notify()


async def batch_when_ready(get_batch, changed: QueueChanged, request, wait_s: float) -> dict:
    """atroposlib's `/batch` answer (`get_batch`, its handler), waiting up to `wait_s` for a batch
    when none is ready. Returns at once with a batch or an error answer (no registration yet);
    an empty `{"batch": None}` when `wait_s` passes without one; `{}` without asking for a batch
    once the client has disconnected (the answer would reach no one and the batch would be lost)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        event = changed.event()  # taken before the look: a POST after it sets this event
        body = await get_batch()
        remaining = deadline - loop.time()
        if not isinstance(body, dict) or body.get("batch") or "status" in body or remaining <= 0:
            return body
        try:
            await asyncio.wait_for(event.wait(), remaining)
        except asyncio.TimeoutError:
            pass
        if await request.is_disconnected():
            return {}


def build_app():
    """atroposlib's app with `ENVS_PATH` and `BATCH_WAIT_PATH` added (once, however often this is
    called; before the app serves: middleware cannot be added later)."""
    from atroposlib.api import app
    from atroposlib.api.server import get_batch

    if not any(getattr(r, "path", None) == ENVS_PATH for r in app.routes):
        app.add_api_route(ENVS_PATH, lambda: registered_envs(app.state), methods=["GET"],
                          summary="The environments registered so far (atropos-trainer)")
    if not any(getattr(r, "path", None) == BATCH_WAIT_PATH for r in app.routes):
        changed = QueueChanged()
        app.add_middleware(NotifyOnQueuePost, changed=changed)

        async def batch_route(request: Request, wait_s: float = Query(0.0, ge=0.0, le=MAX_BATCH_WAIT_S,
                                                                      allow_inf_nan=False)):
            return await batch_when_ready(get_batch, changed, request, wait_s)

        app.add_api_route(BATCH_WAIT_PATH, batch_route, methods=["GET"],
                          summary="/batch, waiting up to wait_s seconds for one (atropos-trainer)")
    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="atroposlib's trajectory API, successful polls unlogged")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    exit_with_parent()  # stop when the trainer that started this API is gone (`procs`)
    uvicorn.run(build_app(), host=args.host, port=args.port, log_config=log_config())


if __name__ == "__main__":
    main()
