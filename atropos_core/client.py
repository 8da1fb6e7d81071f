"""Trainer-side client of the Atropos trajectory API (atroposlib 0.4.0's `run-api`).

The protocol, as the installed server implements it (`atroposlib/api/server.py`):
- `POST /register` sends the trainer's settings. Only the first registration after a start (or a
  `GET /reset_data`) sets the server's state; later ones just get a new uuid.
- `GET /batch` returns `{"batch": null}` or `{"batch": [group, ...]}` holding exactly `batch_size`
  sequences (groups are never split). **The first `/batch` call is what lets environments in**:
  until a trainer has polled once, `/register-env` answers "wait for trainer to start", so a trainer
  that waits for data before polling waits forever. Call `wait_for_batch` (or `get_batch`, or
  `wait_for_envs`, which polls once) right after `register`.
- `GET /info` → `{batch_size, max_token_len}`, -1 when no trainer is registered.
- `GET /status` → `{current_step, queue_size}` (queue in groups).

While it waits for a batch the client long-polls `BATCH_WAIT_PATH`, a route our API runner adds
(`atropos_core.run_api`): `/batch` that answers as soon as the environments' posts complete a
batch, so a ready batch does not wait for the next poll. An API without it (atroposlib's own
`run-api`) answers 404 there once; the client then polls `/batch` with backoff as before.

What can go wrong and what this client does about it:
- The server is not up yet or is restarting: connection errors are retried with exponential
  backoff and jitter (tenacity) up to `max_wait_s`, then one `AtroposUnavailable` naming the URL
  and what was tried, without the retry machinery's stack.
- A queued group holding NaN/Infinity (the server accepts it) makes `/batch` answer 500 and that
  batch is lost: counted in `data/api_errors`, logged, and polling goes on.
- The server restarted (state is in memory only) or was reset: `/batch` answers "Trainer not
  registered" or 500 and `/info` says -1: the client registers again (`data/reregistered`) with
  the step it has reached, and goes on.
- An environment posted data to a fresh server before the trainer registered: atroposlib 0.4.0
  then ignores the registration (it only initialises when no queue exists) and every `/batch`
  fails. Seen as `/info` still -1 right after registering; the client resets the server's data
  (`GET /reset_data`, losing those early groups) and registers again (`data/api_resets`).
- A registration that does not match ours (another trainer's state): `AtroposConfigMismatch`.

Several environments may feed one API (Atropos's multi-environment training): the API numbers them
in the order they register (`env_id` 0, 1, ...; each environment's log says "Initialized env with
id N") and every group carries its `env_id`. `env_metrics` splits a batch's reward by it.
The API builds each batch from the environments registered when `/batch` is called, so a run
that started several waits for all of them before its first batch (`wait_for_envs`, on the route
our API runner adds; an API without it is not waited on).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Optional
from urllib.parse import urlparse

from .checks import Between, Finite, Ge, Gt, check_fields

try:
    import requests
    from tenacity import (RetryError, Retrying, retry_if_exception_type, stop_before_delay,
                          wait_exponential_jitter)
except ImportError as _e:  # AtroposConfig and env_metrics serve runs without the API (atropos.url synthetic)
    requests = None
    _MISSING = _e

logger = logging.getLogger(__name__)

#: Longest wait one long poll of the batch (`BATCH_WAIT_PATH`) may ask the API for.
MAX_BATCH_WAIT_S = 30.0


def env_metrics(groups: list) -> dict:
    """Per-environment mean reward and sequence count of a batch as it came from the API (every
    sequence of every group with a list of finite scores), keyed by the groups' `env_id`
    (`reward/env<ID>`, `data/sequences_env<ID>`; "unknown" when a group carries none)."""
    sums: dict[str, list] = {}
    for g in groups or []:
        if not isinstance(g, dict) or not isinstance(g.get("scores"), list):
            continue
        eid = g.get("env_id")
        key = str(eid) if isinstance(eid, int) and not isinstance(eid, bool) else "unknown"
        scores = [float(x) for x in g["scores"] if isinstance(x, (int, float)) and not isinstance(x, bool)
                  and math.isfinite(x)]
        acc = sums.setdefault(key, [0.0, 0])
        acc[0] += sum(scores)
        acc[1] += len(scores)
    out = {}
    for key, (total, n) in sorted(sums.items()):
        if n:
            out[f"reward/env{key}"] = total / n
            out[f"data/sequences_env{key}"] = n
    return out


#: `atropos.url` value that selects the synthetic batch source (`atropos_core.synthetic`).
SYNTHETIC_URL = "synthetic"


@dataclass
class AtroposConfig:
    """Where the trajectory API is and what the trainer registers with it."""

    url: str = "http://127.0.0.1:8000"
    """Base URL of the trajectory API (`run-api`), e.g. http://127.0.0.1:8000; or "synthetic": seeded
    random groups drawn in the trainer (`atropos_core.synthetic`), no API, vLLM or environment."""
    batch_size: Annotated[int, Ge(1)] = 64
    """Sequences per training batch (not groups): the server ships exactly this many."""
    max_token_len: Annotated[int, Ge(2)] = 2048
    """Longest sequence the environments may send (in a run: `run.max_token_len`)."""
    group_size: Optional[Annotated[int, Ge(1)]] = None
    """Sequences per group the environments send, if known: checked against batch_size at start (in a
    run: `env.group_size`)."""
    request_timeout_s: Annotated[float, Gt(0), Finite()] = 60.0
    """Timeout of one HTTP request (connect and read). Keep it generous: the API pops a batch
    before it sends it, so a `/batch` answer cut off by the read timeout is lost (the API took ~4 s
    to send a 6 MB batch on one busy core)."""
    max_wait_s: Annotated[float, Gt(0), Finite()] = 900.0
    """Longest total wait for the server to answer (register) or for one batch to be ready (an
    answer already being read may add up to request_timeout_s)."""
    backoff_initial_s: Annotated[float, Gt(0)] = 0.005
    """First pause between polls; it doubles each time up to backoff_max_s. Short: the API has no
    blocking /batch, so a batch that lands just after a poll waits for the next one (a poll on
    loopback costs ~1 ms; 0.05 s + 0.1 s jitter added ~0.1 s to every step of a fast loop)."""
    backoff_max_s: Annotated[float, Gt(0), Finite()] = 0.02
    """Longest pause between two polls, and so the worst latency added to a batch that is ready.
    Short, because an empty poll is cheap for both sides (a fraction of a millisecond of the API's
    CPU) while every step waits up to this long after its batch is complete; with 1 s, an
    environment taking 2 s per batch had ~0.3 s added to each step (docs/loop-speed-2026-12-01.md)."""
    backoff_jitter_s: Annotated[float, Ge(0)] = 0.005
    """Random extra pause in [0, this] added to each wait, so many clients do not poll in step."""
    long_poll_s: Annotated[float, Between(0.0, MAX_BATCH_WAIT_S)] = 0.5
    """Longest time one request waits at the API for a batch to be ready, on the long-poll route our
    API runner adds (`BATCH_WAIT_PATH`); 0, or an API without the route: poll `/batch` instead.
    Between two such requests the wait's checks run (a dead child process is named within this)."""
    log_every_s: Annotated[float, Gt(0), Finite()] = 30.0
    """While waiting, log a line saying what we wait for at most this often."""
    wandb_group: str = "atropos-trainer"
    """wandb group the environments log under (registered with the server)."""
    wandb_project: str = "atropos"
    """wandb project the environments log under (registered with the server)."""
    checkpoint_dir: str = "checkpoints"
    """Checkpoint directory the server hands to environments (informational for them)."""
    save_checkpoint_interval: int = 0
    """Steps between checkpoints, told to environments (<= 0: they do not act on it)."""
    starting_step: Annotated[int, Ge(0)] = 0
    """Step the run starts at (non-zero when resuming); the server counts steps from it."""
    num_steps: Annotated[int, Ge(1)] = 1
    """Total steps of the run, told to environments (in a run: `run.steps`)."""

    def __post_init__(self):
        parsed = urlparse(self.url)
        if self.url != SYNTHETIC_URL and (parsed.scheme not in ("http", "https") or not parsed.netloc):
            raise ValueError(f"atropos.url must be an http(s) URL like http://127.0.0.1:8000, got {self.url!r}")
        self.url = self.url.rstrip("/")
        check_fields(self, "atropos")
        if self.group_size is not None:
            if self.group_size > self.batch_size:
                raise ValueError(
                    f"atropos.group_size {self.group_size} > atropos.batch_size {self.batch_size}: the API never "
                    f"splits a group, so a group larger than a batch blocks its queue forever; raise batch_size "
                    f"or lower the environment's group_size")
            if self.batch_size % self.group_size:
                raise ValueError(
                    f"atropos.batch_size {self.batch_size} is not a multiple of atropos.group_size "
                    f"{self.group_size}: the API fills a batch with whole groups only, so it would never ship one")
        if self.backoff_initial_s > self.backoff_max_s:
            raise ValueError(f"atropos.backoff_initial_s must be in (0, backoff_max_s={self.backoff_max_s}], "
                             f"got {self.backoff_initial_s}")
        if self.backoff_jitter_s > self.backoff_max_s:
            raise ValueError(f"atropos.backoff_jitter_s must be in [0, backoff_max_s], got {self.backoff_jitter_s}")


