"""
The README's results rows from a recipe's seeds: mean ± std over the eval JSONs that sample.py wrote,
the model beside every baseline, after checking that all runs scored the same samples.

    bash runs/redial.sh 0 && bash runs/redial.sh 1 && bash runs/redial.sh 2
    python runs/table.py out/redial-s0/eval_test.json out/redial-s1/eval_test.json out/redial-s2/eval_test.json

The std is the sample std (n - 1), as in docs/results.md. The baselines count each run's training data;
with the same data they are the same in every run, so a std above zero on a baseline row says the runs
did not train on the same data.
"""
import argparse
import json
import statistics
import sys

COLUMNS = [("R@1", None, "recall@1"), ("R@10", None, "recall@10"), ("R@50", None, "recall@50"),
           ("NDCG@10", None, "ndcg@10"), ("fresh R@10", "fresh", "recall@10")]


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def load(paths: list[str]) -> list[dict]:
    runs = []
    for p in paths:
        try:
            with open(p) as f:
                r = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            sys.exit(f"{p}: not a readable eval JSON ({e})")
        if "model" not in r or "n_samples" not in r:
            sys.exit(f"{p}: not a sample.py --eval JSON (no 'model' or 'n_samples')")
        runs.append(r)
    first = runs[0]
    for p, r in zip(paths, runs):  # a mean over runs means something only on the same samples
        for key in ("split", "n_samples", "n_fresh", "beam"):
            if r.get(key) != first.get(key):
                sys.exit(f"{p}: {key} {r.get(key)} differs from {paths[0]}'s {first.get(key)}")
    return runs


def rows(runs: list[dict]) -> list[tuple[str, list[str]]]:
    """(method, one "mean ± std" cell per column) for the methods every run has, in the JSON's order (model
    first); then the model's free-mode REC precision / recall (threshold from val) when the runs were calibrated."""
    out = []
    # a method is a key whose value holds ranking metrics (the others: counts, "fresh", "diagnostics", ...)
    methods = [k for k, v in runs[0].items() if isinstance(v, dict) and "recall@1" in v]
    for m in methods:
        if not all(m in r for r in runs):
            continue
        cells = []
        for _, part, key in COLUMNS:
            mu, sd = mean_std([(r[part] if part else r)[m][key] for r in runs])
            cells.append(f"{mu:.4f} ± {sd:.4f}")
        out.append((m, cells))
    if all("intent_calibrated" in r for r in runs):
        p = mean_std([r["intent_calibrated"]["rec_precision"] for r in runs])
        q = mean_std([r["intent_calibrated"]["rec_recall"] for r in runs])
        out.append(("model intent", [f"REC precision {p[0]:.2f} ± {p[1]:.2f} / recall {q[0]:.2f} ± {q[1]:.2f}"]))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("evals", nargs="+", help="eval JSONs (sample.py --eval ... --json), one per seed")
    args = p.parse_args()
    runs = load(args.evals)
    r0 = runs[0]
    print(f"{len(runs)} runs, {r0['split']}: {r0['n_samples']} samples ({r0['n_fresh']} fresh), beam {r0['beam']}")
    print("| method | " + " | ".join(c for c, _, _ in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for m, cells in rows(runs):
        print(f"| {m} | " + " | ".join(cells) + " |")
    print("the model per run, R@1 / R@10 / fresh R@10: " + ", ".join(
        f"{r['model']['recall@1']:.4f} / {r['model']['recall@10']:.4f} / {r['fresh']['model']['recall@10']:.4f}" for r in runs))


if __name__ == "__main__":
    main()
