"""
Tests for nanocrs/datasets.py on small invented fixtures in the raw formats (tests/fixtures/): ReDial
merging, mentions, deduplication across raw / UniCRS / IARD files, deterministic validation carving;
INSPIRED TSV quirks (QUOTATION_MARK, the malformed movie_dict) and title linking; the custom schema;
malformed input reported with file:line; nanocrs/download.py against a local HTTP server.

    python -m pytest tests/test_datasets.py -q
"""

import functools
import hashlib
import http.server
import json
import os
import shutil
import threading

import pytest

from conftest import REPO, run_cli
from nanocrs import download
from nanocrs.data import DataError, load_dataset
from nanocrs.datasets import build_custom, build_redial
from nanocrs.inspired import build_inspired, link_titles

FIX = os.path.join(REPO, "tests", "fixtures")
REDIAL, INSPIRED = os.path.join(FIX, "redial"), os.path.join(FIX, "inspired")


def by_id(dialogs):
    return {d["id"]: d for d in dialogs}


def copy_fixture(src, tmp_path):
    dst = os.path.join(tmp_path, os.path.basename(src))
    shutil.copytree(src, dst)
    return dst


# -----------------------------------------------------------------------------
# ReDial

def test_redial_merging_mentions_and_items(capsys):
    items, splits, info = build_redial(REDIAL, seed=0)
    test = by_id(splits["test"])
    d = test["redial-20001"]
    assert [t["role"] for t in d["turns"]] == ["user", "assistant", "user", "assistant", "user"]
    assert d["turns"][0] == {"role": "user", "text": "Hi! I liked @{1001} any ideas?", "items": ["1001"]}
    assert d["turns"][1]["items"] == ["1004", "1002"]
    assert d["turns"][3]["text"] == "A bit. @{1004} is great"  # the newline is gone
    assert test["redial-20002"]["turns"][0]["role"] == "assistant"  # respondentQuestions == [] is fine
    # the seeker-only dialog is dropped, counted, and located
    assert "redial-20003" not in test
    assert info["skipped"]["no assistant turn"]["count"] == 1
    assert info["skipped"]["no assistant turn"]["examples"][0].endswith("test_data.jsonl:3")
    assert "skipped 1 dialogs: no assistant turn: 1" in capsys.readouterr().out
    # every movie of the CSV is an item; text from id2info where present, title and year otherwise
    it = {i["id"]: i for i in items}
    assert len(items) == 8 and info["items_with_metadata"] == 4 and info["metadata_coverage_items"] == 0.5
    assert it["1001"]["text"] == ("title: The Crimson Harbor | year: 1987 | genres: horror, comedy | director: Ada Quill"
                                  " | cast: Bo Tran, Cy Ruiz | plot: A lighthouse keeper finds a singing crab.")
    assert it["1002"]["text"] == "title: Moonlight Circus | year: 2003 | genres: fantasy | director: Lee Park | cast: Mo Diaz"
    assert it["1003"]["text"] == "title: Paper Lanterns" and it["1003"]["title"] == "Paper Lanterns"
    assert it["1008"]["text"] == "title: Last Summer Train | year: 1978"


def test_redial_dedup_across_formats():
    _, splits, info = build_redial(REDIAL, seed=0)
    train = by_id(splits["train"] + splits["val"])
    # 101-104 raw, 105 UniCRS only, 106 IARD only; 102 is in raw and UniCRS: the raw copy wins
    assert sorted(train) == [f"redial-{i}" for i in range(101, 107)]
    assert not any("UNICRS COPY" in t["text"] for t in train["redial-102"]["turns"])
    assert [t["text"] for t in train["redial-105"]["turns"]] == ["any sci-fi?", "@{1006} is sci-fi and funny", "nice"]
    assert train["redial-106"]["turns"][1]["text"] == "How about @{1007} ?"  # IARD's "<Ox (2001)>" dropped
    assert train["redial-101"]["turns"][-1]["text"] == "yes very good"
    assert info["train_copies_of_test_dialogs_dropped"] == 1  # IARD's copy of test dialog 20002
    assert info["official_train_used"] == 6
    assert info["official_train_used_fraction"] == round(6 / 10006, 4)
    files = {s["file"]: s for s in info["train_sources"]}
    assert files[os.path.join("unicrs", "valid_data.jsonl")]["new"] == 1
    assert os.path.join("extra", "id_map.json") not in files  # not dialogs


