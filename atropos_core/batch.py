"""Atropos groups → validated groups → advantages → micro-batches (`atropos_core.types.TrainBatch`).

Why the checks: the trajectory API (atroposlib 0.4.0) checks nothing. It accepts and serves back
groups whose `tokens`/`masks`/`scores` counts or lengths disagree, over-long sequences, any integer
as a token id; a NaN/Infinity makes its `/batch` answer 500 (see `client.py`). One bad group must not
kill a step or, worse, train silently on misaligned data, so every group is checked here and a bad
one is dropped *whole* (its siblings give its advantages their meaning) with one logged line and a
`data/dropped/<reason>` counter. The good groups of the same batch go on.

Alignment: Atropos puts `masks`, `advantages`, `inference_logprobs` and `ref_logprobs` at position t
for token t (prompt positions: mask -100, inference logprob 1.0). The model predicts token t from
position t-1, so a sequence of L tokens becomes L-1 row positions: `input_ids = tokens[:-1]`,
`targets = tokens[1:]`, and every per-token field is taken at t+1 (see `types.py`). A mask on token 0
cannot be trained (nothing predicts it) and is ignored.

Advantages: token-level `advantages` sent by the environment are used as sent. Otherwise the GRPO
advantage of sequence i in group g is `(score_i - mean_g)`, divided by the group's std
(`advantage_scale="group"`), by the std of all scores in the batch (`"batch"`, the "group mean,
batch std" variant of Liu et al. 2025, *Tricks or Traps?*), or not at all (`"none"`, Dr. GRPO). Stds
are population stds; one below `advantage_eps` is treated as zero (the values stay centred, not
divided). Then optional whitening over the batch's trained tokens (`advantage_norm`), optional
clipping, and finally the per-sequence `overrides[i]["set_advantage_to_zero"]` (or the group's
`group_overrides`), whose sequences are left out of the whitening statistics.

Packing: a micro-batch's cost is rows × longest row when padded, the sum of lengths when packed,
and must fit `max_tokens_per_micro_batch` (a longer sequence gets a micro-batch of its own).
Sequences go longest first onto the least loaded of k micro-batches they fit in (LPT), for the
smallest k that works up to what first-fit-decreasing needs; if none does, first-fit-decreasing's
grouping is kept (it puts rows of similar length together: less padding). So micro-batches come
out few and with similar token counts. `TrainBatch.total_trained_tokens` counts the whole batch,
so the loss normaliser does not depend on the split. `split_for_ranks` gives every rank the same
number of micro-batches (FSDP issues the same collectives per forward/backward on every rank),
padding with an all-masked one.

Cost, measured on one busy CPU core: a batch of 64 groups × 16 sequences (1.27M tokens, both
logprob fields) builds in ~1 s, mostly turning JSON lists into arrays; its JSON (48 MB) takes
~6 s to encode and ~4 s to decode, so ship the bytes `/batch` sent rather than re-encoding.

Shipping: rank 0 fetches the batch and sends the raw groups to the other ranks as JSON bytes in a
uint8 tensor (`broadcast_groups`): nothing from the network is unpickled, and every rank then runs
the same deterministic `build_train_batch`, so "batch" and "global" normalisation agree and
`total_trained_tokens` is already the global count on every rank.

Ignored group fields: `messages`, `generation_params`, `images`, `env_id` (logged on a drop),
`distill_token_ids`, `distill_logprobs`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Annotated, Callable, Literal, Optional, Sequence

import numpy as np
import torch

from .checks import Finite, Ge, check_fields
from .types import MicroBatch, TrainBatch

logger = logging.getLogger(__name__)

# Drop reasons (the `<reason>` of `data/dropped/<reason>`), in the order the checks run.
DROP_REASONS = (
    "malformed",          # not a dict, a required key missing, or a field of the wrong type
    "count_mismatch",     # numbers of sequences differ across tokens/masks/scores/per-token fields
    "empty_sequence",     # a sequence with no tokens
    "length_mismatch",    # a sequence's tokens/masks/advantages/logprobs lengths differ
    "too_long",           # a sequence longer than max_token_len
    "token_out_of_range", # a token id < 0 or >= vocab_size
    "bad_mask",           # a mask entry neither -100 nor the token id at that position
    "non_finite",         # NaN/Infinity in scores, advantages or logprobs
    "bad_logprobs",       # a logprob > 0 at a trained position (misaligned or padded with 1.0)
    "bad_distill",        # distill_token_ids/distill_logprobs: one without the other, ragged top-k,
                          # k differing between the two fields, or an entry that is not a list
    "bad_temperature",    # a sampling temperature (overrides/generation_params/group_overrides)
                          # that is not a finite number > 0
    "missing_logprobs",   # use_inference_logprobs=True/use_ref_logprobs but the group lacks the field
    "no_trained_tokens",  # no position after the first has a mask != -100
    "duplicate",          # same tokens, trained positions and scores as a group already in this batch
)
IGNORE = -100           # Atropos's mask value for a position that is not trained
_LOGPROB_SLACK = 1e-4   # float noise allowed above 0 for a logprob

ReduceFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class DataConfig:
    """How Atropos groups become training tensors."""

    max_token_len: Annotated[int, Ge(2)] = 2048
    """Longest sequence (tokens, prompt included) kept; longer ones drop their group ("too_long").
    Keep it equal to `atropos.max_token_len`, which tells the environments the same limit."""
    vocab_size: Optional[Annotated[int, Ge(1)]] = None
    """Rows of the model's embedding: token ids must be in [0, vocab_size). None checks only >= 0
    (set it: an out-of-range id is an index error deep inside the embedding otherwise)."""
    pad_token_id: Annotated[int, Ge(0)] = 0
    """Token written in padded positions of `input_ids` (never trained, attention_mask 0)."""
    advantage_scale: Literal["group", "batch", "none"] = "group"
    """GRPO advantage from `scores` when a group sends no token `advantages`: score minus group mean,
    divided by the group std ("group"), the std of all scores in the batch ("batch"), or 1 ("none")."""
    advantage_norm: Literal["none", "batch", "global"] = "none"
    """Whitening of the token advantages over trained tokens: none, over this batch, or over all
    ranks ("global": needs `reduce_fn` in `build_train_batch` when ranks hold different data; when
    every rank builds the same full batch, as `broadcast_groups` arranges, it equals "batch")."""
    advantage_clip: Optional[tuple[float, float]] = None
    """[lo, hi] bounds for the final token advantages, or None."""
    advantage_eps: Annotated[float, Ge(0), Finite()] = 1e-6
    """A std at or below this counts as zero: advantages are centred but not divided by it."""
    max_tokens_per_micro_batch: Annotated[int, Ge(1)] = 8192
    """Budget of one micro-batch in tokens: rows × longest row when padded, total when packed."""
    layout: Literal["padded", "packed"] = "padded"
    """"padded": one sequence per row. "packed": all sequences of a micro-batch in one row with
    position_ids restarting per sequence and cu_seqlens. Attention must honour the boundaries:
    flash-attention varlen does; with transformers 5.19, SDPA given position_ids and no
    attention_mask builds the block-diagonal causal mask from the position resets
    (tests/test_loss.py::test_packed_row_equals_separate_rows)."""
    use_inference_logprobs: Optional[bool] = None
    """The sampler's `inference_logprobs` as the behaviour policy (`MicroBatch.old_logprobs`, used
    by `loss.is_mode`). None (default, "auto"): used whenever a group carries them; a group
    without them in such a batch is trained as on-policy (its `behaviour_mask` is 0: IS weight 1,
    PPO ratio 1, left out of the mismatch metrics) and counted in
    `data/groups_without_inference_logprobs`. True: required, groups without them are dropped
    ("missing_logprobs"). False: ignored."""
    use_ref_logprobs: bool = False
    """Put the environment's `ref_logprobs` into `MicroBatch.ref_logprobs` (KL penalty); groups
    without them are dropped ("missing_logprobs")."""

    def __post_init__(self):
        check_fields(self, "data")
        if self.vocab_size is not None and self.pad_token_id >= self.vocab_size:
            raise ValueError(f"data.pad_token_id must be in [0, vocab_size), got {self.pad_token_id}")
        if self.advantage_clip is not None:
            clip = tuple(self.advantage_clip)
            if len(clip) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in clip) \
                    or not clip[0] < clip[1]:
                raise ValueError("data.advantage_clip must be [lo, hi] with finite lo < hi, "
                                 f"got {self.advantage_clip!r}")
            self.advantage_clip = (float(clip[0]), float(clip[1]))


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

@dataclass
class _Seq:
    """One checked sequence, numpy arrays aligned with its tokens (unshifted)."""

    tokens: np.ndarray                      # (L,) int64
    trained: np.ndarray                     # (L,) bool: mask != -100 and position >= 1
    score: float
    advantages: Optional[np.ndarray]        # (L,) float64, as sent
    inference_logprobs: Optional[np.ndarray]
    ref_logprobs: Optional[np.ndarray]
    zero_advantage: bool
    temperature: Optional[float] = None     # sampling temperature, None = loss.temperature
    distill_ids: Optional[np.ndarray] = None    # (L, k) int64, rows valid where trained
    distill_logprobs: Optional[np.ndarray] = None  # (L, k) float64


class _Bad(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


_PER_TOKEN_FLOAT_FIELDS = ("advantages", "inference_logprobs", "ref_logprobs")


def _numeric_row(v, field: str, i: int, kinds: str, dtype, what: str) -> np.ndarray:
    """`v` as a flat 1-D array whose numpy kind is in `kinds`, cast to `dtype`; `_Bad` otherwise."""
    if not isinstance(v, list):
        raise _Bad("malformed", f"{field}[{i}] is {type(v).__name__}, not a list of {what}")
    if not v:
        return np.zeros(0, dtype=dtype)
    arr = np.asarray(v)
    if arr.ndim != 1 or arr.dtype.kind not in kinds:
        raise _Bad("malformed", f"{field}[{i}] is not a flat list of {what} (numpy read it as {arr.dtype}, "
                                f"ndim {arr.ndim})")
    return arr.astype(dtype, copy=False)


def _int_row(v, field: str, i: int) -> np.ndarray:
    return _numeric_row(v, field, i, "iu", np.int64, "integers")


def _float_row(v, field: str, i: int) -> np.ndarray:
    return _numeric_row(v, field, i, "iuf", np.float64, "numbers")


def _temperature(sources) -> Optional[float]:
    """The first `temperature` set in `sources` (dicts or None), Atropos's order of precedence."""
    for where, src in sources:
        if isinstance(src, dict) and src.get("temperature") is not None:
            t = src["temperature"]
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
                raise _Bad("bad_temperature", f"{where} temperature {t!r} is not a finite number > 0")
            return float(t)
    return None


