"""The command line of our vLLM server (`atropos_core.inference.server`): vLLM's own `serve`
flags plus ours, and the checks on the flags a user adds. Builds argv only; `services` starts it.

Our flags: fp32 on CPU (the tests compare logprobs with transformers at ~1e-4), `--enforce-eager`
(no graph capture to invalidate on updates; also a faster start on CPU), `--seed 0`, the worker
extension that registers our weight-transfer engine, `--weight-transfer-config '{"backend":
"atropos"}'`, and processed logprobs. Flags that the run sets from its own config may not come from
`inference.extra_args` (`check_user_vllm_args`); any other user flag replaces ours
(`merge_vllm_flags`): one value per flag on the final command line, the user's.

The same command serves CUDA machines: the engine joins with NCCL when the trainer asks for it at
`/weights/init`; pass `dtype="bfloat16"` and `enforce_eager=False` (CUDA graphs keep their buffers:
weights are copied into the existing tensors in place) where throughput matters.
"""
from __future__ import annotations

import secrets
import shlex
import sys
from pathlib import Path
from typing import Sequence


SERVER_MODULE = "atropos_core.inference.server"
WORKER_EXTENSION = "atropos_core.inference.worker_ext.AtroposWorkerExtension"
TRANSFER_CONFIG = '{"backend": "atropos"}'
#: How a CPU server holds linear weights (see `worker_ext`), and the variable that tells the workers.
CPU_WEIGHT_LAYOUTS = ("packed", "plain")
CPU_WEIGHT_LAYOUT_ENV = "ATROPOS_CPU_WEIGHT_LAYOUT"
#: What a user may ask for: a layout, or "auto" (`resolve_cpu_weight_layout`).
CPU_WEIGHT_LAYOUT_CHOICES = ("auto", *CPU_WEIGHT_LAYOUTS)
#: "auto" picks "plain" for a checkpoint up to this many bytes, "packed" above.
AUTO_PLAIN_MAX_BYTES = 32 << 20


def resolve_cpu_weight_layout(layout: str, model_dir: str | Path) -> tuple[str, str]:
    """(layout, why) for a CPU server of the checkpoint in `model_dir`.

    "auto" is the trade-off measured at both ends of the model sizes we run (docs/weight_sync.md,
    docs/loop-speed-2026-12-01.md): on a 1.8 MB model oneDNN's pre-packing generates no faster
    than plain GEMMs while re-packing makes every sync ~1.5x slower, so small models get "plain";
    on a 400 MB model pre-packed GEMMs generate up to 2x faster at 16 sequences, so big ones get
    "packed". Where between the two the crossover lies is not measured; the cut is at
    `AUTO_PLAIN_MAX_BYTES` of safetensors. Without safetensors to size, vLLM's own "packed"."""
    if layout not in CPU_WEIGHT_LAYOUT_CHOICES:
        raise ValueError(f"cpu_weight_layout must be one of {CPU_WEIGHT_LAYOUT_CHOICES}, got {layout!r}")
    if layout != "auto":
        return layout, "asked for"
    files = list(Path(model_dir).glob("*.safetensors")) if Path(model_dir).is_dir() else []
    if not files:
        return "packed", "auto: no safetensors files to size the model by"
    nbytes = sum(f.stat().st_size for f in files)
    pick = "plain" if nbytes <= AUTO_PLAIN_MAX_BYTES else "packed"
    return pick, f"auto: {nbytes / 2**20:.1f} MiB of weights, {'up to' if pick == 'plain' else 'over'} " \
                 f"{AUTO_PLAIN_MAX_BYTES >> 20} MiB"


#: vLLM flags that the run sets from its own config fields (the launcher, the trainer and the
#: environments must agree on them), so `inference.extra_args` may not carry them.
RUN_OWNED_FLAGS = {"--model": "model.path (--model)", "--host": "inference.host", "--port": "inference.port (--inference-port)",
                   "--max-model-len": "run.max_token_len (--max-token-len)", "--worker-extension-cls": None,
                   "--weight-transfer-config": None}