def test_redial_val_carving_is_deterministic(tmp_path):
    def split_ids(raw, seed):
        _, s, _ = build_redial(raw, seed=seed)
        return sorted(d["id"] for d in s["train"]), sorted(d["id"] for d in s["val"])
    a = split_ids(REDIAL, 0)
    assert a == split_ids(REDIAL, 0) and len(a[1]) == 1  # 10% of 6, rounded
    # the carving depends on the set of dialogs, not on file names or reading order
    raw = copy_fixture(REDIAL, tmp_path)
    os.rename(os.path.join(raw, "train_raw.jsonl"), os.path.join(raw, "zz_train.jsonl"))
    assert split_ids(raw, 0) == a
    vals = {tuple(split_ids(REDIAL, s)[1]) for s in range(6)}
    assert len(vals) > 1


def test_redial_malformed_input_is_skipped_and_counted(tmp_path, capsys):
    raw = copy_fixture(REDIAL, tmp_path)
    good = json.loads(open(os.path.join(raw, "train_raw.jsonl")).readline())
    unknown = dict(good, conversationId="150", messages=[dict(good["messages"][0], text="see @999999")] + good["messages"][1:])
    empty = dict(good, conversationId="151", messages=[])
    with open(os.path.join(raw, "train_raw.jsonl"), "a") as f:
        f.write(json.dumps(unknown) + "\n" + json.dumps(empty) + "\n" + json.dumps(good)[:60] + "\n")
    _, splits, info = build_redial(raw, seed=0)
    sk = info["skipped"]
    assert sk["unknown item id"]["examples"] == [os.path.join(raw, "train_raw.jsonl") + ":5"]
    assert sk["empty dialog"]["examples"] == [os.path.join(raw, "train_raw.jsonl") + ":6"]
    assert sk["invalid JSON line"]["examples"] == [os.path.join(raw, "train_raw.jsonl") + ":7"]
    assert "skipped 4 dialogs" in capsys.readouterr().out
    assert info["official_train_used"] == 6


def test_redial_fatal_problems(tmp_path):
    raw = copy_fixture(REDIAL, tmp_path)
    with open(os.path.join(raw, "movies_with_mentions.csv"), "w") as f:
        f.write("movieId,title,nbMentions\n1001,X (1990),1\n")
    with pytest.raises(DataError, match=r"movies_with_mentions\.csv:1: missing column 'movieName'"):
        build_redial(raw)
    os.remove(os.path.join(raw, "test_data.jsonl"))
    with pytest.raises(DataError, match="no test_data.jsonl"):
        build_redial(raw)


# -----------------------------------------------------------------------------
# INSPIRED

def test_inspired_tsv_and_unicrs(capsys):
    items, splits, info = build_inspired(INSPIRED, seed=0)
    assert info["split_sources"] == {"train": os.path.join("unicrs", "train_data_dbpedia.jsonl"),
                                     "val": "dev.tsv", "test": "test.tsv"}
    val = by_id(splits["val"])
    d = val["inspired-20200101-000001_001_live"]
    # QUOTATION_MARK restored, same-speaker rows merged, titles linked to normalized title + year slugs
    assert d["turns"][1] == {"role": "user", "text": 'I loved "@{galaxy_bakers_2019}" last year. It was so sweet',
                             "items": ["galaxy_bakers_2019"]}
    assert d["turns"][2]["text"] == "Then try @{moonlight_circus_2003}, it is magical."  # via the placeholder
    # the malformed movie_dict skips its dialog, counted with file:line
    assert "inspired-20200101-000002_002_live" not in val
    assert info["skipped"]["malformed movie_dict"]["examples"] == [os.path.join(INSPIRED, "dev.tsv") + ":7"]
    # short titles only as written; noisy candidates that are not in the text are dropped and counted
    d3 = val["inspired-20200101-000003_003_live"]
    assert d3["turns"][0]["items"] == [] and "ox in the barn" in d3["turns"][0]["text"]
    assert d3["turns"][1]["text"] == "You should watch @{ox_2001} and @{iron_orchard_1995}"
    assert info["titles_not_found_in_text"] == 2
    assert by_id(splits["test"])["inspired-20200102-000004_004_live"]["turns"][0]["text"] == \
        "Anything like @{galaxy_bakers_2019}?"
    # unicrs train: the user-only dialog is dropped
    assert len(splits["train"]) == 2 and info["skipped"]["no assistant turn"]["count"] == 1
    # enrichment from ReDial's id2info.json (found as ../redial/metadata/id2info.json)
    it = {i["id"]: i for i in items}
    assert it["galaxy_bakers_2019"]["text"].startswith("title: Galaxy Bakers | year: 2019 | genres: comedy, sci-fi")
    assert it["quiet_rivers_2011"]["text"] == "title: Quiet Rivers | year: 2011"
    assert info["items_with_metadata"] == 4 and len(items) == 7
    assert "skipped 2 dialogs" in capsys.readouterr().out