def _distill_rows(ids_in, lps_in, i: int, L: int, trained: np.ndarray, cfg: DataConfig):
    """Sequence i's teacher top-k `(ids (L, k), logprobs (L, k))`, checked at trained positions."""
    if not isinstance(ids_in, list) or not isinstance(lps_in, list):
        raise _Bad("bad_distill", f"distill fields of sequence {i} are not lists")
    if len(ids_in) != L or len(lps_in) != L:
        raise _Bad("length_mismatch", f"sequence {i}: len(tokens)={L}, len(distill_token_ids)={len(ids_in)}, "
                                      f"len(distill_logprobs)={len(lps_in)}")
    pos = np.flatnonzero(trained)
    ks = set()
    for t in pos:
        a, b = ids_in[t], lps_in[t]
        if not isinstance(a, list) or not isinstance(b, list):
            raise _Bad("bad_distill", f"sequence {i} position {t}: top-k entries must be lists")
        if len(a) != len(b):
            raise _Bad("bad_distill", f"sequence {i} position {t}: k mismatch, {len(a)} ids vs {len(b)} logprobs")
        ks.add(len(a))
    if len(ks) > 1 or 0 in ks:
        raise _Bad("bad_distill", f"sequence {i}: ragged top-k at trained positions (k in {sorted(ks)})")
    k = ks.pop()
    ids_t = _int_row([x for t in pos for x in ids_in[t]], "distill_token_ids", i)
    lps_t = _float_row([x for t in pos for x in lps_in[t]], "distill_logprobs", i)
    if ids_t.min() < 0 or (cfg.vocab_size is not None and ids_t.max() >= cfg.vocab_size):
        raise _Bad("token_out_of_range", f"distill_token_ids[{i}] in [{ids_t.min()}, {ids_t.max()}], allowed "
                                         f"[0, {cfg.vocab_size if cfg.vocab_size is not None else 'inf'})")
    if not np.isfinite(lps_t).all():
        raise _Bad("non_finite", f"distill_logprobs[{i}] holds {lps_t[~np.isfinite(lps_t)][:3].tolist()}")
    if lps_t.max() > _LOGPROB_SLACK:
        raise _Bad("bad_logprobs", f"distill_logprobs[{i}] has {lps_t.max():.4g} > 0")
    ids = np.zeros((L, k), dtype=np.int64)
    lps = np.zeros((L, k), dtype=np.float64)
    ids[pos] = ids_t.reshape(len(pos), k)
    lps[pos] = lps_t.reshape(len(pos), k)
    return ids, lps


