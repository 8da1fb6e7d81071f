"""Runs inside every vLLM worker: our weight-transfer engine ("atropos"), gloo on CPU, NCCL on CUDA.

vLLM's in-tree transfer engines are CUDA-only and have no gloo path. This module is named by
`--worker-extension-cls`, so vLLM imports it in each worker before it builds the engine named by
`--weight-transfer-config '{"backend": "atropos"}'`; importing it registers the engine.

The engine joins the trainer's transfer group (`atropos_core.weight_sync.make_transfer_group`, the
same function the trainer calls, so both ends agree on store prefix, backend and timeouts) and, per
update, receives the tensors the JSON manifest announces, bucket by bucket, and feeds them to
`model.load_weights` between `initialize_layerwise_reload` and `finalize_layerwise_reload` (the
base class's start/finish hooks, run by vLLM's worker inside `set_current_vllm_config`): plain
`load_weights` breaks on CPU after the first load (FACTS.md). Received tensors are in HF naming.

Error path: if receiving fails mid-way (trainer gone, timeout), the layerwise reload is finalised
here before re-raising, so layers that got nothing put their old tensors back instead of staying on
the meta device; vLLM's worker does not call finish after a failed update.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from atropos_core.weight_sync import (
    WIRE_DTYPES,
    broadcast_async,
    bucket_layout,
    make_transfer_group,
    unpack_bucket,
)

logger = logging.getLogger(__name__)

BACKEND_NAME = "atropos"


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
    pipeline_depth: int = 2
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

    def init_transfer_engine(self, init_info: AtroposInitInfo) -> None:
        if init_info.backend == "nccl" and self.device.type != "cuda":
            raise ValueError(f"NCCL weight transfer needs a CUDA worker, this one is on {self.device}")
        pc = self.parallel_config
        rank = init_info.rank_offset + pc.data_parallel_index * pc.world_size + pc.rank
        self.shutdown()  # a reconnecting trainer (e.g. after a resume) replaces the old group
        self.group, self._store = make_transfer_group(
            init_info.backend, init_info.host, init_info.port, rank, init_info.world_size,
            init_info.init_timeout_s, init_info.op_timeout_s)
        logger.info("joined weight-transfer group as rank %d of %d (%s)", rank, init_info.world_size,
                    init_info.backend)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        self._reprocess_tied_layers()

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
            logger.exception("weight update v%s failed while receiving; restoring unloaded layers", typed.version)
            self.group = None  # a failed collective leaves the group unusable; the trainer reconnects
            try:
                self.finish_weight_update()
            except Exception:  # noqa: BLE001 - the original error matters more
                logger.exception("finalising the failed update also failed")
            raise
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def receive_weights(self, update_info: AtroposUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("weight transfer group not initialised: call /weights/init first")
        names, dtypes, shapes = update_info.names, update_info.dtypes, update_info.shapes
        # Post the receive of message i+1 before loading message i: loading overlaps the wire.
        inflight: deque = deque()
        for bucket in update_info.buckets:
            if len(bucket) == 1:
                i = bucket[0]
                buf = torch.empty(shapes[i], dtype=WIRE_DTYPES[dtypes[i]], device=self.device)
            else:
                _, total = bucket_layout([shapes[i] for i in bucket], [dtypes[i] for i in bucket])
                buf = torch.empty(total, dtype=torch.uint8, device=self.device)
            inflight.append((bucket, buf, broadcast_async(self.group, buf)))
            while len(inflight) >= max(1, update_info.pipeline_depth):
                self._load(*inflight.popleft(), update_info)
        while inflight:
            self._load(*inflight.popleft(), update_info)

    def _load(self, bucket: list[int], buf: torch.Tensor, work, info: AtroposUpdateInfo) -> None:
        work.wait()
        if len(bucket) == 1:
            self.model.load_weights([(info.names[bucket[0]], buf)])
        else:
            views = unpack_bucket(buf, [info.shapes[i] for i in bucket], [info.dtypes[i] for i in bucket])
            self.model.load_weights([(info.names[i], v) for i, v in zip(bucket, views)])

    def shutdown(self) -> None:
        self.group = None
        self._store = None


class AtroposWorkerExtension:
    """Mixed into vLLM's worker by `--worker-extension-cls`; importing this module is its job (it
    registers the engine). It adds one RPC for diagnostics."""

    def atropos_weight_transfer_ready(self) -> bool:
        engine = getattr(self, "weight_transfer_engine", None)
        return isinstance(engine, AtroposWeightTransferEngine) and engine.group is not None


try:
    WeightTransferEngineFactory.register_engine(BACKEND_NAME, AtroposWeightTransferEngine)
except ValueError:  # imported twice in one process
    pass