def test_inspired_missing_column(tmp_path):
    raw = copy_fixture(INSPIRED, tmp_path)
    path = os.path.join(raw, "dev.tsv")
    rows = [line.rstrip("\n").split("\t") for line in open(path)]
    k = rows[0].index("movie_dict")
    with open(path, "w") as f:
        f.writelines("\t".join(r[:k] + r[k + 1:]) + "\n" for r in rows)
    with pytest.raises(DataError, match=r"dev\.tsv:1: missing column 'movie_dict'"):
        build_inspired(raw)


def test_link_titles():
    text, n = link_titles("I saw avengers end game and It, then it rained", [("Avengers: Endgame", "a"), ("It", "b")])
    assert (text, n) == ("I saw @{a} and @{b}, then it rained", 2)
    # a shorter title never matches inside an already linked longer one
    text, n = link_titles("The Long Walk Home was long", [("Long Walk", "w"), ("The Long Walk Home", "h")])
    assert text == "@{h} was long" and n == 1


def test_chat_linking_leaves_ordinary_words_alone():
    """Against the whole catalogue (the chat), a one-word title is a title only with its capital and
    mid-sentence; titles of several words link as before, in any case."""
    movies = [("Looking", "l"), ("Good", "g"), ("Her", "h"), ("Paper Lanterns", "p")]
    line = "Good evening, I'm looking for something good like paper lanterns"
    assert link_titles(line, movies, cased_words=True) == ("Good evening, I'm looking for something good like @{p}", 1)
    assert link_titles(line, movies)[1] == 3  # the readers' default (each dialog's own movies): any case
    text, n = link_titles("I loved Looking and Her. Good was fine too", movies, cased_words=True)
    assert (text, n) == ("I loved @{l} and @{h}. Good was fine too", 2)
    assert link_titles('"Her" was great', movies, cased_words=True)[1] == 0  # first in the sentence, behind a quote
    assert link_titles('she said "Her" was great', movies, cased_words=True)[1] == 1


# -----------------------------------------------------------------------------
# custom schema

def write_schema(d, dialog_text="I liked @{m1}"):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "items.jsonl"), "w") as f:
        for i in ("m1", "m2"):
            f.write(json.dumps({"id": i, "title": i, "text": f"title: {i}"}) + "\n")
    for s in ("train", "val", "test"):
        with open(os.path.join(d, f"{s}.jsonl"), "w") as f:
            f.write(json.dumps({"id": f"{s}-0", "turns": [
                {"role": "user", "text": dialog_text, "items": ["m1"]},
                {"role": "assistant", "text": "try @{m2}", "items": ["m2"]}]}) + "\n")


def test_custom(tmp_path):
    write_schema(tmp_path / "ok")
    items, splits, info = build_custom(str(tmp_path / "ok"))
    assert len(items) == 2 and all(len(splits[s]) == 1 for s in ("train", "val", "test"))
    assert info["stats"]["test"]["rec_samples"] == 1
    write_schema(tmp_path / "bad", dialog_text="I liked @{m1} and @{m9}")
    with pytest.raises(DataError, match=r"train\.jsonl:1: .*unknown item id 'm9'"):
        build_custom(str(tmp_path / "bad"))


# -----------------------------------------------------------------------------
# download and cache

@pytest.fixture
def server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www; yields (base URL, served folder)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", www
    httpd.shutdown()
    httpd.server_close()


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_download_verifies_and_caches(server, tmp_path, monkeypatch):
    base, www = server
    shutil.copytree(REDIAL, www / "redial")
    official = [(rel, f"redial/{rel}", "sha256:" + sha256(os.path.join(REDIAL, rel)))
                for rel in ("test_data.jsonl", "train_raw.jsonl", "movies_with_mentions.csv", "metadata/id2info.json")]
    official[1] = (official[1][0], official[1][1], "gitsha1:" + download.digest(os.path.join(REDIAL, "train_raw.jsonl"), "gitsha1"))
    monkeypatch.setitem(download.OFFICIAL, "redial", official)
    cache = str(tmp_path / "cache")
    raw = download.download("redial", cache_dir=cache, url_base=base)
    assert sha256(os.path.join(raw, "metadata", "id2info.json")) == sha256(os.path.join(REDIAL, "metadata", "id2info.json"))
    _, splits, _ = build_redial(raw)
    assert len(splits["test"]) == 2 and len(splits["train"]) + len(splits["val"]) == 4
    # cached: a second call needs no server
    shutil.rmtree(www / "redial")
    assert download.download("redial", cache_dir=cache, url_base=base) == raw


