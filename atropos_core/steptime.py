"""Where a training step's wall time goes: `perf/*_s` phases that add up to `perf/step_s` exactly.

`StepClock.lap(phase)` charges the time since the previous lap to `phase`; `split()` charges what
is left to "other", returns `perf/<phase>_s` for every phase and `perf/step_s` (their sum) and
starts the next step. Every instant belongs to exactly one lap, so the phases add up to the step by
construction, and consecutive steps tile the run's wall time. The time a step spends writing its
own record (`perf/log_s`: metrics line, JSONL, plot, checkpoint) is only known after the record is
written, so it is charged to the next record: a record covers "previous log, wait for data, train,
sync, other".

`RunTime` adds the records up for the one line the driver logs when a run ends: each phase's share
of the run's time and the mean staleness. When the trainer waited for data most of the time on
fresh data (`waits_on_policy`), that line says what would overlap the wait: an environment allowed
one batch ahead samples while the trainer trains (`max_batches_offpolicy` 2), on data up to one step
staler; what that gained and cost where it was measured is in docs/offpolicy.md ("One batch
ahead"). Not said when the data is already stale (the environment runs ahead), when waiting is
not most of the run, or when every environment the run started already has that room (then its
generation is the slow side).
"""
from __future__ import annotations

import math
import time
from typing import Mapping

#: Phases every record carries (0.0 when a step had none), in the order they happen.
PHASES = ("log", "wait_data", "train", "sync", "other")
#: How the end-of-run line names them.
PHASE_NAMES = {"log": "logging", "wait_data": "waiting for data", "train": "training", "sync": "weight sync",
               "other": "other"}
#: `RunTime.waits_on_policy`: waiting for data at least this share of the run, with a mean staleness
#: below `FRESH_STALENESS` steps, over at least `MIN_STEPS` steps.
WAIT_SHARE, FRESH_STALENESS, MIN_STEPS = 0.5, 0.5, 10


class StepClock:
    def __init__(self, clock=time.perf_counter):
        self._clock = clock
        self._last = clock()
        self._phases = dict.fromkeys(PHASES, 0.0)

    def lap(self, phase: str) -> float:
        """Charge the time since the previous lap to `phase`; returns that time in seconds."""
        now = self._clock()
        dt = now - self._last
        self._last = now
        self._phases[phase] = self._phases.get(phase, 0.0) + dt
        return dt

    def split(self) -> dict[str, float]:
        """End the step: the rest goes to "other"; returns the step's `perf/*_s` and resets."""
        self.lap("other")
        out = {f"perf/{k}_s": v for k, v in self._phases.items()}
        out["perf/step_s"] = sum(self._phases.values())
        self._phases = dict.fromkeys(PHASES, 0.0)
        return out


class RunTime:
    """The `perf/*_s` split of every record of a run, added up; `summary()` is the end-of-run line."""

    def __init__(self) -> None:
        self.steps = 0
        self.phases = dict.fromkeys(PHASES, 0.0)
        self._staleness: list[float] = []

    def add(self, record: Mapping[str, float]) -> None:
        """Count one step's record (its `perf/<phase>_s`, and `data/staleness_mean` when it has one)."""
        self.steps += 1
        for phase in PHASES:
            self.phases[phase] += float(record.get(f"perf/{phase}_s", 0.0))
        stale = record.get("data/staleness_mean")
        if isinstance(stale, (int, float)) and math.isfinite(stale):
            self._staleness.append(float(stale))

    @property
    def total_s(self) -> float:
        return sum(self.phases.values())

    @property
    def staleness(self) -> float | None:
        """Mean of the steps' mean staleness, or None when no step measured it."""
        return sum(self._staleness) / len(self._staleness) if self._staleness else None

    def share(self, phase: str) -> float:
        return self.phases[phase] / self.total_s if self.total_s > 0 else 0.0

    def waits_on_policy(self) -> bool:
        """The trainer waited for data most of the run, and the data was fresh (the environment did
        not run ahead), over enough steps to say so."""
        stale = self.staleness
        return (self.steps >= MIN_STEPS and self.share("wait_data") >= WAIT_SHARE
                and stale is not None and stale < FRESH_STALENESS)

    def summary(self, max_batches_offpolicy: int | None = None) -> str | None:
        """'time over N steps (T s): waiting for data W%, ...; data S steps stale on average', plus
        what would overlap the wait when `waits_on_policy` and the environments are not known to have
        room for a batch ahead already (`max_batches_offpolicy`: `EnvConfig.max_batches_offpolicy()`, None when not
        known; with room and still waiting, the environment's generation is the slow side, and more
        room would not overlap anything); None before the first step."""
        if not self.steps or self.total_s <= 0:
            return None
        parts = ", ".join(f"{PHASE_NAMES[p]} {100 * self.share(p):.0f}%"
                          for p in sorted(PHASES, key=lambda p: -self.phases[p]))
        line = f"time over {self.steps} steps ({self.total_s:.1f} s): {parts}"
        if self.staleness is not None:
            line += f"; data {self.staleness:.2f} steps stale on average"
        if self.waits_on_policy() and (max_batches_offpolicy is None or max_batches_offpolicy < 2):
            line += ("; the trainer mostly waited for fresh data: an environment allowed one batch ahead "
                     "samples while it trains, on data up to one step staler, weighed by loss.is_mode (its "
                     "--env.max_batches_offpolicy 2; the built-in one's: --env.extra_args "
                     "\"--env.max_batches_offpolicy 2\"; docs/offpolicy.md)")
        return line
