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

And one speed default, for an environment whose trainer keeps up with it:

* atroposlib 0.4.0's `BaseEnv.env_manager` asks the API for its status, then sleeps a fixed 0.1 s,
  before it starts the next group's rollouts. With `max_batches_offpolicy=1` it may start only once
  the trainer has taken the queued batch, so a trainer faster than that waits ~50 ms on average
  for the environment just to notice (measured: the largest part of the echo task's wait for data,
  docs/loop-speed-2026-12-01.md). Here that one wait is `$ATROPOS_ENV_POLL_S` (default
  `ENV_POLL_S`); other sleeps are untouched. A poll is one small HTTP request to the API, so this
  costs the API and the environment a few percent of a core, not a spinning thread.
"""
from __future__ import annotations

import functools
import os
import runpy
import sys

#: Seconds between the environment manager's status polls (atroposlib's own: 0.1).
ENV_POLL_S = 0.02
ENV_POLL_ENV = "ATROPOS_ENV_POLL_S"
#: The fixed wait atroposlib 0.4.0's env manager loop ends each round with.
_ATROPOSLIB_LOOP_WAIT_S = 0.1


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


class _PollingAsyncio:
    """`asyncio` as atroposlib's `envs.base` module sees it: everything the real module has, except
    that its env manager's fixed 0.1 s wait between status polls is `poll_s`."""

    def __init__(self, real, poll_s: float) -> None:
        self._real, self._poll_s = real, poll_s

    def __getattr__(self, name: str):
        return getattr(self._real, name)

    def sleep(self, delay, *args, **kwargs):
        if delay == _ATROPOSLIB_LOOP_WAIT_S:
            delay = self._poll_s
        return self._real.sleep(delay, *args, **kwargs)


def shorten_status_poll(environ=os.environ) -> float | None:
    """Make atroposlib's env manager poll the API every `$ATROPOS_ENV_POLL_S` s (default
    `ENV_POLL_S`) instead of 0.1 s. Returns the interval applied, None when left alone (a value
    that is not a positive number, or an atroposlib without that module)."""
    import asyncio

    raw = environ.get(ENV_POLL_ENV, "")
    try:
        poll_s = float(raw) if raw else ENV_POLL_S
    except ValueError:
        return None
    if not 0 < poll_s < float("inf"):
        return None
    try:
        from atroposlib.envs import base
    except ImportError:
        return None
    real = getattr(base.asyncio, "_real", base.asyncio)
    if real is not asyncio:
        return None
    base.asyncio = _PollingAsyncio(real, poll_s)
    return poll_s


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        sys.exit("usage: python -m atropos_core.envs.run_env MODULE serve [--env.* ...] [--openai.* ...]")
    restore_chat_template_ids()
    shorten_status_poll()
    module, rest = argv[0], argv[1:]
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
