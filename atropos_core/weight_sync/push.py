"""The trainer's push: `WeightSyncConfig` and `WeightSync`, which drive every vLLM server's
`/weights/*` routes over HTTP and broadcast the tensors on the transfer group.

* **Control over HTTP, data over torch.distributed.** The manifest (`protocol`) travels as JSON;
  the tensors by broadcast from trainer rank 0 (`transport`). Data-parallel replicas simply get
  later ranks of the group.
* **Message grouping per backend.** Consecutive tensors are packed into byte buckets, one
  message each: on gloo of at most `GLOO_BUCKET_BYTES` (a small model is one message; per-tensor
  messages each cost a wait on the worker, measured in docs/loop-speed-2026-12-01.md), on NCCL
  `NCCL_BUCKET_BYTES`, as vLLM's own NCCL engine does. A tensor over the size goes alone, uncopied.
* **FSDP2.** `push()` runs on every trainer rank: each parameter is gathered with
  `DTensor.full_tensor()` one at a time (a collective all ranks join in the same order), rank 0
  broadcasts it and drops it, so no rank ever holds a whole-model copy (bucketing on NCCL holds at
  most one bucket). Tied embeddings need nothing special: `named_parameters()` yields a shared
  parameter once and vLLM ties `lm_head` itself.
* **Fail once, clearly, and leave the servers serving.** The first update `prepare`s its
  manifest on every server (validated against the served checkpoint's tensors, remembered under
  its `manifest_key`; nothing is paused), so a bad manifest fails before a single byte is
  broadcast. Every update is then ONE exchange per server, `/weights/update`: the server answers
  "ready" on a streamed first line once it has accepted the update, the trainer broadcasts while
  the server pauses, receives, loads, resets its prefix cache and resumes (on its own error path
  too), and the second line is the result and the served version (`sync/round_trips`: 2 when a
  prepare ran first, else 1). Trainer ranks keep gathering in lockstep after a failure on rank 0
  and all raise the same `WeightSyncError` at the end, so the trainer can still checkpoint and
  exit.
"""
from __future__ import annotations

import datetime
import http.client
import json
import logging
import select
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections import deque
from dataclasses import dataclass
from typing import Annotated, Any, Iterator, Literal, Sequence
from urllib.parse import urlsplit

try:
    import requests
except ImportError:  # WeightSyncConfig serves runs without inference servers; WeightSync needs requests
    requests = None
import torch

from ..checks import Between, Ge, Gt, check_fields
from .protocol import (
    DTYPE_NAMES,
    MAX_PIPELINE_DEPTH,
    GLOO_BUCKET_BYTES,
    NCCL_BUCKET_BYTES,
    PIPELINE_DEPTH,
    WIRE_DTYPES,
    WeightSyncError,
    auth_headers,
    build_manifest,
    clean_param_name,
    device_id,
    manifest_key,
    message_timeout,
    pack_bucket,
    sequence_key,
    validate_manifest,
)
from .transport import broadcast_async, make_transfer_group, pick_backend, wait_done

logger = logging.getLogger(__name__)


def _interrupt(err: BaseException) -> bool:
    """A KeyboardInterrupt or SystemExit: the process is being stopped, not an update failing."""
    return not isinstance(err, Exception)


