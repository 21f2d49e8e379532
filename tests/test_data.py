"""
Tests for nanocrs/data.py: rendering and loss masking, left truncation, dialog windows, the validating
readers (DataError naming file:line), rec_samples' fresh flag, and deterministic epoch batches.

    python -m pytest tests/test_data.py -q
"""

import json
import os
import random
import re

import pytest

from nanocrs.data import (DataError, Renderer, collate, epoch_batches, load_dataset, load_dialogs, load_items,
                          rec_samples)


def supervised(ids, targets):
    """Positions t+1 whose token is a label (targets[t] is the label of token t+1), checking the shift."""
    pos = []
    for t, y in enumerate(targets):
        if y != -1:
            assert y == ids[t + 1], "targets[t] must be ids[t+1]"
            pos.append(t + 1)
    assert targets[-1] == -1
    return pos


def runs(pos):
    """Split sorted positions into maximal runs of consecutive positions."""
    out = []
    for p in pos:
        if out and out[-1][-1] == p - 1:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def expected_target(turn, sids, item=None):
    """The structured target string, written independently of Renderer."""
    def span(i):
        return "<BOI>" + "".join(sids.tokens(i)) + "<EOI>"
    text = re.sub(r"@\{([^}]+)\}", lambda m: span(m.group(1)), turn["text"])
    if turn["items"]:
        return "<MODE=REC>" + span(item or turn["items"][0]) + "<RESP> " + text + "<EOT>"
    return "<MODE=CHAT><RESP> " + text + "<EOT>"


def assistant_turns(ds, rec):
    for d in ds["train"]:
        for t, turn in enumerate(d["turns"]):
            if turn["role"] == "assistant" and t > 0 and bool(turn["items"]) == rec:
                yield d, t


@pytest.fixture(scope="module")
def rd(tok, sids):
    return Renderer(tok, sids, 256)


# -----------------------------------------------------------------------------
# rendering

@pytest.mark.parametrize("rec", [True, False])
def test_example_supervises_exactly_the_target(rd, tok, sids, dataset, rec):
    n = 0
    for d, t in list(assistant_turns(dataset, rec))[:25]:
        turn = d["turns"][t]
        ids, targets = rd.example(d["turns"][:t], turn)
        assert len(ids) == len(targets) <= rd.block_size
        pos = supervised(ids, targets)
        # one contiguous run at the very end of the sequence, right after "Assistant:"
        assert len(runs(pos)) == 1 and pos[-1] == len(ids) - 1
        assert ids[pos[0] - len(rd.assistant_ids):pos[0]] == tok.encode("Assistant:")
        want = expected_target(turn, sids)
        assert tok.decode([ids[p] for p in pos]) == want
        assert want.startswith("<MODE=REC><BOI>" if rec else "<MODE=CHAT><RESP> ")
        # nothing from the context is supervised: the count matches the target's own tokens
        assert len(pos) == len(tok.encode(want))
        n += 1
    assert n == 25


def test_multi_item_turn_renders_each_item_in_the_slot(rd, tok, sids, dataset):
    found = 0
    for d, t in assistant_turns(dataset, True):
        turn = d["turns"][t]
        items = list(dict.fromkeys(turn["items"]))
        if len(items) < 2:
            continue
        slots = []
        for item in items:
            ids, targets = rd.example(d["turns"][:t], turn, item)
            got = tok.decode([ids[p] for p in supervised(ids, targets)])
            assert got == expected_target(turn, sids, item)
            slot = got[:got.index("<RESP>")]
            assert slot == "<MODE=REC><BOI>" + "".join(sids.tokens(item)) + "<EOI>"
            slots.append(slot)
        assert len(set(slots)) == len(items)
        # the default slot is the first mentioned item
        ids0, tg0 = rd.example(d["turns"][:t], turn)
        assert (ids0, tg0) == rd.example(d["turns"][:t], turn, items[0])
        found += 1
        if found == 5:
            break
    assert found == 5


@pytest.mark.parametrize("rec", [True, False])
def test_parse_inverts_structured_ids(rd, dataset, rec):
    """parse(structured_ids(turn)) gives the turn back: its mode, its slot item, and its text with each
    mention an ("item", id) piece (join writes them as @{id} again)."""
    for d, t in list(assistant_turns(dataset, rec))[:25]:
        turn = d["turns"][t]
        mode, slot, pieces = rd.parse(rd.structured_ids(turn))
        assert (mode, slot) == (("REC", turn["items"][0]) if rec else ("CHAT", None))
        assert Renderer.join(pieces, lambda i: "@{" + i + "}") == " ".join(turn["text"].split())


