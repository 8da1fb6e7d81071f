"""Per-step metrics: one fixed-order line, metrics.jsonl, curves.png, optional wandb. Rank 0 only.

Why this shape: the step line is what a person watches (always the same columns, so a glance down
the terminal compares steps); metrics.jsonl is what tools read (every metric, slash-namespaced,
one JSON object per step, appended and flushed so a killed run keeps its history); curves.png is
redrawn from the in-memory history every `plot_every` steps with matplotlib's Agg backend (no
display needed), on a worker thread: a redraw takes ~0.35 s on the 2-core box, which on the
training thread cost the demo ~8 s of its 120 steps (docs/loop-speed-2026-12-01.md). Off the
training thread it still takes CPU from the processes the step waits on (on 2 cores, the
environment and vLLM): ~0.2-0.3 s a redraw was ~25-45 ms a step of a fast loop, so a redraw also
waits until `plot_min_interval_s` has passed since the last one started (a picture for a person
needs no fresher). Only
matplotlib's object API is used there (`Figure`, no pyplot state), a redraw that comes due while
one is running is skipped (the next one, or the last at `close()`, has those steps), and
`plot()`/`close()` draw in the caller's thread after the worker is done. wandb is imported only
when enabled, so a run never needs it installed.

Keys the step line reads (missing ones print as "-"): `loss/total`, `reward/mean`, `kl/mean`,
`clip/frac`, `grad/norm`, `perf/tokens_per_s` (else `perf/train_tokens_per_s`),
`perf/sync_ms` (else `sync/ms`), `perf/mem_gb`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional, TextIO

from . import dist as adist
from .checks import Ge, NonEmpty, check_fields

logger = logging.getLogger(__name__)

__all__ = ["LoggingConfig", "MetricsLogger", "format_step_line"]

# (header, metric keys tried in order, format)
_COLUMNS = (
    ("loss", ("loss/total",), "{:+.4f}"),
    ("reward", ("reward/mean",), "{:+.3f}"),
    ("kl", ("kl/mean",), "{:.4f}"),
    ("clip", ("clip/frac",), "{:.3f}"),
    ("grad_norm", ("grad/norm",), "{:.3f}"),
    ("tok/s", ("perf/tokens_per_s", "perf/train_tokens_per_s"), "{:.0f}"),
    ("sync ms", ("perf/sync_ms", "sync/ms"), "{:.0f}"),
    ("mem", ("perf/mem_gb",), "{:.2f}G"),
)
# (title, key) of the four panels of curves.png
_PANELS = (("reward", "reward/mean"), ("loss", "loss/total"), ("KL", "kl/mean"),
           ("tokens/s", ("perf/tokens_per_s", "perf/train_tokens_per_s")))


@dataclass
class LoggingConfig:
    """Where metrics go."""

    run_dir: Annotated[str, NonEmpty()] = "runs/default"
    """Directory for metrics.jsonl and curves.png (created on rank 0)."""
    plot_every: Annotated[int, Ge(0)] = 10
    """Redraw curves.png every K steps (0 disables plotting)."""
    plot_min_interval_s: Annotated[float, Ge(0)] = 10.0
    """...and no sooner than this many seconds after the last redraw started (the last one, at the
    end of the run, always draws)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install wandb`)."""
    wandb_project: str = "atropos-trainer"
    """wandb project name."""
    wandb_run_name: Optional[str] = None
    """wandb run name (default: wandb's own)."""

    def __post_init__(self):
        check_fields(self, "logging")


def _pick(metrics: dict, keys) -> Optional[float]:
    for k in (keys,) if isinstance(keys, str) else keys:
        v = metrics.get(k)
        if v is not None:
            return v
    return None


def format_step_line(step: int, metrics: dict) -> str:
    """`step N | loss +0.1234 | reward ... | mem 1.23G` with every column always present."""
    parts = [f"step {step:>6d}"]
    for name, keys, fmt in _COLUMNS:
        v = _pick(metrics, keys)
        parts.append(f"{name} " + (fmt.format(v) if isinstance(v, (int, float)) and math.isfinite(v) else
                                   (str(v) if v is not None else "-")))
    return " | ".join(parts)


def _jsonable(v):
    if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Infinity; keep the information as a string
    return v


class MetricsLogger:
    """Rank-0 sink for per-step metric dicts; on other ranks every method is a no-op."""

    def __init__(self, cfg: LoggingConfig, *, run_config: Optional[dict] = None, stream: TextIO = None):
        self.cfg = cfg
        self.active = adist.is_main()
        self._no_plot_noted = False
        self._plotter: Optional[ThreadPoolExecutor] = None
        self._plotting: Optional[Future] = None
        self._plotted_at = -math.inf  # time.monotonic() when the last background redraw started
        self.stream = stream or sys.stdout
        self.history: list[dict] = []
        self._wandb = None
        self._jsonl = None
        if not self.active:
            return
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if cfg.wandb:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("logging.wandb=True needs wandb: pip install wandb") from e
            self._wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=run_config or {},
                                     dir=str(self.run_dir))

    def log(self, step: int, metrics: dict, *, redraw: bool = True) -> None:
        """Print the step line, append to metrics.jsonl, redraw curves.png when due (unless
        `redraw` is False: the caller then calls `redraw_if_due` itself), push to wandb."""
        if not self.active:
            return
        rec = {"step": int(step), "time": time.time()}  # wall clock (Unix s) when the step was logged
        rec.update({k: _jsonable(v) for k, v in metrics.items()})
        self.history.append(rec)
        self._jsonl.write(json.dumps(rec, sort_keys=True) + "\n")
        self._jsonl.flush()
        # The one line per step is this logger's output channel (the driver's console), not a log.
        print(format_step_line(step, metrics), file=self.stream, flush=True)
        if redraw:
            self.redraw_if_due(step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in rec.items() if isinstance(v, (int, float))}, step=int(step))

    def redraw_if_due(self, step: int) -> None:
        """Start redrawing curves.png on the background thread when `step` is a plot step and
        `plot_min_interval_s` has passed since the last redraw started."""
        if self.active and self.cfg.plot_every and step % self.cfg.plot_every == 0 and \
                time.monotonic() - self._plotted_at >= self.cfg.plot_min_interval_s:
            self._plot_in_background()

    def _plot_in_background(self) -> None:
        if self._plotting is not None and not self._plotting.done():
            return  # a redraw is running: the next one has these steps too
        if self._plotter is None:
            self._plotter = ThreadPoolExecutor(1, thread_name_prefix="curves")
        self._plotted_at = time.monotonic()
        self._plotting = self._plotter.submit(self._draw_logged, list(self.history))

    def _draw_logged(self, history: list[dict]) -> None:
        try:
            self._draw(history)
        except Exception:  # noqa: BLE001 - a failed picture must not stop training
            logger.exception("could not redraw %s", self.run_dir / "curves.png")

    def plot(self) -> Optional[Path]:
        """Redraw `<run dir>/curves.png` from the whole history now (atomically replaced), after
        any background redraw has finished."""
        if not self.active or not self.history:
            return None
        if self._plotting is not None:
            self._plotting.result()
        return self._draw(self.history)

    def _draw(self, history: list[dict]) -> Optional[Path]:
        try:
            from matplotlib.figure import Figure
        except ImportError:
            if not self._no_plot_noted:
                logger.info("matplotlib is not installed: no %s (metrics.jsonl has every value)",
                            self.run_dir / "curves.png")
                self._no_plot_noted = True
            return None
        fig = Figure(figsize=(10, 6.5))
        axes = fig.subplots(2, 2)
        for ax, (title, keys) in zip(axes.flat, _PANELS):
            xs, ys = [], []
            for rec in history:
                v = _pick(rec, keys)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    xs.append(rec["step"])
                    ys.append(v)
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if not xs:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        out = self.run_dir / "curves.png"
        tmp = self.run_dir / ".curves.tmp.png"
        fig.savefig(tmp, dpi=90, format="png")
        os.replace(tmp, out)
        return out

    def close(self) -> None:
        if not self.active:
            return
        if self.history and self.cfg.plot_every:
            self.plot()
        if self._plotter is not None:
            self._plotter.shutdown(wait=True)
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