@dataclass
class WeightSyncConfig:
    """How the trainer pushes weights to the vLLM servers."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """"auto" (NCCL when the model's parameters are on CUDA, else gloo; gloo also when the trainer
    shares a GPU with a vLLM worker, which NCCL refuses: see `pick_backend`), "gloo" or "nccl"."""
    master_address: str = "127.0.0.1"
    """Address of trainer rank 0 that the vLLM workers connect to (TCPStore and the group)."""
    master_port: Annotated[int, Between(0, 65535)] = 0
    """TCPStore port on trainer rank 0; 0 picks a free one."""
    init_timeout_s: Annotated[float, Gt(0)] = 120.0
    """Time for every worker of every server to join the group at `connect()`."""
    update_timeout_s: Annotated[float, Gt(0)] = 30.0
    """Per-message timeout of the transfer (gloo: the group's per-collective timeout; NCCL: enforced
    on the host for each message, `wait_done`, with at most `pipeline_depth` messages in flight, so
    it never times a whole update). Short on purpose: a dead worker otherwise hangs the trainer."""
    http_timeout_s: Annotated[float, Gt(0)] = 30.0
    """Timeout of the control calls that do not wait for the broadcast (spec, prepare, sampled versions),
    and of connecting for an update."""
    apply_timeout_s: Annotated[float, Gt(0)] = 600.0
    """Upper bound on one whole update on a server (receive + load + finish); failures inside it are
    caught sooner by the group's timeout, this only bounds a server that hangs afterwards."""
    bucket_bytes: Annotated[int, Ge(0)] | None = None
    """Bytes per broadcast message. 0 sends tensor by tensor; None picks per backend
    (`GLOO_BUCKET_BYTES` on gloo, `NCCL_BUCKET_BYTES` on NCCL; see the module docstring)."""
    pipeline_depth: Annotated[int, Between(1, MAX_PIPELINE_DEPTH)] = PIPELINE_DEPTH
    """Messages in flight on each side (sent in the manifest, so both ends agree). 2 posts message
    i+1 before the worker loads message i into vLLM (and before rank 0 gathers the next), so the
    load overlaps the wire; 1 is strictly one at a time."""
    wire_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Cast floating-point weights to this dtype before sending (e.g. "bfloat16" when vLLM serves
    bf16 from fp32 master weights: half the bytes). None sends the parameter dtype."""
    pause_mode: Literal["keep", "wait", "abort"] = "keep"
    """How vLLM pauses in-flight requests during an update: "keep" freezes them and they continue on
    the new weights (their KV cache is recomputed), "wait" drains them first, "abort" cancels them."""
    validate_shapes: bool = True
    """Check the manifest against the served checkpoint's tensor names/shapes before sending."""
    verify_every: Annotated[int, Ge(0)] = 1
    """Every N steps, right after the push, compare a fixed probe's logprobs on the trainer and on
    every server (`atropos_core.served_check`); a mismatch beyond the dtype's tolerance stops the
    run. 0 disables it. Cost: one 32-token forward and one tiny request per server."""

    def __post_init__(self) -> None:
        check_fields(self, "sync")


class _UpdateChannel:
    """One server's kept-alive HTTP/1.1 connection for its `/weights/update` exchanges, on the
    standard library's `http.client`: the trainer waits for the first line of every update before
    it sends a byte, and `requests` costs that wait about a millisecond of its own per exchange
    (measured in docs/loop-speed-2026-12-01.md). Driven from the pushing thread, one update at a
    time; any error closes the connection and the next exchange opens a new one."""

    def __init__(self, url: str, headers: dict[str, str], connect_timeout_s: float) -> None:
        parts = urlsplit(url)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self.url = url
        self._path = parts.path.rstrip("/") + "/weights/update"
        self._conn = cls(parts.hostname, parts.port, timeout=connect_timeout_s)
        self._headers = dict(headers, **{"Content-Type": "application/json"})
        self._resp: http.client.HTTPResponse | None = None

    def _drop_if_closed(self) -> None:
        """Reconnect when the server closed the idle connection (its keep-alive timeout): a
        readable socket between two exchanges can only be an EOF."""
        sock = self._conn.sock
        if sock is not None and select.select([sock], [], [], 0)[0]:
            self._conn.close()

    def send(self, body: dict) -> None:
        """Send the request (all servers' requests go out before any answer is read)."""
        try:
            if self._resp is not None:  # the last exchange was left unfinished: start afresh
                self.close()
            self._drop_if_closed()
            self._conn.request("POST", self._path, body=json.dumps(body).encode(), headers=self._headers)
        except (OSError, http.client.HTTPException) as err:
            self.close()
            raise WeightSyncError(f"vLLM server {self.url}: POST /weights/update failed: {err}") from err

    def first(self) -> str:
        """Read the answer up to its first line: "ready", or "manifest_unknown" (a 409 asking for a
        prepare); any other answer raises `WeightSyncError`."""
        try:
            resp = self._conn.getresponse()
            if resp.status != 200:
                raw = resp.read().decode(errors="replace")
                try:
                    answer = json.loads(raw)
                except ValueError:
                    answer = {"error": raw}
                if resp.status == 409 and isinstance(answer, dict) and answer.get("code") == "manifest_unknown":
                    return "manifest_unknown"
                detail = answer.get("error") if isinstance(answer, dict) else None
                raise WeightSyncError(f"vLLM server {self.url}: POST /weights/update answered {resp.status}: "
                                      f"{detail or answer}")
            line = json.loads(resp.readline())
        except (OSError, http.client.HTTPException, ValueError) as err:
            self.close()
            raise WeightSyncError(f"vLLM server {self.url}: /weights/update did not start: {err}") from err
        except WeightSyncError:
            self.close()
            raise
        if not isinstance(line, dict) or line.get("status") != "ready":
            self.close()
            raise WeightSyncError(f"vLLM server {self.url}: /weights/update did not start: first line {line!r}")
        self._resp = resp
        return "ready"

    def result(self, timeout: float | None = None) -> dict:
        """The started update's result (its second line), waiting up to `timeout` seconds (default:
        the connection's timeout); raises `WeightSyncError` when the server reports a failure."""
        resp, self._resp = self._resp, None
        try:
            if resp is None:
                raise ValueError("no update was started")
            if self._conn.sock is not None and timeout is not None:
                self._conn.sock.settimeout(timeout)
            line = resp.readline()
            resp.read()  # the end of the chunked body, so the connection can be used again
            if self._conn.sock is not None:
                self._conn.sock.settimeout(self._conn.timeout)
            final = json.loads(line)
        except (OSError, http.client.HTTPException, ValueError) as err:
            self.close()
            raise WeightSyncError(f"vLLM server {self.url}: /weights/update gave no result: {err}") from err
        if not isinstance(final, dict):
            raise WeightSyncError(f"vLLM server {self.url}: /weights/update gave no result: {final!r}")
        if final.get("http_status", 200) != 200:
            raise WeightSyncError(f"vLLM server {self.url}: /weights/update answered {final.get('http_status')}: "
                                  f"{final.get('error')}")
        return final

    def close(self) -> None:
        self._resp = None
        self._conn.close()


