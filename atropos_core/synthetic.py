"""Synthetic batches: the trainer without Atropos (`--atropos-url synthetic`).

Rank 0 draws each batch itself from a seeded generator instead of polling the trajectory API, so
that a node can be checked end to end (model load, FSDP2, the fused loss, checkpoints, metrics)
where no API, vLLM or environment runs, or cannot be installed. `SyntheticBatches` has the part
of `AtroposClient`'s interface the driver uses (`cfg`, `register`, `wait_for_batch`, `metrics`,
`last_raw`) and imports neither requests nor atroposlib.

What a batch holds: `atropos.batch_size` sequences in groups of `atropos.group_size` (8 when unset;
batch_size itself when that does not divide it), each group one shared prompt and completions of
random tokens in [0, vocab), every sequence at most `atropos.max_token_len` tokens, masks -100 on
prompt positions, a random score per sequence, and `inference_logprobs` near -log(vocab) (what a
freshly initialised model gives), keyed like the API's groups (atroposlib 0.4.0's `ScoredData`,
14 keys). The data has no signal: the reward does not rise. Each step's batch depends only on
`run.seed` and the step, so a resumed run draws what it would have drawn.
"""
from __future__ import annotations

import logging
import math
import random
import time
from typing import Optional

from .client import AtroposConfig

logger = logging.getLogger(__name__)


class SyntheticBatches:
    """Seeded Atropos-format groups over a vocabulary of `vocab_size` tokens (rank 0 only)."""

    def __init__(self, cfg: AtroposConfig, vocab_size: Optional[int], seed: int = 0):
        if not vocab_size or vocab_size < 2:
            raise ValueError(f"synthetic batches need the model's vocabulary size (>= 2), got {vocab_size}")
        if cfg.max_token_len < 2:
            raise ValueError(f"synthetic batches need atropos.max_token_len >= 2, got {cfg.max_token_len}")
        self.cfg = cfg
        self.vocab_size = int(vocab_size)
        self.seed = seed
        gs = cfg.group_size or min(8, cfg.batch_size)
        self.group_size = gs if cfg.batch_size % gs == 0 else cfg.batch_size
        self.batches_received = 0
        self.last_raw: Optional[bytes] = None  # groups are encoded by broadcast_groups when needed
        self._last_wait_s = self._total_wait_s = 0.0

    def register(self) -> None:
        logger.warning("atropos.url=synthetic: training on SYNTHETIC batches (seeded random tokens and scores, "
                       "%d sequences in groups of %d, at most %d tokens, vocabulary %d); no Atropos API, "
                       "inference server or environment is used, and the reward carries no signal",
                       self.cfg.batch_size, self.group_size, self.cfg.max_token_len, self.vocab_size)

    def _group(self, rng: random.Random) -> dict:
        max_len = self.cfg.max_token_len
        prompt = [rng.randrange(self.vocab_size) for _ in range(rng.randint(1, max(1, max_len // 4)))]
        g = {"tokens": [], "masks": [], "scores": [], "advantages": None, "ref_logprobs": None, "messages": None,
             "generation_params": None, "inference_logprobs": [], "overrides": None, "group_overrides": None,
             "images": None, "env_id": 0, "distill_token_ids": None, "distill_logprobs": None}
        base = -math.log(self.vocab_size)
        for _ in range(self.group_size):
            comp = [rng.randrange(self.vocab_size) for _ in range(rng.randint(1, max_len - len(prompt)))]
            g["tokens"].append(prompt + comp)
            g["masks"].append([-100] * len(prompt) + comp)
            g["scores"].append(rng.random())
            # Atropos puts 1.0 on prompt positions of inference_logprobs.
            g["inference_logprobs"].append([1.0] * len(prompt) + [base + rng.gauss(0.0, 0.1) for _ in comp])
        return g

    def wait_for_batch(self, abort_check=None) -> list[dict]:
        """The next batch at once (`abort_check`, the client's, has nothing to interrupt here)."""
        started = time.monotonic()
        step = self.cfg.starting_step + self.batches_received
        rng = random.Random(f"synthetic:{self.seed}:{step}")
        batch = [self._group(rng) for _ in range(self.cfg.batch_size // self.group_size)]
        self.batches_received += 1
        self._last_wait_s = time.monotonic() - started
        self._total_wait_s += self._last_wait_s
        return batch

    def metrics(self) -> dict:
        return {"data/batches": self.batches_received, "data/synthetic": 1,
                "data/last_wait_s": self._last_wait_s, "data/total_wait_s": self._total_wait_s}

    def close(self) -> None:
        pass
