"""MetricsLogger: fixed-order step line, metrics.jsonl with every key, curves.png."""
from __future__ import annotations

import io
import json

import pytest

from atropos_core.metrics import LoggingConfig, MetricsLogger, format_step_line


def _metrics(step):
    return {"loss/total": 0.5 / step, "reward/mean": 0.1 * step, "kl/mean": 0.01 * step, "clip/frac": 0.02,
            "grad/norm": 1.5, "perf/train_tokens_per_s": 1000.0 + step, "perf/sync_ms": 12.0, "perf/mem_gb": 0.75,
            "entropy/mean": 3.2, "lr": 1e-6, "train/skipped_nonfinite": 0.0}


def test_jsonl_has_every_key_and_curves_png_exists(tmp_path):
    out = io.StringIO()
    log = MetricsLogger(LoggingConfig(run_dir=str(tmp_path / "run"), plot_every=2), stream=out)
    for step in range(1, 5):
        m = _metrics(step)
        if step == 3:
            m["loss/total"] = float("nan")  # a skipped step: recorded, not a JSON error
        log.log(step, m)
    log.close()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    recs = [json.loads(x) for x in lines]
    for step, rec in enumerate(recs, 1):
        assert rec["step"] == step
        assert set(_metrics(step)) <= set(rec)
    assert recs[0]["perf/train_tokens_per_s"] == 1001.0
    assert recs[2]["loss/total"] == "nan"
    png = tmp_path / "run" / "curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    printed = out.getvalue().splitlines()
    assert len(printed) == 4 and all(p.startswith("step ") for p in printed)


def test_step_line_fixed_order_and_missing_columns():
    line = format_step_line(7, _metrics(7))
    heads = [part.split(" ")[0] for part in line.split(" | ")]
    assert heads == ["step", "loss", "reward", "kl", "clip", "grad_norm", "tok/s", "sync", "mem"]
    assert "tok/s 1007" in line and "mem 0.75G" in line
    sparse = format_step_line(1, {"loss/total": 1.0})
    assert sparse.count(" -") == 7 and "loss +1.0000" in sparse


def test_logging_config_validation():
    with pytest.raises(ValueError, match="plot_every"):
        LoggingConfig(plot_every=-1)
    with pytest.raises(ValueError, match="run_dir"):
        LoggingConfig(run_dir="")


def test_redraw_can_wait_until_the_caller_says(tmp_path):
    """`log(..., redraw=False)` on a plot step writes the record but starts no redraw (the driver
    saves a checkpoint first); `redraw_if_due` then starts it, and only on plot steps."""
    log = MetricsLogger(LoggingConfig(run_dir=str(tmp_path / "run"), plot_every=2), stream=io.StringIO())
    png = tmp_path / "run" / "curves.png"
    log.log(2, _metrics(2), redraw=False)
    assert log._plotting is None and not png.exists()
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["step"] == 2
    log.redraw_if_due(3)  # not a plot step
    assert log._plotting is None
    log.redraw_if_due(2)
    assert log._plotting is not None
    log._plotting.result()
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log.close()


def test_redraws_are_spaced_by_the_minimum_interval(tmp_path):
    """A plot step within `plot_min_interval_s` of the last redraw's start starts none; the next
    plot step after it does; `close()` draws the whole history whatever the interval. (The clock is
    moved by hand, not slept on: a first draw alone can take longer than a short interval.)"""
    hour = 3600.0
    log = MetricsLogger(LoggingConfig(run_dir=str(tmp_path / "run"), plot_every=1, plot_min_interval_s=hour),
                        stream=io.StringIO())
    log.log(1, _metrics(1))
    first = log._plotting
    assert first is not None                            # the first plot step draws
    first.result()
    log.log(2, _metrics(2))
    assert log._plotting is first                       # due by steps, too soon by time: none started
    log._plotted_at -= hour                             # an hour later
    log.log(3, _metrics(3))
    assert log._plotting is not first                   # the interval passed: a redraw started
    log._plotting.result()
    log.log(4, _metrics(4))                             # too soon: only close() draws step 4
    drawn = []
    log._draw = lambda history, _draw=log._draw: (drawn.append(len(history)), _draw(history))[1]
    log.close()
    assert drawn == [4] and (tmp_path / "run" / "curves.png").stat().st_size > 5000
    with pytest.raises(ValueError, match="plot_min_interval_s"):
        LoggingConfig(plot_min_interval_s=-1)