def _check_group(group, cfg: DataConfig) -> list[_Seq]:
    """Parse and check one group; raise `_Bad(reason, detail)` on the first problem found."""
    if not isinstance(group, dict):
        raise _Bad("malformed", f"group is {type(group).__name__}, not an object")
    for key in ("tokens", "masks", "scores"):
        if not isinstance(group.get(key), list):
            raise _Bad("malformed", f"{key!r} is {type(group.get(key)).__name__}, not a list")
    tokens_in, masks_in, scores_in = group["tokens"], group["masks"], group["scores"]
    n = len(tokens_in)
    if n == 0:
        raise _Bad("empty_sequence", "group has no sequences")
    per_token = {f: group.get(f) for f in _PER_TOKEN_FLOAT_FIELDS if group.get(f) is not None}
    if cfg.use_inference_logprobs and "inference_logprobs" not in per_token:
        raise _Bad("missing_logprobs", "data.use_inference_logprobs is true but the group has no inference_logprobs")
    if cfg.use_ref_logprobs and "ref_logprobs" not in per_token:
        raise _Bad("missing_logprobs", "data.use_ref_logprobs is set but the group has no ref_logprobs")
    overrides = group.get("overrides")
    counts = {"tokens": n, "masks": len(masks_in), "scores": len(scores_in)}
    for f, v in per_token.items():
        if not isinstance(v, list):
            raise _Bad("malformed", f"{f!r} is {type(v).__name__}, not a list")
        counts[f] = len(v)
    if overrides is not None:
        if not isinstance(overrides, list) or not all(o is None or isinstance(o, dict) for o in overrides):
            raise _Bad("malformed", "'overrides' must be a list of objects (or null)")
        # Atropos's BaseEnv sends [] when no item set one: treat that as "none".
        if overrides:
            counts["overrides"] = len(overrides)
    d_ids, d_lps = group.get("distill_token_ids"), group.get("distill_logprobs")
    d_ids, d_lps = (d_ids or None), (d_lps or None)       # [] = not sent, like overrides
    if (d_ids is None) != (d_lps is None):
        raise _Bad("bad_distill", "distill_token_ids and distill_logprobs must be sent together")
    if d_ids is not None:
        if not isinstance(d_ids, list) or not isinstance(d_lps, list):
            raise _Bad("bad_distill", "distill_token_ids/distill_logprobs must be lists [sequence][position][k]")
        counts["distill_token_ids"], counts["distill_logprobs"] = len(d_ids), len(d_lps)
    if len(set(counts.values())) != 1:
        raise _Bad("count_mismatch", "numbers of sequences differ: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    group_overrides = group.get("group_overrides")
    if group_overrides is not None and not isinstance(group_overrides, dict):
        raise _Bad("malformed", "'group_overrides' must be an object (or null)")
    gen_params = group.get("generation_params")
    if gen_params is not None and not isinstance(gen_params, dict):
        raise _Bad("malformed", "'generation_params' must be an object (or null)")
    group_zero = bool((group_overrides or {}).get("set_advantage_to_zero", False))

    scores = _float_row(scores_in, "scores", 0) if scores_in else np.zeros(0)
    if scores.shape != (n,):
        raise _Bad("malformed", "'scores' must be a flat list of numbers")
    if not np.isfinite(scores).all():
        raise _Bad("non_finite", f"scores hold {scores[~np.isfinite(scores)][:3].tolist()}")

    seqs = []
    for i in range(n):
        tok = _int_row(tokens_in[i], "tokens", i)
        mask = _int_row(masks_in[i], "masks", i)
        floats = {f: _float_row(v[i], f, i) for f, v in per_token.items()}
        L = len(tok)
        if L == 0:
            raise _Bad("empty_sequence", f"sequence {i} has no tokens")
        lens = {"tokens": L, "masks": len(mask), **{f: len(a) for f, a in floats.items()}}
        if len(set(lens.values())) != 1:
            raise _Bad("length_mismatch", f"sequence {i}: " + ", ".join(f"len({k})={v}" for k, v in lens.items()))
        if L > cfg.max_token_len:
            raise _Bad("too_long", f"sequence {i} has {L} tokens > data.max_token_len {cfg.max_token_len}")
        lo, hi = int(tok.min()), int(tok.max())
        if lo < 0 or (cfg.vocab_size is not None and hi >= cfg.vocab_size):
            raise _Bad("token_out_of_range", f"sequence {i} has token ids in [{lo}, {hi}], allowed "
                                             f"[0, {cfg.vocab_size if cfg.vocab_size is not None else 'inf'})")
        masked = mask == IGNORE
        if not np.all(masked | (mask == tok)):
            t = int(np.flatnonzero(~(masked | (mask == tok)))[0])
            raise _Bad("bad_mask", f"sequence {i} position {t}: mask {int(mask[t])} is neither -100 nor the "
                                   f"token id {int(tok[t])}")
        for f, a in floats.items():
            if not np.isfinite(a).all():
                raise _Bad("non_finite", f"{f}[{i}] holds {a[~np.isfinite(a)][:3].tolist()}")
        trained = ~masked
        trained[0] = False  # nothing predicts token 0
        for f in ("inference_logprobs", "ref_logprobs"):
            if f in floats and trained.any() and float(floats[f][trained].max()) > _LOGPROB_SLACK:
                raise _Bad("bad_logprobs", f"{f}[{i}] has {float(floats[f][trained].max()):.4g} > 0 at a trained "
                                           f"position (misaligned, or a prompt's 1.0 under a trained mask)")
        if not trained.any():
            raise _Bad("no_trained_tokens", f"sequence {i} has no trained position after the first token")
        ov = overrides[i] if overrides else None
        temp = _temperature(((f"overrides[{i}]", ov), ("generation_params", gen_params),
                             ("group_overrides", group_overrides)))
        dist = _distill_rows(d_ids[i], d_lps[i], i, L, trained, cfg) if d_ids is not None else (None, None)
        seqs.append(_Seq(tokens=tok, trained=trained, score=float(scores[i]),
                         advantages=floats.get("advantages"),
                         inference_logprobs=floats.get("inference_logprobs"),
                         ref_logprobs=floats.get("ref_logprobs"),
                         zero_advantage=group_zero or bool((ov or {}).get("set_advantage_to_zero", False)),
                         temperature=temp, distill_ids=dist[0], distill_logprobs=dist[1]))
    return seqs


def validate_group(group, cfg: DataConfig) -> tuple[bool, str]:
    """Check one Atropos group. Returns `(True, "")` or `(False, "<reason>: <detail>")`, where
    `<reason>` is one of `DROP_REASONS` (see `reason_key`)."""
    try:
        _check_group(group, cfg)
    except _Bad as e:
        return False, str(e)
    return True, ""


def reason_key(reason: str) -> str:
    """The `DROP_REASONS` entry of a `validate_group` reason string."""
    return reason.split(":", 1)[0]


def _group_digest(seqs: list[_Seq]) -> bytes:
    """Identity of a checked group for duplicate detection: tokens, trained positions, scores."""
    h = hashlib.blake2b(digest_size=16)
    for s in seqs:
        h.update(len(s.tokens).to_bytes(8, "little"))
        h.update(s.tokens.tobytes())
        h.update(np.packbits(s.trained).tobytes())
        h.update(np.float64(s.score).tobytes())
    return h.digest()


def filter_groups(groups: Sequence, cfg: DataConfig,
                  log_drops: bool = True) -> tuple[list[dict], list[list[_Seq]], dict]:
    """Drop bad groups whole. Returns (kept groups, their parsed sequences, metrics) where metrics
    has `data/dropped` (total) and `data/dropped/<reason>` for each reason that occurred. Each drop
    is logged as a warning, or at debug level with `log_drops=False` (ranks other than 0)."""
    kept, parsed, drops, seen = [], [], Counter(), set()
    dup_score_sum, dup_seqs = 0.0, 0
    for gi, group in enumerate(groups):
        try:
            seqs = _check_group(group, cfg)
            digest = _group_digest(seqs)
            if digest in seen:
                # A converged policy samples identical groups for real (8 equal right answers), so a
                # duplicate is valid data we do not train on twice: its scores still count in the
                # reward statistics (`data/duplicate_*`), or reward would fall as the policy improves.
                dup_score_sum += sum(s.score for s in seqs)
                dup_seqs += len(seqs)
                raise _Bad("duplicate", "same tokens, masks and scores as an earlier group of this batch")
        except _Bad as e:
            drops[e.reason] += 1
            env = group.get("env_id") if isinstance(group, dict) else None
            logger.log(logging.WARNING if log_drops else logging.DEBUG,
                       "dropping group %d of the batch (env_id=%s): %s", gi, env, e)
            continue
        seen.add(digest)
        kept.append(group)
        parsed.append(seqs)
    metrics = {"data/dropped": sum(drops.values())}
    metrics.update({f"data/dropped/{r}": c for r, c in sorted(drops.items())})
    if dup_seqs:
        metrics.update({"data/duplicate_sequences": dup_seqs, "data/duplicate_score_sum": dup_score_sum})
    return kept, parsed, metrics


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------

def _std(x: np.ndarray) -> float:
    # Scores near ±1e300 overflow to inf here (numpy would warn); dividing by it zeroes the advantages.
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.sqrt(np.mean((x - x.mean()) ** 2))) if x.size else 0.0


