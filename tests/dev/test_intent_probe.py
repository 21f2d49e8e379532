"""
dev/intent_probe.py: its precision-at-recall helper on a hand-worked case, and the whole probe on the
synthetic world, whose recommender turns follow a request the probe can read (so it must find them).

    python -m pytest tests/dev/test_intent_probe.py -q
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "dev"))
import intent_probe  # noqa: E402


def test_precision_at_recall():
    # sorted by p: REC, CHAT, REC, CHAT, REC -> recall 1/3, 1/3, 2/3, 2/3, 1 at precision 1, 1/2, 2/3, 1/2, 3/5
    p = [0.9, 0.8, 0.7, 0.6, 0.5]
    y = [True, False, True, False, True]
    assert intent_probe.precision_at_recall(p, y, 0.5) == 2 / 3
    assert intent_probe.precision_at_recall(p, y, 0.3) == 1.0
    assert intent_probe.precision_at_recall(p, y, 1.0) == 3 / 5


def test_probe_reads_the_synthetic_intent(dataset_dir, tmp_path):
    out = str(tmp_path / "probe.json")
    intent_probe.main(["--data", dataset_dir, "--l2", "1e-3", "--steps", "100", "--json", out])
    res = json.load(open(out))
    assert res["turns"]["val"] > 0 and res["turns"]["test"] > 0
    share = res["rec_share"]["test"]
    # far above the base rate: the synthetic seeker asks before the recommender recommends
    assert res["test"]["rec_precision"] > min(0.9, share + 0.3), res["test"]
    assert res["test"]["rec_recall"] > 0.8, res["test"]
