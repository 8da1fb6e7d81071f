"""What every benchmark records beside its numbers: device, commit and date, in one long CSV each."""
from __future__ import annotations

import csv
import datetime
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def device_name(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    import os

    return f"cpu:{platform.machine()}:{os.cpu_count()}c"


def run_meta(device: str = "cpu") -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"device": device_name(device), "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def append_rows(path: Path, fields: list[str], rows: list[dict]) -> None:
    """Append `rows` to the long-format CSV at `path` (header written when the file is new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)