def compute_advantages(parsed: list[list[_Seq]], cfg: DataConfig,
                       reduce_fn: Optional[ReduceFn] = None) -> list[np.ndarray]:
    """Token advantages per sequence (flattened over groups), aligned with tokens, zero where not
    trained. `reduce_fn` (for advantage_norm="global") sums a float64 tensor across ranks, e.g.
    `lambda t: (dist.all_reduce(t), t)[1]`."""
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
    if cfg.advantage_norm != "none":
        vals = np.concatenate([a[m] for a, m in zip(out, live)]) if out else np.zeros(0)
        reduce = reduce_fn if cfg.advantage_norm == "global" else None
        stats = torch.tensor([float(vals.size), float(vals.sum())], dtype=torch.float64)
        if reduce is not None:
            stats = reduce(stats)
        count, total = float(stats[0]), float(stats[1])
        if count > 0:
            mean = total / count
            sq = torch.tensor([float(((vals - mean) ** 2).sum())], dtype=torch.float64)
            if reduce is not None:
                sq = reduce(sq)
            std = math.sqrt(float(sq[0]) / count)
            for k, (a, m) in enumerate(zip(out, live)):
                a = np.where(m, a - mean, 0.0)
                out[k] = a / std if std > cfg.advantage_eps else a
    if cfg.advantage_clip is not None:
        lo, hi = cfg.advantage_clip
        out = [np.clip(a, lo, hi) for a in out]
    for k, s in enumerate(seqs):
        out[k] = np.where(live[k], out[k], 0.0)
    return out


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------

