"""Checkpoints: the policy in HF format for transformers/vLLM, plus everything needed to resume.

Layout of one checkpoint, `<dir>/step-00000042/`:
    config.json, generation_config.json, model.safetensors, tokenizer files
                        → `from_pretrained(path)` / `vllm --model path` load it as is
    state/              → torch.distributed.checkpoint (DCP) of {"model", "optim"}, sharded per rank
    trainer_state.pt    → step, scheduler state, caller's extra dict
    rng/rank<r>.pt      → torch (CPU, CUDA), python and numpy RNG states of each rank
    COMPLETE            → written last; a directory without it is not a checkpoint

Why both HF weights and a DCP model state: the HF copy is for serving and evaluation (one full
file gathered to rank 0, tied weights stored once); the DCP copy restores the sharded master
weights exactly and reshards when the world size changes, with no full-model gather on load.

Atomicity: everything is written into `<dir>/.tmp-step-00000042/`, then rank 0 writes COMPLETE
and renames the directory into place (a rename within one filesystem is atomic). A process killed
mid-write leaves only a `.tmp-*` directory, which `find_latest` ignores and the next save of that
step removes; the previous good checkpoint is never touched before the new one is complete.
Files from checkpoints are our own and are loaded with `weights_only=True` anyway.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import torch
from torch import nn

from . import dist as adist
from .checks import Ge, check_fields

logger = logging.getLogger(__name__)

__all__ = ["CheckpointConfig", "save_checkpoint", "load_checkpoint", "find_latest", "resolve_resume",
           "prune_checkpoints", "save_hf_model", "full_state_dict", "checkpoint_dir_for_step"]

_NAME = re.compile(r"^step-(\d{8})$")
_MARKER = "COMPLETE"


@dataclass
class CheckpointConfig:
    """Where and how often to checkpoint, and what to resume from."""

    dir: str = ""
    """Directory holding `step-XXXXXXXX/` checkpoints; empty disables checkpointing."""
    every: Annotated[int, Ge(0)] = 0
    """Save every K optimizer steps (0: only when the driver asks, e.g. at the end)."""
    keep_last: Annotated[int, Ge(0)] = 3
    """Keep the newest K complete checkpoints, delete older ones (0 keeps all)."""
    resume: Optional[str] = None
    """None: start fresh; "auto": the newest complete checkpoint in `dir` if any; or a path."""

    def __post_init__(self):
        check_fields(self, "checkpoint")
        if self.resume == "auto" and not self.dir:
            raise ValueError("checkpoint.resume='auto' needs checkpoint.dir")
        if self.every > 0 and not self.dir:
            raise ValueError("checkpoint.every > 0 needs checkpoint.dir")

    def should_save(self, step: int) -> bool:
        return bool(self.dir) and self.every > 0 and step % self.every == 0


def checkpoint_dir_for_step(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def find_latest(root: str | Path) -> Optional[Path]:
    """The newest COMPLETE checkpoint under `root`, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    best = None
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / _MARKER).is_file():
            if best is None or int(m.group(1)) > best[0]:
                best = (int(m.group(1)), p)
    return best[1] if best else None


def resolve_resume(cfg: CheckpointConfig) -> Optional[Path]:
    """The checkpoint to resume from per `cfg.resume` (None: start fresh)."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        latest = find_latest(cfg.dir)
        logger.info("resume=auto: %s", latest or f"no complete checkpoint in {cfg.dir}, starting fresh")
        return latest
    p = Path(cfg.resume)
    if not (p / _MARKER).is_file():
        raise ValueError(f"checkpoint.resume={cfg.resume!r} is not a complete checkpoint (no {_MARKER} file)")
    return p


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (0 keeps all); rank 0 only."""
    if keep_last <= 0 or not adist.is_main():
        return []
    root = Path(root)
    done = sorted((int(m.group(1)), p) for p in root.iterdir()
                  if (m := _NAME.match(p.name)) and (p / _MARKER).is_file())
    removed = [p for _, p in done[:-keep_last]]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    if removed:
        logger.info("pruned %d old checkpoint(s): %s", len(removed), [p.name for p in removed])
    return removed


def _tied_duplicates(model: nn.Module) -> list[str]:
    """Names of parameters that are the same tensor as an earlier one (e.g. a tied lm_head)."""
    seen, dups = {}, []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            dups.append(name)
        else:
            seen[id(p)] = name
    return dups