def test_item_not_in_turn_is_refused(rd, dataset):
    d, t = next(assistant_turns(dataset, True))
    other = next(i["id"] for i in dataset["items"] if i["id"] not in d["turns"][t]["items"])
    with pytest.raises(AssertionError):
        rd.example(d["turns"][:t], d["turns"][t], other)


def test_long_context_left_truncated_at_turn_boundaries(tok, sids, dataset):
    block = 128
    small = Renderer(tok, sids, block)
    checked = 0
    for d in dataset["train"]:
        turns = d["turns"]
        t = max(i for i, x in enumerate(turns) if x["role"] == "assistant")
        ctx_ids = small.context_ids(turns[:t])
        prompt, sup = small.turn_ids(turns[t])
        if sum(map(len, ctx_ids)) + len(prompt) + len(sup) <= block or len(prompt) + len(sup) > block // 2:
            continue  # want a context that must be cut, and a target that fits with room to spare
        ids, targets = small.example(turns[:t], turns[t])
        assert len(ids) <= block
        pos = supervised(ids, targets)
        assert tok.decode([ids[p] for p in pos]) == expected_target(turns[t], sids)  # target intact
        kept = ids[:len(ids) - len(prompt) - len(sup)]
        assert ids[len(kept):len(kept) + len(prompt)] == prompt
        # the kept context is exactly the last k whole turns, and k is as large as fits
        k = next(k for k in range(len(ctx_ids) + 1) if sum(ctx_ids[len(ctx_ids) - k:], []) == kept)
        assert 0 < k < len(ctx_ids)
        assert len(ctx_ids[-k - 1]) + len(ids) > block
        checked += 1
    assert checked >= 5


def test_prompt_is_truncated_and_leaves_room(tok, sids, dataset):
    small = Renderer(tok, sids, 64)
    huge = [{"role": "user", "text": "scary movies from the eighties " * 300, "items": []}]
    p = small.prompt(huge, forced="<MODE=REC><BOI>")
    assert len(p) <= 64 - 16
    assert tok.decode(p).endswith("Assistant:<MODE=REC><BOI>")


def test_dialog_windows_fitting_dialog(rd, tok, sids, dataset):
    checked = 0
    for d in dataset["train"]:
        total = sum(len(sum(rd.turn_ids(t), [])) for t in d["turns"])
        if total > rd.block_size:
            continue
        windows = rd.dialog_windows(d, slot_items="first")
        assert len(windows) == 1
        ids, targets = windows[0]
        assert len(ids) == total
        pos = supervised(ids, targets)
        got = [tok.decode([ids[p] for p in r]) for r in runs(pos)]
        want = [expected_target(t, sids) for t in d["turns"] if t["role"] == "assistant"]
        assert got == want  # every assistant turn, in order, and nothing else
        # user-turn tokens are never labels
        user_tokens = sum(len(rd.turn_ids(t)[0]) for t in d["turns"] if t["role"] == "user")
        assert len(pos) == sum(len(tok.encode(w)) for w in want)
        assert len(ids) - len(pos) >= user_tokens
        checked += 1
        if checked == 20:
            break
    assert checked == 20


def test_every_item_is_a_slot_target(rd, tok, sids, dataset):
    """slot_items="all" (the default) adds, per extra item of a REC turn, one example whose only
    supervised tokens are <MODE=REC><BOI>SID<EOI> of that item, after the same context the turn has."""
    checked = 0
    for d in dataset["train"]:
        extra = [(k, i) for k, t in enumerate(d["turns"]) if t["role"] == "assistant" and k > 0
                 for i in list(dict.fromkeys(t["items"]))[1:]]
        if not extra:
            continue
        first, every = rd.dialog_windows(d, "first"), rd.dialog_windows(d)
        assert every[:len(first)] == first and len(every) == len(first) + len(extra)
        for (k, item), (ids, targets) in zip(extra, every[len(first):]):
            pos = supervised(ids, targets)
            assert tok.decode([ids[p] for p in pos]) == "<MODE=REC>" + rd.item_span(item)
            assert pos[-1] == len(ids) - 1  # the example ends with its slot: the response is not repeated
            ctx = sum(rd.context_ids(d["turns"][:k]), []) + rd.assistant_ids
            head = ids[:len(ids) - len(pos)]
            assert head == ctx[len(ctx) - len(head):]  # the turn's own context, left-truncated
        checked += 1
    assert checked > 0