def _cost(rows: int, longest: int, total: int, padded: bool) -> int:
    return rows * longest if padded else total


def _first_fit(order: list[int], lengths: Sequence[int], budget: int, padded: bool) -> list[list[int]]:
    """First-fit in `order` (longest first, so a bin's first sequence is its longest)."""
    bins: list[list[int]] = []
    totals: list[int] = []
    for i in order:
        for b, members in enumerate(bins):
            if _cost(len(members) + 1, lengths[members[0]], totals[b] + lengths[i], padded) <= budget:
                members.append(i)
                totals[b] += lengths[i]
                break
        else:
            bins.append([i])
            totals.append(lengths[i])
    return bins


def _balanced(order: list[int], lengths: Sequence[int], budget: int, padded: bool, k: int) -> Optional[list[list[int]]]:
    """Longest first onto the least loaded of `k` micro-batches it fits in; None if one fits nowhere.
    Vectorised over the k micro-batches (a 1k-sequence batch plans in milliseconds)."""
    bins: list[list[int]] = [[] for _ in range(k)]
    rows = np.zeros(k, dtype=np.int64)
    longest = np.zeros(k, dtype=np.int64)
    totals = np.zeros(k, dtype=np.int64)
    loads = np.zeros(k, dtype=np.int64)
    for i in order:
        n = lengths[i]
        new_cost = (rows + 1) * np.maximum(longest, n) if padded else totals + n
        fits = new_cost <= budget
        if not fits.any():
            return None
        b = int(np.argmin(np.where(fits, loads, np.iinfo(np.int64).max)))  # first of the least loaded
        bins[b].append(i)
        rows[b] += 1
        longest[b] = max(longest[b], n)
        totals[b] += n
        loads[b] = new_cost[b]
    return [b for b in bins if b]


