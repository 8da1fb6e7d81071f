"""Runs inside every vLLM worker: our weight-transfer engine ("atropos"), gloo on CPU, NCCL on CUDA.

vLLM's in-tree transfer engines are CUDA-only and have no gloo path. This module is named by
`--worker-extension-cls`, so vLLM imports it in each worker before it loads the model and builds the
engine named by `--weight-transfer-config '{"backend": "atropos"}'`; importing it registers the
engine.

The engine joins the trainer's transfer group (`atropos_core.weight_sync.transport.make_transfer_group`,
the same function the trainer calls, so both ends agree on store prefix, backend and timeouts) and,
per update, receives the tensors the JSON manifest (`atropos_core.weight_sync.protocol`) announces and feeds them, as they arrive, to ONE
`model.load_weights` call (the model's own loader: fused qkv/gate_up, tensor-parallel slices, HF
names). Two ways to load, picked once per server when the group forms (logged):

* **in place** (unquantized models on CUDA; on CPU with the `plain` layout): `load_weights` copies
  each tensor straight into the live parameter. Valid when every layer's post-load processing is
  the identity: true for unquantized layers on CUDA, and on CPU once the `plain` layout (below)
  keeps linear weights as plain tensors. One copy per tensor, no re-processing: the cheapest load.
* **layerwise** (quantized models; CPU with the default `packed` layout): between vLLM's
  `initialize_layerwise_reload` and `finalize_layerwise_reload` (the base class's start/finish
  hooks), which materialise each layer, load it, re-run its processing (quantisation, CPU oneDNN
  packing) and copy the result back into the original storage. Plain `load_weights` breaks there on
  CPU after the first load (vLLM 0.32: `'Parameter' object has no attribute 'weight_loader'`): the
  packed layers dropped their weight tensors.

CPU weight layout (`ATROPOS_CPU_WEIGHT_LAYOUT`, read at import, before the model loads; set by
`start_vllm_server(cpu_weight_layout=...)`): `packed` (default, vLLM's own) packs every CPU linear
weight into a oneDNN handle and drops the plain tensor, so each update re-packs the whole model;
`plain` keeps the plain tensor and computes with `F.linear`. `plain` syncs faster (no re-pack, no
layerwise round trip) but generates slower at batch sizes > 1 (MKL GEMM against oneDNN's
pre-packed kernels; numbers in docs/weight_sync.md). Generation dominates an RL step, hence the
default.

Error path: if receiving fails mid-way (trainer gone, timeout), a layerwise reload is finalised here
before re-raising, so layers that got nothing put their old tensors back instead of staying on the
meta device; vLLM's worker does not call finish after a failed update. Either way the server then
claims no version until the next good update.
"""
from __future__ import annotations

import logging
import math
import os
import time
from contextlib import contextmanager
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from atropos_core.inference.vllm_command import CPU_WEIGHT_LAYOUT_ENV, CPU_WEIGHT_LAYOUTS
from atropos_core.weight_sync.protocol import (
    PIPELINE_DEPTH,
    WIRE_DTYPES,
    bucket_layout,
    device_id,
    message_timeout,
    unpack_bucket,
)
from atropos_core.weight_sync.transport import broadcast_async, make_transfer_group, wait_done

# Under "vllm." so the line reaches the server log: vLLM configures only its own logger tree in workers.
logger = logging.getLogger("vllm.atropos_worker")

BACKEND_NAME = "atropos"
#: Largest message received into a reused buffer (bigger ones, e.g. a large vocabulary's embedding,
#: get a fresh buffer rather than pinning that much memory between updates).
POOL_MAX_BYTES = 256 << 20



