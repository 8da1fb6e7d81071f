"""Trainer side of the weight sync: new weights reach every vLLM worker in place after each step.

Design (see docs/weight_sync.md for the measured numbers):

* **Control over HTTP, data over torch.distributed.** Each vLLM server (ours,
  `atropos_core.inference.server`) exposes token-protected `/weights/*` routes. The manifest of an
  update (names, shapes, dtypes, bucket plan, version) travels as JSON; the tensors travel by
  `broadcast` in one process group formed by trainer rank 0 and every worker of every server (data
  parallel replicas simply get later ranks). Nothing is pickled: neither side deserialises objects
  from the network.
* **One code path, two backends.** The group is built directly from a `TCPStore` as a
  `ProcessGroupGloo` (CPU) or `ProcessGroupNCCL` (CUDA), never registered as a global group, so it
  lives beside the trainer's own FSDP group and vLLM's internal groups. `backend="auto"` picks
  NCCL when the trainer holds CUDA tensors, gloo otherwise.
* **Message grouping is measured, per backend.** On gloo one broadcast per tensor beat one packed
  message ~4.5x (the concatenation copy and one huge message; FACTS.md), so gloo sends tensor by
  tensor (`bucket_bytes=0`). NCCL favours fewer, larger messages, so it packs consecutive tensors
  into byte buckets (default 256 MiB) as vLLM's own NCCL engine does.
* **FSDP2.** `push()` runs on every trainer rank: each parameter is gathered with
  `DTensor.full_tensor()` one at a time (a collective all ranks join in the same order), rank 0
  broadcasts it and drops it, so no rank ever holds a whole-model copy (bucketing on NCCL holds at
  most one bucket). Tied embeddings need nothing special: `named_parameters()` yields a shared
  parameter once and vLLM ties `lm_head` itself.
* **Fail once, clearly, and leave the servers serving.** An update is `prepare` (validate the
  manifest against the served checkpoint's tensor shapes, pause generation, start the update: a
  layerwise reload where the server does not load in place) on every server, then `apply` (the
  server receives while rank 0 broadcasts; it then finishes, resets the prefix cache and resumes,
  resuming on its own error path too), or `abort`
  (resume) if anything failed before the broadcast. A bad manifest fails before a single byte is
  broadcast. Once a server has prepared a manifest, later updates with the same names, shapes,
  dtypes and plan (`manifest_key`) are one exchange, `/weights/update`: the server answers
  "ready" (paused, receives posted) on a streamed first line, the trainer broadcasts, the second
  line is the result and the served version (`sync/round_trips` says which path ran). The gloo group's timeout is short (`update_timeout_s`), because a worker that died
  mid-broadcast otherwise hangs the trainer. Trainer ranks keep gathering in lockstep after a
  failure on rank 0 and all raise the same `WeightSyncError` at the end, so the trainer can still
  checkpoint and exit.

This module never imports vLLM; `atropos_core.inference.worker_ext` imports the shared wire helpers
(`make_transfer_group`, `plan_buckets`, `unpack_bucket`) from here, so both ends agree by
construction.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections import deque
from dataclasses import dataclass
from typing import Annotated, Any, Iterator, Literal, Sequence

try:
    import requests
except ImportError:  # WeightSyncConfig serves runs without inference servers; WeightSync needs requests
    requests = None
import torch

from .checks import Between, Ge, Gt, check_fields

logger = logging.getLogger(__name__)

#: dtypes that may appear in a manifest (the name is what travels in JSON).
WIRE_DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in WIRE_DTYPES.items()}
#: Name segments that wrappers (torch.compile, activation checkpointing, FSDP1) insert.
_WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "module.")
#: Default NCCL bucket (vLLM's packed NCCL engine uses buffers of the same order).
NCCL_BUCKET_BYTES = 256 << 20
#: Messages in flight on each side (`WeightSyncConfig.pipeline_depth`): default and upper bound,
#: checked on both ends by `validate_manifest`.
PIPELINE_DEPTH = 2
MAX_PIPELINE_DEPTH = 16


class WeightSyncError(RuntimeError):
    """A weight update failed; the message names the server and, where known, the tensor."""


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
    it never times a whole update), and the servers' watchdog for a prepared update that never gets
    applied. Short on purpose: a dead worker otherwise hangs the trainer."""
    http_timeout_s: Annotated[float, Gt(0)] = 30.0
    """Timeout of the control calls that do not wait for the broadcast (spec, prepare, abort)."""
    apply_timeout_s: Annotated[float, Gt(0)] = 600.0
    """Upper bound on one whole update on a server (receive + load + finish); failures inside it are
    caught sooner by the group's timeout, this only bounds a server that hangs afterwards."""
    bucket_bytes: Annotated[int, Ge(0)] | None = None
    """Bytes per broadcast message. 0 sends tensor by tensor; None picks per backend (0 on gloo,
    `NCCL_BUCKET_BYTES` on NCCL; measured, see the module docstring)."""
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


