"""Our vLLM API server: vLLM's OpenAI server plus Atropos's `/generate` and token-protected
`/weights/*` routes. Run as `python -m atropos_core.inference.server <vllm serve args>`.

Why our own entry module rather than vLLM's dev-mode routes:
* Atropos environments with `server_type="vllm"` call `POST /generate` with
  `{"prompt": {"prompt_token_ids": [...]}, "logprobs": 0, "n", "max_tokens", ...}` and parse
  `{"logprobs": [per completion: [per token: [{"<id>": logprob}]]], "finish_reasons": [...]}`
  (atroposlib/envs/server_handling/vllm_server.py). vLLM serves no route of that shape.
* vLLM's `VLLM_SERVER_DEV_MODE` routes (`/collective_rpc`, `/update_weights`, ...) let anyone who
  reaches the port drive the workers. Our update routes do one thing each and require the
  per-launch token (env `ATROPOS_UPDATE_TOKEN`, never on the command line where `ps` shows it) as
  `Authorization: Bearer <token>`; refusals are logged with the client address. The server refuses
  to start with dev mode on. Bodies on our routes are size-limited (`--max-request-bytes`).
* The update protocol checks before it moves a byte: `/weights/prepare` validates a manifest
  (names, shapes, dtypes, bucket plan) against the served checkpoint's tensors and remembers it
  under its `manifest_key`; it pauses nothing. `/weights/update` names a remembered key and a
  version: the answer streams "ready" as soon as the update is accepted (the trainer broadcasts no
  byte before it, so a refused update costs nothing), then the result once the update is done:
  generation paused, received, loaded, finished, prefix cache reset (in-flight requests recompute
  their KV on the new weights) and generation ALWAYS resumed, on the error path too (a failed
  update otherwise leaves vLLM paused and later requests hang). Every step after the first is
  that one exchange. Inside the server the update is ONE call into the EngineCore
  (`inference.engine_ext`), not vLLM's chain of seven; an EngineCore without it gets the chain.
* `/generate` remembers which weight version produced each sequence; `/weights/sampled_versions`
  gives it back, so the trainer can log how stale its data is with unmodified environments.

The app is vLLM's own (`build_app`), with our routes added by wrapping it where vLLM's entry
module looks it up, so every vLLM CLI flag and the serving loop stay vLLM's.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

from typing import Annotated, Optional, Union

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.routing import APIRoute
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from atropos_core.inference.engine_ext import ONE_CALL_SUPPORTED, ONE_CALL_UPDATE
from atropos_core.inference.engine_ext import install as install_one_call_update
from atropos_core.model_source import checkpoint_tensors
from atropos_core.procs import exit_with_parent
from atropos_core.weight_sync.protocol import (
    PAUSE_MODES,
    PIPELINE_DEPTH,
    manifest_key,
    sequence_key,
    token_refusal,
    validate_manifest,
)

logger = logging.getLogger("atropos_core.inference.server")

TOKEN_ENV = "ATROPOS_UPDATE_TOKEN"
DEFAULT_MAX_BODY_BYTES = 8 << 20
#: Sequences whose weight version /generate remembers (for the trainer's staleness metric); the
#: oldest are forgotten first. ~100 B each.
SAMPLED_VERSIONS_KEPT = 1 << 16
_MAX_TOKEN_ID = 2**31 - 1
_Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
_TokenId = Annotated[int, Field(strict=True, ge=0, le=_MAX_TOKEN_ID)]


class _TokenPrompt(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt_token_ids: Annotated[list[_TokenId], Field(min_length=1)]


class GenerateRequest(BaseModel):
    """The declared schema of a `/generate` body, checked before anything reaches vLLM: strict
    types (no "1" for 1, no true for 1), finite numbers, ranges where vLLM asserts rather than
    raises. Keys outside it are ignored (logged once per key); vLLM's own checks (a prompt longer
    than --max-model-len, a token id outside the vocabulary, too many logprobs) still answer 400."""

    model_config = ConfigDict(extra="allow")
    prompt: Union[_TokenPrompt, Annotated[str, Field(strict=True, min_length=1)]]
    n: Optional[Annotated[int, Field(strict=True, ge=1, le=4096)]] = None
    max_tokens: Optional[Annotated[int, Field(strict=True, ge=1, le=_MAX_TOKEN_ID)]] = None
    temperature: Optional[Annotated[_Float, Field(ge=0.0)]] = None
    top_p: Optional[Annotated[_Float, Field(gt=0.0, le=1.0)]] = None
    top_k: Optional[Annotated[int, Field(strict=True, ge=-1, le=_MAX_TOKEN_ID)]] = None
    min_p: Optional[Annotated[_Float, Field(ge=0.0, le=1.0)]] = None
    seed: Optional[Annotated[int, Field(strict=True, ge=-(2**63), le=2**63 - 1)]] = None
    stop: Optional[Union[Annotated[str, Field(strict=True)], list[Annotated[str, Field(strict=True)]]]] = None
    stop_token_ids: Optional[list[_TokenId]] = None
    logprobs: Optional[Annotated[int, Field(strict=True, ge=-1, le=_MAX_TOKEN_ID)]] = None
    prompt_logprobs: Optional[Annotated[int, Field(strict=True, ge=-1, le=_MAX_TOKEN_ID)]] = None
    presence_penalty: Optional[Annotated[_Float, Field(ge=-2.0, le=2.0)]] = None
    frequency_penalty: Optional[Annotated[_Float, Field(ge=-2.0, le=2.0)]] = None
    repetition_penalty: Optional[Annotated[_Float, Field(gt=0.0)]] = None
    ignore_eos: Optional[StrictBool] = None
    skip_special_tokens: Optional[StrictBool] = None
    include_stop_str_in_output: Optional[StrictBool] = None
    min_tokens: Optional[Annotated[int, Field(strict=True, ge=0, le=_MAX_TOKEN_ID)]] = None
    spaces_between_special_tokens: Optional[StrictBool] = None


#: Request keys of /generate passed to SamplingParams (others are ignored, logged once).
_SAMPLING_KEYS = tuple(k for k in GenerateRequest.model_fields if k != "prompt")


def parse_generate_request(body: Any) -> tuple[Any, dict, set]:
    """(engine prompt, SamplingParams kwargs, ignored keys) of a `/generate` body, or ValueError
    with one line naming each wrong field."""
    try:
        req = GenerateRequest.model_validate(body)
    except ValidationError as e:
        parts = []
        for err in e.errors()[:5]:
            # Keep field names and list indices; drop pydantic's names of union branches.
            loc = ".".join(str(x) for x in err["loc"] if isinstance(x, int)
                           or (str(x).isidentifier() and not str(x)[0].isupper() and not str(x).startswith("_")))
            parts.append(f"{loc or 'body'}: {err['msg']}")
        raise ValueError("invalid /generate request: " + "; ".join(parts)) from None
    prompt = ({"prompt_token_ids": list(req.prompt.prompt_token_ids)} if isinstance(req.prompt, _TokenPrompt)
              else req.prompt)
    kwargs = {k: getattr(req, k) for k in _SAMPLING_KEYS if getattr(req, k) is not None}
    return prompt, kwargs, set(req.model_extra or {})


class _UpdateState:
    """The server's side of the update protocol (one update at a time)."""

    def __init__(self) -> None:
        self.phase = "idle"          # idle | applying
        self.version: int | None = 0  # None after a failed update: the weights are in an unknown state
        self.last_error: str | None = None
        self.lock = asyncio.Lock()
        # The last manifest prepared here and its key (`weight_sync.protocol.manifest_key`): an update with
        # the same names, shapes, dtypes and plan needs only `/weights/update`, one exchange.
        self.known_key: str | None = None
        self.known_manifest: dict | None = None
        # Whether the EngineCore has `engine_ext`'s one-call update (asked at the first /weights/init).
        self.one_call: bool | None = None
        # weight_sync.sequence_key(prompt + completion) -> the version that generated it
        self.sampled: "OrderedDict[str, int]" = OrderedDict()