def full_state_dict(model: nn.Module) -> dict:
    """Full (unsharded) CPU state dict on rank 0 ({} on other ranks); collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if adist.is_main() else {}


def save_hf_model(model: nn.Module, out_dir: str | Path, tokenizer=None, dtype: Optional[torch.dtype] = None) -> None:
    """Write `model` as a HF checkpoint (safetensors + config [+ tokenizer]) on rank 0.

    Collective under FSDP (all ranks must call it). Tied weights are stored once, like
    `save_pretrained` does. `dtype` casts floating tensors (default: keep the master dtype).
    """
    from safetensors.torch import save_file

    dups = set(_tied_duplicates(model))
    sd = full_state_dict(model)
    if not adist.is_main():
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in sd.items():
        if k in dups:
            continue
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(str(out))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def _rng_state() -> dict:
    import numpy as np

    py = random.getstate()
    np_state = np.random.get_state()
    st = {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype("int64")), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    import numpy as np

    torch.set_rng_state(st["torch"])
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype("uint32"), n[2], n[3], n[4]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every call without a process group; one plain process is a supported mode."""
    with warnings.catch_warnings():
        if not adist.is_dist():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _commit(tmp: Path, final: Path) -> None:
    """Mark `tmp` complete and rename it to `final` (rank 0). Replacing an existing `final` of the
    same step moves it aside first, so some complete copy exists at every instant."""
    (tmp / _MARKER).write_text("ok\n")
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(root: str | Path, step: int, model: nn.Module, optimizer, scheduler=None, tokenizer=None,
                    *, extra: Optional[dict] = None, keep_last: int = 0) -> Path:
    """Save a complete, atomically committed checkpoint of `step`; collective (all ranks call it).

    Returns the final path `<root>/step-XXXXXXXX`. Prunes to `keep_last` afterwards (0 = keep all).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(root)
    final = checkpoint_dir_for_step(root, step)
    tmp = root / f".tmp-{final.name}"
    if adist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
        tmp.mkdir()
        (tmp / "rng").mkdir()
    adist.barrier()
    save_hf_model(model, tmp, tokenizer)
    msd, osd = get_state_dict(model, optimizer)
    with _quiet_single_process():
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "state"))
    torch.save(_rng_state(), tmp / "rng" / f"rank{adist.rank()}.pt")
    adist.barrier()
    if adist.is_main():
        torch.save({"step": int(step), "world_size": adist.world_size(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "extra": extra or {}}, tmp / "trainer_state.pt")
        _commit(tmp, final)
        prune_checkpoints(root, keep_last)
        logger.info("saved checkpoint %s", final)
    adist.barrier()
    return final


def load_checkpoint(path: str | Path, model: nn.Module, optimizer=None, scheduler=None, *,
                    restore_rng: bool = True) -> dict:
    """Restore model (and optimizer, scheduler, RNG) from a checkpoint written by `save_checkpoint`.

    Call after `apply_fsdp` and `build_optimizer`, on every rank. Works across world sizes (DCP
    reshards); RNG states are restored only when the world size is unchanged. Returns
    `{"step": int, "extra": dict}`.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    if not (path / _MARKER).is_file():
        raise ValueError(f"{path} is not a complete checkpoint (no {_MARKER} file)")
    msd, osd = get_state_dict(model, optimizer) if optimizer is not None else (get_state_dict(model, [])[0], None)
    state = {"model": msd} if optimizer is None else {"model": msd, "optim": osd}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path / "state"))
    if optimizer is None:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    ts = torch.load(path / "trainer_state.pt", weights_only=True)
    if scheduler is not None and ts.get("scheduler") is not None:
        scheduler.load_state_dict(ts["scheduler"])
    rng_file = path / "rng" / f"rank{adist.rank()}.pt"
    if restore_rng:
        if ts.get("world_size") == adist.world_size() and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        else:
            logger.warning("checkpoint %s: world size changed (%s → %d): RNG states not restored",
                           path, ts.get("world_size"), adist.world_size())
    logger.info("resumed from %s at step %d", path, ts["step"])
    return {"step": int(ts["step"]), "extra": ts.get("extra", {})}
