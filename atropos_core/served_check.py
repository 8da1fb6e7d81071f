"""Check that the inference servers serve the trainer's weights: score a fixed probe sequence on both
sides and compare the per-token logprobs (`sync.verify_every`).

Why: a weight-sync bug is silent (the loop keeps training, the servers keep sampling from other
weights; a stale tied `lm_head` on CPU was one we hit). Right after a push, the trainer scores a
fixed probe of `PROBE_LEN` token ids with its own model (one small forward, full logits: 32 × V) and
asks each server for the same ids' `prompt_logprobs` (our `/generate`, greedy, one new token). The
largest absolute difference is the metric `sync/verify_max_abs_diff`; above the dtype's tolerance
the run stops with `ServedPolicyMismatch`; so it does when any logprob, a server's or the trainer's,
is not finite (`probe_difference`: a NaN would never compare as the worst). Raw logits on both
sides (vLLM's prompt logprobs are not tempered). Under FSDP every rank runs the forward (a
collective), rank 0 asks the servers and the verdict is shared, so all ranks stop together.

Overlapped with the next step (`start_served_check` → `PendingCheck.result()`): the trainer's
forward runs right after the push, on the weights just pushed; the servers' requests run on a
worker thread while the driver waits for the next batch and trains; the driver takes the verdict
before its next push (so the servers still serve the weights being checked) and after the last
step. The servers' side was most of the check's cost (an HTTP request and a prefill per server, ~25
ms of a 45 ms step on the tiny model, docs/loop-speed-2026-12-01.md), and it is now off the step's
critical path. So `sync/verify_max_abs_diff` logged at step N is the check of the weights pushed
at step N-1, and a mismatch stops the run one step later than a blocking check would.
"""
from __future__ import annotations

import logging
import math
from concurrent.futures import Executor, Future
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from . import dist as adist

logger = logging.getLogger(__name__)

PROBE_LEN = 32
# Largest |logp_trainer - logp_server| accepted, by the trainer's parameter dtype. fp32 on CPU agrees
# to ~1e-6 (docs/facts-found.md); a wrong tensor moves logprobs by O(0.1-10). 16-bit formats carry
# their rounding of the logits (bf16: up to ~0.06 at |z| ~ 16-32) on both sides.
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-3, torch.float16: 0.05, torch.bfloat16: 0.15}


class ServedPolicyMismatch(RuntimeError):
    """The servers' logprobs of the probe differ from the trainer's beyond the tolerance."""


def served_tolerance(model: nn.Module, wire_dtype: Optional[str] = None) -> float:
    """The tolerance for the coarser of the trainer's parameter dtype and the sync's wire dtype."""
    p = next(model.parameters())
    tols = [TOLERANCE.get(p.dtype, 0.15)]
    if wire_dtype:
        tols.append(TOLERANCE.get(getattr(torch, str(wire_dtype).replace("torch.", ""), None), 0.15))
    return max(tols)


def probe_ids(vocab_size: int, n: int = PROBE_LEN) -> list[int]:
    """A fixed, spread-out sequence of token ids below `vocab_size` (no special meaning)."""
    v = max(2, min(vocab_size, 32000))
    return [(97 * i + 11) % v for i in range(n)]


@torch.no_grad()
def trainer_logprobs(model: nn.Module, ids: Sequence[int]) -> torch.Tensor:
    """`(len(ids)-1,)` fp64 logprob of ids[t] given ids[:t] under the trainer's model."""
    x = torch.tensor([list(ids)], dtype=torch.int64, device=adist.model_device(model))
    logits = model(input_ids=x, use_cache=False).logits[0, :-1].double()
    lp = torch.log_softmax(logits, -1)
    return lp.gather(1, x[0, 1:, None]).squeeze(1).cpu()


