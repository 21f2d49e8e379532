"""
The README's results rows from a recipe's seeds: mean ± std over the eval JSONs that sample.py wrote,
the model beside every baseline, after checking that all runs scored the same samples.

    bash runs/redial.sh 0 && bash runs/redial.sh 1 && bash runs/redial.sh 2
    python runs/table.py out/redial-s0/eval_test.json out/redial-s1/eval_test.json out/redial-s2/eval_test.json

The std is the sample std (n - 1). The baselines count each run's training data; with the same data
they are the same in every run, so a std above zero on a baseline row says the runs did not train on
the same data.

Beside the std over seeds (which says how much training noise moves a number), the sampling error of
the test set itself: a paired bootstrap 95% interval of (model - baseline) for R@1, R@10 and fresh R@10,
read from the per-sample rankings that sample.py --rankings writes beside each eval JSON
(eval_test.json -> rankings_test.jsonl). Each test sample's difference is averaged over the seeds first
(the seeds score the same samples), then the samples are resampled with replacement. "Beats X" needs
the whole interval above zero.
"""
import argparse
import hashlib
import json
import math
import os
import statistics
import sys

import numpy as np

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
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            sys.exit(f"{p}: not a readable eval JSON ({e})")
        runs.append(r)
    check_runs(paths, runs)
    return runs


KNOB_KEYS = ("copy_bias", "just_named_bias", "text_prior")  # what the eval JSON records of decoding knobs


