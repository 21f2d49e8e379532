"""
Tests for nanocrs/synthetic.py, the seeded fictional movie world. Run from the repo root:

    python -m pytest tests/test_synthetic.py -q

The default world is built once per test session (well under a second) and shared.
"""

import re
import pytest

from nanocrs.data import MENTION
from nanocrs.synthetic import (DECADES, GENRE_PHRASES, GENRES, MAX_WORDS, MIN_CELL, MIN_WORDS,
                               describe_world, make_world)


@pytest.fixture(scope="module")
def world():
    items, splits = make_world(seed=0)
    return items, splits


def all_dialogs(splits):
    return [d for ds in splits.values() for d in ds]


def test_deterministic():
    a = make_world(seed=3, n_items=200, n_train=50, n_val=10, n_test=10)
    b = make_world(seed=3, n_items=200, n_train=50, n_val=10, n_test=10)
    c = make_world(seed=4, n_items=200, n_train=50, n_val=10, n_test=10)
    assert a == b
    assert a[0] != c[0] and a[1] != c[1]


def test_val_test_independent_of_n_train():
    # each split has its own random stream, so growing train leaves val/test untouched
    _, s1 = make_world(seed=1, n_train=10, n_val=20, n_test=20)
    _, s2 = make_world(seed=1, n_train=30, n_val=20, n_test=20)
    assert s1["val"] == s2["val"] and s1["test"] == s2["test"]


def test_sizes_and_ids(world):
    items, splits = world
    assert len(items) >= 500
    assert {s: len(d) for s, d in splits.items()} == {"train": 3000, "val": 300, "test": 300}
    for split, dialogs in splits.items():
        assert [d["id"] for d in dialogs] == [f"syn-{split}-{i:05d}" for i in range(len(dialogs))]
    ids = [it["id"] for it in items]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[A-Za-z0-9_.-]+", x) for x in ids)


def test_items_schema(world):
    items, _ = world
    titles = [it["title"] for it in items]
    assert len(set(titles)) == len(titles), "titles must be unique"
    for it in items:
        m = it["metadata"]
        assert 1 <= len(m["genres"]) <= 3 and len(set(m["genres"])) == len(m["genres"])
        assert all(g in GENRES for g in m["genres"])
        assert m["decade"] in DECADES and m["decade"] <= m["year"] < m["decade"] + 10
        assert 8 <= len(m["plot"].split()) <= 14
        assert m["popularity"] > 0
        assert it["text"] == (f"title: {it['title']} | year: {m['year']} | "
                              f"genres: {', '.join(m['genres'])} | plot: {m['plot']}")
    pops = sorted((it["metadata"]["popularity"] for it in items), reverse=True)
    assert pops[0] == 1.0 and pops[0] > 10 * pops[-1]  # Zipf-like, long tail


def test_turn_structure(world):
    items, splits = world
    known = {it["id"] for it in items}
    for d in all_dialogs(splits):
        roles = [t["role"] for t in d["turns"]]
        assert roles[0] == "user" and roles[-1] == "assistant"
        assert all(a != b for a, b in zip(roles, roles[1:])), "roles must alternate"
        for t in d["turns"]:
            mentioned = list(dict.fromkeys(MENTION.findall(t["text"])))
            assert mentioned == t["items"], (d["id"], t)
            assert all(x in known for x in mentioned)
            assert MIN_WORDS <= len(t["text"].split()) <= MAX_WORDS, t["text"]
            assert ("oracle" in t) == (t["role"] == "assistant" and bool(t["items"]))
        # the dialog has 1-3 REC turns and the last assistant turn is a CHAT goodbye
        n_rec = sum(1 for t in d["turns"] if t["role"] == "assistant" and t["items"])
        assert 1 <= n_rec <= 3 and not d["turns"][-1]["items"]


def test_oracle_follows_hidden_rule(world):
    items, splits = world
    by_id = {it["id"]: it for it in items}
    pop = lambda x: by_id[x]["metadata"]["popularity"]
    for d in all_dialogs(splits):
        profiles = None  # the (G, D) pairs consistent with every REC turn of this dialog so far
        for k, t in enumerate(d["turns"]):
            if "oracle" not in t:
                continue
            oracle = t["oracle"]
            earlier = {x for u in d["turns"][:k] for x in u["items"]}
            assert 1 <= len(t["items"]) <= 2 and set(t["items"]) <= set(oracle)
            assert len(set(oracle)) == len(oracle) and not set(oracle) & earlier
            assert oracle == sorted(oracle, key=lambda x: (-pop(x), x)), "oracle is sorted by popularity"
            decades = {by_id[x]["metadata"]["decade"] for x in oracle}
            common = set(GENRES).intersection(*(by_id[x]["metadata"]["genres"] for x in oracle))
            assert len(decades) == 1 and common, "oracle items share a genre and a decade"
            # stronger: the oracle is exactly cell(G, D) minus earlier mentions, for some G
            (D,) = decades
            fits = {(G, D) for G in common
                    if {it["id"] for it in items if G in it["metadata"]["genres"] and it["metadata"]["decade"] == D}
                    - earlier == set(oracle)}
            profiles = fits if profiles is None else profiles & fits
            assert profiles, d["id"]
        # the profile is revealed before the first REC turn: G is said in words by the user
        first_rec = next(k for k, t in enumerate(d["turns"]) if "oracle" in t)
        said = " ".join(t["text"].lower() for t in d["turns"][:first_rec] if t["role"] == "user")
        assert any(p in said for G, _ in profiles for p in GENRE_PHRASES[G] + [G]), d["id"]
        for G, D in profiles:
            cell = [it for it in items if G in it["metadata"]["genres"] and it["metadata"]["decade"] == D]
            assert len(cell) >= MIN_CELL


def test_world_statistics(world):
    items, splits = world
    dialogs = all_dialogs(splits)
    asst = [t for d in dialogs for t in d["turns"] if t["role"] == "assistant"]
    rec = [t for t in asst if t["items"]]
    assert 0.35 < len(rec) / len(asst) < 0.55, "aim for ~45% REC assistant turns"
    two = sum(len(t["items"]) == 2 for t in rec) / len(rec)
    assert 0.2 < two < 0.4, "~30% of REC turns recommend 2 items"
    # a user mentions an item before the first REC in ~60% of dialogs: 50% liked item, 20% distractor
    with_item = sum(any(t["items"] for t in d["turns"][:next(k for k, t in enumerate(d["turns"]) if "oracle" in t)])
                    for d in dialogs)
    assert 0.5 < with_item / len(dialogs) < 0.7
    text = describe_world(items, splits)
    assert "items: " in text and "REC turns" in text and "oracle" in text


def test_bad_input():
    with pytest.raises(ValueError):
        make_world(n_items=5)
    with pytest.raises(ValueError):
        make_world(n_train=-1)
