"""Validation: one Atropos group → its checked sequences, or a drop with a reason.

Why the checks: the trajectory API (atroposlib 0.4.0) checks nothing. It accepts and serves back
groups whose `tokens`/`masks`/`scores` counts or lengths disagree, over-long sequences, any integer
as a token id; a NaN/Infinity makes its `/batch` answer 500 (see `client.py`). One bad group must not
kill a step or, worse, train silently on misaligned data, so every group is checked here and a bad
one is dropped *whole* (its siblings give its advantages their meaning) with one logged line and a
`data/dropped/<reason>` counter. The good groups of the same batch go on.

A mask on token 0 cannot be trained (nothing predicts it) and is ignored. A group identical to an
earlier one of the batch (tokens, trained positions, scores) is dropped as "duplicate"; its scores
still count in the reward statistics.

Ignored group fields: `messages`, `images`, `env_id` (logged on a drop).
"""
from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .config import DataConfig

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


@dataclass
class CheckedSeq:
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


class BadGroup(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


_PER_TOKEN_FLOAT_FIELDS = ("advantages", "inference_logprobs", "ref_logprobs")


def _numeric_row(v, field: str, i: int, kinds: str, dtype, what: str) -> np.ndarray:
    """`v` as a flat 1-D array whose numpy kind is in `kinds`, cast to `dtype`; `BadGroup` otherwise."""
    if not isinstance(v, list):
        raise BadGroup("malformed", f"{field}[{i}] is {type(v).__name__}, not a list of {what}")
    if not v:
        return np.zeros(0, dtype=dtype)
    arr = np.asarray(v)
    if arr.ndim != 1 or arr.dtype.kind not in kinds:
        raise BadGroup("malformed", f"{field}[{i}] is not a flat list of {what} (numpy read it as {arr.dtype}, "
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
                raise BadGroup("bad_temperature", f"{where} temperature {t!r} is not a finite number > 0")
            return float(t)
    return None


def _distill_rows(ids_in, lps_in, i: int, L: int, trained: np.ndarray, cfg: DataConfig):
    """Sequence i's teacher top-k `(ids (L, k), logprobs (L, k))`, checked at trained positions."""
    if not isinstance(ids_in, list) or not isinstance(lps_in, list):
        raise BadGroup("bad_distill", f"distill fields of sequence {i} are not lists")
    if len(ids_in) != L or len(lps_in) != L:
        raise BadGroup("length_mismatch", f"sequence {i}: len(tokens)={L}, len(distill_token_ids)={len(ids_in)}, "
                                      f"len(distill_logprobs)={len(lps_in)}")
    pos = np.flatnonzero(trained)
    ks = set()
    for t in pos:
        a, b = ids_in[t], lps_in[t]
        if not isinstance(a, list) or not isinstance(b, list):
            raise BadGroup("bad_distill", f"sequence {i} position {t}: top-k entries must be lists")
        if len(a) != len(b):
            raise BadGroup("bad_distill", f"sequence {i} position {t}: k mismatch, {len(a)} ids vs {len(b)} logprobs")
        ks.add(len(a))
    if len(ks) > 1 or 0 in ks:
        raise BadGroup("bad_distill", f"sequence {i}: ragged top-k at trained positions (k in {sorted(ks)})")
    k = ks.pop()
    ids_t = _int_row([x for t in pos for x in ids_in[t]], "distill_token_ids", i)
    lps_t = _float_row([x for t in pos for x in lps_in[t]], "distill_logprobs", i)
    if ids_t.min() < 0 or (cfg.vocab_size is not None and ids_t.max() >= cfg.vocab_size):
        raise BadGroup("token_out_of_range", f"distill_token_ids[{i}] in [{ids_t.min()}, {ids_t.max()}], allowed "
                                         f"[0, {cfg.vocab_size if cfg.vocab_size is not None else 'inf'})")
    if not np.isfinite(lps_t).all():
        raise BadGroup("non_finite", f"distill_logprobs[{i}] holds {lps_t[~np.isfinite(lps_t)][:3].tolist()}")
    if lps_t.max() > _LOGPROB_SLACK:
        raise BadGroup("bad_logprobs", f"distill_logprobs[{i}] has {lps_t.max():.4g} > 0")
    ids = np.zeros((L, k), dtype=np.int64)
    lps = np.zeros((L, k), dtype=np.float64)
    ids[pos] = ids_t.reshape(len(pos), k)
    lps[pos] = lps_t.reshape(len(pos), k)
    return ids, lps


def _check_group(group, cfg: DataConfig) -> list[CheckedSeq]:
    """Parse and check one group; raise `BadGroup(reason, detail)` on the first problem found."""
    if not isinstance(group, dict):
        raise BadGroup("malformed", f"group is {type(group).__name__}, not an object")
    for key in ("tokens", "masks", "scores"):
        if not isinstance(group.get(key), list):
            raise BadGroup("malformed", f"{key!r} is {type(group.get(key)).__name__}, not a list")
    tokens_in, masks_in, scores_in = group["tokens"], group["masks"], group["scores"]
    n = len(tokens_in)
    if n == 0:
        raise BadGroup("empty_sequence", "group has no sequences")
    per_token = {f: group.get(f) for f in _PER_TOKEN_FLOAT_FIELDS if group.get(f) is not None}
    if cfg.use_inference_logprobs and "inference_logprobs" not in per_token:
        raise BadGroup("missing_logprobs", "data.use_inference_logprobs is true but the group has no inference_logprobs")
    if cfg.use_ref_logprobs and "ref_logprobs" not in per_token:
        raise BadGroup("missing_logprobs", "data.use_ref_logprobs is set but the group has no ref_logprobs")
    overrides = group.get("overrides")
    counts = {"tokens": n, "masks": len(masks_in), "scores": len(scores_in)}
    for f, v in per_token.items():
        if not isinstance(v, list):
            raise BadGroup("malformed", f"{f!r} is {type(v).__name__}, not a list")
        counts[f] = len(v)
    if overrides is not None:
        if not isinstance(overrides, list) or not all(o is None or isinstance(o, dict) for o in overrides):
            raise BadGroup("malformed", "'overrides' must be a list of objects (or null)")
        # Atropos's BaseEnv sends [] when no item set one: treat that as "none".
        if overrides:
            counts["overrides"] = len(overrides)
    d_ids, d_lps = group.get("distill_token_ids"), group.get("distill_logprobs")
    d_ids, d_lps = (d_ids or None), (d_lps or None)       # [] = not sent, like overrides
    if (d_ids is None) != (d_lps is None):
        raise BadGroup("bad_distill", "distill_token_ids and distill_logprobs must be sent together")
    if d_ids is not None:
        if not isinstance(d_ids, list) or not isinstance(d_lps, list):
            raise BadGroup("bad_distill", "distill_token_ids/distill_logprobs must be lists [sequence][position][k]")
        counts["distill_token_ids"], counts["distill_logprobs"] = len(d_ids), len(d_lps)
    if len(set(counts.values())) != 1:
        raise BadGroup("count_mismatch", "numbers of sequences differ: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    group_overrides = group.get("group_overrides")
    if group_overrides is not None and not isinstance(group_overrides, dict):
        raise BadGroup("malformed", "'group_overrides' must be an object (or null)")
    gen_params = group.get("generation_params")
    if gen_params is not None and not isinstance(gen_params, dict):
        raise BadGroup("malformed", "'generation_params' must be an object (or null)")
    group_zero = bool((group_overrides or {}).get("set_advantage_to_zero", False))

    scores = _float_row(scores_in, "scores", 0) if scores_in else np.zeros(0)
    if scores.shape != (n,):
        raise BadGroup("malformed", "'scores' must be a flat list of numbers")
    if not np.isfinite(scores).all():
        raise BadGroup("non_finite", f"scores hold {scores[~np.isfinite(scores)][:3].tolist()}")

    seqs = []
    for i in range(n):
        tok = _int_row(tokens_in[i], "tokens", i)
        mask = _int_row(masks_in[i], "masks", i)
        floats = {f: _float_row(v[i], f, i) for f, v in per_token.items()}
        L = len(tok)
        if L == 0:
            raise BadGroup("empty_sequence", f"sequence {i} has no tokens")
        lens = {"tokens": L, "masks": len(mask), **{f: len(a) for f, a in floats.items()}}
        if len(set(lens.values())) != 1:
            raise BadGroup("length_mismatch", f"sequence {i}: " + ", ".join(f"len({k})={v}" for k, v in lens.items()))
        if L > cfg.max_token_len:
            raise BadGroup("too_long", f"sequence {i} has {L} tokens > data.max_token_len {cfg.max_token_len}")
        lo, hi = int(tok.min()), int(tok.max())
        if lo < 0 or (cfg.vocab_size is not None and hi >= cfg.vocab_size):
            raise BadGroup("token_out_of_range", f"sequence {i} has token ids in [{lo}, {hi}], allowed "
                                             f"[0, {cfg.vocab_size if cfg.vocab_size is not None else 'inf'})")
        masked = mask == IGNORE
        if not np.all(masked | (mask == tok)):
            t = int(np.flatnonzero(~(masked | (mask == tok)))[0])
            raise BadGroup("bad_mask", f"sequence {i} position {t}: mask {int(mask[t])} is neither -100 nor the "
                                   f"token id {int(tok[t])}")
        for f, a in floats.items():
            if not np.isfinite(a).all():
                raise BadGroup("non_finite", f"{f}[{i}] holds {a[~np.isfinite(a)][:3].tolist()}")
        trained = ~masked
        trained[0] = False  # nothing predicts token 0
        for f in ("inference_logprobs", "ref_logprobs"):
            if f in floats and trained.any() and float(floats[f][trained].max()) > _LOGPROB_SLACK:
                raise BadGroup("bad_logprobs", f"{f}[{i}] has {float(floats[f][trained].max()):.4g} > 0 at a trained "
                                           f"position (misaligned, or a prompt's 1.0 under a trained mask)")
        if not trained.any():
            raise BadGroup("no_trained_tokens", f"sequence {i} has no trained position after the first token")
        ov = overrides[i] if overrides else None
        temp = _temperature(((f"overrides[{i}]", ov), ("generation_params", gen_params),
                             ("group_overrides", group_overrides)))
        dist = _distill_rows(d_ids[i], d_lps[i], i, L, trained, cfg) if d_ids is not None else (None, None)
        seqs.append(CheckedSeq(tokens=tok, trained=trained, score=float(scores[i]),
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
    except BadGroup as e:
        return False, str(e)
    return True, ""


def reason_key(reason: str) -> str:
    """The `DROP_REASONS` entry of a `validate_group` reason string."""
    return reason.split(":", 1)[0]


def _group_digest(seqs: list[CheckedSeq]) -> bytes:
    """Identity of a checked group for duplicate detection: tokens, trained positions, scores."""
    h = hashlib.blake2b(digest_size=16)
    for s in seqs:
        h.update(len(s.tokens).to_bytes(8, "little"))
        h.update(s.tokens.tobytes())
        h.update(np.packbits(s.trained).tobytes())
        h.update(np.float64(s.score).tobytes())
    return h.digest()


#: Whether this process has said that repeated groups are trained once (said once per process).
_duplicates_noted = False


def filter_groups(groups: Sequence, cfg: DataConfig,
                  log_drops: bool = True) -> tuple[list[dict], list[list[CheckedSeq]], dict]:
    """Drop bad groups whole. Returns (kept groups, their parsed sequences, metrics) where metrics
    has `data/dropped` (total) and `data/dropped/<reason>` for each reason that occurred. Each drop
    of bad data is logged as a warning, or at debug level with `log_drops=False` (ranks other than
    0); a repeated group (valid data of a converged policy) is said once per process at info level,
    then only counted."""
    kept, parsed, drops, seen = [], [], Counter(), set()
    dup_score_sum, dup_seqs = 0.0, 0
    for gi, group in enumerate(groups):
        env = group.get("env_id") if isinstance(group, dict) else None
        try:
            seqs = _check_group(group, cfg)
        except BadGroup as e:
            drops[e.reason] += 1
            logger.log(logging.WARNING if log_drops else logging.DEBUG,
                       "dropping group %d of the batch (env_id=%s): %s", gi, env, e)
            continue
        digest = _group_digest(seqs)
        if digest in seen:
            # A converged policy samples identical groups for real (8 equal right answers), so a
            # duplicate is valid data we do not train on twice: its scores still count in the
            # reward statistics (`data/duplicate_*`), or reward would fall as the policy improves.
            # Every batch of a converged policy has some: said once per process, then counted.
            global _duplicates_noted
            drops["duplicate"] += 1
            dup_score_sum += sum(s.score for s in seqs)
            dup_seqs += len(seqs)
            logger.log(logging.INFO if log_drops and not _duplicates_noted else logging.DEBUG,
                       "group %d of the batch (env_id=%s) repeats an earlier one (same tokens, masks and "
                       "scores): it is trained once; later repeats are only counted, in data/dropped/duplicate",
                       gi, env)
            _duplicates_noted = _duplicates_noted or log_drops
            continue
        seen.add(digest)
        kept.append(group)
        parsed.append(seqs)
    metrics = {"data/dropped": sum(drops.values())}
    metrics.update({f"data/dropped/{r}": c for r, c in sorted(drops.items())})
    if dup_seqs:
        metrics.update({"data/duplicate_sequences": dup_seqs, "data/duplicate_score_sum": dup_score_sum})
    return kept, parsed, metrics