# ----------------------------------------------------------------------------------------------
# Wire helpers shared with the worker side (atropos_core.inference.worker_ext).
# ----------------------------------------------------------------------------------------------

def make_transfer_group(backend: str, host: str, port: int, rank: int, world_size: int,
                        init_timeout_s: float, op_timeout_s: float, *, store=None):
    """A process group for the transfer only, built from a TCPStore and never registered globally.

    Rank 0 (the trainer) hosts the store; pass it as `store` there. Blocks until all `world_size`
    ranks have joined (or `init_timeout_s`). Returns `(group, store)`.
    """
    import torch.distributed as dist

    if store is None:
        store = dist.TCPStore(host, port, world_size, is_master=False,
                              timeout=datetime.timedelta(seconds=init_timeout_s))
    prefixed = dist.PrefixStore("atropos_weight_sync", store)
    timeout = datetime.timedelta(seconds=op_timeout_s)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        # Bind to loopback when the trainer is local: the default device resolves the hostname,
        # which need not be reachable on a locked-down machine.
        iface_host = "127.0.0.1" if host in ("127.0.0.1", "localhost") else ""
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=iface_host)]
        group = dist.ProcessGroupGloo(prefixed, rank, world_size, opts)
    elif backend == "nccl":
        nccl_cls = getattr(dist, "ProcessGroupNCCL", None)
        if nccl_cls is None:
            raise WeightSyncError("backend 'nccl' requested but this torch build has no NCCL")
        opts = nccl_cls.Options()
        # The per-message timeout is enforced on the host (`wait_done`); the watchdog is only the
        # backstop that frees a hung communicator, so it must not fire first: a message may be
        # enqueued up to MAX_PIPELINE_DEPTH messages before it can run.
        opts._timeout = datetime.timedelta(seconds=op_timeout_s * (MAX_PIPELINE_DEPTH + 2))
        group = _nccl_group_without_teardown(nccl_cls, prefixed, rank, world_size, opts)
    else:
        raise ValueError(f"unknown transfer backend {backend!r}")
    return group, store


def device_id(device: torch.device) -> str:
    """"cpu", or "cuda:<GPU UUID>" (what the workers report at /weights/spec)."""
    if device.type != "cuda":
        return "cpu"
    return f"cuda:{torch.cuda.get_device_properties(device).uuid}"