def served_logprobs(url: str, ids: Sequence[int], timeout_s: float = 60.0) -> torch.Tensor:
    """The server's prompt logprobs of ids[1:] (its `/generate`, `prompt_logprobs=0`)."""
    import requests

    body = {"prompt": {"prompt_token_ids": list(ids)}, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
    r = requests.post(f"{url}/generate", json=body, timeout=timeout_s)
    r.raise_for_status()
    entries = r.json().get("prompt_logprobs")
    if not isinstance(entries, list) or len(entries) != len(ids):
        raise ServedPolicyMismatch(f"{url} returned no usable prompt_logprobs for the probe")
    return torch.tensor([float(entries[t][str(ids[t])]) for t in range(1, len(ids))], dtype=torch.float64)


TRAINER = "the trainer"


def probe_difference(mine: torch.Tensor, served: Mapping[str, torch.Tensor]) -> tuple[float, str]:
    """`(d, culprit)`: the largest |served - mine| over the servers (`{url: logprobs}`) and its url.

    Any non-finite logprob makes `d = inf` (a NaN never compares larger than anything, so a plain
    max would pass a server that returns NaN); `culprit` is then `TRAINER` when the trainer's own
    logprobs are not finite, else the first server whose are not."""
    if not bool(torch.isfinite(mine).all()):
        return math.inf, TRAINER
    d, worst = 0.0, ""
    for url, theirs in served.items():
        if not bool(torch.isfinite(theirs).all()):
            return math.inf, url
        d_url = float((theirs - mine).abs().max())
        if d_url > d or not worst:
            d, worst = d_url, url
    return d, worst


def _mismatch_message(step: int, d: float, worst: str, tol: float, dtype: torch.dtype) -> str:
    if math.isinf(d):
        if worst == TRAINER:
            what = "the trainer's own probe logprobs are not finite (NaN/inf): its weights or forward are broken"
        else:
            who = f"the inference server {worst}" if worst else "an inference server (or rank 0's trainer)"
            what = f"{who} returned non-finite probe logprobs (NaN/inf)"
        return f"step {step}: {what}; stopping. sync.verify_every=0 disables this check"
    return (f"step {step}: the inference server{' ' + worst if worst else 's'} serve(s) other weights than the "
            f"trainer's: probe logprobs differ by up to {d:.3g} (tolerance {tol:g} for {dtype}). The weight "
            f"sync is broken (a tensor not updated, e.g. a tied lm_head); stopping. sync.verify_every=0 "
            f"disables this check")


class PendingCheck:
    """A started check of the weights pushed at `step`: the trainer's logprobs, taken then, and
    (rank 0) the servers' answers, on their way. `result()` on every rank gives the verdict."""

    def __init__(self, step: int, mine: torch.Tensor, served: Optional[Future], tolerance: float,
                 dtype: torch.dtype) -> None:
        self.step, self._mine, self._served, self._tol, self._dtype = step, mine, served, tolerance, dtype

    def result(self) -> dict:
        """`{"sync/verify_max_abs_diff": d}`, or `ServedPolicyMismatch` on every rank when `d` exceeds
        the tolerance or any logprob, the trainer's or a server's, is not finite. Every rank must
        call it at the same point (one all-reduce)."""
        served = self._served.result() if self._served is not None else {}
        d, worst = probe_difference(self._mine, served)
        d = float(adist.all_reduce_max(d))
        if not d <= self._tol:
            raise ServedPolicyMismatch(_mismatch_message(self.step, d, worst, self._tol, self._dtype))
        return {"sync/verify_max_abs_diff": d}


def start_served_check(model: nn.Module, server_urls: Sequence[str], vocab_size: int, *, step: int,
                       tolerance: Optional[float] = None, executor: Optional[Executor] = None) -> PendingCheck:
    """Score the probe with the trainer's model now (every rank: a collective under FSDP) and, on
    rank 0, ask every server for it on `executor` (None: now, in this thread). Take the verdict with
    `.result()` before the servers' weights change again."""
    ids = probe_ids(vocab_size)
    mine = trainer_logprobs(model, ids)
    served: Optional[Future] = None
    if adist.rank() == 0:
        def ask() -> dict:
            return {url: served_logprobs(url, ids) for url in server_urls}

        if executor is not None:
            served = executor.submit(ask)
        else:
            served = Future()
            served.set_result(ask())
    tol = tolerance if tolerance is not None else served_tolerance(model)
    return PendingCheck(step, mine, served, tol, next(model.parameters()).dtype)


def verify_served_policy(model: nn.Module, server_urls: Sequence[str], vocab_size: int, *, step: int,
                         tolerance: Optional[float] = None) -> dict:
    """`start_served_check(...).result()` in one call: the check, blocking."""
    return start_served_check(model, server_urls, vocab_size, step=step, tolerance=tolerance).result()
