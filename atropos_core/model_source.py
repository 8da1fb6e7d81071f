"""Where the run's model comes from and how long its sequences may be: resolved once, at launch.

* `--model` is a local Hugging Face directory or a hub id (`Qwen/Qwen2.5-0.5B-Instruct`). A hub id
  is resolved here, once, on rank 0, through `huggingface_hub.snapshot_download` to the local
  snapshot directory; the trainer, vLLM and the environments all load that directory, so they read
  the same files. With `HF_HUB_OFFLINE=1` only the cache is read (`HF_HUB_CACHE`, else
  `HF_HOME/hub`, else `~/.cache/huggingface/hub`), and an id that is not there ends the start with
  one line naming it.
* One length for the whole run: the longest sequence (prompt + completion, in tokens). vLLM's
  `--max-model-len`, the `max_token_len` the trainer registers with the Atropos API (which tells the
  environments) and the trainer's data validation all use it. A value the user sets (any of
  `run.max_token_len`, `data.max_token_len`, `atropos.max_token_len`; they must agree) is checked
  against the model's own limit, the smallest of the `config.json` keys vLLM 0.32 reads for it
  (`vllm/transformers_utils/model_arch_config_convertor.py`: max_position_embeddings, n_positions,
  ...) and the tokenizer's `model_max_length`; more is a config error naming both numbers. Unset,
  it is the model's limit capped at `DEFAULT_MAX_TOKEN_LEN` (a 32k-context model would otherwise
  reserve KV cache and memory for 32k-token sequences no default environment sends).
* A plain output head only. The fused losses (`kernels/`) compute log-softmax(hidden @
  lm_head.weight.T / T), and nothing more. A model whose forward changes the logits after the
  head is refused here, by name, before anything starts (`check_output_head`:
  `HEAD_TRANSFORM_KEYS` in config.json, or an `lm_head.bias` tensor in the checkpoint). Without
  that, it would train silently on log-probs that are not those of the policy vLLM samples. A
  numeric probe could not replace the check: on a random-initialised model a soft cap of 30
  changes the logits by ~1e-7. `model.load_model_and_tokenizer` checks again, for models loaded
  another way. Supporting a soft cap means adding it to every kernel backend and to the
  reference. A constant factor (`LOGIT_SCALE_KEYS`: Cohere, Granite) is supported: the loss
  multiplies the hidden state by it, (s·h) @ W.T = s·(h @ W.T), exact on every backend. The
  loader checks that factor against the model's own logits on a short probe: a factor is
  visible on any model, random or trained.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKEN_LEN = 2048
#: config.json keys that bound a model's context (the same list vLLM 0.32 takes the minimum of).
LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
               "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Files a trainer and vLLM never need from a hub repo (other frameworks' weights, GGUF, originals).
_IGNORE = ["*.pth", "*.pt", "*.bin", "*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.tflite", "original/*"]


class ModelSourceError(ValueError):
    """The model cannot be found or its limits cannot be honoured (reported as a config error)."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> Path:
    """The hub cache `huggingface_hub` reads, from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or str(Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface")
    return Path(home).expanduser() / "hub"


def is_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.fullmatch(spec)) and not spec.startswith((".", "/", "~"))


def resolve_model_path(spec: str) -> Path:
    """A local model directory for `spec` (a directory, or a hub id resolved to its snapshot)."""
    p = Path(spec).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelSourceError(f"model.path {spec!r} is not a Hugging Face model directory (no config.json there)")
        return p
    if not is_hub_id(spec):
        raise ModelSourceError(f"model.path {spec!r} is neither a model directory nor a hub id like org/name")
    from huggingface_hub import snapshot_download

    offline, cache = _offline(), hub_cache_dir()
    try:
        path = Path(snapshot_download(spec, cache_dir=str(cache), local_files_only=offline, ignore_patterns=_IGNORE))
    except Exception as e:  # noqa: BLE001 - LocalEntryNotFound, offline mode, 404, network: one line each
        if offline:
            raise ModelSourceError(f"model {spec!r} is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE=1: "
                                   f"download it once (`hf download {spec}`) or unset HF_HUB_OFFLINE") from None
        raise ModelSourceError(f"model {spec!r}: could not fetch it from the Hugging Face hub "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"model {spec!r}: its snapshot {path} has no config.json")
    logger.info("model %s resolved to %s", spec, path)
    return path


def model_max_len(model_dir: str | Path) -> tuple[Optional[int], str]:
    """The model's own length limit and where it comes from ("" when it declares none)."""
    d = Path(model_dir)
    cfg = json.loads((d / "config.json").read_text())
    best: tuple[Optional[int], str] = (None, "")
    for sec in _sections(cfg):
        for key in LENGTH_KEYS:
            v = sec.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0 and (best[0] is None or v < best[0]):
                best = (v, f"{key} in {d / 'config.json'}")
    tok_cfg = d / "tokenizer_config.json"
    if tok_cfg.is_file():
        v = json.loads(tok_cfg.read_text()).get("model_max_length")
        # Tokenizers without a limit store a huge sentinel (int(1e30)): not a limit.
        if isinstance(v, int) and 0 < v < 10**9 and (best[0] is None or v < best[0]):
            best = (v, f"model_max_length in {tok_cfg}")
    return best


