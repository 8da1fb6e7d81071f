"""Advantages: checked groups → one token-advantage array per sequence.

Token-level `advantages` sent by the environment are used as sent. Otherwise the GRPO advantage of
sequence i in group g is `(score_i - mean_g)`, divided by the group's std (`advantage_scale="group"`),
by the std of all scores in the batch (`"batch"`, the "group mean, batch std" variant of Liu et al.
2025, *Tricks or Traps?*), or not at all (`"none"`, Dr. GRPO). Stds are population stds; one at or
below `advantage_eps` is treated as zero (the values stay centred, not divided). Then optional
whitening over the batch's trained tokens (`advantage_norm="batch"`; every rank builds the same full
batch, so it is the global whitening too), optional clipping, and finally the per-sequence
`overrides[i]["set_advantage_to_zero"]` (or the group's `group_overrides`), whose sequences are left
out of the whitening statistics.
"""
from __future__ import annotations

import math

import numpy as np

from .config import DataConfig
from .validate import CheckedSeq


def _std(x: np.ndarray) -> float:
    # Scores near ±1e300 overflow to inf here (numpy would warn); dividing by it zeroes the advantages.
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.sqrt(np.mean((x - x.mean()) ** 2))) if x.size else 0.0


def compute_advantages(parsed: list[list[CheckedSeq]], cfg: DataConfig) -> list[np.ndarray]:
    """Token advantages per sequence (flattened over groups), aligned with tokens, zero where not
    trained."""
    score_groups = [g for g in parsed if g[0].advantages is None]
    batch_std = _std(np.array([s.score for g in score_groups for s in g])) if score_groups else 0.0
    out: list[np.ndarray] = []
    for g in parsed:
        if g[0].advantages is not None:
            for s in g:
                out.append(np.where(s.trained, s.advantages, 0.0))
            continue
        scores = np.array([s.score for s in g])
        centred = scores - scores.mean()
        scale = {"group": _std(scores), "batch": batch_std, "none": 1.0}[cfg.advantage_scale]
        if scale > cfg.advantage_eps:
            centred = centred / scale
        for s, a in zip(g, centred):
            out.append(np.where(s.trained, a, 0.0))
    seqs = [s for g in parsed for s in g]
    live = [s.trained & (not s.zero_advantage) for s in seqs]   # bool (L,): positions the statistics see
    if cfg.advantage_norm == "batch":
        vals = np.concatenate([a[m] for a, m in zip(out, live)]) if out else np.zeros(0)
        if vals.size:
            mean = float(vals.sum()) / vals.size
            std = math.sqrt(float(((vals - mean) ** 2).sum()) / vals.size)
            for k, (a, m) in enumerate(zip(out, live)):
                a = np.where(m, a - mean, 0.0)
                out[k] = a / std if std > cfg.advantage_eps else a
    if cfg.advantage_clip is not None:
        lo, hi = cfg.advantage_clip
        out = [np.clip(a, lo, hi) for a in out]
    for k, s in enumerate(seqs):
        out[k] = np.where(live[k], out[k], 0.0)
    return out

