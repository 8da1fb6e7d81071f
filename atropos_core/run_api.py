"""Run atroposlib's trajectory API as its `run-api` console script does, with the access log kept to
what a person reads: `python -m atropos_core.run_api --host 127.0.0.1 --port 8000`.

The launcher starts the run's API through this module (`services.start_atropos_api`). The app is
atroposlib's own (`atroposlib.api:app`) under uvicorn, as `run-api` runs it; two things differ:

* The access log leaves out successful polls: `GET /batch`, `/status` and `/status-env` answered
  200. The trainer polls `/batch` at most 20 ms apart while it waits for data
  (`AtroposConfig.backoff_max_s`) and every environment polls `/status-env` every 0.1 s, so with
  every request logged the API's log grew by ~50 lines a second for as long as the trainer waited
  (~2,700 lines for the one-minute demo; up to ~4 million a day). Everything else is logged as
  before: every POST (groups, registrations), every answer that is not 200, and start-up and
  errors (uvicorn's error log).
* `--host` defaults to 127.0.0.1 (run-api's default is 0.0.0.0); the launcher always passes it.
"""
from __future__ import annotations

import argparse
import copy
import logging

from atropos_core.procs import exit_with_parent

#: Paths whose successful GETs are polls: left out of the access log.
POLLED_PATHS = frozenset({"/batch", "/status", "/status-env"})


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


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="atroposlib's trajectory API, successful polls unlogged")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    exit_with_parent()  # stop when the trainer that started this API is gone (`procs`)
    uvicorn.run("atroposlib.api:app", host=args.host, port=args.port, log_config=log_config())


if __name__ == "__main__":
    main()
