"""
Tests for dev/gpu_check.py: its --cpu-dry-run (every section at toy sizes on the CPU) passes and
writes a figure per section, so the GPU script at least runs end to end before a GPU ever sees it.

    python -m pytest tests/dev/test_gpu_check.py -q
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cpu_dry_run(tmp_path):
    out = str(tmp_path / "figures.json")
    r = subprocess.run([sys.executable, os.path.join(REPO, "dev", "gpu_check.py"), "--cpu-dry-run", "--out", out,
                        "--work", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.load(open(out))
    sections = report["sections"]
    assert list(sections) == ["env", "flash", "parity", "cli", "fp32_master", "qlora", "big_shapes", "beam", "load_1b"]
    assert sections["qlora"]["resume_max_rel_diff"] == 0 and sections["qlora"]["loss"] > 0
    assert all(s["ok"] for s in sections.values())
    assert sections["fp32_master"]["moved_fraction"] >= 0.99
    assert sections["parity"]["beam_top50_identical"]
    assert sections["beam"]["items"] == 6924 and sections["beam"]["seconds_per_prompt"] > 0
    # its time is a benchmark figure, not a test: on a loaded machine it varies several-fold (the
    # subprocess timeout above is what catches a hang)
    assert report["total_seconds"] > 0