def _install_plain_cpu_layout() -> None:
    """On CPU with `plain` layout, make vLLM keep 2-D linear/LM-head weights as plain tensors.

    vLLM routes every unquantized CPU linear through `dispatch_cpu_unquantized_gemm`, which packs
    the weight for oneDNN (or sgl/zentorch) and replaces it with an empty tensor. Wrapped here (it
    is imported at call time, so wrapping the module attribute reaches every caller): 2-D weights
    keep their tensor and compute with `F.linear`, so an update can copy into them in place; other
    shapes (MoE experts, conv) keep vLLM's path.
    """
    layout = os.environ.get(CPU_WEIGHT_LAYOUT_ENV, CPU_WEIGHT_LAYOUTS[0])
    if layout not in CPU_WEIGHT_LAYOUTS:
        raise ValueError(f"{CPU_WEIGHT_LAYOUT_ENV} must be one of {CPU_WEIGHT_LAYOUTS}, got {layout!r}")
    from vllm.platforms import current_platform

    if layout != "plain" or not current_platform.is_cpu():
        return
    from vllm.model_executor.layers import utils as layer_utils

    original = layer_utils.dispatch_cpu_unquantized_gemm
    if getattr(original, "_atropos_plain", False):
        return

    def dispatch_plain(layer: torch.nn.Module, remove_weight: bool) -> None:
        if layer.weight.is_meta or layer.weight.ndim != 2:
            return original(layer, remove_weight)
        layer.cpu_linear = torch.nn.functional.linear
        layer._atropos_plain_weight = True

    dispatch_plain._atropos_plain = True  # type: ignore[attr-defined]
    layer_utils.dispatch_cpu_unquantized_gemm = dispatch_plain