def plan_micro_batches(lengths: Sequence[int], budget: int, padded: bool) -> list[list[int]]:
    """Indices of the sequences in each micro-batch (sorted within it): a sequence longer than
    `budget` alone; the rest in as few micro-batches as first-fit-decreasing needs, spread evenly
    by cost (longest-processing-time first onto the least loaded micro-batch) when that many
    balanced micro-batches suffice, else first-fit-decreasing's own grouping (which keeps rows of
    similar length together: less padding)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    alone = [[i] for i in order if lengths[i] > budget]
    rest = [i for i in order if lengths[i] <= budget]
    if not rest:
        return alone
    packed_ffd = _first_fit(rest, lengths, budget, padded)
    for k in range(max(1, math.ceil(sum(lengths[i] for i in rest) / budget)), len(packed_ffd) + 1):
        bins = _balanced(rest, lengths, budget, padded, k)
        if bins is not None:
            return alone + [sorted(b) for b in bins]
    return alone + [sorted(b) for b in packed_ffd]


@dataclass
class _Row:
    """One sequence shifted for training: position t predicts targets[t] = tokens[t+1]."""

    input_ids: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    advantages: np.ndarray
    old_logprobs: Optional[np.ndarray]
    ref_logprobs: Optional[np.ndarray]
    seq_id: int
    temperature: float = 0.0                     # 0 = loss.temperature
    distill_ids: Optional[np.ndarray] = None     # (L-1, k)
    distill_logprobs: Optional[np.ndarray] = None


@dataclass
class _Fields:
    """Which optional tensors the micro-batches of one batch carry (the same for all of them, so
    every rank and micro-batch sees the same structure)."""

    old: bool = False
    ref: bool = False
    temperature: bool = False
    distill_k: int = 0


def _shift(s: _Seq, adv: np.ndarray, seq_id: int, cfg: DataConfig, fields: _Fields) -> _Row:
    m = s.trained[1:]
    lp = lambda a: np.where(m, a[1:], 0.0) if a is not None else None  # noqa: E731 - prompt 1.0s go
    d_ids = d_lps = None
    if fields.distill_k:
        k = fields.distill_k
        d_ids = np.full((len(m), k), -1, dtype=np.int64)   # -1: no teacher for this row
        d_lps = np.zeros((len(m), k), dtype=np.float64)
        if s.distill_ids is not None:
            # sorted by the teacher's logprob, then cut to the batch's smallest k: the top-k' of a
            # top-k is the top-k' (vLLM also appends the sampled token after the top-k)
            order = np.argsort(-s.distill_logprobs[1:], axis=1, kind="stable")[:, :k]
            d_ids = np.where(m[:, None], np.take_along_axis(s.distill_ids[1:], order, 1), -1)
            d_lps = np.where(m[:, None], np.take_along_axis(s.distill_logprobs[1:], order, 1), 0.0)
    return _Row(input_ids=s.tokens[:-1], targets=s.tokens[1:], loss_mask=m.astype(np.float32),
                advantages=np.where(m, adv[1:], 0.0),
                old_logprobs=lp(s.inference_logprobs) if fields.old else None,
                ref_logprobs=lp(s.ref_logprobs) if fields.ref else None, seq_id=seq_id,
                temperature=s.temperature or 0.0, distill_ids=d_ids, distill_logprobs=d_lps)


def _make_micro_batch(rows: list[_Row], cfg: DataConfig, fields: Optional[_Fields] = None) -> MicroBatch:
    fields = fields or _Fields(old=bool(cfg.use_inference_logprobs), ref=cfg.use_ref_logprobs)
    with_old, with_ref = fields.old, fields.ref
    if cfg.layout == "packed":
        T = sum(len(r.input_ids) for r in rows)
        shape = (1, T)
        placements = [(r, 0, off) for r, off in zip(rows, np.cumsum([0] + [len(r.input_ids) for r in rows[:-1]]))]
    else:
        T = max(len(r.input_ids) for r in rows)
        shape = (len(rows), T)
        placements = [(r, k, 0) for k, r in enumerate(rows)]
    input_ids = torch.full(shape, cfg.pad_token_id, dtype=torch.int64)
    targets = torch.zeros(shape, dtype=torch.int64)
    loss_mask = torch.zeros(shape, dtype=torch.float32)
    advantages = torch.zeros(shape, dtype=torch.float32)
    attention_mask = torch.zeros(shape, dtype=torch.int64)
    position_ids = torch.zeros(shape, dtype=torch.int64)
    sequence_ids = torch.full(shape, -1, dtype=torch.int64)
    old = torch.zeros(shape, dtype=torch.float32) if with_old else None
    bmask = torch.zeros(shape, dtype=torch.bool) if with_old else None
    ref = torch.zeros(shape, dtype=torch.float32) if with_ref else None
    temp = torch.zeros(shape, dtype=torch.float32) if fields.temperature else None
    k = fields.distill_k
    d_ids = torch.full(shape + (k,), -1, dtype=torch.int64) if k else None
    d_lps = torch.zeros(shape + (k,), dtype=torch.float32) if k else None
    for r, row, off in placements:
        n = len(r.input_ids)
        sl = (row, slice(int(off), int(off) + n))
        input_ids[sl] = torch.from_numpy(r.input_ids)
        targets[sl] = torch.from_numpy(r.targets)
        loss_mask[sl] = torch.from_numpy(r.loss_mask)
        advantages[sl] = torch.from_numpy(r.advantages).to(torch.float32)
        attention_mask[sl] = 1
        position_ids[sl] = torch.arange(n)
        sequence_ids[sl] = r.seq_id
        if with_old and r.old_logprobs is not None:
            old[sl] = torch.from_numpy(r.old_logprobs).to(torch.float32)
            bmask[sl] = True
        if with_ref:
            ref[sl] = torch.from_numpy(r.ref_logprobs).to(torch.float32)
        if temp is not None:
            temp[sl] = r.temperature
        if k:
            d_ids[sl] = torch.from_numpy(r.distill_ids)
            d_lps[sl] = torch.from_numpy(r.distill_logprobs).to(torch.float32)
    cu = None
    if cfg.layout == "packed":
        cu = torch.tensor([0] + np.cumsum([len(r.input_ids) for r in rows]).tolist(), dtype=torch.int32)
    return MicroBatch(input_ids=input_ids, targets=targets, loss_mask=loss_mask, advantages=advantages,
                      attention_mask=attention_mask, position_ids=position_ids, old_logprobs=old,
                      ref_logprobs=ref, layout=cfg.layout, cu_seqlens=cu, num_sequences=len(rows),
                      sequence_ids=sequence_ids, behaviour_mask=bmask, temperature=temp,
                      distill_ids=d_ids, distill_logprobs=d_lps)


_logged_behaviour = False


def _batch_fields(seqs: list[_Seq], cfg: DataConfig, log: bool) -> tuple[_Fields, dict]:
    """The optional fields of this batch and the counters that explain them (see `DataConfig`)."""
    global _logged_behaviour
    with_inf = [s.inference_logprobs is not None for s in seqs]
    old = bool(cfg.use_inference_logprobs) or (cfg.use_inference_logprobs is None and any(with_inf))
    metrics = {}
    if old:
        metrics["data/sequences_without_inference_logprobs"] = sum(not w for w in with_inf)
        if not _logged_behaviour and log:
            logger.info("batches carry inference_logprobs: they are the behaviour policy of the loss "
                        "(data.use_inference_logprobs=%s; see loss.is_mode). Sequences without them are "
                        "trained as on-policy and counted in data/sequences_without_inference_logprobs",
                        {None: "auto", True: "true"}[cfg.use_inference_logprobs])
            _logged_behaviour = True
    ks = [s.distill_ids.shape[1] for s in seqs if s.distill_ids is not None]
    if ks:
        metrics["data/distill_top_k"] = min(ks)
        metrics["data/sequences_without_distill"] = len(seqs) - len(ks)
    fields = _Fields(old=old, ref=cfg.use_ref_logprobs, temperature=any(s.temperature is not None for s in seqs),
                     distill_k=min(ks) if ks else 0)
    return fields, metrics


def build_train_batch(groups: Sequence, cfg: DataConfig, reduce_fn: Optional[ReduceFn] = None,
                      log_drops: bool = True) -> TrainBatch:
    """Validate, compute advantages and pack one Atropos batch (a list of groups as `/batch` sends).

    Sequences are numbered in the order of the kept groups (`MicroBatch.sequence_ids`,
    `TrainBatch.scores`). With every group dropped, `micro_batches` is empty and
    `total_trained_tokens` 0: skip the step. Pass `log_drops=False` on all ranks but one.
    """
    kept, parsed, metrics = filter_groups(groups, cfg, log_drops)
    seqs = [s for g in parsed for s in g]
    advs = compute_advantages(parsed, cfg, reduce_fn)
    fields, field_metrics = _batch_fields(seqs, cfg, log_drops)
    metrics.update(field_metrics)
    rows = [_shift(s, a, k, cfg, fields) for k, (s, a) in enumerate(zip(seqs, advs))]
    plan = plan_micro_batches([len(r.input_ids) for r in rows], cfg.max_tokens_per_micro_batch,
                              padded=cfg.layout == "padded")
    mbs = [_make_micro_batch([rows[i] for i in idx], cfg, fields) for idx in plan]
    trained = int(sum(r.loss_mask.sum() for r in rows))
    real = sum(len(r.input_ids) for r in rows)
    slots = sum(mb.input_ids.numel() for mb in mbs)
    all_adv = np.concatenate([r.advantages[r.loss_mask > 0] for r in rows]) if rows else np.zeros(0)
    metrics.update({
        "data/groups": len(kept),
        "data/sequences": len(seqs),
        "data/tokens": real,
        "data/trained_tokens": trained,
        "data/micro_batches": len(mbs),
        "data/padding_fraction": (1.0 - real / slots) if slots else 0.0,
        "data/seq_len_mean": (real / len(rows)) if rows else 0.0,
        "data/advantage_mean": float(all_adv.mean()) if all_adv.size else 0.0,
        "data/advantage_abs_mean": float(np.abs(all_adv).mean()) if all_adv.size else 0.0,
    })
    return TrainBatch(micro_batches=mbs, total_trained_tokens=trained, num_groups=len(kept),
                      num_sequences=len(seqs), scores=[s.score for s in seqs], metrics=metrics)


def _dummy_like(mb: MicroBatch, pad_token_id: int) -> MicroBatch:
    """A 1×1 micro-batch that trains nothing. Its one token is attended (attention_mask 1): a row
    with no attended key gives NaN attention, and NaN × 0 is still NaN in the loss."""
    zeros = lambda dt: torch.zeros((1, 1), dtype=dt)  # noqa: E731
    return MicroBatch(
        input_ids=torch.full((1, 1), pad_token_id, dtype=torch.int64),
        targets=zeros(torch.int64), loss_mask=zeros(torch.float32), advantages=zeros(torch.float32),
        attention_mask=torch.ones((1, 1), dtype=torch.int64), position_ids=zeros(torch.int64),
        old_logprobs=zeros(torch.float32) if mb.old_logprobs is not None else None,
        ref_logprobs=zeros(torch.float32) if mb.ref_logprobs is not None else None,
        behaviour_mask=zeros(torch.bool) if mb.behaviour_mask is not None else None,
        temperature=zeros(torch.float32) if mb.temperature is not None else None,
        distill_ids=torch.full((1, 1) + mb.distill_ids.shape[2:], -1, dtype=torch.int64) if mb.distill_ids is not None else None,
        distill_logprobs=torch.zeros((1, 1) + mb.distill_ids.shape[2:]) if mb.distill_ids is not None else None,
        layout=mb.layout, cu_seqlens=torch.tensor([0, 1], dtype=torch.int32) if mb.layout == "packed" else None,
        num_sequences=0, sequence_ids=torch.full((1, 1), -1, dtype=torch.int64))


def split_for_ranks(micro_batches: Sequence[MicroBatch], world_size: int,
                    pad_token_id: int = 0) -> list[list[MicroBatch]]:
    """Share micro-batches between ranks, balanced by token slots (rows × length), with the SAME
    number per rank: FSDP runs the same collectives per forward/backward on every rank, so a rank
    with one micro-batch fewer would hang the others. Short ranks get an all-masked 1×1 micro-batch
    (it must still go through forward and backward). Deterministic: every rank computes the same
    split and takes `result[rank]`."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not micro_batches:
        raise ValueError("split_for_ranks needs at least one micro-batch (an empty batch is a skipped step)")
    per_rank = math.ceil(len(micro_batches) / world_size)
    order = sorted(range(len(micro_batches)), key=lambda i: (-micro_batches[i].input_ids.numel(), i))
    shares: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for i in order:
        r = min((r for r in range(world_size) if len(shares[r]) < per_rank), key=lambda r: (loads[r], r))
        shares[r].append(i)
        loads[r] += micro_batches[i].input_ids.numel()
    out = []
    for share in shares:
        mbs = [micro_batches[i] for i in sorted(share)]
        mbs += [_dummy_like(micro_batches[0], pad_token_id) for _ in range(per_rank - len(mbs))]
        out.append(mbs)
    return out