class AtroposUnavailable(ConnectionError):
    """The trajectory API could not be reached within `max_wait_s`."""


class AtroposAPIError(RuntimeError):
    """The trajectory API answered something this client cannot use (bad status or payload)."""


class AtroposConfigMismatch(AtroposAPIError):
    """The server holds another trainer's registration (batch size / max length differ)."""


class _NoBatchYet(Exception):
    pass


class _EnvsMissing(Exception):
    pass


#: The routes our API runner adds (`atropos_core.run_api`): the environments registered so far, and
#: `/batch` that waits up to `?wait_s=` (at most MAX_BATCH_WAIT_S) for a batch to be ready.
ENVS_PATH = "/trainer/registered-envs"
BATCH_WAIT_PATH = "/trainer/batch"


_NETWORK_ERRORS = (requests.ConnectionError, requests.Timeout) if requests else ()


class AtroposClient:
    """One trainer's connection to the trajectory API. Use it on rank 0 only (the others get the
    groups through `data.broadcast_groups`) and from one thread at a time (a prefetch thread that
    overlaps the next fetch with the current step is fine)."""

    def __init__(self, cfg: AtroposConfig, session: Optional[requests.Session] = None):
        if requests is None:
            raise ImportError(f"the Atropos API client needs requests and tenacity ({_MISSING}); install them, "
                              f"or train on synthetic batches with --atropos-url synthetic")
        self.cfg = cfg
        self.session = session or requests.Session()
        self.uuid: Optional[int] = None
        self.batches_received = 0
        self.last_raw: Optional[bytes] = None   # JSON body of the last batch (for data.broadcast_groups)
        self._deadline: Optional[float] = None   # set while a bounded wait runs
        self._counters = {k: 0 for k in ("data/polls", "data/empty_polls", "data/batches", "data/api_errors",
                                         "data/connection_errors", "data/reregistered", "data/api_resets")}
        self._last_wait_s = 0.0
        self._total_wait_s = 0.0
        self._held: Optional[list[dict]] = None  # a batch the start poll of wait_for_envs got
        self._long_poll = cfg.long_poll_s > 0   # False once the API answered 404 on BATCH_WAIT_PATH
        self._waited_at_api = False              # the last poll already waited at the API: no pause

    # -- plumbing ------------------------------------------------------------------------------
    def _timeout(self, waits_s: float = 0.0) -> tuple[float, float]:
        """(connect, read) timeouts. Connecting is bounded by the running wait's deadline; reading
        never is: the server pops a batch before sending it, so a cut-off answer loses that batch.
        `waits_s`: how long the server may hold the answer back on purpose (a long poll)."""
        connect = self.cfg.request_timeout_s
        if self._deadline is not None:
            connect = max(0.5, min(connect, self._deadline - time.monotonic()))
        return connect, self.cfg.request_timeout_s + waits_s

    def _request(self, method: str, path: str, waits_s: float = 0.0, **kw) -> requests.Response:
        try:
            return self.session.request(method, self.cfg.url + path, timeout=self._timeout(waits_s), **kw)
        except _NETWORK_ERRORS:
            self._counters["data/connection_errors"] += 1
            raise

    def _json(self, resp: requests.Response, what: str) -> Any:
        if resp.status_code != 200:
            raise AtroposAPIError(f"{what} at {self.cfg.url} answered HTTP {resp.status_code}: {resp.text[:300]!r}")
        try:
            return resp.json()
        except ValueError:
            raise AtroposAPIError(f"{what} at {self.cfg.url} answered non-JSON: {resp.text[:300]!r}") from None

    def _retrying(self, retry_on: tuple, before_sleep=None) -> Retrying:
        backoff = wait_exponential_jitter(initial=self.cfg.backoff_initial_s, max=self.cfg.backoff_max_s,
                                          jitter=self.cfg.backoff_jitter_s)
        # no pause after a long poll that came back empty: it has already waited at the API
        return Retrying(
            stop=stop_before_delay(self.cfg.max_wait_s),
            wait=lambda retry_state: 0.0 if self._waited_at_api else backoff(retry_state),
            retry=retry_if_exception_type(retry_on), before_sleep=before_sleep, reraise=False)

    def _unavailable(self, err: RetryError, what: str, started: float) -> AtroposUnavailable:
        last = err.last_attempt.exception() if err.last_attempt.failed else None
        return AtroposUnavailable(
            f"Atropos API at {self.cfg.url} did not answer {what}: tried {err.last_attempt.attempt_number} "
            f"times over {time.monotonic() - started:.1f} s (atropos.max_wait_s={self.cfg.max_wait_s}); last "
            f"error: {type(last).__name__}: {str(last)[:200]}. Is `run-api` running there?")

    # -- one request each ------------------------------------------------------------------------
    def info(self) -> dict:
        """`GET /info` → {"batch_size", "max_token_len"} (-1 when no trainer is registered)."""
        return self._json(self._request("GET", "/info"), "GET /info")

    def status(self) -> dict:
        """`GET /status` → {"current_step", "queue_size"} (queue size in groups)."""
        return self._json(self._request("GET", "/status"), "GET /status")

    def registration_payload(self) -> dict:
        c = self.cfg
        return {"wandb_group": c.wandb_group, "wandb_project": c.wandb_project, "batch_size": c.batch_size,
                "max_token_len": c.max_token_len, "checkpoint_dir": c.checkpoint_dir,
                "save_checkpoint_interval": c.save_checkpoint_interval,
                "starting_step": c.starting_step + self.batches_received, "num_steps": c.num_steps}

    def _register_once(self) -> int:
        body = self._json(self._request("POST", "/register", json=self.registration_payload()), "POST /register")
        info = self.info()
        if info.get("batch_size") == -1:
            # atroposlib 0.4.0 initialises only when no queue exists: data posted before the first
            # registration makes it ignore ours. Clearing that data is the only way in.
            logger.warning("Atropos API at %s ignored the registration (an environment posted data before any "
                           "trainer registered); resetting its data and registering again", self.cfg.url)
            self._request("GET", "/reset_data")
            self._counters["data/api_resets"] += 1
            body = self._json(self._request("POST", "/register", json=self.registration_payload()),
                              "POST /register")
            info = self.info()
            if info.get("batch_size") == -1:
                raise AtroposAPIError(f"Atropos API at {self.cfg.url} still reports no trainer after reset and "
                                      f"registration: {info}")
        if info.get("batch_size") != self.cfg.batch_size or info.get("max_token_len") != self.cfg.max_token_len:
            raise AtroposConfigMismatch(
                f"Atropos API at {self.cfg.url} holds another registration: batch_size={info.get('batch_size')}, "
                f"max_token_len={info.get('max_token_len')}; ours: batch_size={self.cfg.batch_size}, "
                f"max_token_len={self.cfg.max_token_len}. Restart the API or GET /reset_data first.")
        self.uuid = int(body["uuid"])
        return self.uuid

    def register(self) -> int:
        """Register this trainer (waiting up to `max_wait_s` for the server to come up); returns the
        uuid. Call `wait_for_batch` next: environments can only join after the first `/batch`."""
        started = time.monotonic()
        self._deadline = started + self.cfg.max_wait_s
        try:
            for attempt in self._retrying(_NETWORK_ERRORS):
                with attempt:
                    uid = self._register_once()
        except RetryError as e:
            raise self._unavailable(e, "POST /register", started) from None
        finally:
            self._deadline = None
        logger.info("registered with Atropos API at %s (batch_size=%d sequences, max_token_len=%d)",
                    self.cfg.url, self.cfg.batch_size, self.cfg.max_token_len)
        return uid

    def _ensure_registered(self) -> None:
        """Register again if the server has lost our registration (restart or /reset_data)."""
        if self.info().get("batch_size") == -1:
            logger.warning("Atropos API at %s has no trainer registered (restarted or reset?): registering "
                           "again at step %d", self.cfg.url, self.cfg.starting_step + self.batches_received)
            self._register_once()
            self._counters["data/reregistered"] += 1

    def _long_poll_s(self) -> float:
        """How long the next poll may wait at the API: `long_poll_s`, cut to what is left of the
        running wait; 0 when the API has no long-poll route or outside a bounded wait."""
        if not self._long_poll or self._deadline is None:
            return 0.0
        return round(max(0.0, min(self.cfg.long_poll_s, self._deadline - time.monotonic())), 3)

    def get_batch(self, wait_s: float = 0.0) -> Optional[list[dict]]:
        """One poll: the groups of one batch, or None when none is ready (also after a survived
        server error). With `wait_s` > 0 it asks the long-poll route to hold the answer until a
        batch is ready or `wait_s` passes; an API without that route (404) is asked `/batch` at
        once and never long-polled again. Network errors propagate (`wait_for_batch` retries them)."""
        self._counters["data/polls"] += 1
        self._waited_at_api = long_polled = False
        try:
            resp = None
            if wait_s > 0 and self._long_poll:
                resp = self._request("GET", BATCH_WAIT_PATH, waits_s=wait_s, params={"wait_s": wait_s})
                if resp.status_code == 404:
                    self._long_poll = False
                    logger.info("the Atropos API at %s has no %s (atroposlib's own run-api?): polling /batch "
                                "every %g s at most instead", self.cfg.url, BATCH_WAIT_PATH, self.cfg.backoff_max_s)
                    resp = None
                else:
                    long_polled = True
            if resp is None:
                resp = self._request("GET", "/batch")
        except requests.ReadTimeout:
            logger.warning("GET /batch at %s timed out while reading (atropos.request_timeout_s=%s): if the API "
                           "had a batch ready, that batch is lost", self.cfg.url, self.cfg.request_timeout_s)
            raise
        if resp.status_code >= 500:
            # uvicorn closes the connection after an unhandled error: drop the pooled one, or the
            # next request on it fails with "connection reset".
            self.session.close()
            self._counters["data/api_errors"] += 1
            logger.warning("GET /batch at %s answered HTTP %d (atroposlib does this when a queued group holds "
                           "NaN/Infinity, losing that batch, or after a reset); polling on. Body: %r",
                           self.cfg.url, resp.status_code, resp.text[:200])
            self._ensure_registered()
            return None
        body = self._json(resp, "GET /batch")
        if not isinstance(body, dict):
            raise AtroposAPIError(f"GET /batch at {self.cfg.url} answered {type(body).__name__}, not an object")
        if body.get("status") == "error":
            logger.info("GET /batch at %s: %s", self.cfg.url, body.get("message"))
            self._ensure_registered()
            return None
        batch = body.get("batch")
        if not batch:
            self._counters["data/empty_polls"] += 1
            self._waited_at_api = long_polled   # it waited there: the next poll needs no pause
            return None
        if not isinstance(batch, list):
            raise AtroposAPIError(f"GET /batch at {self.cfg.url}: 'batch' is {type(batch).__name__}, not a list")
        self._counters["data/batches"] += 1
        self.batches_received += 1
        self.last_raw = resp.content
        return batch

    def wait_for_batch(self, abort_check: Optional[Callable[[], None]] = None) -> list[dict]:
        """Poll `/batch` (exponential backoff with jitter) until a batch comes or `max_wait_s` passes.

        `abort_check`, when given, runs before every poll: an exception it raises ends the wait at
        once and propagates as it is (the driver passes `RunServices.check`, so a dead child that
        starves the environments is named within a poll instead of after `max_wait_s`).
        Raises `AtroposUnavailable` if the server cannot be reached all that time, `TimeoutError` if
        it answers but has no batch for us, `AtroposAPIError` on an unusable answer."""
        if self._held is not None:
            batch, self._held = self._held, None
            self._last_wait_s = 0.0
            return batch
        started = time.monotonic()
        self._deadline = started + self.cfg.max_wait_s
        last_note = [started]

        def note(retry_state) -> None:
            now = time.monotonic()
            if now - last_note[0] < self.cfg.log_every_s:
                return
            last_note[0] = now
            try:
                st = self.status()
                where = f"queue holds {st.get('queue_size')} groups, server step {st.get('current_step')}"
            except (*_NETWORK_ERRORS, AtroposAPIError) as e:
                where = f"server unreachable ({type(e).__name__})"
            logger.info("waiting %.0f s for a batch of %d sequences from %s: %s", now - started,
                        self.cfg.batch_size, self.cfg.url, where)

        try:
            for attempt in self._retrying((_NoBatchYet, *_NETWORK_ERRORS), before_sleep=note):
                with attempt:
                    if abort_check is not None:
                        abort_check()  # not a retried error type: tenacity re-raises it as it is
                    batch = self.get_batch(wait_s=self._long_poll_s())
                    if batch is None:
                        raise _NoBatchYet()
        except RetryError as e:
            waited = time.monotonic() - started
            self._total_wait_s += waited
            if isinstance(e.last_attempt.exception(), _NETWORK_ERRORS):
                raise self._unavailable(e, "GET /batch", started) from None
            raise TimeoutError(
                f"no batch of {self.cfg.batch_size} sequences from the Atropos API at {self.cfg.url} within "
                f"{waited:.1f} s (atropos.max_wait_s={self.cfg.max_wait_s}, {e.last_attempt.attempt_number} polls): "
                f"are environments running and sending groups that add up to batch_size?") from None
        finally:
            self._deadline = None
        self._last_wait_s = time.monotonic() - started
        self._total_wait_s += self._last_wait_s
        return batch

    def registered_envs(self) -> Optional[list[dict]]:
        """The environments registered with the API so far (`ENVS_PATH`, which our API runner adds:
        `env_id`, `name`, `connected`, ...), or None for an API without that route (HTTP 404)."""
        resp = self._request("GET", ENVS_PATH)
        if resp.status_code == 404:
            return None
        body = self._json(resp, f"GET {ENVS_PATH}")
        envs = body.get("envs") if isinstance(body, dict) else None
        if not isinstance(envs, list):
            raise AtroposAPIError(f"GET {ENVS_PATH} at {self.cfg.url} answered {str(body)[:200]!r}, not "
                                  f"{{'envs': [...]}}")
        return envs

    def wait_for_envs(self, names: list[str], abort_check: Optional[Callable[[], None]] = None) -> Optional[list]:
        """Let environments in and wait until as many as `names` (those this run started) have
        registered, up to `max_wait_s`; returns the registered ones, or None when the API cannot
        say (an API without `ENVS_PATH`: then nothing is waited for).

        Call it after `register`. It polls `/batch` once, which is what lets environments register
        (a batch that poll gets is kept for the next `wait_for_batch`), then polls `ENVS_PATH`.
        Without it a run whose environments start at different speeds trains its first steps on
        the fastest one alone: the API builds each batch from the environments registered at that
        moment. The count decides, not the names (an environment may register under another name);
        the names are for the messages. `abort_check` as in `wait_for_batch`. Raises
        `TimeoutError` naming the missing ones when they have not all registered in time."""
        if not names:
            return []
        started = time.monotonic()
        self._deadline = started + self.cfg.max_wait_s
        last_note = [started]
        seen: list[list] = [[]]

        def progress() -> str:
            got = [str(e.get("name")) for e in seen[0]]
            missing = [n for n in names if n not in got] or ["(under other names)"]
            return (f"{len(got)} of {len(names)} registered ({', '.join(got) or 'none'}); not yet: "
                    f"{', '.join(missing)}")

        def note(retry_state) -> None:
            now = time.monotonic()
            if now - last_note[0] >= self.cfg.log_every_s:
                last_note[0] = now
                logger.info("waiting %.0f s for environments to register with the Atropos API at %s: %s",
                            now - started, self.cfg.url, progress())

        try:
            if self._held is None:
                for attempt in self._retrying(_NETWORK_ERRORS):
                    with attempt:
                        self._held = self.get_batch()  # the poll that opens the API to environments
            for attempt in self._retrying((_EnvsMissing, *_NETWORK_ERRORS), before_sleep=note):
                with attempt:
                    if abort_check is not None:
                        abort_check()
                    envs = self.registered_envs()
                    if envs is None:
                        logger.info("the Atropos API at %s does not list its environments (%s: not started by "
                                    "this trainer): taking batches without waiting for every environment",
                                    self.cfg.url, ENVS_PATH)
                        return None
                    seen[0] = envs
                    if len(envs) < len(names):
                        raise _EnvsMissing()
        except RetryError as e:
            if isinstance(e.last_attempt.exception(), _NETWORK_ERRORS):
                raise self._unavailable(e, f"GET {ENVS_PATH}", started) from None
            raise TimeoutError(
                f"environments did not all register with the Atropos API at {self.cfg.url} within "
                f"{time.monotonic() - started:.0f} s (atropos.max_wait_s={self.cfg.max_wait_s}): {progress()}. "
                f"An environment registers once its setup() has finished: see its log") from None
        finally:
            self._deadline = None
        logger.info("%d environment(s) registered with the Atropos API in %.1f s: %s", len(seen[0]),
                    time.monotonic() - started, ", ".join(f"{e.get('name')} (id {e.get('env_id')})" for e in seen[0]))
        return seen[0]

    def metrics(self) -> dict:
        """Counters since start, slash-namespaced (data/api_errors, data/reregistered, ...)."""
        return {**self._counters, "data/last_wait_s": self._last_wait_s, "data/total_wait_s": self._total_wait_s}

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "AtroposClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