def _checkpoint_spec(model: str) -> dict:
    """Names and shapes of the served checkpoint's tensors, read from safetensors headers only
    (`model_source.checkpoint_tensors`)."""
    d = Path(model)
    spec: dict[str, Any] = {"tensors": None, "tie_word_embeddings": None}
    if not d.is_dir():
        return spec
    cfg = d / "config.json"
    if cfg.exists():
        spec["tie_word_embeddings"] = bool(json.loads(cfg.read_text()).get("tie_word_embeddings", False))
    if any(d.glob("*.safetensors")):
        spec["tensors"] = checkpoint_tensors(d)
    return spec


class _Refused(Exception):
    """Raised by a route dependency (token, body): answered `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _GuardedRoute(APIRoute):
    """A route whose dependencies may raise `_Refused`. Answered here, not by an app exception
    handler: vLLM has built its app's middleware stack (and so its handler table) by the time our
    routes are added."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def guarded(request: Request):
            try:
                return await handler(request)
            except _Refused as err:
                return _error(err.status, str(err))

        return guarded


async def _pause(eng, mode: str) -> None:
    """Pause generation for an update, without `AsyncLLM.pause_generation`'s closing 20 ms sleep.

    That sleep only lets outputs of requests that finished while draining reach their callers before
    the method returns ("not required for correctness", vLLM 0.32); every update paid it (20 of
    ~30 ms of a prepare, measured). The two calls it makes are made here; on an engine without
    them, the public method."""
    core, renderer = getattr(eng, "engine_core", None), getattr(eng, "renderer", None)
    if core is None or renderer is None or not hasattr(core, "pause_scheduler_async"):
        await eng.pause_generation(mode=mode, clear_cache=True)
        return
    await renderer.clear_mm_cache_async()
    await core.pause_scheduler_async(mode=mode, clear_cache=True)


