"""
runs/table.py: mean ± std over seeds' eval JSONs, and refusing runs that did not score the same samples.

    python -m pytest tests/dev/test_table.py -q
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "runs"))
import table  # noqa: E402


def metrics(r1, r10):
    return {"recall@1": r1, "recall@10": r10, "recall@50": 0.5, "ndcg@10": r10 / 2}


def eval_json(r10, n_samples=100, precision=0.6):
    return {"split": "test", "n_samples": n_samples, "n_fresh": 90, "beam": 50,
         "model": metrics(0.05, r10), "cooc": metrics(0.03, 0.15),
         "fresh": {"model": metrics(0.01, r10 - 0.1), "cooc": metrics(0.03, 0.15)},
         "intent_calibrated": {"rec_precision": precision, "rec_recall": 0.8}}


def write(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return str(p)


def test_mean_and_sample_std_by_hand(tmp_path):
    paths = [write(tmp_path, "a.json", eval_json(0.2, precision=0.5)), write(tmp_path, "b.json", eval_json(0.3, precision=0.7))]
    got = dict(table.rows(table.load(paths)))
    assert list(got) == ["model", "cooc", "model intent"]  # only the methods every run has, model first
    # R@10 0.2 and 0.3: mean 0.25, sample std sqrt(2 * 0.05^2 / 1) = 0.0707
    assert got["model"][1] == "0.2500 ± 0.0707"
    assert got["model"][4] == "0.1500 ± 0.0707"  # fresh R@10
    assert got["cooc"][1] == "0.1500 ± 0.0000"  # same training data: the baselines do not move
    assert got["model intent"] == ["REC precision 0.60 ± 0.14 / recall 0.80 ± 0.00"]
    assert table.mean_std([0.0431, 0.0513, 0.0457]) == pytest.approx((0.0467, 0.0042), abs=1e-4)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "runs", "table.py"), *paths],
                         capture_output=True, text=True, check=True).stdout
    assert "2 runs, test: 100 samples (90 fresh), beam 50" in out
    assert "| model | 0.0500 ± 0.0000 | 0.2500 ± 0.0707 |" in out


def test_refuses_runs_on_other_samples_and_bad_files(tmp_path):
    a = write(tmp_path, "a.json", eval_json(0.2))
    b = write(tmp_path, "b.json", eval_json(0.3, n_samples=99))
    with pytest.raises(SystemExit, match=r"b\.json: n_samples 99 differs from .*a\.json's 100"):
        table.load([a, b])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match=r"bad\.json: not a readable eval JSON"):
        table.load([str(bad)])
    with pytest.raises(SystemExit, match=r"c\.json: not a sample.py --eval JSON"):
        table.load([write(tmp_path, "c.json", {"split": "test"})])


def test_paired_bootstrap_interval(tmp_path):
    """The interval is of (model - baseline) per sample, averaged over the runs first: a model that finds
    every sample a baseline misses reads +1 with no spread; a model equal to the baseline reads 0; and an
    interval over half-and-half differences straddles its mean."""
    import numpy as np
    n = 200
    always, never = np.full((2, n), 3), np.zeros((2, n), dtype=int)
    assert table.paired_interval(always, never, 10, np.ones(n, bool)) == (1.0, 1.0, 1.0)
    assert table.paired_interval(always, always, 1, np.ones(n, bool)) == (0.0, 0.0, 0.0)
    half = np.tile(np.array([1, 0] * (n // 2)), (2, 1))
    d, lo, hi = table.paired_interval(half, never, 1, np.ones(n, bool))
    assert d == 0.5 and lo < 0.5 < hi and hi - lo < 0.3
    # the rankings files beside the eval JSONs feed it; samples that differ between runs are refused
    paths = []
    for seed in range(2):
        folder = tmp_path / f"s{seed}"
        folder.mkdir()
        (folder / "eval_test.json").write_text(json.dumps(eval_json(0.3)))
        rows = [{"dialog": "d", "turn": i, "gold": "m1", "fresh": i % 2 == 0, "rank": 1, "top": [],
                 "baselines": {"cooc": 0}} for i in range(n)]
        (folder / "rankings_test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        paths.append(str(folder / "eval_test.json"))
    lines = table.interval_rows(paths)
    assert any(line.startswith("| cooc | +1.0000 [+1.0000, +1.0000]") for line in lines)
    rows[0]["gold"] = "m2"
    (tmp_path / "s1" / "rankings_test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(SystemExit, match="other samples"):
        table.interval_rows(paths)
