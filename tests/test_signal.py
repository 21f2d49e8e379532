"""
Tests for the training signal beyond the text dialogs (issue: learn more than counting): ReDial's E19
item sequences as items-only dialogs, INSPIRED read from its annotated UniCRS splits with every
annotated movie kept, item-text alignment windows, co-occurrence item features and the random-ID
control. All on small invented fixtures.

    python -m pytest tests/test_signal.py -q
"""

import json
import os
import shutil

import numpy as np

from conftest import REPO
from nanocrs.data import Renderer, load_dataset
from nanocrs.datasets import build_redial
from nanocrs.inspired import build_inspired
from nanocrs.encoder import cooc_counts, cooc_svd, item_features, ppmi_factors
from nanocrs.quantizer import SemanticIDs
from nanocrs.tokenizer import BOI, EOI, MODE_REC, RESP, Tokenizer, added_tokens

FIX = os.path.join(REPO, "tests", "fixtures")


def _redial_with_e19(tmp_path):
    raw = os.path.join(tmp_path, "redial")
    shutil.copytree(os.path.join(FIX, "redial"), raw)
    e19 = os.path.join(raw, "extra", "e19")
    os.makedirs(e19)
    json.dump({str(1000 + k): k for k in range(1, 9)}, open(os.path.join(e19, "ReDID2uID.json"), "w"))  # uID k -> 100k
    records = [
        ["101", [[1, 1]], [], [[2, 1]]],                      # has text here: never added
        ["201", [], [], [[3, 1], [4, 0], [5, 1]]],            # no text: added, ordered 1003 1004 1005
        ["201", [[3, 1]], [], [[4, 0], [5, 1]]],              # a later step of the same dialog
        ["20001", [[1, 1]], [], [[6, 1]]],                    # a test dialog: never trained on
        ["202", [[7, 1]], [], []],                            # one item: nothing to predict
        ["203", [[1, 1]], [], [[99, 1]]],                     # unknown uID: skipped and counted
    ]
    json.dump(records, open(os.path.join(e19, "ReDialRnGChronoTRAIN_wEmptyTargets.json"), "w"))
    return raw


def test_redial_item_sequences(tmp_path):
    raw = _redial_with_e19(tmp_path)
    _, splits, info = build_redial(raw, seed=0)
    seq = {d["id"]: d for d in splits["train"] if d.get("items_only")}
    assert list(seq) == ["redial-seq-201"] and info["item_sequence_dialogs"] == 1
    d = seq["redial-seq-201"]
    assert [(t["role"], t["items"]) for t in d["turns"]] == [("user", ["1003"]), ("assistant", ["1004"]),
                                                              ("assistant", ["1005"])]
    assert not any(d.get("items_only") for d in splits["val"] + splits["test"])
    assert sum(v["count"] for k, v in info["skipped"].items() if k.startswith("E19")) == 1
    assert info["official_train_used"] == 6  # the text dialogs alone
    # off: the same splits as before
    _, plain, _ = build_redial(raw, seed=0, item_sequences=False)
    assert not any(d.get("items_only") for d in plain["train"])
    assert sorted(d["id"] for d in plain["val"]) == sorted(d["id"] for d in splits["val"])