async def _has_one_call_update(eng) -> bool:
    """Whether the EngineCore has `engine_ext`'s one-call update (installed by this module)."""
    try:
        return bool(await eng.engine_core.call_utility_async(ONE_CALL_SUPPORTED))
    except Exception as err:  # noqa: BLE001 - then vLLM's chain of calls does the update
        logger.info("the EngineCore has no one-call weight update: %s", err)
        return False


async def _chain_update(eng, manifest: dict, version: int, pause_mode: str) -> None:
    """An update as vLLM's AsyncLLM drives it, call by call: pause, start, receive, finish and
    set the version, reset the prefix cache, resume (always)."""
    from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

    await _pause(eng, pause_mode)
    try:
        await eng.start_weight_update()
        await eng.update_weights(request=WeightTransferUpdateRequest(update_info=manifest))
        await eng.finish_weight_update(str(version))
        if not await eng.reset_prefix_cache(reset_running_requests=True):
            logger.warning("prefix cache was not reset after the update to v%d", version)
    finally:
        await eng.resume_generation()


def _error(status: int, msg: str) -> JSONResponse:
    return JSONResponse({"error": msg}, status_code=status)


def add_atropos_routes(app: FastAPI, *, token: str, max_body_bytes: int, model: str) -> None:
    """Add `/generate`, `/weight_version` and the token-protected `/weights/*` routes to `app`."""
    from vllm import envs

    if envs.VLLM_SERVER_DEV_MODE:
        # Its /collective_rpc, /update_weights, ... are unauthenticated and bypass our protocol.
        raise RuntimeError("VLLM_SERVER_DEV_MODE must be off for the Atropos server: its routes would let "
                           "anyone who reaches the port drive the workers")
    state = _UpdateState()
    spec = _checkpoint_spec(model)
    ignored_keys_logged: set[str] = set()

    weights = APIRouter(route_class=_GuardedRoute)  # the /weights/* routes, added to `app` at the end

    async def authorized(request: Request) -> None:
        """Dependency of every `/weights/*` route: the update token, checked before the body is read
        (401 without a token, 403 with a wrong one; logged with the client address). Async, so
        FastAPI runs it on the event loop rather than a worker thread."""
        why = token_refusal(request.headers.get("authorization", ""), token)
        if why is None:
            return
        client = request.client.host if request.client else "?"
        logger.warning("refused %s %s from %s: %s", request.method, request.url.path, client, why)
        raise _Refused(401 if why == "no token" else 403, "weight routes need the update token")

    async def body_json(request: Request) -> dict:
        """The body as a JSON object, or `_Refused`: 413 over the size limit, 400 when it is not one."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_body_bytes:
            raise _Refused(413, f"request body over {max_body_bytes} bytes")
        raw = await request.body()
        if len(raw) > max_body_bytes:
            raise _Refused(413, f"request body over {max_body_bytes} bytes")
        try:
            data = json.loads(raw or b"{}")
        except RecursionError:
            raise _Refused(400, "request body nests too deeply") from None
        except ValueError as err:
            raise _Refused(400, str(err)) from None
        if not isinstance(data, dict):
            raise _Refused(400, "request body must be a JSON object")
        return data

    async def authorized_body(request: Request) -> dict:
        """Dependency of the `/weights/*` routes that take a body: the token, then the body."""
        await authorized(request)
        return await body_json(request)

    def engine(request: Request):
        return request.app.state.engine_client

    def _remember_versions(final) -> None:
        if state.version is None:
            return
        prompt = list(final.prompt_token_ids or [])
        for o in final.outputs:
            state.sampled[sequence_key(prompt + list(o.token_ids))] = state.version
        while len(state.sampled) > SAMPLED_VERSIONS_KEPT:
            state.sampled.popitem(last=False)

    # -- Atropos's token-in/token-out route ----------------------------------------------------
    @app.post("/generate")
    async def generate(request: Request):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        try:
            body = await body_json(request)
        except _Refused as err:
            return _error(err.status, str(err))
        try:
            engine_prompt, kwargs, unknown = parse_generate_request(body)
            unknown -= ignored_keys_logged
            if unknown:
                ignored_keys_logged.update(unknown)
                logger.warning("/generate ignores request keys %s", sorted(unknown))
            params = SamplingParams(output_kind=RequestOutputKind.FINAL_ONLY, **kwargs)
        except (ValueError, TypeError, AssertionError) as err:  # vLLM asserts on some combinations
            return _error(400, str(err))
        final = None
        try:
            async for out in engine(request).generate(engine_prompt, params, f"atropos-{uuid.uuid4().hex}"):
                final = out
        except ValueError as err:  # e.g. prompt longer than max_model_len, token id out of range
            return _error(400, str(err))
        if final is None:
            return _error(500, "generation produced no output")
        _remember_versions(final)
        want_lp = params.logprobs is not None
        result: dict[str, Any] = {
            "text": [o.text for o in final.outputs],
            "token_ids": [list(o.token_ids) for o in final.outputs],
            "finish_reasons": [o.finish_reason for o in final.outputs],
            "prompt_token_ids": list(final.prompt_token_ids or []),
            "weight_version": state.version,
        }
        if want_lp:
            # Atropos reads item[0] of each token entry: a dict whose FIRST key is the sampled token.
            result["logprobs"] = [
                [[{str(tid): lps[tid].logprob, **{str(k): v.logprob for k, v in lps.items() if k != tid}}]
                 for tid, lps in zip(o.token_ids, o.logprobs or [])]
                for o in final.outputs]
        if params.prompt_logprobs is not None:
            result["prompt_logprobs"] = [
                None if lps is None else {str(k): v.logprob for k, v in lps.items()}
                for lps in (final.prompt_logprobs or [])]
        return JSONResponse(result)

    @app.get("/weight_version")
    async def weight_version():
        return JSONResponse({"weight_version": state.version, "phase": state.phase,
                             "last_error": state.last_error})

    # -- weight updates (each checks the token first) -------------------------------------
    @weights.get("/weights/spec", dependencies=[Depends(authorized)])
    async def weights_spec(request: Request):
        pc = request.app.state.vllm_config.parallel_config
        try:  # each worker's device, so the trainer can avoid NCCL between two ranks on one GPU
            devices = [str(d) for d in await engine(request).collective_rpc("atropos_device_id")]
        except Exception as err:  # noqa: BLE001 - the spec is still useful without it
            logger.warning("could not ask the workers for their devices: %s", err)
            devices = None
        return JSONResponse(dict(spec, num_workers=pc.world_size_across_dp, weight_version=state.version,
                                 devices=devices))

    @weights.post("/weights/init")
    async def weights_init(request: Request, body: dict = Depends(authorized_body)):
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        keys = ("host", "port", "world_size", "rank_offset", "backend", "init_timeout_s", "op_timeout_s")
        init = {k: body[k] for k in keys if k in body}
        if set(keys[:4]) - set(init):
            return _error(400, f"/weights/init needs {list(keys[:4])}")
        async with state.lock:
            if state.phase != "idle":
                return _error(409, f"an update is {state.phase}")
            try:
                await engine(request).init_weight_transfer_engine(WeightTransferInitRequest(init_info=init))
            except Exception as err:  # noqa: BLE001 - reported to the trainer
                logger.exception("joining the weight-transfer group failed")
                return _error(500, f"joining the weight-transfer group failed: {err}")
        if state.one_call is None:
            state.one_call = await _has_one_call_update(engine(request))
            logger.info("weight updates run as %s", "one EngineCore call" if state.one_call else "vLLM's chain of calls")
        return JSONResponse({"status": "joined"})

    @weights.post("/weights/prepare")
    async def weights_prepare(body: dict = Depends(authorized_body)):
        """Validate a manifest against the served checkpoint and remember it: `/weights/update`
        then names it by the `manifest_key` answered here. Pauses nothing."""
        try:
            manifest = body.get("manifest")
            if not isinstance(manifest, dict):
                raise ValueError("/weights/prepare needs a 'manifest' object")
            validate_manifest(manifest, spec, "this server")
            # What `manifest_key` hashes; `/weights/update` adds each update's version.
            known = {k: manifest[k] for k in ("names", "dtypes", "shapes", "buckets")}
            known["pipeline_depth"] = manifest.get("pipeline_depth", PIPELINE_DEPTH)
        except (ValueError, TypeError) as err:
            return _error(400, str(err))
        async with state.lock:
            if state.phase != "idle":
                return _error(409, f"an update is {state.phase}")
            state.known_key, state.known_manifest = manifest_key(known), known
        return JSONResponse({"status": "prepared", "manifest_key": state.known_key})

    async def _apply(eng, manifest: dict, version: int, pause_mode: str) -> tuple[int, dict]:
        """The whole update on an accepted request (the caller holds the lock and has set phase
        "applying"); generation is paused and ALWAYS resumed inside. Returns (HTTP status, answer)."""
        t0 = time.perf_counter()
        try:
            if state.one_call:
                await eng.engine_core.call_utility_async(ONE_CALL_UPDATE, manifest, str(version), pause_mode)
            else:
                await _chain_update(eng, manifest, version, pause_mode)
            state.version, state.last_error = version, None
        except Exception as err:  # noqa: BLE001 - reported to the trainer
            state.version = None
            state.last_error = f"update to v{version} failed: {err}"
            logger.exception("weight update to v%d failed", version)
            return 500, {"error": f"weight update to v{version} failed on this server: {err}"}
        finally:
            state.phase = "idle"
        ms = (time.perf_counter() - t0) * 1e3
        logger.info("weights updated to v%d in %.0f ms", version, ms)
        return 200, {"status": "updated", "weight_version": version, "ms": ms}

    @weights.post("/weights/update")
    async def weights_update(request: Request, body: dict = Depends(authorized_body)):
        """One update of a manifest prepared before (`manifest_key`; only the version changes).
        The answer streams two JSON lines: `{"status": "ready"}` once the update is accepted (the
        trainer sends no byte before it), then the result. Refusals come before "ready", as a
        plain 4xx: 409 `manifest_unknown` (the trainer prepares and asks again), 409 busy, 400."""
        try:
            key, version = body.get("manifest_key"), int(body["version"])
            pause_mode = body.get("pause_mode", "keep")
            if not isinstance(key, str) or pause_mode not in PAUSE_MODES:
                raise ValueError("/weights/update needs a string 'manifest_key' and a valid 'pause_mode'")
        except (ValueError, TypeError, KeyError) as err:
            return _error(400, f"/weights/update needs 'manifest_key' and an integer 'version': {err}")
        eng = engine(request)
        await state.lock.acquire()
        if state.phase != "idle":
            state.lock.release()
            return _error(409, f"an update is {state.phase}")
        if key != state.known_key or state.known_manifest is None:
            state.lock.release()
            return JSONResponse({"error": "manifest unknown here: prepare it first", "code": "manifest_unknown"},
                                status_code=409)
        state.phase = "applying"
        manifest = dict(state.known_manifest, version=version)

        async def run() -> tuple[int, dict]:
            try:
                return await _apply(eng, manifest, version, pause_mode)
            finally:
                state.lock.release()

        # A task, so that a client that disconnects mid-update cannot cancel it half-way: the
        # update still ends (by the group's timeout if no byte comes) and generation resumes.
        task = asyncio.get_running_loop().create_task(run())

        async def lines():
            yield json.dumps({"status": "ready"}) + "\n"
            code, answer = await asyncio.shield(task)
            yield json.dumps(dict(answer, http_status=code)) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @weights.post("/weights/sampled_versions")
    async def sampled_versions(body: dict = Depends(authorized_body)):
        """The weight version that generated each sequence (`weight_sync.sequence_key` of prompt +
        completion tokens), or null where this server does not know it."""
        keys = body.get("keys")
        if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            return _error(400, "/weights/sampled_versions needs 'keys': a list of strings")
        return JSONResponse({"versions": [state.sampled.get(k) for k in keys]})

    @weights.post("/weights/load_from_disk")
    async def weights_load_from_disk(request: Request, body: dict = Depends(authorized_body)):
        """The disk round trip (fallback and benchmark baseline): reload a safetensors directory."""
        try:
            path, version = Path(str(body["path"])), int(body["version"])
            if not path.is_dir() or not any(path.glob("*.safetensors")):
                raise ValueError(f"{path} is not a directory of .safetensors files")
        except (ValueError, TypeError, KeyError) as err:
            return _error(400, str(err) if isinstance(err, ValueError) else f"needs 'path', 'version': {err}")
        eng = engine(request)
        async with state.lock:
            if state.phase != "idle":
                return _error(409, f"an update is {state.phase}")
            state.phase = "applying"
            t0 = time.perf_counter()
            try:
                await _pause(eng, "keep")
                await eng.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
                await eng.update_weight_version(str(version))
                await eng.reset_prefix_cache(reset_running_requests=True)
                state.version, state.last_error = version, None
            except Exception as err:  # noqa: BLE001 - reported to the caller
                state.version, state.last_error = None, f"reload of v{version} from {path} failed: {err}"
                logger.exception("reload from %s failed", path)
                return _error(500, state.last_error)
            finally:
                await eng.resume_generation()
                state.phase = "idle"
        return JSONResponse({"status": "updated", "weight_version": version,
                             "ms": (time.perf_counter() - t0) * 1e3})

    app.include_router(weights)


SPIN_ENV = "ATROPOS_VLLM_SPIN_S"  # = atropos_core.cpu_budget.SPIN_ENV (not imported: keep this light)


def quiet_idle_readers(environ=os.environ) -> float | None:
    """Make vLLM's shared-memory queue readers stop spinning `$ATROPOS_VLLM_SPIN_S` seconds after a
    message (vLLM 0.32: 1 s of `sched_yield`, `SpinCondition.busy_loop_s`, no setting for it),
    then wait on their notification socket. Unset: vLLM's behaviour. Returns the value applied.

    Called at import: vLLM starts its EngineCore and workers with `spawn`, and a spawned child
    re-imports the parent's main module (this one, as `__mp_main__`), so every process of the
    server's tree runs this before it builds a queue. The writer notifies on every write, so a
    reader that waits on the socket wakes as soon as a message lands (no poll interval)."""
    raw = environ.get(SPIN_ENV)
    if raw in (None, ""):
        return None
    try:
        spin_s = max(0.0, float(raw))
    except ValueError:
        logger.warning("ignoring %s=%r: not a number of seconds", SPIN_ENV, raw)
        return None
    from vllm.distributed.device_communicators import shm_broadcast

    cls = shm_broadcast.SpinCondition
    if getattr(cls.__init__, "_atropos_spin_s", None) == spin_s:
        return spin_s
    original = getattr(cls.__init__, "_atropos_original", cls.__init__)

    def init(self, is_reader, context, notify_address, busy_loop_s=spin_s):
        original(self, is_reader, context, notify_address, busy_loop_s=min(busy_loop_s, spin_s))

    init._atropos_spin_s = spin_s  # type: ignore[attr-defined]
    init._atropos_original = original  # type: ignore[attr-defined]
    cls.__init__ = init
    return spin_s


def main(argv: list[str] | None = None) -> None:
    """Parse our flags, hand the rest to vLLM's `serve` entry with our routes added to its app."""
    ours = argparse.ArgumentParser(add_help=False)
    ours.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                      help="size limit of request bodies on our routes")
    args, rest = ours.parse_known_args(sys.argv[1:] if argv is None else argv)
    token = os.environ.get(TOKEN_ENV, "")
    if len(token) < 16:
        sys.exit(f"{TOKEN_ENV} must hold the per-launch update token (>= 16 characters)")
    # Our own handler: vLLM's logging setup (dictConfig) runs later and disables loggers that exist
    # by then; `build_app_with_atropos_routes` re-enables ours.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [atropos] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    exit_with_parent()  # stop, then SIGKILL the engine too, when the trainer that started us is gone

    import vllm.entrypoints.launchers.api_server.entry as entry

    vllm_build_app = entry.build_app

    def build_app_with_atropos_routes(vllm_args, *a, **kw):
        app = vllm_build_app(vllm_args, *a, **kw)
        logger.disabled = False
        add_atropos_routes(app, token=token, max_body_bytes=args.max_request_bytes, model=vllm_args.model)
        return app

    entry.build_app = build_app_with_atropos_routes
    sys.argv = [sys.argv[0], *rest]
    entry.main()


quiet_idle_readers()
if __name__ in ("__main__", "__mp_main__"):  # the server's API process, or a child vLLM spawned from it
    install_one_call_update()

if __name__ == "__main__":
    main()
