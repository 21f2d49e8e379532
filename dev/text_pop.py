"""
A ranker with no language model at all: the frozen sentence encoder's match between the dialog's last
turns and each item's text, plus w * log(1 + popularity), with w chosen on val. It asks how much of a
recommender's score a text match and a count already give, on the eval's own samples.

    python dev/text_pop.py --data data/inspired
    python dev/text_pop.py --data data/inspired --against out/inspired-s0/rankings_test.jsonl out/inspired-s1/rankings_test.jsonl

score(item) = cos(E(last two turns), E(item text)) + w log(1 + recommender mentions in train), E the
encoder that data_prep.py embedded the items with (item_embeddings.npy; MiniLM with --encoder minilm),
the dialog text read as the text prior reads it (nanocrs/heads.py TextPrior: mentions written as titles).
w: the grid value with the best val R@10 (ties: the smaller w). Prints val and test R@1 / R@10 / R@50 /
fresh R@10; with --against, the paired bootstrap 95% interval of (model - this ranker) on test, the
model's ranks read from its rankings files (one per seed, averaged per sample, as runs/table.py does).
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "runs"))
from nanocrs.data import DataError, load_dataset, rec_samples, training_dialogs  # noqa: E402
from nanocrs.heads import TextPrior  # noqa: E402
from nanocrs.metrics import rank_metrics, recommended_counts  # noqa: E402
from table import paired_interval  # noqa: E402

GRID = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


def split_scores(prior: TextPrior, dialogs: list[dict]) -> tuple[list[tuple], torch.Tensor]:
    """The split's samples (dialog id, turn, gold, fresh) and, per sample, the text match of its turn (S, N)."""
    samples = list(rec_samples(dialogs))
    turns = list(dict.fromkeys((d["id"], t) for d, t, _, _ in samples))  # a turn with two golds is embedded once
    by_id = {d["id"]: d for d in dialogs}
    match = prior([by_id[did]["turns"][:t] for did, t in turns]) if turns else torch.zeros(0, 0)  # (turns, N)
    row = {key: n for n, key in enumerate(turns)}
    return [(d["id"], t, gold, fresh) for d, t, gold, fresh in samples], match[[row[(d["id"], t)] for d, t, _, _ in samples]]


def ranks_of(scores: torch.Tensor, golds: list[int], k: int = 50) -> list[int]:
    """1-based rank of each gold in its row's top k, 0 when outside it (as metrics.rank_of)."""
    top = scores.topk(k, dim=1).indices  # (S, k)
    hit = top == torch.tensor(golds)[:, None]
    return [int(h.nonzero()[0]) + 1 if h.any() else 0 for h in hit]


def metrics(ranks: list[int], fresh: list[bool]) -> dict:
    m = rank_metrics(ranks)
    return {"recall@1": m["recall@1"], "recall@10": m["recall@10"], "recall@50": m["recall@50"],
            "fresh_recall@10": rank_metrics([r for r, f in zip(ranks, fresh) if f])["recall@10"], "n": len(ranks)}


def model_ranks(paths: list[str], keys: list[tuple]) -> np.ndarray:
    """(runs, samples) the model's ranks from sample.py --rankings files, checked to be these samples."""
    out = []
    for p in paths:
        with open(p) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if [(r["dialog"], r["turn"], r["gold"]) for r in rows] != [k[:3] for k in keys]:
            sys.exit(f"{p}: other samples than this split's (a rankings file of another dataset or split?)")
        out.append([r["rank"] for r in rows])
    return np.array(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a data_prep.py folder embedded by a sentence encoder")
    p.add_argument("--against", nargs="*", default=[], help="the model's test rankings files (sample.py --rankings)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    try:
        ds = load_dataset(args.data)
    except DataError as e:
        sys.exit(str(e))
    encoder = ds["meta"].get("encoder", "tfidf")
    if encoder.startswith("tfidf"):
        sys.exit(f"{args.data}/dataset.json: items embedded by tfidf, which can not embed a dialog (data_prep.py --encoder minilm)")
    path = os.path.join(args.data, "item_embeddings.npy")
    try:
        emb = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        sys.exit(f"{path}: not a readable .npy file ({type(e).__name__}: {e})")
    if emb.ndim != 2 or emb.shape[0] != len(ds["items"]) or not np.isfinite(emb).all():
        sys.exit(f"{path}: expected one finite vector per item ({len(ds['items'])}), got {emb.dtype} {emb.shape}")
    catalogue = [it["id"] for it in ds["items"]]
    title = {it["id"]: it["title"] for it in ds["items"]}
    prior = TextPrior(encoder, emb, 1.0, title.__getitem__)
    counts = recommended_counts(training_dialogs(ds, "train"))
    log_pop = torch.log1p(torch.tensor([float(counts[i]) for i in catalogue]))  # (N,)
    index = {i: n for n, i in enumerate(catalogue)}
    res = {"encoder": encoder}
    keys, match = {}, {}
    for split in ("val", "test"):
        keys[split], match[split] = split_scores(prior, ds[split])
    golds = {s: [index[k[2]] for k in keys[s]] for s in keys}
    fresh = {s: [k[3] for k in keys[s]] for s in keys}
    grid = {w: metrics(ranks_of(match["val"] + w * log_pop, golds["val"]), fresh["val"]) for w in GRID}
    w = max(GRID, key=lambda g: (grid[g]["recall@10"], -g))
    res["val_grid"] = {str(g): grid[g]["recall@10"] for g in GRID}
    res["w"] = w
    test_ranks = ranks_of(match["test"] + w * log_pop, golds["test"])
    res["val"], res["test"] = grid[w], metrics(test_ranks, fresh["test"])
    print(f"w = {w} (val R@10 by w: {res['val_grid']})")
    for split in ("val", "test"):
        m = res[split]
        print(f"{split}: {m['n']} samples, R@1 {m['recall@1']:.4f}  R@10 {m['recall@10']:.4f}  "
              f"R@50 {m['recall@50']:.4f}  fresh R@10 {m['fresh_recall@10']:.4f}")
    if args.against:
        model, base = model_ranks(args.against, keys["test"]), np.array([test_ranks])
        every, fr = np.ones(len(test_ranks), dtype=bool), np.array(fresh["test"])
        res["model_minus_text_pop"] = {}
        for name, k, mask in (("R@1", 1, every), ("R@10", 10, every), ("fresh R@10", 10, fr)):
            d, lo, hi = paired_interval(model, np.repeat(base, len(model), 0), k, mask)
            res["model_minus_text_pop"][name] = [d, lo, hi]
            print(f"model - text+pop {name}: {d:+.4f} [{lo:+.4f}, {hi:+.4f}] ({len(model)} runs averaged per sample)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