def _tiny_renderer(item_ids, block_size=256):
    sids = SemanticIDs(item_ids, [(k % 3, k // 3) for k in range(len(item_ids))], [3, 3])
    text = ["User: Assistant: the film is good (1999) | comedy, drama"] * 5
    tok = Tokenizer.train(text, 300, added=added_tokens(sids))
    return Renderer(tok, sids, block_size), tok, sids


def test_items_only_dialog_supervises_only_mode_and_item():
    rd, tok, sids = _tiny_renderer(["a", "b", "c"])
    d = {"id": "x", "items_only": True, "turns": [
        {"role": "user", "text": "@{a}", "items": ["a"]},
        {"role": "assistant", "text": "@{b}", "items": ["b"]},
        {"role": "assistant", "text": "@{c}", "items": ["c"]}]}
    (ids, targets), = rd.dialog_windows(d)
    sup = [tok.token(t) for t in targets if t != -1]
    assert sup == [MODE_REC, BOI, *sids.tokens("b"), EOI, MODE_REC, BOI, *sids.tokens("c"), EOI]
    assert tok.id(RESP) not in ids  # no (empty) response is ever learned
    # the recommendation eval's prefix is what these sequences teach
    assert rd.prompt(d["turns"][:2], forced=MODE_REC + BOI)[-2:] == [tok.id(MODE_REC), tok.id(BOI)]


def test_item_text_windows_both_directions():
    rd, tok, sids = _tiny_renderer(["a", "b", "c"])
    items = [{"id": i, "title": f"film {i}", "text": "", "metadata": {"year": 1999, "genres": ["comedy"]}}
             for i in ("a", "b", "c")]
    windows = rd.item_text_windows(items, per_window=2)
    assert len(windows) == 2  # 3 items, 2 per window
    ids, targets = windows[0]
    supervised = tok.decode([t for t in targets if t != -1])
    assert "film a (1999) | comedy" in supervised and "film b (1999) | comedy" in supervised
    assert supervised.count("".join(sids.tokens("a"))) == 1  # text -> ID: the ID is a target
    assert len(ids) == len(targets)


def test_cooc_features_group_items_that_co_occur():
    ids = [f"m{k}" for k in range(40)]
    rng = np.random.default_rng(0)
    dialogs = []
    for _ in range(300):  # two communities: m0..m17 and m18..m35; m36..m39 never mentioned
        base = 0 if rng.random() < 0.5 else 18
        its = rng.choice(18, size=3, replace=False) + base
        dialogs.append({"turns": [{"role": "user", "items": [ids[i] for i in its]}]})
    text = rng.standard_normal((40, 8)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    v = cooc_svd(dialogs, ids, dim=4, fallback=text)
    assert v.shape == (40, 4) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    sim = v @ v.T
    within = np.mean([sim[a, b] for a in range(18) for b in range(18) if a != b])
    across = np.mean([sim[a, b] for a in range(18) for b in range(18, 36)])
    assert within > across + 0.5
    both = item_features(text, dialogs, ids, "text+cooc", dim=4)
    assert both.shape == (40, 12) and np.allclose(np.linalg.norm(both, axis=1), 1, atol=1e-5)


def test_ppmi_factors_are_the_best_low_rank_ppmi():
    """cooc_counts counts dialogs per pair; ppmi_factors' left @ right.T is the best rank-dim
    approximation of the positive PMI of the items that co-occur (exact here: the sketch spans them all)."""
    rng = np.random.default_rng(0)
    ids = [f"i{k}" for k in range(24)]
    dialogs = [{"turns": [{"role": "user", "items": [ids[i] for i in rng.choice(20, size=4, replace=False)]},
                          {"role": "assistant", "items": [ids[0]]}]} for _ in range(60)]
    counts = cooc_counts(dialogs, ids)
    assert counts[0, 0] == 0 and np.array_equal(counts, counts.T) and not counts[20:].any()
    pair = [sum(1 for d in dialogs if {ids[1], ids[2]} <= {i for t in d["turns"] for i in t["items"]})]
    assert counts[1, 2] == pair[0]
    warm, left, right = ppmi_factors(counts, dim=5)
    assert list(warm) == list(range(20)) and left.shape == right.shape == (20, 5)
    c = counts[:20, :20].astype(np.float64)
    with np.errstate(divide="ignore"):
        pmi = np.log(c * c.sum() / np.outer(c.sum(1), c.sum(0)))
    ppmi = np.where(c > 0, np.maximum(pmi, 0), 0)
    u, s, vt = np.linalg.svd(ppmi)
    assert np.allclose(left @ right.T, (u[:, :5] * s[:5]) @ vt[:5], atol=1e-8)
    assert ppmi_factors(counts, dim=20) is None  # no more co-occurring items than the rank: nothing to factorise


def test_random_ids_control(tmp_path):
    import data_prep
    base = ["--dataset", "synthetic", "--n-items", "160", "--n-train", "60", "--n-val", "10", "--n-test", "10",
            "--levels", "2", "--codebook-size", "8", "--vocab-size", "300", "--kmeans-iters", "10"]
    data_prep.main(base + ["--out", str(tmp_path / "sem")])
    data_prep.main(base + ["--out", str(tmp_path / "rnd"), "--ids", "random"])
    a = SemanticIDs.load(str(tmp_path / "sem" / "sids.json"))
    b = SemanticIDs.load(str(tmp_path / "rnd" / "sids.json"))
    assert sorted(a.codes) == sorted(b.codes) and a.level_sizes == b.level_sizes  # same codes, same lengths
    moved = sum(a.tokens(i) != b.tokens(i) for i in a.item_ids)
    assert moved > 0.8 * len(a)
    load_dataset(str(tmp_path / "rnd"))


def test_inspired_unicrs_keeps_every_annotated_movie(tmp_path):
    raw = os.path.join(tmp_path, "inspired")
    os.makedirs(os.path.join(raw, "unicrs"))
    def turn(role, text, movies):
        return {"text": text, "role": role, "movie": movies, "entity_link": [], "entity_name": [],
                "movie_link": [], "movie_name": []}
    dialog = [turn("SEEKER", "I loved Quiet Rivers and Qt Rvrs 2", ["Quiet Rivers (2011)", "Quiet Rivers 2 (2013)"]),
              turn("RECOMMENDER", "Then watch Moonlite Circus!", ["Moonlight Circus (2003)"]),
              turn("SEEKER", "ok", [])]
    for name in ("train", "valid", "test"):
        with open(os.path.join(raw, "unicrs", f"{name}_data_dbpedia.jsonl"), "w") as f:
            f.write(json.dumps(dialog) + "\n")
    # a TSV beside them is not used: all splits come from one source
    open(os.path.join(raw, "test.tsv"), "w").write("not read\n")
    items, splits, info = build_inspired(raw, seed=0, redial_metadata_path="")
    assert set(info["split_sources"].values()) == {os.path.join("unicrs", f"{n}_data_dbpedia.jsonl")
                                                   for n in ("train", "valid", "test")}
    d = splits["test"][0]
    # the seeker's unlocated movie is appended as a mention; the recommender's is the turn's item
    assert d["turns"][0]["items"] == ["quiet_rivers_2011", "quiet_rivers_2_2013"]
    assert d["turns"][0]["text"].endswith("@{quiet_rivers_2_2013}")
    assert d["turns"][1] == {"role": "assistant", "text": "Then watch Moonlite Circus!", "items": ["moonlight_circus_2003"]}
    assert len(items) == 3


def test_reorder_items_only_keeps_items_and_roles():
    import random
    from nanocrs.data import reorder_items_only
    d = {"id": "x", "items_only": True, "turns": [
        {"role": "user" if k == 0 else "assistant", "text": "@{" + m + "}", "items": [m]} for k, m in enumerate("abcde")]}
    orders = set()
    for s in range(20):
        r = reorder_items_only(d, random.Random(s))
        assert [t["role"] for t in r["turns"]] == [t["role"] for t in d["turns"]]  # roles stay with positions
        assert sorted(t["items"][0] for t in r["turns"]) == list("abcde")
        assert all(t["text"] == "@{" + t["items"][0] + "}" for t in r["turns"])   # a turn keeps its own item
        orders.add(tuple(t["items"][0] for t in r["turns"]))
    assert len(orders) > 10 and d["turns"][0]["items"] == ["a"]  # it varies, and the input is untouched
    assert reorder_items_only(d, random.Random(7)) == reorder_items_only(d, random.Random(7))
