"""
dev/text_pop.py: the model-free text + popularity ranker. Its ranks are the sorted order of its scores,
its weight is the val grid's best, and a rankings file of other samples is refused in one line.

    python -m pytest tests/dev/test_text_pop.py -q
"""
import json
import os
import shutil
import sys

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [os.path.join(REPO, "dev")]
import text_pop  # noqa: E402
from conftest import run_cli  # noqa: E402
from nanocrs.data import load_dataset, rec_samples  # noqa: E402


def test_ranks_are_the_sorted_order():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(20, 60, generator=g)
    golds = torch.randint(0, 60, (20,), generator=g).tolist()
    got = text_pop.ranks_of(scores, golds, k=10)
    for row, gold, rank in zip(scores, golds, got):
        order = sorted(range(60), key=lambda i: -float(row[i]))
        want = order.index(gold) + 1
        assert rank == (want if want <= 10 else 0)


def minilm_copy(dataset_dir, tmp_path) -> str:
    """The tiny dataset with its items embedded by the real MiniLM, as data_prep.py --encoder minilm does."""
    from nanocrs.encoder import encode_texts
    data = str(tmp_path / "syn-minilm")
    shutil.copytree(dataset_dir, data)
    items = [json.loads(line) for line in open(os.path.join(data, "items.jsonl"))]
    np.save(os.path.join(data, "item_embeddings.npy"), encode_texts([it["text"] for it in items], "minilm"))
    meta = json.load(open(os.path.join(data, "dataset.json")))
    json.dump({**meta, "encoder": "minilm"}, open(os.path.join(data, "dataset.json"), "w"))
    return data


def test_text_pop_end_to_end(dataset_dir, tmp_path):
    r = run_cli("dev/text_pop.py", "--data", dataset_dir)
    assert r.returncode != 0 and "tfidf" in r.stderr.strip().splitlines()[-1]
    r = run_cli("dev/text_pop.py", "--data", str(tmp_path / "nowhere"))
    assert r.returncode != 0 and "nowhere" in r.stderr.strip().splitlines()[-1] and "Traceback" not in r.stderr
    data = minilm_copy(dataset_dir, tmp_path)
    emb_path = os.path.join(data, "item_embeddings.npy")
    good = open(emb_path, "rb").read()
    open(emb_path, "wb").write(b"not an array")  # a damaged file: one line naming it
    r = run_cli("dev/text_pop.py", "--data", data)
    assert r.returncode != 0 and emb_path in r.stderr.strip().splitlines()[-1] and "Traceback" not in r.stderr
    open(emb_path, "wb").write(good)
    out = str(tmp_path / "tp.json")
    r = run_cli("dev/text_pop.py", "--data", data, "--json", out, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.load(open(out))
    grid = {float(w): r10 for w, r10 in res["val_grid"].items()}
    assert sorted(grid) == sorted(text_pop.GRID)
    assert res["w"] == min(w for w in grid if grid[w] == max(grid.values()))  # the best val R@10, ties: the smaller w
    assert res["val"]["recall@10"] == grid[res["w"]]
    test = load_dataset(data)["test"]
    assert res["test"]["n"] == len(list(rec_samples(test)))
    for split in ("val", "test"):
        m = res[split]
        assert 0 <= m["recall@1"] <= m["recall@10"] <= m["recall@50"] <= 1
    # a model's rankings file of other samples (here: one row short) is refused, naming the file
    rows = [{"dialog": d["id"], "turn": t, "gold": g, "fresh": f, "rank": 1} for d, t, g, f in rec_samples(test)]
    bad = tmp_path / "rankings_test.jsonl"
    bad.write_text("".join(json.dumps(x) + "\n" for x in rows[:-1]))
    r = run_cli("dev/text_pop.py", "--data", data, "--against", str(bad), timeout=300)
    assert r.returncode != 0 and str(bad) in r.stderr.strip().splitlines()[-1]
    # the same file whole: every gold at rank 1, so the model's R@1 is ahead of the ranker's by 1 - its R@1
    bad.write_text("".join(json.dumps(x) + "\n" for x in rows))
    r = run_cli("dev/text_pop.py", "--data", data, "--against", str(bad), "--json", out, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    d, lo, hi = json.load(open(out))["model_minus_text_pop"]["R@1"]
    assert abs(d - (1 - res["test"]["recall@1"])) < 1e-9 and lo <= d <= hi
