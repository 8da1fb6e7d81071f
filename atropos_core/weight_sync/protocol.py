"""The weight-sync wire format, shared by the trainer (`push`) and the vLLM worker
(`atropos_core.inference.worker_ext`) and server (`atropos_core.inference.server`).

Both ends import this module, so they agree by construction on dtype names, the manifest (its
fields, its validation, its key), the bucket plan and the packed-bucket layout, the per-message
timeout, the keys of sampled sequences and the update token's header. It imports nothing heavier
than torch: no HTTP client, no thread pool, no vLLM.

The manifest is JSON: `{"version", "names", "dtypes", "shapes", "buckets", "total_bytes",
"pipeline_depth"}`. `buckets` lists tensor indices, in order, one list per broadcast message; a
bucket of several tensors travels as one uint8 buffer with each tensor at a `BUCKET_ALIGN`-aligned
offset. Nothing is pickled: neither side deserialises objects from the network.
"""
from __future__ import annotations

import hashlib
import hmac
import json
from typing import Sequence

import torch

#: dtypes that may appear in a manifest (the name is what travels in JSON).
WIRE_DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in WIRE_DTYPES.items()}
#: Name segments that wrappers (torch.compile, activation checkpointing, FSDP1) insert.
_WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "module.")
#: Default NCCL bucket (vLLM's packed NCCL engine uses buffers of the same order).
NCCL_BUCKET_BYTES = 256 << 20
#: Default gloo bucket: a small model goes as one message (each message costs a wait on the worker,
#: which loads the previous one in between), a big one in buckets of this size. Measured on both
#: sizes in docs/loop-speed-2026-12-01.md (2026-12-02, one-call update).
GLOO_BUCKET_BYTES = 16 << 20
#: Messages in flight on each side (`WeightSyncConfig.pipeline_depth`): default and upper bound,
#: checked on both ends by `validate_manifest`.
PIPELINE_DEPTH = 2
MAX_PIPELINE_DEPTH = 16
#: How vLLM may pause in-flight requests during an update (`WeightSyncConfig.pause_mode`).
PAUSE_MODES = ("keep", "wait", "abort")


class WeightSyncError(RuntimeError):
    """A weight update failed; the message names the server and, where known, the tensor."""


def device_id(device: torch.device) -> str:
    """"cpu", or "cuda:<GPU UUID>" (what the workers report at /weights/spec)."""
    if device.type != "cuda":
        return "cpu"
    return f"cuda:{torch.cuda.get_device_properties(device).uuid}"


#: Slowest wire speed a per-message timeout allows for (bytes/s): a message of b bytes gets
#: `update_timeout_s + b / MIN_WIRE_BYTES_PER_S` (a 1 GB embedding 1 s more than a small tensor).
MIN_WIRE_BYTES_PER_S = 1e9


def message_timeout(base_s: float, nbytes: int) -> float:
    """Timeout of one message of `nbytes`: sized per message, not per update."""
    return base_s + nbytes / MIN_WIRE_BYTES_PER_S


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
    offsets, total = bucket_layout([list(t.shape) for t in tensors], [DTYPE_NAMES[t.dtype] for t in tensors])
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


def build_manifest(version: int, names: Sequence[str], shapes: Sequence[Sequence[int]],
                   dtype_names: Sequence[str], *, bucket_bytes: int, pipeline_depth: int) -> dict:
    """The manifest of one update: tensors in the order they are sent, their bucket plan
    (`plan_buckets` of their wire sizes) and the total bytes."""
    shapes = [[int(x) for x in s] for s in shapes]
    nbytes = [tensor_nbytes(s, d) for s, d in zip(shapes, dtype_names)]
    return {"version": int(version), "names": list(names), "dtypes": list(dtype_names), "shapes": shapes,
            "buckets": plan_buckets(nbytes, bucket_bytes), "total_bytes": sum(nbytes),
            "pipeline_depth": int(pipeline_depth)}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_manifest(manifest: dict, spec: dict | None, where: str) -> None:
    """Raise ValueError naming the tensor if `manifest` does not fit the served checkpoint `spec`
    ({"tensors": {name: {"shape", "dtype"}}, "tie_word_embeddings": bool}); also checks that the
    manifest is internally consistent. `where` names the server in the message."""
    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: manifest must be a JSON object, got {type(manifest).__name__}")
    names, dtypes, shapes = manifest.get("names"), manifest.get("dtypes"), manifest.get("shapes")
    if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)):
        raise ValueError(f"{where}: manifest needs lists 'names', 'dtypes', 'shapes'")
    if not len(names) == len(dtypes) == len(shapes):
        raise ValueError(f"{where}: manifest lists differ in length "
                         f"({len(names)} names, {len(dtypes)} dtypes, {len(shapes)} shapes)")
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{where}: manifest 'names' must be non-empty strings")
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: manifest names a tensor twice")
    for name, dname, shape in zip(names, dtypes, shapes):
        if not isinstance(dname, str) or dname not in WIRE_DTYPES:
            raise ValueError(f"{where}: tensor {name!r} has unsupported dtype {dname!r}")
        if not (isinstance(shape, list) and all(_is_int(s) and s >= 0 for s in shape)):
            raise ValueError(f"{where}: tensor {name!r} has a bad shape {shape!r}")
    buckets = manifest.get("buckets")
    if not (isinstance(buckets, list) and all(isinstance(b, list) and b and all(_is_int(i) for i in b)
                                              for b in buckets)
            and [i for b in buckets for i in b] == list(range(len(names)))):
        raise ValueError(f"{where}: manifest 'buckets' must cover every tensor index exactly once, in order")
    version = manifest.get("version", 0)
    if not (_is_int(version) and version >= 0):
        raise ValueError(f"{where}: manifest 'version' must be a non-negative integer, got {version!r}")
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
    already holds needs one exchange (`/weights/update`), without a prepare first."""
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


def auth_headers(token: str) -> dict[str, str]:
    """HTTP headers that carry the per-launch update token to the `/weights/*` routes."""
    return {"Authorization": f"Bearer {token}"}


def token_refusal(authorization: str, token: str) -> str | None:
    """None if the `Authorization` header value carries `token`, else why not ("no token" or
    "wrong token"; the server answers 401 or 403). Constant-time comparison."""
    given = authorization[7:] if authorization.startswith("Bearer ") else ""
    if not given:
        return "no token"
    if not token or not hmac.compare_digest(given.encode(), token.encode()):
        return "wrong token"
    return None