def pick_backend(requested: str, trainer_device: str,
                 server_devices: dict[str, list[str] | None]) -> tuple[str, str]:
    """The transfer backend for `requested` ("auto", "gloo", "nccl"), and why it differs from the
    obvious choice ("" when it does not).

    "auto" means NCCL when the trainer is on a GPU, except when two ranks of the group would sit on
    one GPU (trainer and a vLLM worker colocated, or two replicas sharing a GPU): NCCL >= 2.5
    refuses that ("Duplicate GPU detected", ncclInvalidUsage; NVIDIA/nccl#418), so gloo carries the
    tensors through host memory instead (slower, but it works). Asking for "nccl" in that case is an
    error raised here, before any group is formed.
    """
    if requested not in ("auto", "gloo", "nccl"):
        raise ValueError(f"unknown transfer backend {requested!r}")
    if requested == "gloo" or (requested == "auto" and not trainer_device.startswith("cuda")):
        return "gloo", ""
    owners: dict[str, str] = {trainer_device: "the trainer"}
    for url, devices in server_devices.items():
        for i, dev in enumerate(devices or []):
            if not dev.startswith("cuda"):
                if requested == "nccl":
                    raise WeightSyncError(f"backend 'nccl' requested but worker {i} of {url} runs on {dev}")
                return "gloo", f"worker {i} of {url} runs on {dev}, not a GPU"
            if dev in owners:
                why = (f"{owners[dev]} and worker {i} of {url} share GPU {dev.removeprefix('cuda:')}, and NCCL "
                       f"refuses two ranks on one GPU")
                if requested == "nccl":
                    raise WeightSyncError(f"backend 'nccl' cannot work here: {why}; use backend 'gloo' or 'auto'")
                return "gloo", why
            owners[dev] = f"worker {i} of {url}"
    return "nccl", ""


def _nccl_group_without_teardown(nccl_cls, store, rank: int, world_size: int, opts):
    """A ProcessGroupNCCL whose watchdog, on a timeout or NCCL error, aborts the communicator and
    leaves the process alive (TORCH_NCCL_ASYNC_ERROR_HANDLING=2, "CleanUpOnly"). The default (3,
    "SkipCleanUp") kills the process: inside a vLLM worker that is the whole engine, where a failed
    update must only fail the update. The variable is read by the constructor, so it is set for
    this group only and restored afterwards (vLLM's own groups keep their setting)."""
    import os

    key = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
    old = os.environ.get(key)
    os.environ[key] = "2"
    try:
        return nccl_cls(store, rank, world_size, opts)
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def broadcast_async(group, tensor: torch.Tensor):
    """Start broadcasting `tensor` from rank 0 of `group` (in place on the receivers); returns the
    work handle. `tensor` must stay alive until `.wait()` returns."""
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    return group.broadcast([tensor], opts)


#: Slowest wire speed a per-message timeout allows for (bytes/s): a message of b bytes gets
#: `update_timeout_s + b / MIN_WIRE_BYTES_PER_S` (a 1 GB embedding 1 s more than a small tensor).
MIN_WIRE_BYTES_PER_S = 1e9


def message_timeout(base_s: float, nbytes: int) -> float:
    """Timeout of one message of `nbytes`: sized per message, not per update."""
    return base_s + nbytes / MIN_WIRE_BYTES_PER_S


def wait_done(work, timeout_s: float, *, host_poll: bool, what: str = "message") -> None:
    """Wait for one transfer message; with `host_poll` (NCCL) block the HOST, at most `timeout_s`.

    gloo's `wait()` already blocks the host (and its group timeout is per collective). NCCL's only
    makes the current stream wait: a loop of post-and-wait would enqueue a whole update at once,
    every buffer alive (a second copy of the model on the worker) and NCCL's watchdog timing the
    last message from the moment it was enqueued. Polling `is_completed()` first keeps at most the
    caller's `pipeline_depth` messages in flight, makes the timeout one message's, and turns a hung
    transfer into a WeightSyncError on the host before any stream is chained to it (the watchdog,
    set to CleanUpOnly by `make_transfer_group`, then aborts the communicator without killing the
    process). `work.wait()` afterwards orders the current stream and raises the work's own error."""
    if host_poll:
        deadline = time.monotonic() + timeout_s
        pause = 5e-5
        while not work.is_completed():
            if time.monotonic() > deadline:
                raise WeightSyncError(f"{what} not transferred within {timeout_s:.0f} s (per-message timeout)")
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
    work.wait()


