"""Draw PNGs from the long-format benchmark CSVs in bench/results (Liger's layout: one figure per
metric, one line per provider, the swept size on the x axis).

Why a separate script: benchmarks only append rows (with device, commit and date), so results
from different machines and commits accumulate in one file; plotting picks, for each device,
dtype and provider, the newest row of every shape and never re-runs anything.

    python bench/plot.py                     # every known CSV in bench/results
    python bench/plot.py --csv bench/results/loss.csv --out bench/results
Writes `loss_<metric>_<device>_<dtype>.png` for loss.csv (x: the dimension that varies, else a
bar per provider) and, for the other CSVs, one bar chart per numeric column of their newest rows.
"""
from __future__ import annotations

import argparse
import csv
import re
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
LOSS_METRICS = {"ms_median": "time fwd+bwd (ms)", "peak_mem_mb": "extra peak memory (MiB)"}


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_")


def _read(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _newest(rows: list[dict], key) -> list[dict]:
    """The newest row (by date, then file order) for each key(row)."""
    best: dict = {}
    for i, r in enumerate(rows):
        k = key(r)
        if k not in best or (r.get("date", ""), i) >= best[k][0]:
            best[k] = ((r.get("date", ""), i), r)
    return [v[1] for v in best.values()]


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on the benchmark machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, dest: Path) -> Path:
    """Lay out, write `dest` at 110 dpi and close `fig` (pyplot keeps every open figure alive)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return dest


def plot_loss(path: Path, out: Path) -> list[Path]:
    plt = _pyplot()
    rows = _newest(_read(path), lambda r: (r["device"], r["dtype"], r["provider"], r["N"], r["D"], r["V"]))
    groups = defaultdict(list)
    for r in rows:
        groups[(r["device"], r["dtype"])].append(r)
    written = []
    for (device, dtype), rs in sorted(groups.items()):
        varying = [k for k in ("V", "N", "D") if len({r[k] for r in rs}) > 1]
        x_key = varying[0] if varying else None
        providers = sorted({r["provider"] for r in rs})
        for metric, label in LOSS_METRICS.items():
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            if x_key:
                for prov in providers:
                    pts = sorted((int(r[x_key]), float(r[metric])) for r in rs if r["provider"] == prov)
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
                ax.set_xlabel(x_key)
                fixed = {k: rs[0][k] for k in ("N", "D", "V") if k != x_key}
                ax.legend()
            else:
                vals = [float(next(r[metric] for r in rs if r["provider"] == p)) for p in providers]
                ax.bar(providers, vals, color=[("C3" if p == "ours" else "C0") for p in providers])
                for i, v in enumerate(vals):
                    ax.annotate(f"{v:.0f}", (i, v), ha="center", va="bottom", fontsize=8)
                ax.tick_params(axis="x", rotation=20)
                fixed = {k: rs[0][k] for k in ("N", "D", "V")}
            ax.set_ylabel(label)
            ax.set_title(f"fused linear policy loss, {device}, {dtype}\n"
                         + " ".join(f"{k}={v}" for k, v in fixed.items()), fontsize=9)
            ax.grid(alpha=0.3)
            written.append(_save(fig, out / f"loss_{metric}_{_slug(device)}_{dtype}.png"))
    return written


def plot_generic(path: Path, out: Path) -> list[Path]:
    """One bar chart per numeric column of the newest rows, labelled by the first text column."""
    plt = _pyplot()
    rows = _read(path)
    if not rows:
        return []
    meta = {"device", "commit", "date"}
    cols = [c for c in rows[0] if c not in meta]

    def numeric(c):
        try:
            return all(r[c] != "" and float(r[c]) == float(r[c]) for r in rows)
        except ValueError:
            return False

    label_cols = [c for c in cols if not numeric(c)]
    metrics = [c for c in cols if numeric(c)]
    key = (lambda r: (r["device"], *(r[c] for c in label_cols)))
    rows = _newest(rows, key)
    written = []
    for m in metrics:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        labels = [" ".join([r["device"][:18], *(r[c][-24:] for c in label_cols)]) for r in rows]
        ax.barh(range(len(rows)), [float(r[m]) for r in rows])
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.set_xlabel(m)
        ax.set_title(f"{path.stem}: {m} (newest row per configuration)", fontsize=9)
        written.append(_save(fig, out / f"{path.stem}_{_slug(m)}.png"))
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csv", action="append", default=[], help="CSV file(s); default: every *.csv in bench/results")
    p.add_argument("--out", default=str(RESULTS), help="folder for the PNGs")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(c) for c in args.csv] or sorted(RESULTS.glob("*.csv"))
    for path in paths:
        written = plot_loss(path, out) if path.stem == "loss" else plot_generic(path, out)
        for w in written:
            print(w)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
