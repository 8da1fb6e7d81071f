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
"""
from __future__ import annotations

import argparse
import copy
import logging

from atropos_core.client import ENVS_PATH  # the route this runner adds, read by the trainer's client
from atropos_core.procs import exit_with_parent

#: Paths whose successful GETs are polls: left out of the access log.
POLLED_PATHS = frozenset({"/batch", "/status", "/status-env", ENVS_PATH})


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


def build_app():
    """atroposlib's app with `ENVS_PATH` added (once, however often this is called)."""
    from atroposlib.api import app

    if not any(getattr(r, "path", None) == ENVS_PATH for r in app.routes):
        app.add_api_route(ENVS_PATH, lambda: registered_envs(app.state), methods=["GET"],
                          summary="The environments registered so far (atropos-trainer)")
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