def _install_cpu_generator_rewind() -> None:
    """On CPU, rewind a seeded request's generator by its saved state, not by an offset.

    When a step's sampled token is thrown away (a prompt prefilled in chunks: every chunk but the
    last samples a token nobody keeps), vLLM 0.32's `GPUModelRunner._bookkeeping_sync` undoes that
    sample in the request's own generator with `gen.set_offset(gen.get_offset() - 4)`: the CUDA
    Philox counter. A CPU generator (Mersenne Twister) has no offset and raises "CPU Generator does
    not use offset"; the engine dies and every request in flight fails. So any request with a
    `seed` whose prompt got chunked (a long prompt, or a busy step's token budget) killed a CPU
    server. Wrapped here: `_sample` saves the state of each CPU generator whose row will be
    discarded, and `_bookkeeping_sync` runs with those generators out of its sight and then puts
    them back at their saved state: the discarded token consumed nothing, as on CUDA, so a seeded
    request gives the same tokens whether its prompt was chunked or not. A vLLM without these
    methods is left alone (logged).
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    sample = getattr(GPUModelRunner, "_sample", None)
    bookkeeping = getattr(GPUModelRunner, "_bookkeeping_sync", None)
    if sample is None or bookkeeping is None:
        logger.warning("vLLM's model runner lacks _sample/_bookkeeping_sync: seeded requests are not "
                       "guarded against the CPU generator-offset crash")
        return
    if getattr(bookkeeping, "_atropos_rewind", False):
        return

    def discarded_cpu_generators(runner: Any) -> dict[int, torch.Generator]:
        batch, mask = runner.input_batch, runner.discard_request_mask
        rows = mask.np[:batch.num_reqs].nonzero()[0].tolist()
        return {i: batch.generators[i] for i in rows
                if i in batch.generators and batch.generators[i].device.type == "cpu"}

    def sample_saving_state(self: Any, *args: Any, **kwargs: Any) -> Any:
        self._atropos_rng_before = {i: g.get_state() for i, g in discarded_cpu_generators(self).items()}
        return sample(self, *args, **kwargs)

    def bookkeeping_restoring_state(self: Any, *args: Any, **kwargs: Any) -> Any:
        held = discarded_cpu_generators(self)
        generators = self.input_batch.generators
        for i in held:
            del generators[i]
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            generators.update(held)
            saved = getattr(self, "_atropos_rng_before", {})
            for i, gen in held.items():
                if i in saved:
                    gen.set_state(saved[i])
            self._atropos_rng_before = {}

    bookkeeping_restoring_state._atropos_rewind = True  # type: ignore[attr-defined]
    GPUModelRunner._sample = sample_saving_state
    GPUModelRunner._bookkeeping_sync = bookkeeping_restoring_state


def in_place_blocker(model: torch.nn.Module, device: torch.device, quantization: str | None) -> str | None:
    """Why `model` cannot take updates by plain in-place `load_weights`, or None if it can.

    In place is right only when loading a checkpoint tensor into a layer needs no processing after
    it: no quantisation, every layer's method unquantized, and (on CPU) the weights not packed.
    """
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    if quantization:
        return f"quantized model ({quantization})"
    if device.type not in ("cuda", "cpu"):
        return f"device {device.type}"
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is None:
            continue
        if not isinstance(method, (UnquantizedLinearMethod, UnquantizedEmbeddingMethod)):
            return f"{name} uses {type(method).__name__}"
        if device.type == "cpu" and not getattr(module, "_atropos_plain_weight", False):
            return f"{name} holds a packed CPU weight ({CPU_WEIGHT_LAYOUT_ENV}=packed)"
    return None


@contextmanager
def _unpinned():
    """Let threads created inside run on every CPU of the machine, not only the worker's OMP cores.

    On CPU vLLM pins each worker's main thread to its OpenMP cores (`VLLM_CPU_OMP_THREADS_BIND`,
    one core per worker on a small box, the others reserved for the API server and EngineCore).
    Threads inherit the affinity of the thread that creates them, so gloo's socket-loop and work
    threads would share that one core with the load into vLLM: receiving and loading then run one
    after the other. Generation is paused during an update, so the reserved cores are idle; the
    transfer threads may use them. The main thread's own pinning is restored on exit.
    """
    if not hasattr(os, "sched_getaffinity"):
        yield
        return
    pinned = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except OSError:  # a cpuset that forbids it: keep the pinning
        yield
        return
    try:
        yield
    finally:
        os.sched_setaffinity(0, pinned)


@dataclass
class AtroposInitInfo(WeightTransferInitInfo):
    """Where to rendezvous with trainer rank 0 (sent as JSON by `/weights/init`)."""

    host: str
    port: int
    world_size: int
    rank_offset: int
    backend: str = "gloo"
    init_timeout_s: float = 120.0
    op_timeout_s: float = 30.0


@dataclass
class AtroposUpdateInfo(WeightTransferUpdateInfo):
    """One update's manifest (validated by the server before it reaches the worker)."""

    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    buckets: list[list[int]]
    version: int = 0
    total_bytes: int = 0
    pipeline_depth: int = PIPELINE_DEPTH
    extra: dict[str, Any] = field(default_factory=dict)