#: config.json keys by which a model's forward changes the logits after `hidden @ lm_head.weight.T`
#: in a way the fused losses do not compute (transformers 5: Gemma-2's soft cap c·tanh(z/c)).
HEAD_TRANSFORM_KEYS = ("final_logit_softcapping",)
#: config.json keys of a constant factor on the logits, and whether the forward multiplies by it
#: (Cohere, Cohere2: `logits * logit_scale`) or divides (Granite and its MoE variants:
#: `logits / logits_scaling`). The loss applies it to the hidden state, which is exact.
LOGIT_SCALE_KEYS = {"logit_scale": True, "logits_scaling": False}


def checkpoint_tensors(model_dir: str | Path) -> dict[str, dict]:
    """{name: {"shape", "dtype"}} of a directory's safetensors tensors, read from the headers only
    (`safe_open` maps the file; `get_slice` reads no tensor data). Empty without safetensors files."""
    from safetensors import safe_open

    tensors: dict[str, dict] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                sl = fh.get_slice(name)
                tensors[name] = {"shape": list(sl.get_shape()), "dtype": sl.get_dtype()}
    return tensors


def output_head_transforms(config: dict, weight_names: set[str] = frozenset()) -> list[str]:
    """What a model's forward does to its logits beyond `hidden @ lm_head.weight.T`, from its
    config (and its checkpoint's tensor names: an `lm_head.bias`). Empty for a plain head."""
    found = [f"{key}={sec[key]}" for sec in _sections(config) for key in HEAD_TRANSFORM_KEYS
             if sec.get(key) not in (None, 0) and not isinstance(sec.get(key), bool)]
    if any(name.endswith("lm_head.bias") for name in weight_names):
        found.append("an lm_head bias")
    return sorted(set(found))


def output_logit_scale(config: dict) -> float:
    """The constant factor a model's forward puts on `hidden @ lm_head.weight.T` (1.0 for most)."""
    scale = 1.0
    for key, multiplies in LOGIT_SCALE_KEYS.items():
        values = {float(sec[key]) for sec in _sections(config)
                  if isinstance(sec.get(key), (int, float)) and not isinstance(sec.get(key), bool)}
        for v in values:
            if not (math.isfinite(v) and v > 0):
                raise ModelSourceError(f"{key}={v} in the model's config: a logit scale must be a positive number")
            scale = scale * v if multiplies else scale / v
    return scale


def _sections(config: dict) -> list[dict]:
    return [config] + [config[k] for k in ("text_config", "llm_config") if isinstance(config.get(k), dict)]


def head_transform_error(where: str, transforms: list[str]) -> str:
    return (f"model {where}: its forward changes the logits after the LM head ({', '.join(transforms)}). The "
            f"fused losses compute log-softmax(hidden @ lm_head.weight.T / temperature) and nothing else, "
            f"so the trained log-probs would not be the policy's that vLLM samples from (silently wrong "
            f"ratios and gradients). Such heads are not supported yet: train a model without them")


def check_output_head(model_dir: str | Path) -> None:
    """Raise ModelSourceError when the model's logits are not plain `hidden @ lm_head.weight.T`."""
    d = Path(model_dir)
    transforms = output_head_transforms(json.loads((d / "config.json").read_text()), set(checkpoint_tensors(d)))
    if transforms:
        raise ModelSourceError(head_transform_error(str(d), transforms))


def resolve_max_token_len(requested: Optional[int], model_dir: str | Path) -> int:
    """The run's one sequence length: `requested` if the model allows it, else the model's limit
    (capped at DEFAULT_MAX_TOKEN_LEN) when nothing was requested."""
    limit, where = model_max_len(model_dir)
    if requested is None:
        return min(DEFAULT_MAX_TOKEN_LEN, limit) if limit else DEFAULT_MAX_TOKEN_LEN
    if limit is not None and requested > limit:
        raise ModelSourceError(f"max_token_len {requested} exceeds the model's limit {limit} ({where}): set "
                               f"--max-token-len {limit} or less, or leave it unset to use {min(limit, DEFAULT_MAX_TOKEN_LEN)}")
    return requested