def broadcast(group, tensor: torch.Tensor) -> None:
    """Broadcast `tensor` from rank 0 of `group`; blocks until done."""
    broadcast_async(group, tensor).wait()


def plan_buckets(nbytes: Sequence[int], bucket_bytes: int) -> list[list[int]]:
    """Split tensor indices, in order, into buckets of at most `bucket_bytes` (a bigger tensor gets
    a bucket of its own). `bucket_bytes == 0` gives one tensor per bucket."""
    buckets: list[list[int]] = []
    cur: list[int] = []
    cur_bytes = 0
    for i, n in enumerate(nbytes):
        if cur and (bucket_bytes == 0 or cur_bytes + n > bucket_bytes):
            buckets.append(cur)
            cur, cur_bytes = [], 0
        cur.append(i)
        cur_bytes += n
    if cur:
        buckets.append(cur)
    return buckets


def tensor_nbytes(shape: Sequence[int], dtype_name: str) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * WIRE_DTYPES[dtype_name].itemsize


#: Every tensor in a packed bucket starts at a multiple of this many bytes, so each can be viewed
#: back as its dtype (a view needs its offset divisible by the element size).
BUCKET_ALIGN = 16


def bucket_layout(shapes: Sequence[Sequence[int]], dtype_names: Sequence[str]) -> tuple[list[int], int]:
    """Byte offset of each tensor in a packed bucket, and the bucket's total size."""
    offsets, off = [], 0
    for shape, dname in zip(shapes, dtype_names):
        offsets.append(off)
        off += -(-tensor_nbytes(shape, dname) // BUCKET_ALIGN) * BUCKET_ALIGN
    return offsets, off


def pack_bucket(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The trainer's side of `unpack_bucket`: one uint8 buffer holding every tensor at its offset."""
    offsets, total = bucket_layout([list(t.shape) for t in tensors], [_DTYPE_NAMES[t.dtype] for t in tensors])
    buf = torch.empty(total, dtype=torch.uint8, device=tensors[0].device)
    for off, t in zip(offsets, tensors):
        raw = t.contiguous().view(-1).view(torch.uint8)
        buf[off:off + raw.numel()].copy_(raw)
    return buf


def unpack_bucket(buf: torch.Tensor, shapes: Sequence[Sequence[int]], dtype_names: Sequence[str]
                  ) -> list[torch.Tensor]:
    """Views into a received uint8 bucket, one per tensor, in manifest order."""
    offsets, _ = bucket_layout(shapes, dtype_names)
    return [buf[off:off + tensor_nbytes(shape, dname)].view(WIRE_DTYPES[dname]).view(tuple(shape))
            for off, shape, dname in zip(offsets, shapes, dtype_names)]


def validate_manifest(manifest: dict, spec: dict | None, where: str) -> None:
    """Raise ValueError naming the tensor if `manifest` does not fit the served checkpoint `spec`
    ({"tensors": {name: {"shape", "dtype"}}, "tie_word_embeddings": bool}); also checks that the
    manifest is internally consistent. `where` names the server in the message."""
    names, dtypes, shapes = manifest.get("names"), manifest.get("dtypes"), manifest.get("shapes")
    if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)):
        raise ValueError(f"{where}: manifest needs lists 'names', 'dtypes', 'shapes'")
    if not len(names) == len(dtypes) == len(shapes):
        raise ValueError(f"{where}: manifest lists differ in length "
                         f"({len(names)} names, {len(dtypes)} dtypes, {len(shapes)} shapes)")
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: manifest names a tensor twice")
    for name, dname, shape in zip(names, dtypes, shapes):
        if not isinstance(name, str) or dname not in WIRE_DTYPES:
            raise ValueError(f"{where}: tensor {name!r} has unsupported dtype {dname!r}")
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise ValueError(f"{where}: tensor {name!r} has a bad shape {shape!r}")
    buckets = manifest.get("buckets")
    if not (isinstance(buckets, list) and sorted(i for b in buckets for i in b) == list(range(len(names)))):
        raise ValueError(f"{where}: manifest 'buckets' must cover every tensor index exactly once, in order")
    depth = manifest.get("pipeline_depth", PIPELINE_DEPTH)
    if not (isinstance(depth, int) and 1 <= depth <= MAX_PIPELINE_DEPTH):
        raise ValueError(f"{where}: manifest 'pipeline_depth' must be an integer in 1..{MAX_PIPELINE_DEPTH}, "
                         f"got {depth!r}")
    if spec is None or spec.get("tensors") is None:
        return
    served = spec["tensors"]
    for name, shape in zip(names, shapes):
        if name not in served:
            raise ValueError(f"{where}: tensor {name!r} is not in the served model")
        if list(served[name]["shape"]) != list(shape):
            raise ValueError(f"{where}: tensor {name!r} has shape {list(shape)}, the served model has "
                             f"{list(served[name]['shape'])}")
    missing = sorted(set(served) - set(names))
    if spec.get("tie_word_embeddings"):
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing:
        raise ValueError(f"{where}: update lacks {len(missing)} tensor(s) the served model has, e.g. "
                         f"{missing[0]!r} (tied vs untied embeddings?)")