class AtroposWeightTransferEngine(WeightTransferEngine[AtroposInitInfo, AtroposUpdateInfo]):
    """Receives broadcast weights over a gloo (CPU) or NCCL (CUDA) group and loads them in place."""

    init_info_cls = AtroposInitInfo
    update_info_cls = AtroposUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = None
        self._store = None
        self._in_place: bool | None = None  # decided once the model is loaded (first init)
        self._pool: list[torch.Tensor] = []  # reused receive buffers (in-place loading only)
        self._op_timeout_s = 30.0  # per message, from /weights/init

    def init_transfer_engine(self, init_info: AtroposInitInfo) -> None:
        if init_info.backend == "nccl" and self.device.type != "cuda":
            raise ValueError(f"NCCL weight transfer needs a CUDA worker, this one is on {self.device}")
        pc = self.parallel_config
        rank = init_info.rank_offset + pc.data_parallel_index * pc.world_size + pc.rank
        self.shutdown()  # a reconnecting trainer (e.g. after a resume) replaces the old group
        self._op_timeout_s = float(init_info.op_timeout_s)
        with _unpinned():
            self.group, self._store = make_transfer_group(
                init_info.backend, init_info.host, init_info.port, rank, init_info.world_size,
                init_info.init_timeout_s, init_info.op_timeout_s)
        if self._in_place is None:
            why_not = in_place_blocker(self.model, self.device, self.model_config.quantization)
            self._in_place = why_not is None
            logger.info("weight updates load %s", "in place" if why_not is None else f"layerwise ({why_not})")
        logger.info("joined weight-transfer group as rank %d of %d (%s)", rank, init_info.world_size,
                    init_info.backend)

    def start_weight_update(self) -> None:
        if self._in_place is not False:
            return
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        if self._in_place is not False:
            return
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        t0 = time.perf_counter()
        finalize_layerwise_reload(self.model, self.model_config)
        self._reprocess_tied_layers()
        logger.info("update finished in %.0f ms", (time.perf_counter() - t0) * 1e3)

    def _reprocess_tied_layers(self) -> None:
        """Re-run weight post-processing on layers that share a parameter with another layer.

        With tied embeddings only `embed_tokens` receives a tensor; `lm_head` holds the same
        Parameter, so the layerwise reload puts it back untouched and never re-processes it. On CPU
        that processing is where the GEMM weight is pre-packed (`dispatch_cpu_unquantized_gemm`),
        so without this `lm_head` keeps computing logits from the OLD embedding (measured: served
        logprobs matched "new embedding, old head" exactly).
        """
        owners: dict[int, list[torch.nn.Module]] = {}
        for module in self.model.modules():
            for p in module.parameters(recurse=False):
                owners.setdefault(id(p), []).append(module)
        for modules in owners.values():
            if len(modules) < 2:
                continue
            for module in modules:
                method = getattr(module, "quant_method", None)
                if method is not None and hasattr(method, "process_weights_after_loading"):
                    method.process_weights_after_loading(module)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class ends with torch.accelerator.synchronize(), which raises on CPU.
        typed = self.parse_update_info(update_info)
        try:
            self.receive_weights(typed)
        except BaseException:
            logger.exception("weight update v%s failed while receiving", typed.version)
            self.group = None  # a failed collective leaves the group unusable; the trainer reconnects
            try:
                self.finish_weight_update()  # layerwise: layers that got nothing get their tensors back
            except Exception:  # noqa: BLE001 - the original error matters more
                logger.exception("finalising the failed update also failed")
            raise
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def receive_weights(self, update_info: AtroposUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("weight transfer group not initialised: call /weights/init first")
        # One `load_weights` call for the whole update, fed by a generator that receives as it goes:
        # every call builds a loader that walks the whole module tree (a call per tensor cost about
        # a third of an update; docs/weight_sync.md).
        stats = {"wait_s": 0.0}
        t0 = time.perf_counter()
        self.model.load_weights(self._received(update_info, stats))
        logger.info("v%d received and loaded in %.0f ms (of which waiting on the wire %.0f ms)",
                    update_info.version, (time.perf_counter() - t0) * 1e3, stats["wait_s"] * 1e3)

    def _received(self, info: AtroposUpdateInfo, stats: dict[str, float]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, tensor) in manifest order, keeping `pipeline_depth` receives posted ahead,
        so the wire runs while the previous tensor is loaded."""
        names, dtypes, shapes = info.names, info.dtypes, info.shapes
        depth = info.pipeline_depth  # 1..MAX_PIPELINE_DEPTH: the server validated the manifest
        inflight: deque = deque()
        buckets = iter(info.buckets)
        # In place, `load_weights` has copied a tensor out (CPU) or enqueued that copy (CUDA) before
        # the generator resumes, so receive buffers can be reused: depth + 1 of them cover `depth`
        # receives in flight plus the one being loaded. On CUDA the next receive into a buffer is
        # ordered after that copy because NCCL's stream waits for the current stream when the
        # receive is posted. (Layerwise loading keeps the received tensors until a layer is
        # complete.) On CUDA the host waits for each message (`wait_done`): without that NCCL's
        # `wait()` returns at once and the whole update would be enqueued, every buffer alive.
        reuse = self._in_place is True
        host_poll = self.device.type == "cuda"
        slot = 0
        while True:
            while len(inflight) < depth:
                bucket = next(buckets, None)
                if bucket is None:
                    break
                if len(bucket) == 1:
                    shape, dtype = shapes[bucket[0]], WIRE_DTYPES[dtypes[bucket[0]]]
                else:
                    shape = [bucket_layout([shapes[i] for i in bucket], [dtypes[i] for i in bucket])[1]]
                    dtype = torch.uint8
                buf = self._receive_buffer(slot if reuse else None, shape, dtype)
                slot = (slot + 1) % (depth + 1)
                inflight.append((bucket, buf, broadcast_async(self.group, buf)))
            if not inflight:
                return
            bucket, buf, work = inflight.popleft()
            t0 = time.perf_counter()
            wait_done(work, message_timeout(self._op_timeout_s, buf.nbytes), host_poll=host_poll,
                      what=f"message with {names[bucket[0]]!r}")
            stats["wait_s"] += time.perf_counter() - t0
            if len(bucket) == 1:
                yield names[bucket[0]], buf
            else:
                views = unpack_bucket(buf, [shapes[i] for i in bucket], [dtypes[i] for i in bucket])
                yield from zip((names[i] for i in bucket), views)

    def _receive_buffer(self, slot: int | None, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        """A tensor to receive one message into: a view of reused buffer `slot` (grown as needed),
        or a fresh one when `slot` is None or the message is over `POOL_MAX_BYTES`.

        Why reuse: a fresh CPU buffer per tensor is first-touched by the receive, and those page
        faults were a measurable part of an update (docs/weight_sync.md)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if slot is None or nbytes > POOL_MAX_BYTES:
            return torch.empty(shape, dtype=dtype, device=self.device)
        while len(self._pool) <= slot:
            self._pool.append(torch.empty(0, dtype=torch.uint8, device=self.device))
        if self._pool[slot].numel() < nbytes:
            self._pool[slot] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self._pool[slot][:nbytes].view(dtype).view(shape)

    def shutdown(self) -> None:
        self.group = None
        self._store = None


class AtroposWorkerExtension:
    """Mixed into vLLM's worker by `--worker-extension-cls`; importing this module is its job (it
    registers the engine). It adds RPCs: readiness, a whole update in one call, and which device the
    worker computes on."""

    def atropos_weight_transfer_ready(self) -> bool:
        engine = getattr(self, "weight_transfer_engine", None)
        return isinstance(engine, AtroposWeightTransferEngine) and engine.group is not None

    def atropos_update(self, update_info: dict) -> None:
        """A whole update in one RPC (`engine_ext.atropos_update` sends it): the worker's own start,
        receive-and-load and finish, then its encoder cache dropped (cached encoder outputs were
        computed with the old weights). A failure while receiving has already finalised a
        layerwise reload (`AtroposWeightTransferEngine.update_weights`)."""
        self.start_weight_update()
        self.update_weights(update_info)
        self.finish_weight_update()
        reset_encoder = getattr(self, "reset_encoder_cache", None)
        if callable(reset_encoder):
            reset_encoder()

    def atropos_device_id(self) -> str:
        """`weight_sync.protocol.device_id` of this worker's device: the trainer compares it with its own
        GPU, because NCCL refuses two ranks of one communicator on the same GPU."""
        return device_id(self.device)


_install_plain_cpu_layout()
_install_cpu_generator_rewind()
try:
    WeightTransferEngineFactory.register_engine(BACKEND_NAME, AtroposWeightTransferEngine)
except ValueError:  # imported twice in one process
    pass