# ---------------------------------------------------------------------------------------------
# Shipping raw groups between ranks (JSON in a uint8 tensor: no pickle)
# ---------------------------------------------------------------------------------------------

def groups_to_json_bytes(groups: Sequence) -> bytes:
    """Encode a batch as compact JSON. NaN/Infinity are kept (as Python's json writes them) so the
    receiving side drops those groups exactly as rank 0 would."""
    return json.dumps(list(groups), separators=(",", ":"), allow_nan=True).encode("utf-8")


def groups_from_json_bytes(data: bytes) -> list[dict]:
    """Decode a batch: a JSON list of groups, or a `/batch` answer `{"batch": [...]}`."""
    out = json.loads(bytes(data).decode("utf-8"))
    if isinstance(out, dict) and isinstance(out.get("batch"), list):
        out = out["batch"]
    if not isinstance(out, list):
        raise ValueError(f"a batch must decode to a JSON list of groups, got {type(out).__name__}")
    return out


def groups_to_tensor(groups: Sequence) -> torch.Tensor:
    """The batch as a 1-D uint8 tensor (for torch.distributed broadcast)."""
    return torch.frombuffer(bytearray(groups_to_json_bytes(groups)), dtype=torch.uint8)


def groups_from_tensor(t: torch.Tensor) -> list[dict]:
    return groups_from_json_bytes(t.detach().to("cpu", torch.uint8).numpy().tobytes())


def broadcast_groups(groups: Optional[Sequence] = None, src: int = 0, group=None,
                     device: torch.device | str = "cpu", raw: Optional[bytes] = None) -> list[dict]:
    """Send the raw groups of global rank `src` to every rank of the process group (length, then
    payload) and return them on every rank. On `src` pass `groups`, or `raw`: the JSON bytes they
    came as (`AtroposClient.last_raw`), which skips re-encoding (JSON encoding is the larger half
    of the cost: ~6 s for a 48 MB batch on one slow core). Other ranks pass nothing. `device` must
    suit the backend ("cuda" for NCCL)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    if rank == src:
        if raw is None and groups is None:
            raise ValueError("broadcast_groups: the source rank must pass groups or raw")
        data = raw if raw is not None else groups_to_json_bytes(groups)
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(size, src=src, group=group)
    if rank != src:
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(payload, src=src, group=group)
    if rank == src:
        return list(groups) if groups is not None else groups_from_json_bytes(raw)
    return groups_from_tensor(payload)
