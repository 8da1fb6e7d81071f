"""Runs inside vLLM's EngineCore process: a whole weight update as ONE engine utility call.

vLLM's AsyncLLM drives an update as a chain of separate calls from the API process to the
EngineCore process, each a ZMQ round trip, several of them also a round trip to the workers: pause
the scheduler (which also synchronises the device, one worker RPC), start the update (worker RPC),
receive (worker RPC), finish (worker RPC), set the version, reset the prefix cache, resume. On a
small model that chain, not the bytes, was most of an update (docs/loop-speed-2026-12-01.md).

`install()` adds two methods to vLLM's `EngineCore` class; the engine's utility dispatch looks a
called name up on the engine object (`getattr(engine, name)`), so the API process reaches them with
`engine_client.engine_core.call_utility_async(name, ...)`, and a data-parallel client sends them to
every engine, as it does vLLM's own utilities:

* `atropos_update(update_info, version, pause_mode)`: pause the scheduler with vLLM's own
  `pause_scheduler(mode, clear_cache=False)` (it waits for in-flight batches, and for "wait" mode
  for running requests to drain), then ONE worker RPC (`AtroposWorkerExtension.atropos_update`:
  start, receive and load, finish, drop the encoder cache), then reset the prefix cache with running
  requests preempted (they recompute their KV on the new weights, as after vLLM's own update
  chain), drop the scheduler's encoder cache, record the version, and resume the scheduler: always,
  also when any of it failed. The busy loop runs the call in its own thread, so nothing is scheduled
  while it runs.

  When the pause cannot complete at once (the engine still has work: in-flight steps, or requests
  that finished in the last step and are not yet cleared), vLLM hands back a Future and completes
  it from an idle-state callback, which its busy loop runs inside `_process_input_queue` just
  before it blocks on the input queue. The update then resumes the scheduler from inside that
  callback, and the loop blocks anyway: it tests for work only before the callback. vLLM's own
  chain never meets this (its resume is a later client request, which wakes the queue); ours
  must wake it, so `_wake` puts vLLM's own `WAKEUP` sentinel on the input queue after every
  update finished from the callback. Without it the resumed requests sat unscheduled until the
  next request of any kind: on the echo task one batch ahead with `sync.verify_every 0` (the
  served check's request had been that wake-up), every few runs an environment waited out its
  120 s request timeout (docs/loop-speed-2026-12-01.md, session 13).
* `atropos_update_supported()`: True; the server asks once and uses vLLM's chain where it fails
  (an EngineCore that did not import this module).

Where it is installed: our server's entry module (`atropos_core.inference.server`) calls
`install()` in the API process before vLLM starts the EngineCore (a forked EngineCore inherits the
patched class) and again when a spawned child re-imports that module as `__mp_main__`.
`ATROPOS_ONE_CALL_UPDATE=off` in the server's environment skips it (vLLM's chain of calls then
runs every update: the escape hatch if a vLLM version changes what these methods rely on).
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import Future
from typing import Any

logger = logging.getLogger("vllm.atropos_engine")

#: Name of the worker RPC that does start + receive + finish in the worker process.
WORKER_UPDATE_RPC = "atropos_update"
#: Names of the EngineCore utilities `install()` adds.
ONE_CALL_UPDATE = "atropos_update"
ONE_CALL_SUPPORTED = "atropos_update_supported"
ONE_CALL_ENV = "ATROPOS_ONE_CALL_UPDATE"


def _load_and_resume(engine: Any, update_info: dict, version: str) -> dict:
    """The update proper, on a paused engine; resumes the scheduler whatever happens."""
    try:
        engine.collective_rpc(WORKER_UPDATE_RPC, kwargs={"update_info": update_info})
        if not engine.reset_prefix_cache(reset_running_requests=True):
            logger.warning("prefix cache was not reset after the update to v%s", version)
        reset_encoder = getattr(engine.scheduler, "reset_encoder_cache", None)
        if callable(reset_encoder):
            reset_encoder()
        engine.set_weight_version(version)
    finally:
        engine.resume_scheduler()
    return {"weight_version": version}


def _wake(engine: Any) -> None:
    """Make the busy loop look for work again: it may be about to block on its input queue with
    the scheduler just resumed (see the module docstring). A no-op sentinel of vLLM's own."""
    queue = getattr(engine, "input_queue", None)  # EngineCoreProc; an in-process EngineCore has none
    if queue is None:
        return
    try:
        from vllm.v1.engine import EngineCoreRequestType
    except ImportError:
        return
    wakeup = getattr(EngineCoreRequestType, "WAKEUP", None)
    if wakeup is not None:
        queue.put_nowait((wakeup, None))


def atropos_update(self: Any, update_info: dict, version: str, pause_mode: str = "keep") -> Any:
    """EngineCore utility: pause, one worker RPC for the whole update, reset caches, resume.
    Returns the answer, or a Future of it when the pause has to wait for in-flight work."""
    try:
        pending = self.pause_scheduler(mode=pause_mode, clear_cache=False)
    except BaseException:
        self.resume_scheduler()
        raise
    if pending is None:
        return _load_and_resume(self, update_info, version)
    answer: Future = Future()

    def paused(f: Future) -> None:  # runs in the busy loop's thread once the engine is idle
        try:
            try:
                f.result()
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                self.resume_scheduler()
                answer.set_exception(err)
                return
            try:
                answer.set_result(_load_and_resume(self, update_info, version))
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                answer.set_exception(err)
        finally:
            _wake(self)  # resumed from inside the idle loop: it must look for work again

    pending.add_done_callback(paused)
    return answer


def atropos_update_supported(self: Any) -> bool:
    return True


def install() -> bool:
    """Add the utilities to vLLM's EngineCore class (idempotent). False if vLLM lacks a method
    they call, or `$ATROPOS_ONE_CALL_UPDATE` is "off" (then the server keeps vLLM's own chain of calls)."""
    if os.environ.get(ONE_CALL_ENV, "").strip().lower() in ("off", "0", "false", "no"):
        return False
    try:
        from vllm.v1.engine.core import EngineCore
    except ImportError:
        return False
    needed = ("pause_scheduler", "resume_scheduler", "collective_rpc", "reset_prefix_cache", "set_weight_version")
    missing = [name for name in needed if not hasattr(EngineCore, name)]
    if missing:
        logger.warning("vLLM's EngineCore lacks %s: weight updates use vLLM's chain of calls", missing)
        return False
    setattr(EngineCore, ONE_CALL_UPDATE, atropos_update)
    setattr(EngineCore, ONE_CALL_SUPPORTED, atropos_update_supported)
    return True