#: Flags of ours that take no value (every other flag of ours is followed by its value).
_BOOLEAN_FLAGS = {"--enforce-eager", "--disable-uvicorn-access-log"}


def _flag_name(tok: str) -> str:
    """`--Max_Model-len=5` -> `--max-model-len` (vLLM's parser accepts underscores too)."""
    return "--" + tok[2:].split("=", 1)[0].replace("_", "-").lower()


def check_user_vllm_args(extra_args: str | Sequence[str]) -> list[str]:
    """Split a user's vLLM flags; raise ValueError for bad quoting or a flag the run owns."""
    try:
        args = shlex.split(extra_args) if isinstance(extra_args, str) else list(extra_args)
    except ValueError as e:
        raise ValueError(f"inference.extra_args {extra_args!r}: {e}") from None
    for tok in args:
        if tok.startswith("--") and _flag_name(tok) in RUN_OWNED_FLAGS:
            owner = RUN_OWNED_FLAGS[_flag_name(tok)]
            raise ValueError(f"inference.extra_args sets {_flag_name(tok)}, which the run sets itself"
                             + (f": use {owner}" if owner else " (the weight-sync protocol needs ours)"))
    return args


def merge_vllm_flags(ours: Sequence[str], theirs: Sequence[str]) -> list[str]:
    """`ours` + `theirs`, where a flag in `theirs` (also as --no-FLAG or --flag=value) replaces ours:
    one value per flag on the final command line, the user's."""
    names = set()
    for tok in theirs:
        if tok.startswith("--"):
            name = _flag_name(tok)
            names.add(name)
            if name.startswith("--no-"):
                names.add("--" + name[5:])
    out, i = [], 0
    ours = list(ours)
    while i < len(ours):
        tok = ours[i]
        takes_value = tok.startswith("--") and tok not in _BOOLEAN_FLAGS and "=" not in tok
        if tok.startswith("--") and (_flag_name(tok) in names or "--no-" + tok[2:] in names):
            i += 2 if takes_value else 1
            continue
        out.append(tok)
        if takes_value:
            out.append(ours[i + 1])
            i += 1
        i += 1
    return out + list(theirs)


def served_name_from(args: Sequence[str]) -> str | None:
    """The first `--served-model-name` in a vLLM argv (the name its OpenAI routes answer to)."""
    args = list(args)
    for i, tok in enumerate(args):
        if tok.startswith("--") and _flag_name(tok) == "--served-model-name":
            if "=" in tok:
                return tok.split("=", 1)[1]
            return args[i + 1] if i + 1 < len(args) else None
    return None


def new_update_token() -> str:
    """A fresh per-launch token for the weight-update routes."""
    return secrets.token_urlsafe(32)


def vllm_server_command(model_dir: str | Path, *, port: int, host: str = "127.0.0.1", dtype: str = "float32",
                        max_model_len: int = 512, enforce_eager: bool = True, seed: int = 0,
                        extra_args: Sequence[str] = (), served_model_name: str | None = None) -> list[str]:
    """The argv that starts our server (without the environment it needs); a flag in `extra_args`
    replaces ours (`merge_vllm_flags`)."""
    cmd = [sys.executable, "-m", SERVER_MODULE, "--model", str(model_dir), "--host", host, "--port", str(port),
           "--dtype", dtype, "--max-model-len", str(max_model_len), "--seed", str(seed),
           "--worker-extension-cls", WORKER_EXTENSION, "--weight-transfer-config", TRANSFER_CONFIG,
           "--disable-uvicorn-access-log"]
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    if enforce_eager:
        cmd.append("--enforce-eager")
    # Logprobs of the distribution actually sampled from (after temperature; and after top-k /
    # top-p / penalties when an environment sets them), not vLLM's default raw_logprobs of
    # softmax(z): the trainer computes log_softmax(z / loss.temperature), so at any temperature
    # other than 1 raw logprobs would disagree with it (tests/test_inference.py, T = 0.7).
    cmd += ["--logprobs-mode", "processed_logprobs"]
    return merge_vllm_flags(cmd, extra_args)


