"""
dev/fresh_buckets.py: the per-bucket counts on a hand-worked case (two fresh samples, one repeat).

    python -m pytest tests/dev/test_fresh_buckets.py -q
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "dev"))
import fresh_buckets  # noqa: E402
from nanocrs.metrics import CoOccurrence, Popularity  # noqa: E402


def turn(role, *items):
    return {"role": role, "text": "", "items": list(items)}


def test_buckets_by_context_items():
    train = [{"id": "t1", "turns": [turn("user", "a"), turn("assistant", "b")]},
             {"id": "t2", "turns": [turn("user", "c"), turn("assistant", "b", "d")]}]
    catalogue = ["a", "b", "c", "d"]
    cooc, pop = CoOccurrence(train, catalogue), Popularity(train, catalogue)
    test = {"x": {"id": "x", "turns": [turn("user"), turn("assistant", "d"), turn("user", "a"), turn("assistant", "b", "a")]}}
    # popularity: b (2), d (1), then a, c; co-occurrence of context {d}: b, c, then a
    runs = [[{"dialog": "x", "turn": 1, "gold": "d", "fresh": True, "rank": 0, "top": [["b", -1.0], ["a", -2.0]]},
             {"dialog": "x", "turn": 3, "gold": "b", "fresh": True, "rank": 2, "top": [["d", -1.0], ["b", -2.0]]},
             {"dialog": "x", "turn": 3, "gold": "a", "fresh": False, "rank": 3, "top": []}],
            [{"dialog": "x", "turn": 1, "gold": "d", "fresh": True, "rank": 1, "top": []},
             {"dialog": "x", "turn": 3, "gold": "b", "fresh": True, "rank": 0, "top": []},
             {"dialog": "x", "turn": 3, "gold": "a", "fresh": False, "rank": 1, "top": []}]]
    rows = fresh_buckets.fresh_buckets(test, runs, cooc, pop)
    # turn 1: no context items; cooc falls back to popularity (d at rank 2); model run 0 misses, run 1 hits
    assert rows[0] == [1, 1, 1, [0, 1], 0, 0, 0]
    # turn 3: context {d, a}; the repeat (gold a) is not fresh and not counted; gold b is first for cooc
    # and popularity; run 0 has it at 2 with the context item d above it (dropping d keeps b); the
    # co-occurrence list is filled up in popularity order, which brings both context items into its top 10
    assert rows[2] == [1, 1, 1, [1, 0], 1, 2, 1]