def test_download_sha_mismatch(server, tmp_path):
    base, www = server
    (www / "f.txt").write_text("tampered")
    dest = str(tmp_path / "cache" / "f.txt")
    with pytest.raises(DataError, match="sha256 mismatch"):
        download.fetch(f"{base}/f.txt", dest, "sha256:" + "0" * 64)
    assert not os.path.exists(dest) and not os.path.exists(dest + ".part")  # nothing unverified is cached
    with pytest.raises(DataError, match="refusing"):
        download.fetch("http://example.com/f.txt", dest, "sha256:" + "0" * 64)


def test_offline_fails_with_one_line_saying_raw(tmp_path):
    env = {**os.environ, "NANOCRS_DATA_URL": "http://127.0.0.1:9", "NANOCRS_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": REPO}
    p = run_cli("data_prep.py", "--dataset", "inspired", "--out", str(tmp_path / "out"), env=env, timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "pass --raw" in lines[0], p.stderr


def test_data_prep_end_to_end(tmp_path):
    out = str(tmp_path / "redial")
    args = ["--dataset", "redial", "--raw", REDIAL, "--out", out, "--embed-dim", "4", "--levels", "1",
            "--codebook-size", "4", "--vocab-size", "300", "--kmeans-iters", "5"]
    p = run_cli("data_prep.py", *args, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    ds = load_dataset(out)
    assert len(ds["items"]) == 8 and len(ds["test"]) == 2
    assert ds["meta"]["info"]["official_train_used"] == 6


def test_link_titles_numeric_title_never_matches_a_placeholder():
    # three titles linked before the movie "2": its pattern must not match inside their placeholders
    text, n = link_titles("I loved Glass Orchard, Moonlight Circus and Paper Lanterns",
                          [("Glass Orchard", "g"), ("Moonlight Circus", "m"), ("Paper Lanterns", "p"), ("2", "two")])
    assert (text, n) == ("I loved @{g}, @{m} and @{p}", 3)


def test_standardized_redial_instances(tmp_path):
    """--protocol standardized: one instance per recommender message that names a movie of its
    conversation's movieMentions and has an earlier message; its targets the distinct movies named, fresh =
    named in no earlier message; each mapped to the merged turn that holds the message."""
    from nanocrs.evaluate import standardized_redial
    mentions = {"1001": "The Crimson Harbor (1987)", "1002": "Moonlight Circus (2003)", "1004": "Iron Orchard (1995)"}
    msgs = [(2, "Try @1001"),                 # the first message: no context, no instance
            (1, "I liked @1002"),             # the seeker's: no instance
            (2, "Then @1004 and @1004"),      # one instance, one target (distinct), fresh
            (2, ""),                          # empty: data_prep drops it, it merges nothing
            (2, "or @1002 again, @9999"),     # the same merged turn; @9999 is not in movieMentions
            (1, "ok")]
    rec = {"conversationId": 7, "initiatorWorkerId": 1, "respondentWorkerId": 2, "movieMentions": mentions,
           "messages": [{"senderWorkerId": s, "text": t, "messageId": k} for k, (s, t) in enumerate(msgs)]}
    raw = tmp_path / "test_data.jsonl"
    raw.write_text(json.dumps(rec) + "\n")
    d = {"id": "redial-7", "turns": [{"role": "assistant", "text": "Try @{1001}", "items": ["1001"]},
                                     {"role": "user", "text": "I liked @{1002}", "items": ["1002"]},
                                     {"role": "assistant", "text": "Then @{1004} and @{1004} or @{1002} again",
                                      "items": ["1004", "1002"]},
                                     {"role": "user", "text": "ok", "items": []}]}
    got = [(dd["id"], t, gold, fresh) for dd, t, gold, fresh in standardized_redial(str(raw), [d])]
    assert got == [("redial-7", 2, "1004", True), ("redial-7", 2, "1002", False)]
    # a prepared split without that conversation is refused in one line, naming the file and line
    with pytest.raises(DataError, match=r"test_data.jsonl:1: message 2 of conversation 7"):
        standardized_redial(str(raw), [])
    # the fixture's own test file, prepared by build_redial: every target lands in its merged REC turn
    _, splits, _ = build_redial(REDIAL, seed=0)
    samples = standardized_redial(os.path.join(REDIAL, "test_data.jsonl"), splits["test"])
    assert samples and all(gold in d["turns"][t]["items"] and d["turns"][t]["role"] == "assistant"
                           for d, t, gold, _ in samples)
