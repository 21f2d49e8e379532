"""
Ranking metrics and the non-learned baselines they are always reported beside.

One evaluation sample = (dialog context, one gold item the recommender mentioned in its turn). For a
ranked list of item ids (best first):
    Recall@k = 1 if gold in the top k         NDCG@k = 1/log2(rank + 1)         MRR@k = 1/rank
(rank counted from 1; 0 when the gold item is not in the top k), each averaged over samples.
A beam-search list of width W is not a full ranking: metrics at k <= W only.

Baselines, computed on the same samples:
    popularity   items ranked by how often recommenders mentioned them in the training dialogs
    repeat       the items already mentioned in this dialog, latest first (the "repetition shortcut")
    oracle       (synthetic world only) the generator's own ranked list of what its rule allows
"""

import math
from collections import Counter

RECALL_KS = (1, 5, 10, 20, 50)
RANK_KS = (5, 10, 20)


def rank_of(ranked: list, gold) -> int:
    """1-based rank of gold in ranked, or 0 if absent."""
    try:
        return ranked.index(gold) + 1
    except ValueError:
        return 0


def rank_metrics(ranks: list[int]) -> dict:
    """Average metrics over samples from each sample's 1-based rank of the gold item (0 = not found)."""
    n = max(len(ranks), 1)
    m = {}
    for k in RECALL_KS:
        m[f"recall@{k}"] = sum(1 for r in ranks if 0 < r <= k) / n
    for k in RANK_KS:
        m[f"ndcg@{k}"] = sum(1 / math.log2(r + 1) for r in ranks if 0 < r <= k) / n
        m[f"mrr@{k}"] = sum(1 / r for r in ranks if 0 < r <= k) / n
    return m


class Popularity:
    """Items ranked by recommender mentions in the training dialogs (ties: id order, deterministic)."""

    def __init__(self, train_dialogs: list[dict], catalogue: list[str]):
        counts = Counter(i for d in train_dialogs for t in d["turns"] if t["role"] == "assistant" for i in t["items"])
        self.ranked = sorted(catalogue, key=lambda i: (-counts[i], i))

    def rank(self, context: list[dict], k: int = 50) -> list[str]:
        return self.ranked[:k]


def repeat_context(context: list[dict], k: int = 50) -> list[str]:
    """The context's items, most recently mentioned first."""
    seen = {}
    for t, turn in enumerate(context):
        for j, item in enumerate(turn["items"]):
            seen[item] = (t, j)
    return sorted(seen, key=lambda i: seen[i], reverse=True)[:k]


def format_table(rows: dict[str, dict], keys: list[str]) -> str:
    """A plain text table: one row per method, one column per metric."""
    name_w = max(len(n) for n in rows) + 2
    head = "method".ljust(name_w) + "".join(k.rjust(10) for k in keys)
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        lines.append(name.ljust(name_w) + "".join(f"{m.get(k, float('nan')):10.4f}" for k in keys))
    return "\n".join(lines)
