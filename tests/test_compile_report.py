"""The offline compile report: every shipped Triton config compiles for sm_90 and sm_80 without
register spills and within the shared-memory limit (see `bench/compile_report.py` for why).

Runs the report in a subprocess, so this pytest process never imports triton (other test files
may need to decide how triton is imported), and compiles one known-bad config beside it: a
checker that cannot fail would pass a spilling config silently.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import json, sys
sys.path.insert(0, "bench")
import compile_report as cr
rc = cr.main(["--json", sys.argv[1]])
# accumulate_dw's bf16 tile at 4 warps: 255 registers and spills (the reason the shipped one uses 8).
bad = dict(BLOCK_C=64, BLOCK_V=128, BLOCK_D=128, DOT_PRECISION="tf32", num_warps=4, num_stages=3)
row = cr.compile_one("accumulate_dw", "bf16", bad, 128256, 4096, "sm_90")
# A shipped row with its shared memory one byte over the architecture's limit.
rows = json.load(open(sys.argv[1]))
over = dict(rows[0], shared=cr.SMEM_LIMIT[rows[0]["arch"]] + 1)
json.dump({"rc": rc, "bad_row": row, "bad_problems": cr.problems(row), "limits": cr.SMEM_LIMIT,
           "over_smem_problems": cr.problems(over), "bad_table": cr._format([row]),
           "expected": [[k, d, c] for k, d, c, _, _ in cr.shipped_configs()]}, open(sys.argv[2], "w"))
"""


def test_shipped_configs_compile_without_spills(tmp_path):
    rows_path, extra_path = tmp_path / "rows.json", tmp_path / "extra.json"
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(rows_path), str(extra_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert extra_path.exists(), f"compile report crashed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    rows = json.loads(rows_path.read_text())
    extra = json.loads(extra_path.read_text())

    # Every (kernel, dtype, config) the heuristic returns was compiled for both architectures.
    compiled = {(r["kernel"], r["dtype"], json.dumps(r["config"], sort_keys=True), r["arch"]) for r in rows}
    for kernel, dname, cfg in extra["expected"]:
        for arch in ("sm_90", "sm_80"):
            assert (kernel, dname, json.dumps(cfg, sort_keys=True), arch) in compiled
    assert {r["kernel"] for r in rows if r["dtype"] == "bf16"} == {"row_stats", "dlogits", "accumulate_dw"}

    for r in rows:
        assert set(r) >= {"kernel", "config", "arch", "dtype", "registers", "spills", "shared"}
        where = f"{r['kernel']} {r['dtype']} {r['arch']} {r['config']}"
        assert 0 < r["registers"] <= 255, where
        assert r["spills"] == 0, f"{where}: {r['spills']} bytes spilled"
        assert r["shared"] <= extra["limits"][r["arch"]], f"{where}: {r['shared']} B shared memory"
        assert r["registers"] * r["config"]["num_warps"] * 32 <= 65536, where
    assert extra["rc"] == 0
    # The printed table has one line per row (after the header and its rule), none flagged.
    table = [line for line in proc.stdout.splitlines() if line.split()[:1] in (["row_stats"], ["dlogits"],
                                                                                ["accumulate_dw"])]
    assert len(table) == len(rows) and not any("!!" in line for line in table), proc.stdout[-3000:]

    # The detector sees a spill where there is one, and prints it; and a shared-memory overflow.
    assert extra["bad_row"]["spills"] > 0 and extra["bad_problems"], extra["bad_row"]
    assert "!!" in extra["bad_table"] and "spills" in extra["bad_table"], extra["bad_table"]
    assert any("shared memory" in p for p in extra["over_smem_problems"]), extra["over_smem_problems"]