def test_dialog_windows_long_dialog_falls_back(tok, sids, dataset):
    block = 96
    small = Renderer(tok, sids, block)
    checked = 0
    for d in dataset["train"]:
        total = sum(len(sum(small.turn_ids(t), [])) for t in d["turns"])
        if total <= 2 * block:
            continue
        if any(len(small.turn_ids(t)[0]) + len(small.turn_ids(t)[1]) > block // 2 for t in d["turns"]):
            continue  # keep every target whole (a target longer than the block is cut on purpose)
        windows = small.dialog_windows(d, slot_items="first")
        assert len(windows) >= 2
        got = []
        for ids, targets in windows:
            assert len(ids) == len(targets) <= block
            pos = supervised(ids, targets)
            got += [tok.decode([ids[p] for p in r]) for r in runs(pos)]
        want = [expected_target(t, sids) for t in d["turns"] if t["role"] == "assistant"]
        assert got == want  # each assistant turn supervised exactly once across the windows
        checked += 1
    assert checked >= 3


def test_collate_pads_with_minus_one():
    x, y = collate([([1, 2, 3], [-1, 5, -1]), ([4], [-1])], pad_id=9)
    assert x.tolist() == [[1, 2, 3], [4, 9, 9]]
    assert y.tolist() == [[-1, 5, -1], [-1, -1, -1]]


# -----------------------------------------------------------------------------
# validating readers

ITEMS = [{"id": "m1", "title": "One", "text": "title: One"}, {"id": "m2", "title": "Two", "text": "title: Two"}]
GOOD = {"id": "d0", "turns": [{"role": "user", "text": "like @{m1}", "items": ["m1"]},
                              {"role": "assistant", "text": "try @{m2}", "items": ["m2"]}]}


def write_lines(path, lines):
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


def test_good_files_load(tmp_path):
    items = load_items(write_lines(tmp_path / "items.jsonl", ITEMS))
    assert [i["id"] for i in items] == ["m1", "m2"]
    dialogs = load_dialogs(write_lines(tmp_path / "d.jsonl", [GOOD, "", {**GOOD, "id": "d1"}]), {"m1", "m2"})
    assert len(dialogs) == 2  # blank lines are skipped


@pytest.mark.parametrize("lines,line_no,words", [
    ([ITEMS[0], "{not json"], 2, "invalid JSON"),
    ([ITEMS[0], ITEMS[0]], 2, "duplicate"),
    ([ITEMS[0], {"id": "m2", "text": "x"}], 2, "title"),
    ([{"id": "bad id!", "title": "x", "text": "x"}], 1, "must match"),
    (["[1, 2]"], 1, "object"),
])
def test_load_items_rejects(tmp_path, lines, line_no, words):
    path = write_lines(tmp_path / "items.jsonl", lines)
    with pytest.raises(DataError) as e:
        load_items(path)
    msg = str(e.value)
    assert f"{path}:{line_no}:" in msg and words in msg and "\n" not in msg


def test_load_items_empty_file(tmp_path):
    path = write_lines(tmp_path / "items.jsonl", [])
    with pytest.raises(DataError, match="no items"):
        load_items(path)


def turn_mod(**kw):
    d = json.loads(json.dumps(GOOD))
    d["turns"][1].update(kw)
    return d


@pytest.mark.parametrize("bad,words", [
    ("{\"id\": \"d1\", \"turns\": [", "invalid JSON"),
    (turn_mod(items=["m9"], text="try @{m9}"), "unknown item id 'm9'"),
    (turn_mod(items=[], text="try @{m2}"), "not listed"),
    (turn_mod(text="try @{m7}", items=["m2"]), "unknown item id 'm7'"),
    (turn_mod(role="system"), "role"),
    (turn_mod(role="Assistant"), "role"),
    (turn_mod(text=None), "text"),
    ({"id": "d1", "turns": []}, "turns"),
    ({"id": "d1"}, "turns"),
    ({"turns": GOOD["turns"]}, "id"),
])
def test_load_dialogs_rejects(tmp_path, bad, words):
    path = write_lines(tmp_path / "train.jsonl", [{**GOOD, "id": "g1"}, {**GOOD, "id": "g2"}, bad])  # ids differ: duplicates are an error too
    with pytest.raises(DataError) as e:
        load_dialogs(path, {"m1", "m2"})
    msg = str(e.value)
    assert f"{path}:3:" in msg and words in msg and "\n" not in msg


@pytest.mark.parametrize("items", [["m2", 5], [{"id": "m2"}], [["m2"]]])
def test_load_dialogs_rejects_non_string_items(tmp_path, items):
    """An 'items' entry that is not a string is malformed input: DataError, not a crash."""
    path = write_lines(tmp_path / "train.jsonl", [GOOD, turn_mod(items=items)])
    with pytest.raises(DataError) as e:
        load_dialogs(path, {"m1", "m2"})
    assert f"{path}:2:" in str(e.value)


def test_load_dataset_missing_directory_and_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(str(tmp_path / "nope"))
    write_lines(tmp_path / "items.jsonl", ITEMS)
    write_lines(tmp_path / "train.jsonl", [GOOD])
    with pytest.raises(DataError, match=re.escape(os.path.join(str(tmp_path), "val.jsonl"))):
        load_dataset(str(tmp_path))


# -----------------------------------------------------------------------------
# evaluation samples and batches

def test_rec_samples_fresh_flag():
    d = {"id": "x", "turns": [
        {"role": "assistant", "text": "", "items": ["z"]},         # turn 0: no context, not a sample
        {"role": "user", "text": "", "items": ["a"]},
        {"role": "assistant", "text": "", "items": ["a", "b", "a"]},
        {"role": "user", "text": "", "items": []},
        {"role": "assistant", "text": "", "items": []},            # CHAT turn: no sample
        {"role": "assistant", "text": "", "items": ["b", "c", "z"]},
    ]}
    got = [(t, item, fresh) for _, t, item, fresh in rec_samples([d])]
    assert got == [(2, "a", False), (2, "b", True), (5, "b", False), (5, "c", True), (5, "z", False)]


def test_rec_samples_on_dataset(dataset):
    samples = list(rec_samples(dataset["test"]))
    assert len(samples) >= 30  # (the synthetic recommender never repeats an item: all are fresh there)
    for d, t, item, fresh in samples:
        assert d["turns"][t]["role"] == "assistant" and item in d["turns"][t]["items"] and t > 0
        earlier = {i for turn in d["turns"][:t] for i in turn["items"]}
        assert fresh == (item not in earlier)


def test_epoch_batches_deterministic_and_complete():
    rng = random.Random(0)
    examples = [([0] * rng.randint(1, 50), []) for _ in range(437)]
    a = epoch_batches(examples, 8, seed=3, epoch=0)
    assert a == epoch_batches(examples, 8, seed=3, epoch=0)
    for epoch in range(3):
        b = epoch_batches(examples, 8, seed=3, epoch=epoch)
        flat = [i for batch in b for i in batch]
        assert sorted(flat) == list(range(len(examples)))  # every example exactly once
        assert all(1 <= len(batch) <= 8 for batch in b)
    assert epoch_batches(examples, 8, seed=3, epoch=1) != a
    assert epoch_batches(examples, 8, seed=4, epoch=0) != a


def test_training_targets_of_table_4(tok, sids, dataset):
    """--target: the paper's Table 4 variants. sid supervises only each assistant turn's head (the rest of
    the turn stays as context); mode-resp renders no item slot; resp no mode either. The dialog text, and
    every mention as <BOI>SID<EOI>, is the same in all four."""
    d = next(d for d in dataset["train"] if any(t["items"] and t["role"] == "assistant" for t in d["turns"][1:]))
    k = next(k for k, t in enumerate(d["turns"]) if k and t["role"] == "assistant" and t["items"])
    turn, item = d["turns"][k], d["turns"][k]["items"][0]
    rds = {t: Renderer(tok, sids, 4096, t) for t in ("full", "sid", "mode-resp", "resp")}
    text = rds["full"].text_ids(" ", turn["text"])
    want = {"full": "<MODE=REC>" + rds["full"].item_span(item), "sid": "<MODE=REC>" + rds["full"].item_span(item),
            "mode-resp": "<MODE=REC>", "resp": ""}
    for name, rd in rds.items():
        whole = rd.structured_ids(turn)
        assert tok.decode(whole[:len(whole) - len(text) - 2]) == want[name]  # the head, then <RESP> text <EOT>
        assert whole[-len(text) - 1:-1] == text
        ids, targets = rd.example(d["turns"][:k], turn)
        got = tok.decode([ids[p] for p in supervised(ids, targets)])
        assert got == (want[name] if name == "sid" else tok.decode(whole))
        (w_ids, w_targets), *_ = rd.dialog_windows(d)
        sup = tok.decode([w_ids[p] for p in supervised(w_ids, w_targets)])
        assert ("<RESP>" in sup) == (name != "sid") and ("<MODE=" in sup) == (name != "resp")
    with pytest.raises(AssertionError):
        Renderer(tok, sids, 256, "items")