class WeightSync:
    """Pushes a trainer's weights into running vLLM servers after each optimizer step.

    Every trainer rank constructs it and calls `connect()`, `push()` and `close()` in the same order;
    only rank 0 talks to the servers and joins the transfer group. With `world_size > 1` the
    trainer's default process group must be initialised (ranks agree on failures through it). `server_urls` are the servers'
    base URLs (e.g. "http://127.0.0.1:8000"); `token` is the per-launch update token they were
    started with.
    """

    def __init__(self, cfg: WeightSyncConfig, server_urls: Sequence[str], token: str,
                 rank: int = 0, world_size: int = 1):
        if not server_urls:
            raise ValueError("WeightSync: server_urls is empty")
        if not token:
            raise ValueError("WeightSync: token is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"WeightSync: rank {rank} outside world_size {world_size}")
        self.cfg = cfg
        self.urls = [u.rstrip("/") for u in server_urls]
        self.rank, self.world_size = rank, world_size
        self._headers = auth_headers(token)
        if requests is None:
            raise ImportError("WeightSync needs the requests package (pip install requests)")
        self._session = requests.Session()
        self._group = None
        self._store = None
        self._backend: str | None = None
        self._specs: dict[str, dict] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._listen_sock: socket.socket | None = None
        self._known_key: str | None = None  # the manifest_key every server answered at the last prepare
        self._channels = {url: _UpdateChannel(url, self._headers, cfg.http_timeout_s) for url in self.urls}

    # -- HTTP -----------------------------------------------------------------------------------
    def _call(self, url: str, route: str, body: dict | None = None, timeout: float | None = None,
              method: str = "POST") -> dict:
        try:
            resp = self._session.request(method, f"{url}{route}", json=body, headers=self._headers,
                                         timeout=timeout or self.cfg.http_timeout_s)
        except requests.RequestException as err:
            raise WeightSyncError(f"vLLM server {url}: {method} {route} failed: {err}") from err
        if resp.status_code != 200:
            try:
                detail = resp.json().get("error") or resp.text
            except ValueError:
                detail = resp.text
            raise WeightSyncError(f"vLLM server {url}: {method} {route} answered {resp.status_code}: {detail}")
        return resp.json()

    def _run_on_servers(self, fn, *, wait: bool = True) -> list[Future]:
        assert self._pool is not None
        futures = [self._pool.submit(fn, url) for url in self.urls]
        if wait:
            self._raise_first(futures)
        return futures

    @staticmethod
    def _raise_first(futures: Sequence, timeout: float | None = None) -> list[Any]:
        """Every result (each waited for up to `timeout`), or the first error once all are in."""
        results, first_err = [], None
        for f in futures:
            try:
                results.append(f.result(timeout=timeout))
            except BaseException as err:  # noqa: BLE001 - collected, the first one is raised
                first_err = first_err or err
        if first_err is not None:
            raise first_err if isinstance(first_err, WeightSyncError) else WeightSyncError(str(first_err))
        return results

    def staleness(self, groups: Sequence, trainer_version: int) -> dict:
        """`data/staleness_*` of a batch: `trainer_version` (the weights it will be trained from)
        minus the weight version each sequence was sampled with, as the servers recorded it at
        `/generate` (works with unmodified Atropos environments: the sequence's tokens are the
        key). Sequences no server knows (generated elsewhere, tokens changed by the environment,
        or a record evicted) are counted in `data/staleness_unknown`. Rank 0 only; one request
        per server. Never raises: a failure is logged and reported as unknown."""
        keys = [sequence_key(toks) for g in groups if isinstance(g, dict)
                for toks in (g.get("tokens") or []) if isinstance(toks, list)]
        if self.rank != 0 or not keys:
            return {}
        found: dict[str, int] = {}
        for url in self.urls:
            try:
                answer = self._call(url, "/weights/sampled_versions", {"keys": keys})
            except WeightSyncError as e:
                logger.warning("could not read sampled versions from %s: %s", url, e)
                continue
            for k, v in zip(keys, answer.get("versions") or []):
                if isinstance(v, int):
                    found.setdefault(k, v)
        lags = [trainer_version - found[k] for k in keys if k in found]
        out = {"data/staleness_unknown": len(keys) - len(lags)}
        if lags:
            out.update({"data/staleness_mean": sum(lags) / len(lags), "data/staleness_max": max(lags),
                        "data/staleness_min": min(lags)})
        return out

    def staleness_async(self, groups: Sequence, trainer_version: int) -> Future:
        """`staleness` on the sync's worker threads, so the request overlaps the train step."""
        if self._pool is None:
            done: Future = Future()
            done.set_result({})
            return done
        return self._pool.submit(self.staleness, groups, trainer_version)

    # -- lifecycle ------------------------------------------------------------------------------
    def connect(self, device: torch.device | str | None = None) -> None:
        """Form the transfer group (rank 0 + every vLLM worker). Call on every trainer rank.

        `device` is where the trainer's parameters live; with the servers' devices (from
        `/weights/spec`) it decides `backend="auto"` (`pick_backend`).
        """
        device = torch.device(device) if device is not None else torch.device("cpu")
        if self.rank != 0:
            self._backend = "gloo" if self.cfg.backend == "auto" else self.cfg.backend  # rank 0 decides
            return
        import torch.distributed as dist

        self._pool = ThreadPoolExecutor(max_workers=max(2, len(self.urls)), thread_name_prefix="weight-sync")
        specs = self._run_on_servers(lambda url: self._call(url, "/weights/spec", method="GET"), wait=False)
        for url, spec in zip(self.urls, self._raise_first(specs)):
            self._specs[url] = spec
        self._backend, why = pick_backend(self.cfg.backend, device_id(device),
                                          {url: self._specs[url].get("devices") for url in self.urls})
        if why:
            logger.warning("weight sync uses %s: %s", self._backend, why)
        offsets, total = {}, 1
        for url in self.urls:
            offsets[url] = total
            total += int(self._specs[url]["num_workers"])
        # Bind the store's listening socket ourselves: given only a host, TCPStore's master listens on
        # every interface, and anyone who reaches it could join the transfer group.
        family = socket.AF_INET6 if ":" in self.cfg.master_address else socket.AF_INET
        self._listen_sock = socket.socket(family, socket.SOCK_STREAM)
        self._listen_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listen_sock.bind((self.cfg.master_address, self.cfg.master_port))
        except OSError as err:
            raise WeightSyncError(f"cannot bind the weight-sync store to {self.cfg.master_address}:"
                                  f"{self.cfg.master_port}: {err}") from err
        self._listen_sock.listen(128)
        port = self._listen_sock.getsockname()[1]
        store = dist.TCPStore(self.cfg.master_address, port, total, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=self.cfg.init_timeout_s),
                              master_listen_fd=self._listen_sock.fileno())
        # The store's server now owns the descriptor (and closes it): never close it twice.
        self._listen_sock.detach()
        self._listen_sock = None
        init = {"host": self.cfg.master_address, "port": port, "world_size": total, "backend": self._backend,
                "init_timeout_s": self.cfg.init_timeout_s, "op_timeout_s": self.cfg.update_timeout_s}
        t0 = time.perf_counter()
        joins = self._run_on_servers(
            lambda url: self._call(url, "/weights/init", dict(init, rank_offset=offsets[url]),
                                   timeout=self.cfg.init_timeout_s + 30), wait=False)
        try:
            if self._backend == "nccl":
                torch.cuda.set_device(device)
            self._group, self._store = make_transfer_group(
                self._backend, self.cfg.master_address, port, 0, total, self.cfg.init_timeout_s,
                self.cfg.update_timeout_s, store=store)
        except Exception as err:
            # A server that refused /weights/init explains the failure better than the rendezvous.
            for f in joins:
                if f.done() and f.exception() is not None:
                    raise WeightSyncError(str(f.exception())) from err
            raise WeightSyncError(f"transfer group ({self._backend}, world {total}) did not form within "
                                  f"{self.cfg.init_timeout_s:.0f} s: {err}") from err
        self._raise_first(joins)
        logger.info("weight sync connected: %d server(s), %d rank(s), backend %s, %.2f s",
                    len(self.urls), total, self._backend, time.perf_counter() - t0)

    def close(self) -> None:
        """Drop the transfer group (the servers keep serving the last weights)."""
        self._group = None
        self._store = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._session.close()
        for channel in self._channels.values():
            channel.close()

    # -- push -----------------------------------------------------------------------------------
    def _params(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        return [(clean_param_name(n), p) for n, p in model.named_parameters()]

    def _wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if self.cfg.wire_dtype is not None and dtype.is_floating_point:
            return WIRE_DTYPES[self.cfg.wire_dtype]
        return dtype

    def _manifest(self, params, version: int) -> dict:
        bucket_bytes = self.cfg.bucket_bytes
        if bucket_bytes is None:
            bucket_bytes = NCCL_BUCKET_BYTES if self._backend == "nccl" else GLOO_BUCKET_BYTES
        # A DTensor's shape is the global one: no gather.
        return build_manifest(version, [n for n, _ in params], [list(p.shape) for _, p in params],
                              [DTYPE_NAMES[self._wire_dtype(p.dtype)] for _, p in params],
                              bucket_bytes=bucket_bytes, pipeline_depth=self.cfg.pipeline_depth)

    def _gathered(self, params) -> Iterator[torch.Tensor]:
        """Full tensors in order; a collective on every rank for sharded (DTensor) parameters."""
        for _, p in params:
            t = p.detach()
            full = getattr(t, "full_tensor", None)
            if callable(full):
                t = full()
            yield t

    def push(self, model: torch.nn.Module, version: int) -> dict:
        """Send `model`'s current weights to every server as `version`. Call on EVERY trainer rank
        after `optimizer.step()`. Returns {"sync/ms", "sync/bytes", "sync/version"} and, on rank 0,
        where the time went: "sync/prepare_ms" (validate + every server paused and ready),
        "sync/send_ms" (gather + broadcast until the last byte left) and "sync/finish_ms" (until
        every server has loaded, finished and resumed).

        Raises `WeightSyncError` (on every rank) if any server or the transfer failed.
        """
        if self._backend is None:
            raise WeightSyncError("WeightSync.push called before connect()")
        t0 = time.perf_counter()
        params = self._params(model)
        err: BaseException | None = None
        manifest: dict = {}
        updates: list[_UpdateChannel] | None = None
        round_trips = 1
        if self.rank == 0:
            manifest = self._manifest(params, version)
            try:
                if self._group is None:
                    raise WeightSyncError("transfer group is closed (an earlier update failed?): reconnect")
                key = manifest_key(manifest)
                for _ in range(2):  # a second time when a server forgot the manifest (restarted?)
                    if self._known_key != key:
                        self._prepare(manifest, key)
                        round_trips = 2
                    updates = self._start_updates(key, version)  # None (and key forgotten): prepare again
                    if updates is not None:
                        break
                else:
                    raise WeightSyncError("a server does not know the manifest it has just prepared")
            except BaseException as e:  # noqa: BLE001 - re-raised on every rank below
                if _interrupt(e):  # stopped between the request and its "ready": drop every channel
                    self._abandon([self._channels[url] for url in self.urls])
                    raise
                err = e
        phases = {"sync/prepare_ms": (time.perf_counter() - t0) * 1e3}  # rank 0 fills in the rest
        # Go/no-go before any gather, so a rejected manifest costs no all-gathers.
        if self._agree_failed(err is not None, model):
            raise self._final_error(err, "prepare")
        sent = self._stream(params, manifest, version, phases, updates) if self.rank == 0 else \
            self._gather_only(params)
        err = sent if isinstance(sent, BaseException) else None
        if self._agree_failed(err is not None, model):
            raise self._final_error(err, "broadcast")
        ms = (time.perf_counter() - t0) * 1e3
        nbytes = manifest.get("total_bytes", 0)
        out = {"sync/ms": ms, "sync/bytes": nbytes, "sync/version": int(version)}
        if self.rank == 0:
            out.update(phases)
            out["sync/round_trips"] = round_trips
            # At info when a prepare ran (the first push); every push's phases are in its metrics.
            logger.log(logging.INFO if round_trips > 1 else logging.DEBUG,
                       "pushed weights v%d: %.1f MB in %.0f ms (%s)", version, nbytes / 1e6, ms,
                       ", ".join(f"{k.removeprefix('sync/')} {v:.0f}" for k, v in phases.items()))
        return out

    def _prepare(self, manifest: dict, key: str) -> None:
        """Have every server validate and remember `manifest` (nothing is paused); `key` is its
        `manifest_key`, which each server must answer alike."""
        if self.cfg.validate_shapes:
            for url in self.urls:
                try:
                    validate_manifest(manifest, self._specs.get(url), f"vLLM server {url}")
                except ValueError as e:
                    raise WeightSyncError(str(e)) from None
        self._known_key = None
        answers = self._raise_first(self._run_on_servers(
            lambda url: self._call(url, "/weights/prepare", {"manifest": manifest}), wait=False))
        for url, answer in zip(self.urls, answers):
            if answer.get("manifest_key") != key:
                raise WeightSyncError(f"vLLM server {url} keys the manifest {answer.get('manifest_key')!r}, this "
                                      f"trainer {key!r}: the two run different versions of atropos_core")
        self._known_key = key

    def _start_updates(self, key: str, version: int) -> list[_UpdateChannel] | None:
        """Start `/weights/update` on every server; return once each has answered "ready" (the
        update is accepted), with the channels whose `result()` is each one's final answer. None
        when no server knows the manifest (nothing was started: prepare it). On the caller's
        thread: every request is sent before any answer is read, and the results are read after
        the broadcast, so no thread hand-off sits on the path (nothing reads a server's socket
        during the broadcast; its result waits in the socket until then)."""
        body = {"manifest_key": key, "version": int(version), "pause_mode": self.cfg.pause_mode}
        channels = [self._channels[url] for url in self.urls]
        try:
            for channel in channels:
                channel.send(body)
            states = [channel.first() for channel in channels]
        except WeightSyncError:
            # Servers that did answer "ready" get no byte: their receive times out and they resume.
            for channel in channels:
                channel.close()
            self._known_key = None
            raise
        if "manifest_unknown" in states:
            self._known_key = None
            if states.count("manifest_unknown") != len(states):  # cannot happen unless servers restarted
                for channel in channels:
                    channel.close()
                raise WeightSyncError("some servers started the update and some did not know its manifest; "
                                      "their receive times out and they resume: reconnect")
            return None
        return channels

    def _stream(self, params, manifest: dict, version: int, phases: dict[str, float],
                applies: list[_UpdateChannel]) -> BaseException | None:
        """Rank 0: broadcast while the servers' updates (`applies`, their final answers) run.
        Keeps gathering after a failure so the other trainer ranks are never left waiting in an
        all-gather. Records "sync/send_ms", "sync/finish_ms" and "sync/server_version" (the lowest
        version the servers answered) in `phases`."""
        t_start = time.perf_counter()
        gathered = self._gathered(params)
        err: BaseException | None = None
        current = None
        nccl = self._backend == "nccl"  # bound what is in flight on the host (`wait_done`)
        inflight: deque = deque()  # (work, tensor kept alive until the work is done)
        try:
            for bucket in manifest["buckets"]:
                tensors = []
                for i in bucket:
                    current = manifest["names"][i]
                    t = next(gathered)
                    wire = WIRE_DTYPES[manifest["dtypes"][i]]
                    tensors.append(t if t.dtype == wire else t.to(wire))
                if err is not None:
                    continue  # keep gathering in lockstep with the other trainer ranks
                current = manifest["names"][bucket[0]]
                try:
                    msg = tensors[0].contiguous() if len(tensors) == 1 else pack_bucket(tensors)
                    inflight.append((broadcast_async(self._group, msg), msg))
                    while len(inflight) >= self.cfg.pipeline_depth:
                        work, sent_msg = inflight.popleft()
                        wait_done(work, message_timeout(self.cfg.update_timeout_s, sent_msg.nbytes), host_poll=nccl,
                                  what=f"message with {current!r}")
                except BaseException as e:  # noqa: BLE001 - reported after the loop
                    err = e
                    self._group = None  # a failed collective leaves the group unusable
            while inflight and err is None:
                work, sent_msg = inflight.popleft()
                wait_done(work, message_timeout(self.cfg.update_timeout_s, sent_msg.nbytes), host_poll=nccl,
                          what="last message")
        except BaseException as e:  # noqa: BLE001 - gathering itself failed: nothing more can be sent
            err = e
            self._group = None
        t_sent = time.perf_counter()
        if err is not None and _interrupt(err):
            # Ctrl-C (or SystemExit) mid-update: the user is stopping the run. Waiting for the
            # servers' answers would hold them up to `update_timeout_s` for an error nobody reads;
            # each server's receive times out on its own and it resumes generation.
            self._abandon(applies)
            raise err
        if err is not None:
            self._known_key = None
            # The server's own error (e.g. it rejected or lost the update) is the better message.
            try:
                for channel in applies:
                    try:
                        channel.result(timeout=self.cfg.update_timeout_s + 10)
                    except WeightSyncError as server_err:
                        return WeightSyncError(f"{server_err} (trainer side: {err!r} at tensor {current!r})")
                return WeightSyncError(f"sending tensor {current!r} failed: {err!r}")
            finally:
                for channel in applies:
                    channel.close()
        try:
            # Every server's answer is read, so each connection stays usable.
            answers = self._raise_first(applies, timeout=self.cfg.apply_timeout_s)
            versions = [a.get("weight_version") for a in answers]
            phases["sync/server_version"] = min(versions) if None not in versions else -1
        except WeightSyncError as e:
            self._known_key = None
            return e
        finally:
            done = time.perf_counter()
            phases["sync/send_ms"] = (t_sent - t_start) * 1e3
            phases["sync/finish_ms"] = (done - t_sent) * 1e3
        return None

    def _abandon(self, channels: list[_UpdateChannel]) -> None:
        """Drop updates in flight without reading their answers: the group and the manifest are
        then unknown (the next push reconnects and prepares again)."""
        self._group = None
        self._known_key = None
        for channel in channels:
            channel.close()

    def _gather_only(self, params) -> None:
        for _ in self._gathered(params):
            pass
        return None

    def _agree_failed(self, failed: bool, model: torch.nn.Module) -> bool:
        """True on every trainer rank if any rank failed (a tiny all-reduce on the trainer's group)."""
        if self.world_size == 1:
            return failed
        import torch.distributed as dist

        from ..dist import scalar_device

        flag = torch.tensor([1.0 if failed else 0.0], device=scalar_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def _final_error(self, err: BaseException | None, phase: str) -> WeightSyncError:
        if err is None:
            return WeightSyncError(f"weight sync {phase} failed on trainer rank 0 (see its log)")
        if isinstance(err, WeightSyncError):
            logger.error("weight sync %s failed: %s", phase, err)
            return err
        logger.error("weight sync %s failed: %r", phase, err)
        return WeightSyncError(f"weight sync {phase} failed: {err!r}")