def manifest_key(manifest: dict) -> str:
    """What identifies a manifest apart from its version: a hash of names, dtypes, shapes, bucket
    plan and pipeline depth. Trainer and server compute it alike; an update whose key the server
    already holds needs one exchange (`/weights/update`) instead of prepare + apply."""
    fields = {k: manifest.get(k) for k in ("names", "dtypes", "shapes", "buckets")}
    fields["pipeline_depth"] = manifest.get("pipeline_depth", PIPELINE_DEPTH)
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def sequence_key(tokens: Sequence[int]) -> str:
    """Key of one sampled sequence (prompt + completion token ids) in the server's record of which
    weight version generated it (`/weights/sampled_versions`); both ends compute it alike."""
    raw = ",".join(str(int(t)) for t in tokens).encode()
    return hashlib.blake2b(raw, digest_size=12).hexdigest()


def clean_param_name(name: str) -> str:
    """HF parameter name of a (possibly compiled / checkpoint-wrapped) module's parameter."""
    for seg in _WRAPPER_SEGMENTS:
        name = name.replace(seg, "")
    return name


# ----------------------------------------------------------------------------------------------
# Trainer side.
# ----------------------------------------------------------------------------------------------

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
        self._headers = {"Authorization": f"Bearer {token}"}
        if requests is None:
            raise ImportError("WeightSync needs the requests package (pip install requests)")
        self._session = requests.Session()
        self._group = None
        self._store = None
        self._backend: str | None = None
        self._specs: dict[str, dict] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._listen_sock: socket.socket | None = None
        self._known: dict[str, str] = {}  # url -> manifest_key the server holds (after a good update)
        self._pending_keys: dict[str, str] = {}  # keys the servers answered at the last prepare

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
    def _raise_first(futures: Sequence[Future]) -> list[Any]:
        results, first_err = [], None
        for f in futures:
            try:
                results.append(f.result())
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

    # -- push -----------------------------------------------------------------------------------
    def _params(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        return [(clean_param_name(n), p) for n, p in model.named_parameters()]

    def _wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if self.cfg.wire_dtype is not None and dtype.is_floating_point:
            return WIRE_DTYPES[self.cfg.wire_dtype]
        return dtype

    def _manifest(self, params, version: int) -> dict:
        names = [n for n, _ in params]
        dtypes = [_DTYPE_NAMES[self._wire_dtype(p.dtype)] for _, p in params]
        shapes = [list(p.shape) for _, p in params]  # a DTensor's shape is the global one: no gather
        bucket_bytes = self.cfg.bucket_bytes
        if bucket_bytes is None:
            bucket_bytes = NCCL_BUCKET_BYTES if self._backend == "nccl" else 0
        nbytes = [tensor_nbytes(s, d) for s, d in zip(shapes, dtypes)]
        return {"version": int(version), "names": names, "dtypes": dtypes, "shapes": shapes,
                "buckets": plan_buckets(nbytes, bucket_bytes), "total_bytes": sum(nbytes),
                "pipeline_depth": self.cfg.pipeline_depth}

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
        updates: list[Future] | None = None
        if self.rank == 0:
            manifest = self._manifest(params, version)
            try:
                if self._group is None:
                    raise WeightSyncError("transfer group is closed (an earlier update failed?): reconnect")
                key = manifest_key(manifest)
                if all(self._known.get(url) == key for url in self.urls):
                    updates = self._start_updates(key, version)  # None: a server forgot it
                if updates is None:
                    self._prepare(manifest)
            except BaseException as e:  # noqa: BLE001 - re-raised on every rank below
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
            out["sync/round_trips"] = 1 if updates is not None else 2
            logger.info("pushed weights v%d: %.1f MB in %.0f ms (%s)", version, nbytes / 1e6, ms,
                        ", ".join(f"{k.removeprefix('sync/')} {v:.0f}" for k, v in phases.items()))
        return out

    def _prepare(self, manifest: dict) -> None:
        if self.cfg.validate_shapes:
            for url in self.urls:
                try:
                    validate_manifest(manifest, self._specs.get(url), f"vLLM server {url}")
                except ValueError as e:
                    raise WeightSyncError(str(e)) from None
        body = {"manifest": manifest, "pause_mode": self.cfg.pause_mode,
                "watchdog_s": self.cfg.update_timeout_s + 30}
        self._known.clear()
        futures = self._run_on_servers(lambda url: self._call(url, "/weights/prepare", body), wait=False)
        try:
            answers = self._raise_first(futures)
        except WeightSyncError:
            self._abort_all()
            raise
        self._pending_keys = {url: a.get("manifest_key") for url, a in zip(self.urls, answers)}

    def _start_updates(self, key: str, version: int) -> list[Future] | None:
        """Start `/weights/update` (prepare + apply in one exchange) on every server; return once
        each has answered "ready" (paused, receives posted), with futures of their final answers.
        None when a server does not know the manifest (nothing was paused: prepare instead)."""
        body = {"manifest_key": key, "version": int(version), "pause_mode": self.cfg.pause_mode}
        readies: list[Future] = []
        finals: list[Future] = []
        for url in self.urls:
            ready: Future = Future()
            readies.append(ready)
            finals.append(self._pool.submit(self._update_one_or_fail, url, body, ready))
        try:
            states = self._raise_first(readies)
        except WeightSyncError:
            self._known.clear()
            raise
        if "manifest_unknown" in states:
            self._known.clear()
            if states.count("manifest_unknown") != len(states):  # cannot happen unless servers restarted
                self._raise_first(finals)
                raise WeightSyncError("some servers started the update and some did not know its manifest; "
                                      "their receive times out and they resume: reconnect")
            return None
        return finals

    def _update_one_or_fail(self, url: str, body: dict, ready: Future) -> dict:
        try:
            return self._update_one(url, body, ready)
        except BaseException as err:
            if not ready.done():  # never leave push() waiting for a "ready" that cannot come
                ready.set_exception(err)
            raise

    def _update_one(self, url: str, body: dict, ready: Future) -> dict:
        """One server's `/weights/update`: sets `ready` to "ready" (or "manifest_unknown", or an
        error) as soon as the first line arrives, then returns the final answer."""
        try:
            resp = self._session.post(f"{url}/weights/update", json=body, headers=self._headers, stream=True,
                                      timeout=(self.cfg.http_timeout_s, self.cfg.apply_timeout_s))
        except requests.RequestException as err:
            e = WeightSyncError(f"vLLM server {url}: POST /weights/update failed: {err}")
            ready.set_exception(e)
            raise e from err
        with resp:
            if resp.status_code != 200:
                try:
                    answer = resp.json()
                except ValueError:
                    answer = {"error": resp.text}
                if resp.status_code == 409 and answer.get("code") == "manifest_unknown":
                    ready.set_result("manifest_unknown")
                    return {}
                e = WeightSyncError(f"vLLM server {url}: POST /weights/update answered {resp.status_code}: "
                                    f"{answer.get('error') or answer}")
                ready.set_exception(e)
                raise e
            lines = resp.iter_lines()
            try:
                first = json.loads(next(lines))
                if first.get("status") != "ready":
                    raise ValueError(f"first line {first!r}")
            except (StopIteration, ValueError, requests.RequestException) as err:
                e = WeightSyncError(f"vLLM server {url}: /weights/update did not start: {err}")
                ready.set_exception(e)
                raise e from None
            ready.set_result("ready")
            try:
                final = json.loads(next(lines))
            except (StopIteration, ValueError, requests.RequestException) as err:
                raise WeightSyncError(f"vLLM server {url}: /weights/update gave no result: {err}") from None
        if final.get("http_status", 200) != 200:
            raise WeightSyncError(f"vLLM server {url}: /weights/update answered {final.get('http_status')}: "
                                  f"{final.get('error')}")
        return final

    def _abort_all(self) -> None:
        """Resume every server that may have been paused by a prepare (best effort)."""
        for url in self.urls:
            try:
                self._call(url, "/weights/abort", {})
            except WeightSyncError as e:
                logger.warning("could not abort the pending update on %s: %s", url, e)

    def _stream(self, params, manifest: dict, version: int, phases: dict[str, float],
                applies: list[Future] | None = None) -> BaseException | None:
        """Rank 0: start `apply` on every server (unless `applies`, the running one-exchange
        updates, are given), then broadcast. Keeps gathering after a failure so the other trainer
        ranks are never left waiting in an all-gather. Records "sync/send_ms", "sync/finish_ms"
        and "sync/server_version" (the lowest version the servers answered) in `phases`."""
        t_start = time.perf_counter()
        pending = self._pending_keys if applies is None else dict(self._known)
        if applies is None:
            applies = self._run_on_servers(
                lambda url: self._call(url, "/weights/apply", {"version": int(version)},
                                       timeout=self.cfg.apply_timeout_s),
                wait=False)
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
        if err is not None:
            self._known.clear()
            # The server's own error (e.g. it rejected or lost the update) is the better message.
            for url, f in zip(self.urls, applies):
                try:
                    f.result(timeout=self.cfg.update_timeout_s + 10)
                except BaseException as server_err:  # noqa: BLE001
                    return WeightSyncError(f"{server_err} (trainer side: {err!r} at tensor {current!r})")
            return WeightSyncError(f"sending tensor {current!r} failed: {err!r}")
        try:
            answers = self._raise_first(applies)
            versions = [a.get("weight_version") for a in answers]
            phases["sync/server_version"] = min(versions) if None not in versions else -1
            self._known = {url: k for url, k in pending.items() if k}
        except WeightSyncError as e:
            self._known.clear()
            return e
        finally:
            done = time.perf_counter()
            phases["sync/send_ms"] = (t_sent - t_start) * 1e3
            phases["sync/finish_ms"] = (done - t_sent) * 1e3
        return None

    def _gather_only(self, params) -> None:
        for _ in self._gathered(params):
            pass
        return None

    def _agree_failed(self, failed: bool, model: torch.nn.Module) -> bool:
        """True on every trainer rank if any rank failed (a tiny all-reduce on the trainer's group)."""
        if self.world_size == 1:
            return failed
        import torch.distributed as dist

        from .dist import scalar_device

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