def check_runs(paths: list[str], runs: list[dict]):
    """Exit with one line naming the file unless the runs are distinct files (one seed given twice would
    count twice, with std 0), well formed (every method's metrics finite numbers in [0, 1]), of the same
    methods, scored on the same samples, and decoded with the same knob settings: the same flags, or
    each run's own calibration on val (values differ from seed to seed; their sources may not)."""
    seen = {}
    for p in paths:
        with open(p, "rb") as f:
            key = hashlib.sha256(f.read()).hexdigest()
        for k in (os.path.realpath(p), key):
            if k in seen:
                sys.exit(f"{p}: the same eval as {seen[k]} (given twice, it would count as two seeds)")
            seen[k] = p
    for p, r in zip(paths, runs):
        if not isinstance(r, dict) or "model" not in r or "n_samples" not in r:
            sys.exit(f"{p}: not a sample.py --eval JSON (no 'model' or 'n_samples')")
        if not isinstance(r.get("fresh"), dict):
            sys.exit(f"{p}: not a sample.py --eval JSON (no 'fresh' metrics)")
    first, methods = runs[0], {}
    for p, r in zip(paths, runs):  # a mean over runs means something only on the same samples
        for key in ("split", "protocol", "n_samples", "n_fresh", "beam"):
            if r.get(key) != first.get(key):
                sys.exit(f"{p}: {key} {r.get(key)} differs from {paths[0]}'s {first.get(key)}")
        for m, v in r.items():
            if isinstance(v, dict) and "recall@1" in v:
                methods.setdefault(m, p)
    for p, r in zip(paths, runs):
        for m, where in methods.items():
            for part in (r, r["fresh"]):
                if m not in part:
                    sys.exit(f"{p}: method {m!r} is missing{' from fresh' if part is not r else ''} ({where} has it)")
                for _, _, key in COLUMNS:
                    v = part[m].get(key) if isinstance(part[m], dict) else None
                    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:  # NaN fails too
                        sys.exit(f"{p}: {'fresh.' if part is not r else ''}{m}.{key} must be a number in [0, 1], got {v!r}")
        if ("intent_calibrated" in r) != ("intent_calibrated" in first):
            sys.exit(f"{p}: {'has' if 'intent_calibrated' in r else 'lacks'} a calibrated REC threshold, "
                     f"{paths[0]} {'does not' if 'intent_calibrated' in r else 'does'}: different knob settings")
        for key in ("rec_precision", "rec_recall"):
            v = r.get("intent_calibrated", {}).get(key, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                sys.exit(f"{p}: intent_calibrated.{key} must be a number, got {v!r}")
    for k in KNOB_KEYS:
        sources = [r.get("knob_sources", {}).get(k) for r in runs]
        for p, r, src in zip(paths, runs, sources):
            if src != sources[0]:
                sys.exit(f"{p}: {k} from {src}, {paths[0]}'s from {sources[0]}: different knob settings")
            if r.get(k) != first.get(k) and src != "calibration.json":
                sys.exit(f"{p}: {k} {r.get(k)} differs from {paths[0]}'s {first.get(k)}: different knob settings "
                         "(runs calibrated on val each record it, from sample.py's eval JSON)")


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


BOOTSTRAP = 2000  # resamples; the interval's ends move by about 0.001 between bootstrap seeds at this count


def rankings_path(eval_path: str) -> str:
    folder, name = os.path.split(eval_path)
    return os.path.join(folder, name.replace("eval_", "rankings_", 1).rsplit(".json", 1)[0] + ".jsonl")


def per_sample_hits(eval_paths: list[str]) -> tuple[dict, list[bool]] | None:
    """({method: (runs, samples) 0/1 array of rank in 1..k} for k in (1, 10), fresh flags) from the rankings
    files beside the eval JSONs, or None when a run has none (or an older one without the baselines)."""
    per_run = []
    for p in eval_paths:
        rp = rankings_path(p)
        if not os.path.isfile(rp):
            return None
        with open(rp) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if not rows or "baselines" not in rows[0]:
            return None
        per_run.append(rows)
    keys = [(r["dialog"], r["turn"], r["gold"]) for r in per_run[0]]
    for p, rows in zip(eval_paths, per_run):
        if [(r["dialog"], r["turn"], r["gold"]) for r in rows] != keys:
            sys.exit(f"{rankings_path(p)}: other samples than {rankings_path(eval_paths[0])}")
    methods = ["model"] + list(per_run[0][0]["baselines"])
    ranks = {m: np.array([[r["rank"] if m == "model" else r["baselines"][m] for r in rows] for rows in per_run])
             for m in methods}
    return ranks, [r["fresh"] for r in per_run[0]]


def paired_interval(model_ranks, base_ranks, k: int, mask, seed: int = 0) -> tuple[float, float, float]:
    """(mean difference, 2.5th, 97.5th percentile) of R@k(model) - R@k(baseline) over the masked samples:
    per sample the difference averaged over runs, then a bootstrap over samples."""
    hit = lambda r: ((r >= 1) & (r <= k)).astype(np.float64)  # rank 0: not in the list
    diff = (hit(model_ranks) - hit(base_ranks)).mean(0)[mask]  # (samples,)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (BOOTSTRAP, len(diff)))].mean(1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def interval_rows(eval_paths: list[str]) -> list[str]:
    got = per_sample_hits(eval_paths)
    if got is None:
        return ["(no per-sample rankings with baselines beside the eval JSONs: sample.py --rankings writes them)"]
    ranks, fresh = got
    everything, fresh = np.ones(len(fresh), dtype=bool), np.array(fresh, dtype=bool)
    out = [f"model - baseline, paired bootstrap 95% interval over {len(fresh)} samples ({fresh.sum()} fresh), "
           f"{len(eval_paths)} runs averaged per sample:",
           "| baseline | R@1 | R@10 | fresh R@10 |", "|---|---|---|---|"]
    for m in ranks:
        if m in ("model", "oracle"):
            continue
        cells = [paired_interval(ranks["model"], ranks[m], k, mask) for k, mask in ((1, everything), (10, everything),
                                                                                     (10, fresh))]
        out.append(f"| {m} | " + " | ".join(f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]" for d, lo, hi in cells) + " |")
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
    print("\n".join(interval_rows(args.evals)))
    print("the model per run, R@1 / R@10 / fresh R@10: " + ", ".join(
        f"{r['model']['recall@1']:.4f} / {r['model']['recall@10']:.4f} / {r['fresh']['model']['recall@10']:.4f}" for r in runs))


if __name__ == "__main__":
    main()
