"""
Where does the model win or lose against counting on the fresh protocol? The fresh test samples
split by how many distinct items the dialog named before the turn, with the model's Recall@10 (from
the rankings files of sample.py --eval test --rankings), co-occurrence's and popularity's on the same
samples, and how many of each top 10 are items the context already holds.

    python sample.py --ckpt out/redial-s0 --eval test --rankings out/redial-s0/rankings_test.jsonl
    python dev/fresh_buckets.py --data data/redial out/redial-s0/rankings_test.jsonl [more runs ...]

The baselines count the training dialogs the first run was trained on (its config.json), exactly as
the eval does. The last column drops the context items from the model's list before taking its top
10: a diagnostic of what the copy head costs on new golds, not a method (the eval never masks).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanocrs.data import load_dataset, read_jsonl, training_dialogs  # noqa: E402
from nanocrs.metrics import CoOccurrence, Popularity, rank_of  # noqa: E402

TOP = 10
LAST = 5  # contexts with this many items or more share the last row


def fresh_buckets(dialogs: dict, runs: list[list[dict]], cooc: CoOccurrence, pop: Popularity) -> dict:
    """bucket (distinct context items, LAST and more share one) -> [samples, co-occurrence hits,
    popularity hits, model hits per run, context items in the model's top (first run), in
    co-occurrence's top, model hits with the context items dropped (first run)], over fresh samples."""
    rows = {}
    for i, r in enumerate(runs[0]):
        if not r["fresh"]:
            continue
        context = dialogs[r["dialog"]]["turns"][:r["turn"]]
        in_context = {x for turn in context for x in turn["items"]}
        e = rows.setdefault(min(len(in_context), LAST), [0, 0, 0, [0] * len(runs), 0, 0, 0])
        ranked = cooc.rank(context)
        e[0] += 1
        e[1] += 1 <= rank_of(ranked, r["gold"]) <= TOP
        e[2] += 1 <= rank_of(pop.rank(context), r["gold"]) <= TOP
        for j, run in enumerate(runs):
            e[3][j] += 1 <= run[i]["rank"] <= TOP
        top = [x for x, _ in r["top"]]
        e[4] += sum(x in in_context for x in top[:TOP])
        e[5] += sum(x in in_context for x in ranked[:TOP])
        e[6] += r["gold"] in [x for x in top if x not in in_context][:TOP]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the dataset folder the runs were evaluated on")
    p.add_argument("--split", default="test")
    p.add_argument("rankings", nargs="+", help="rankings JSONL files of runs on the same samples")
    a = p.parse_args(argv)
    ds = load_dataset(a.data)
    config = json.load(open(os.path.join(os.path.dirname(a.rankings[0]), "config.json")))["train"]
    seen = training_dialogs(ds, config.get("train_splits", "train"), bool(config.get("item_sequences", 1)))
    catalogue = [it["id"] for it in ds["items"]]
    cooc, pop = CoOccurrence(seen, catalogue), Popularity(seen, catalogue)
    dialogs = {d["id"]: d for d in ds[a.split]}
    runs = [[r for _, r in read_jsonl(f)] for f in a.rankings]
    for f, rows in zip(a.rankings, runs):
        if [(r["dialog"], r["turn"], r["gold"]) for r in rows] != [(r["dialog"], r["turn"], r["gold"]) for r in runs[0]]:
            sys.exit(f"{f}: not the same samples as {a.rankings[0]}")

    rows = fresh_buckets(dialogs, runs, cooc, pop)
    print(f"fresh {a.split} samples by the number of distinct items in the context ({len(runs)} run(s); "
          f"model R@{TOP} as mean over runs)")
    print(f"| context items | samples | co-occurrence R@{TOP} | popularity R@{TOP} | model R@{TOP} | "
          f"context items in the model's / co-occurrence's top {TOP} | model R@{TOP}, context items dropped (first run) |")
    print("|---|---|---|---|---|---|---|")
    for b in sorted(rows):
        n, c, pp, m, mc, cc, dropped = rows[b]
        model = sum(m) / len(m) / n
        print(f"| {b}{'+' if b == LAST else ''} | {n} | {c / n:.3f} | {pp / n:.3f} | {model:.3f} | "
              f"{mc / n:.2f} / {cc / n:.2f} | {dropped / n:.3f} |")


if __name__ == "__main__":
    main()
