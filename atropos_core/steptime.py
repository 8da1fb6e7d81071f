"""Where a training step's wall time goes: `perf/*_s` phases that add up to `perf/step_s` exactly.

`StepClock.lap(phase)` charges the time since the previous lap to `phase`; `split()` charges what
is left to "other", returns `perf/<phase>_s` for every phase and `perf/step_s` (their sum) and
starts the next step. Every instant belongs to exactly one lap, so the phases add up to the step by
construction, and consecutive steps tile the run's wall time. The time a step spends writing its
own record (`perf/log_s`: metrics line, JSONL, plot, checkpoint) is only known after the record is
written, so it is charged to the next record: a record covers "previous log, wait for data, train,
sync, other".
"""
from __future__ import annotations

import time

#: Phases every record carries (0.0 when a step had none), in the order they happen.
PHASES = ("log", "wait_data", "train", "sync", "other")


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
