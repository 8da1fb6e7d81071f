"""Run an Atropos environment module as `python -m MODULE ...` would, with atroposlib 0.4.0 made to
work under transformers 5: `python -m atropos_core.envs.run_env MODULE serve --env.* ...`.

The launcher starts every environment through this module (`services.environment_command`). The
environment's code and atroposlib are not changed; one compatibility default is restored first:

* transformers 5 changed `apply_chat_template(..., tokenize=True)` to return a `BatchEncoding`
  (`return_dict=True` by default; 4.x returned the token ids). atroposlib 0.4.0's
  `tokenize_for_trainer`, which most chat-completion environments call to build the trainer's
  tokens and masks, takes `len()` of that result and slices it, so it produced a dict of two keys
  for `tokens` and a two-entry mask (seen with transformers 5.19; the API then refuses the group).
  Here a call that does not pass `return_dict` gets `return_dict=False` again, the 4.x behaviour
  that atroposlib was written for; a caller that asks for a dict still gets one.

And one start-up wait is shortened (`shorten_startup_wait`):

* atroposlib 0.4.0's `BaseEnv.env_manager` registers with the API, reads `/info`, then sleeps a
  fixed 5 s ("wait for other instances to get setup") before its first rollouts: every run, and
  every test that starts an environment, waited those 5 s before its first step. What the wait is
  for, read in atroposlib's source: an environment's share of its inference servers' request slots
  (`env_weight`, from `/status-env`: its `max_token_length * weight` over the sum of every
  registered environment's) only counts the environments registered so far, so one that samples
  before the others have registered starts with a larger share. It is no barrier (each
  environment sleeps after its own registration, so a later one still starts later), and nothing
  else depends on it: the share is read again on every loop of the manager (every 0.1 s) and
  only gates the request semaphore (`num_max_requests_at_once`, 512 by default, against which
  our environments' 16 groups in flight never reach a limit), the API keeps each environment's
  groups apart (`env_id`), and `server_healthy` starts true, so no health check waits on it. For
  several environments started together (one run's `env.modules`) the cost of not waiting is at
  most a fraction of a second of unequal request slots; the gain is 5 s per run.
  The wait is `$ATROPOS_ENV_STARTUP_WAIT_S` (default `STARTUP_WAIT_S`, 0; set 5 for atroposlib's
  own), applied to that one `asyncio.sleep(5)` through the `asyncio` module that
  `atroposlib.envs.base` sees (a proxy; the real module and every other sleep are untouched). An
  atroposlib whose env manager no longer has exactly that call is left alone.
"""
from __future__ import annotations

import functools
import inspect
import os
import runpy
import sys

#: Seconds an environment we launch waits after registering, before its first rollouts.
STARTUP_WAIT_S = 0.0
STARTUP_WAIT_ENV = "ATROPOS_ENV_STARTUP_WAIT_S"
#: The fixed wait of atroposlib 0.4.0's `BaseEnv.env_manager` before its loop, as written there.
_ATROPOSLIB_STARTUP_WAIT_S = 5
_ATROPOSLIB_STARTUP_CALL = f"asyncio.sleep({_ATROPOSLIB_STARTUP_WAIT_S})"


def restore_chat_template_ids() -> None:
    """Make `apply_chat_template(tokenize=True)` return token ids unless `return_dict` is given."""
    from transformers import PreTrainedTokenizerBase

    original = PreTrainedTokenizerBase.apply_chat_template
    if getattr(original, "_atropos_ids_default", False):
        return

    @functools.wraps(original)
    def apply_chat_template(self, conversation, *args, **kwargs):
        if kwargs.get("tokenize", True) and "return_dict" not in kwargs and not args:
            kwargs["return_dict"] = False
        return original(self, conversation, *args, **kwargs)

    apply_chat_template._atropos_ids_default = True
    PreTrainedTokenizerBase.apply_chat_template = apply_chat_template


class _StartupWaitAsyncio:
    """`asyncio` as atroposlib's `envs.base` module sees it: everything the real module has, except
    that a sleep of atroposlib's start-up wait (5 s, its only such call) lasts `wait_s`."""

    def __init__(self, real, wait_s: float) -> None:
        self._real, self._wait_s = real, wait_s

    def __getattr__(self, name: str):
        return getattr(self._real, name)

    def sleep(self, delay, *args, **kwargs):
        if delay == _ATROPOSLIB_STARTUP_WAIT_S:
            delay = self._wait_s
        return self._real.sleep(delay, *args, **kwargs)


def shorten_startup_wait(environ=os.environ) -> float | None:
    """Make atroposlib's env manager wait `$ATROPOS_ENV_STARTUP_WAIT_S` s (default `STARTUP_WAIT_S`)
    after registering instead of 5 s. Returns the wait applied; None when atroposlib is left alone:
    a value that is not a finite number >= 0, an atroposlib without `envs.base`, or one whose
    module has other than exactly one `asyncio.sleep(5)`, in `BaseEnv.env_manager`."""
    import asyncio

    raw = environ.get(STARTUP_WAIT_ENV, "").strip()
    try:
        wait_s = float(raw) if raw else STARTUP_WAIT_S
    except ValueError:
        return None
    if not 0 <= wait_s < float("inf"):
        return None
    try:
        from atroposlib.envs import base
        source, manager = inspect.getsource(base), inspect.getsource(base.BaseEnv.env_manager)
    except (ImportError, AttributeError, OSError, TypeError):
        return None
    if source.count(_ATROPOSLIB_STARTUP_CALL) != 1 or _ATROPOSLIB_STARTUP_CALL not in manager:
        return None
    real = getattr(base.asyncio, "_real", base.asyncio)
    if real is not asyncio:
        return None
    base.asyncio = _StartupWaitAsyncio(real, wait_s)
    return wait_s


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        sys.exit("usage: python -m atropos_core.envs.run_env MODULE serve [--env.* ...] [--openai.* ...]")
    from atropos_core.procs import exit_with_parent

    exit_with_parent()  # stop when the trainer that started this environment is gone (`procs`)
    restore_chat_template_ids()
    shorten_startup_wait()
    module, rest = argv[0], argv[1:]
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
