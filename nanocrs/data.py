"""
The dataset schema, its reader and writer, and the one place where a dialog becomes tokens and
generated tokens become a turn again (Renderer.parse).

On disk (data/NAME/, written by data_prep.py; any dataset, synthetic or real, looks like this):
    items.jsonl          {"id": "m0042", "title": "...", "text": "title: ... | year: ... | ...", "metadata": {...}}
    train.jsonl          {"id": "...", "turns": [{"role": "user"|"assistant", "text": "... @{m0042} ...",
    val.jsonl                                     "items": ["m0042"], "oracle": [...] (optional)}, ...]}
    test.jsonl
    sids.json            the item <-> semantic-ID table (nanocrs/quantizer.py)
    tokenizer.json       BPE + control + semantic-ID tokens (nanocrs/tokenizer.py)
    dataset.json         name, sizes, how it was made
Items are mentioned inside a turn's text as @{ITEM_ID}; an assistant turn that mentions an item is a
recommendation (REC) turn, any other assistant turn is a CHAT turn.

Rendering (the paper's structured generation; every assistant turn, in context or as target):
    User: <text with every mention as <BOI>SID<EOI>>\n
    Assistant:<MODE=REC><BOI>SID(item)<EOI><RESP> <text><EOT>          (REC turn, target item)
    Assistant:<MODE=CHAT><RESP> <text><EOT>                            (CHAT turn)
Loss is on the assistant's tokens after "Assistant:" (mode, item, <RESP>, text, <EOT>), nowhere else:
on the one target turn of Renderer.example, or on every assistant turn of Renderer.dialog_windows.
A dialog marked "items_only": true (an item sequence with no text, e.g. ReDial's E19 sequences) has
its assistant turns rendered as  Assistant:<MODE=REC><BOI>SID<EOI>  only, the same prefix the
recommendation eval scores, so no invented response text is ever a target.
Control and ID tokens are inserted by id, never read out of text: a dialog or a chat user that writes
"<BOI>" or "<a_1><b_2>" gets those characters as plain text (Tokenizer.encode_text).
"""

import hashlib
import json
import os
import random
import re

import torch

from nanocrs.common import atomic_path
from nanocrs.quantizer import SemanticIDs
from nanocrs.tokenizer import ASSISTANT_PREFIX, BOI, EOI, EOT, MODE_CHAT, MODE_REC, RESP, USER_PREFIX, Control, Tokenizer

ITEM_ID = re.compile(r"^[A-Za-z0-9_.\-]+$")
MENTION = re.compile(r"@\{([A-Za-z0-9_.\-]+)\}")
SPLITS = ("train", "val", "test")
# The paper's Table 4 training targets: full structured generation; the SID only (no response is
# supervised); MODE+RESP (no item slot: items only inside the response); RESP (a plain language model on
# dialogs whose mentions are IDs). The last two are scored from the first <BOI> the model writes.
TARGETS = ("full", "sid", "mode-resp", "resp")


class DataError(ValueError):
    """Bad input data; the message is one line naming the file and line."""


# -----------------------------------------------------------------------------
# reading and writing the schema

def write_jsonl(path: str, rows):
    """Atomic: a crash mid-write leaves the previous file, never half a file."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_json(path: str, obj):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)


def decode_line(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None


def read_jsonl(path: str):
    """Yields (line_number, object); malformed JSON is a DataError naming file and line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as f:  # decoded line by line, so bad bytes are reported with their line
        for n, raw in enumerate(f, 1):
            line = decode_line(raw, f"{path}:{n}")
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None


def _require(cond, where, msg):
    if not cond:
        raise DataError(f"{where}: {msg}")


def load_items(path: str) -> list[dict]:
    items, seen = [], set()
    for n, it in read_jsonl(path):
        where = f"{path}:{n}"
        _require(isinstance(it, dict), where, "expected a JSON object")
        for key in ("id", "title", "text"):
            _require(isinstance(it.get(key), str), where, f"field {key!r} must be a string")
        _require(ITEM_ID.match(it["id"]) is not None, where, f"item id {it['id']!r} must match [A-Za-z0-9_.-]+")
        _require(it["id"] not in seen, where, f"duplicate item id {it['id']!r}")
        seen.add(it["id"])
        items.append(it)
    _require(len(items) > 0, path, "no items")
    return items


def load_dialogs(path: str, item_ids: set) -> list[dict]:
    dialogs, seen = [], {}
    for n, d in read_jsonl(path):
        where = f"{path}:{n}"
        _require(isinstance(d, dict) and isinstance(d.get("id"), str), where, "dialog needs a string 'id'")
        _require(d["id"] not in seen, where, f"duplicate dialog id {d['id']!r} (also on line {seen.get(d['id'])})")
        seen[d["id"]] = n
        turns = d.get("turns")
        _require(isinstance(turns, list) and len(turns) > 0, where, f"dialog {d['id']}: 'turns' must be a non-empty list")
        for t, turn in enumerate(turns):
            w = f"{where}: dialog {d['id']} turn {t}"
            _require(isinstance(turn, dict), w, "turn must be an object")
            _require(turn.get("role") in ("user", "assistant"), w, f"role must be 'user' or 'assistant', got {turn.get('role')!r}")
            _require(isinstance(turn.get("text"), str), w, "field 'text' must be a string")
            items = turn.setdefault("items", [])
            _require(isinstance(items, list) and all(isinstance(i, str) for i in items), w,
                     "field 'items' must be a list of item id strings")
            for i in items + MENTION.findall(turn["text"]):
                _require(i in item_ids, w, f"unknown item id {i!r}")
            for i in MENTION.findall(turn["text"]):
                _require(i in items, w, f"item {i!r} is mentioned in the text but not listed in 'items'")
        dialogs.append(d)
    return dialogs


BOUND_FILES = ("items.jsonl", "sids.json", "tokenizer.json")  # written together; they only work together


def fingerprint(folder: str) -> str:
    """sha256 of the catalogue, the item <-> ID table and the tokenizer together. data_prep.py stores it
    in dataset.json and train.py in every checkpoint, so files from different runs are never mixed."""
    h = hashlib.sha256()
    for name in BOUND_FILES:
        h.update(name.encode() + b"\0")
        with open(os.path.join(folder, name), "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def check_catalogue(where: str, item_ids, sids, tokenizer):
    """Every catalogue item has a semantic ID, the table names no other item (the model could then
    recommend items nobody can show), and every ID token is an added token (else the IDs would be
    split into bytes and never match)."""
    item_ids, table = set(item_ids), set(sids.item_ids)
    missing = [i for i in item_ids if i not in table]
    if missing:
        raise DataError(f"{where}: {len(missing)} catalogue items have no semantic ID in sids.json (e.g. {sorted(missing)[0]!r}); "
                        "the files come from different data_prep.py runs")
    extra = [i for i in sids.item_ids if i not in item_ids]
    if extra:
        raise DataError(f"{where}: sids.json names {len(extra)} items that are not in items.jsonl (e.g. {extra[0]!r}); "
                        "the files come from different data_prep.py runs")
    added = {t.content for t in tokenizer.tk.get_added_tokens_decoder().values()}
    loose = [t for t in sids.all_token_strings() if t not in added]
    if loose:
        raise DataError(f"{where}: tokenizer.json lacks {len(loose)} semantic-ID tokens of sids.json (e.g. {loose[0]}); "
                        "it was made for other IDs")


def load_dataset(data_dir: str, splits=SPLITS) -> dict:
    """{"items": [...], "train": [...], "val": [...], "test": [...], "meta": {...}}; DataError if broken."""
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: data directory not found (make one with: python data_prep.py --dataset synthetic --out {data_dir})")
    items = load_items(os.path.join(data_dir, "items.jsonl"))
    ids = {it["id"] for it in items}
    ds = {"items": items}
    first_split = {}
    for s in splits:
        ds[s] = load_dialogs(os.path.join(data_dir, f"{s}.jsonl"), ids)
        for d in ds[s]:  # the same dialog in two splits leaks the test set into training
            _require(first_split.setdefault(d["id"], s) == s, os.path.join(data_dir, f"{s}.jsonl"),
                     f"dialog id {d['id']!r} is also in the {first_split[d['id']]} split")
    meta_path = os.path.join(data_dir, "dataset.json")
    ds["meta"] = {}
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            ds["meta"] = json.load(f)
    if all(os.path.isfile(os.path.join(data_dir, f)) for f in BOUND_FILES):  # data_prep.py writes them last
        stored = ds["meta"].get("fingerprint")
        if stored and stored != fingerprint(data_dir):
            raise DataError(f"{data_dir}: items.jsonl, sids.json and tokenizer.json are not the ones data_prep.py wrote "
                            "together (fingerprint in dataset.json differs); run data_prep.py again")
        check_catalogue(data_dir, ids, SemanticIDs.load(os.path.join(data_dir, "sids.json")),
                        Tokenizer.load(os.path.join(data_dir, "tokenizer.json")))
    return ds


def training_dialogs(ds: dict, splits: str, items_only: bool = True) -> list[dict]:
    """The dialogs of the comma-separated splits a model trains on ("train", or "train,val" =
    train+dev as the paper does for INSPIRED): train.py trains on them, the eval's baselines count them.
    items_only=False leaves out the item-sequence dialogs (train.py --item-sequences 0)."""
    names = splits.split(",")
    for name in names:
        if name not in ("train", "val"):
            raise DataError(f"--train-splits: unknown split {name!r} (train, val; the test split is never trained on)")
    return [d for name in names for d in ds[name] if items_only or not d.get("items_only")]


def reorder_items_only(dialog: dict, rng: random.Random) -> dict:
    """An items-only dialog with its items dealt in a random order; the roles stay with the positions
    (the first turn is the seeker's, the rest are recommendations). An item sequence without text is a
    set of items one seeker liked together more than a story, and the co-occurrence baseline counts it
    as one: a new order each epoch shows the model every pair in both directions and every item both
    as context and as target (train.py --shuffle-item-sequences)."""
    assert dialog.get("items_only"), "only an items-only dialog has no text whose order it would break"
    turns = dialog["turns"]
    perm = rng.sample(range(len(turns)), len(turns))
    return {**dialog, "turns": [{**turns[j], "role": turns[k]["role"]} for k, j in enumerate(perm)]}


def rec_samples(dialogs: list[dict]):
    """The evaluation protocol's samples: one per (assistant turn with a non-empty context, item it
    mentions). Yields (dialog, turn index, gold item id, fresh) where fresh = the gold item was not
    mentioned earlier in the dialog."""
    for d in dialogs:
        seen = set()
        for t, turn in enumerate(d["turns"]):
            if turn["role"] == "assistant" and t > 0:
                for item in dict.fromkeys(turn["items"]):  # unique, in order
                    yield d, t, item, item not in seen
            seen.update(turn["items"])


# -----------------------------------------------------------------------------
# rendering

class Renderer:
    """Turns dialogs into token ids and generated ids back into a turn (parse); the single source of
    truth for the prompt format."""

    def __init__(self, tokenizer, sids, block_size: int, target: str = "full"):
        assert target in TARGETS, f"target {target!r} is not one of {TARGETS}"
        self.tok, self.sids, self.block_size, self.target = tokenizer, sids, block_size, target
        self.ctrl = Control.of(tokenizer)
        self.assistant_ids = tokenizer.encode(ASSISTANT_PREFIX)

    def item_span(self, item_id: str) -> str:
        return BOI + "".join(self.sids.tokens(item_id)) + EOI

    def item_ids(self, item_id: str) -> list[int]:
        """<BOI> SID <EOI> as token ids."""
        return [self.ctrl.boi] + [self.tok.id(t) for t in self.sids.tokens(item_id)] + [self.ctrl.eoi]

    def text(self, text: str) -> str:
        """Dialog text with every @{id} written as <BOI>SID<EOI> (for people; the model's ids come
        from text_ids, which never reads a control token out of the text)."""
        return MENTION.sub(lambda m: self.item_span(m.group(1)), text)

    def text_ids(self, *parts: str) -> list[int]:
        """The concatenated dialog text as ids: the free text between mentions is encoded with added
        tokens as plain text, and each @{id} becomes <BOI>SID<EOI> by id. The library cuts text at
        added tokens and encodes each piece alone, so this gives the same ids as encoding text() would
        whenever the free text holds no added token."""
        ids = []
        pieces = MENTION.split("".join(parts))  # text, item id, text, item id, ..., text
        for k, piece in enumerate(pieces):
            ids += self.item_ids(piece) if k % 2 else self.tok.encode_text(piece)
        return ids

    def structured(self, turn: dict, item: str | None = None) -> str:
        """What the model writes after "Assistant:" for this turn, as a string (for people; the ids
        are structured_ids); `item` picks the target of a multi-item turn (default: its first item)."""
        if turn["items"]:
            item = item or turn["items"][0]
            assert item in turn["items"], f"{item} is not mentioned in this turn"
            head = MODE_REC + self.item_span(item)
        else:
            head = MODE_CHAT
        return head + RESP + " " + self.text(turn["text"]) + EOT

    def head_ids(self, turn: dict, item: str | None = None) -> list[int]:
        """What comes before <RESP> under the training target: <MODE=REC><BOI>SID<EOI> or <MODE=CHAT>
        (full, sid), only the mode (mode-resp), nothing (resp)."""
        if turn["items"]:
            item = item or turn["items"][0]
            assert item in turn["items"], f"{item} is not mentioned in this turn"
        if self.target == "resp":
            return []
        if not turn["items"]:
            return [self.ctrl.mode_chat]
        return [self.ctrl.mode_rec] + (self.item_ids(item) if self.target in ("full", "sid") else [])

    def structured_ids(self, turn: dict, item: str | None = None) -> list[int]:
        """structured() as token ids, control and ID tokens inserted by id."""
        return self.head_ids(turn, item) + [self.ctrl.resp] + self.text_ids(" ", turn["text"]) + [self.ctrl.eot]

    def turn_parts(self, turn: dict, item=None, items_only: bool = False,
                   slot_only: bool = False) -> tuple[list[int], list[int], list[int]]:
        """(prompt, supervised, rest) of one turn, the three concatenated being the turn. A user turn is
        all prompt. In an items-only dialog (an item sequence without text) an assistant turn is just
        <MODE=REC><BOI>SID<EOI> (<MODE=REC><RESP><BOI>SID<EOI> under mode-resp, <RESP><BOI>SID<EOI> under
        resp): it teaches which item comes next and nothing about what to say. slot_only supervises the
        head of a REC turn and nothing after it (the extra items of a multi-item turn, see
        dialog_windows); the sid target supervises every assistant turn that way (Table 4's "SID only")."""
        if turn["role"] == "user":
            return self.text_ids(f"{USER_PREFIX} ", turn["text"], "\n"), [], []
        if items_only:
            item = item or turn["items"][0]
            if self.target in ("full", "sid"):
                return self.assistant_ids, [self.ctrl.mode_rec] + self.item_ids(item), []
            return self.assistant_ids, self.head_ids(turn, item) + [self.ctrl.resp] + self.item_ids(item), []
        full = self.structured_ids(turn, item)
        if slot_only or self.target == "sid":
            n = len(self.head_ids(turn, item))
            return self.assistant_ids, full[:n], full[n:]
        return self.assistant_ids, full, []

    def turn_ids(self, turn: dict, item=None, items_only: bool = False) -> tuple[list[int], list[int]]:
        """(prompt part, the rest) of one turn: the assistant's part after "Assistant:", all of it
        supervised under the full target."""
        prompt, sup, rest = self.turn_parts(turn, item, items_only)
        return prompt, sup + rest

    def context_ids(self, context: list[dict]) -> list[list[int]]:
        return [sum(self.turn_ids(t), []) for t in context]

    def _fit(self, context_turns: list[list[int]], room: int) -> list[int]:
        # keep the latest turns that fit; if even the last one does not, keep its right end
        kept = []
        for ids in reversed(context_turns):
            if len(ids) > room:
                if not kept:
                    kept.append(ids[len(ids) - room:] if room > 0 else [])
                break
            kept.append(ids)
            room -= len(ids)
        return [i for ids in reversed(kept) for i in ids]

    def prompt(self, context: list[dict], forced: str = "") -> list[int]:
        """Generation prefix: the context, "Assistant:" and optional forced tokens (e.g. "<MODE=REC><BOI>").
        Left-truncated so that at least 16 tokens of room remain in the block."""
        tail = self.assistant_ids + (self.tok.encode(forced) if forced else [])
        room = self.block_size - len(tail) - 16
        return self._fit(self.context_ids(context), room) + tail

    def example(self, context: list[dict], target: dict, item=None, items_only=False,
                slot_only=False) -> tuple[list[int], list[int]]:
        """One training/eval example: (ids, targets), both of length T <= block_size, where
        targets[t] = ids[t+1] when token t+1 belongs to the target turn's supervised part, else -1.
        The sequence ends with the supervised part (what follows it in the turn teaches nothing here)."""
        prompt, sup, _ = self.turn_parts(target, item, items_only, slot_only)
        sup = sup[:self.block_size - len(prompt) - 1]  # a target longer than the block keeps its start
        ctx = self._fit(self.context_ids(context), self.block_size - len(prompt) - len(sup))
        ids = ctx + prompt + sup
        n_sup = len(sup)
        targets = [-1] * (len(ids) - n_sup - 1) + sup + [-1]
        assert len(ids) == len(targets) <= self.block_size
        return ids, targets

    def dialog_windows(self, dialog: dict, slot_items: str = "all") -> list[tuple[list[int], list[int]]]:
        """Training sequences for one dialog with every assistant turn supervised at once: earlier
        targets are the later turns' context, in the same structured form, so one sequence costs
        O(turns) tokens instead of O(turns^2) for one example per turn. A dialog longer than the
        block keeps the turns that fit in one sequence; each later assistant turn becomes its own
        left-truncated example.
        Every item of a REC turn is a slot target, as the paper trains (one instance per item): the
        sequence puts the turn's first item in the slot and supervises its response once; each other
        item gets its own example, the context and "Assistant:<MODE=REC><BOI>SID<EOI>" with only that
        head supervised, so the response text is not counted again. slot_items="first" leaves those
        out (the first item only, as earlier recipes trained)."""
        turns, items_only = dialog["turns"], dialog.get("items_only", False)
        ids, sup, j = [], [], 0  # sup[t]: token t is supervised
        while j < len(turns):
            p, s, r = self.turn_parts(turns[j], items_only=items_only)
            if len(ids) + len(p) + len(s) + len(r) > self.block_size:
                break
            ids += p + s + r
            sup += [False] * len(p) + [True] * len(s) + [False] * len(r)
            j += 1
        windows = []
        if any(sup):
            targets = [ids[t + 1] if sup[t + 1] else -1 for t in range(len(ids) - 1)] + [-1]
            windows.append((ids, targets))
        for k in range(j, len(turns)):
            if turns[k]["role"] == "assistant":
                windows.append(self.example(turns[:k], turns[k], items_only=items_only))
        has_slot = self.target in ("full", "sid") and not items_only and slot_items == "all"
        for k, turn in enumerate(turns):
            if has_slot and turn["role"] == "assistant" and k > 0:
                for item in list(dict.fromkeys(turn["items"]))[1:]:
                    windows.append(self.example(turns[:k], turn, item, slot_only=True))
        return windows

    def item_text_windows(self, items: list[dict], per_window: int = 8) -> list[tuple[list[int], list[int]]]:
        """Item-text alignment (as LC-Rec trains it): for every item both directions,
            <BOI>SID<EOI> = title (year) | genres\n          the text is supervised
            title (year) | genres = <BOI>SID<EOI>\n          the ID is supervised
        outside any dialog (no "User:"/"Assistant:"), so they tie each ID to what the item is without
        teaching the dialog format anything. This is what lets the model name an item it never saw
        recommended: its ID's tokens are learned from its text. Several items share one window so
        that a batch is not mostly padding; they are independent, so their order does not matter."""
        lines = []
        for it in items:
            md = it.get("metadata", {})
            desc = it["title"] + (f" ({md['year']})" if md.get("year") else "") + \
                (" | " + ", ".join(md["genres"]) if md.get("genres") else "")
            span, text = self.item_ids(it["id"]), self.tok.encode_text(" " + desc)
            eq, nl = self.tok.encode_text(" ="), self.tok.encode_text("\n")
            lines.append((span + eq, text + nl))   # (prompt part, supervised part): ID -> text
            lines.append((text + eq, span + nl))   # text -> ID
        windows = []
        for w in range(0, len(lines), 2 * per_window):
            ids, sup = [], []
            for p, s in lines[w:w + 2 * per_window]:
                if len(ids) + len(p) + len(s) > self.block_size:
                    break
                ids += p + s
                sup += [False] * len(p) + [True] * len(s)
            targets = [ids[t + 1] if sup[t + 1] else -1 for t in range(len(ids) - 1)] + [-1]
            windows.append((ids, targets))
        return windows


    # -- parsing: generated ids back into a turn ------------------------------------------------------
    def item_of(self, sid_ids: list[int]) -> str | None:
        """The item whose SID tokens these are, or None."""
        return self.sids.item_of_tokens([self.tok.token(t) for t in sid_ids])

    def parse(self, ids: list[int]):
        """What the model wrote after "Assistant:" -> (mode "REC"/"CHAT"/None, slot item or None,
        response), the inverse of structured_ids. The response is a list of pieces: decoded text
        strings and ("item", id) for each <BOI>SID<EOI> span; it ends at <EOT>."""
        c = self.ctrl
        head, body = (ids[:ids.index(c.resp)], ids[ids.index(c.resp) + 1:]) if c.resp in ids else (ids, [])
        mode = {c.mode_rec: "REC", c.mode_chat: "CHAT"}.get(head[0]) if head else None
        slot = None
        if mode == "REC" and c.boi in head and c.eoi in head:
            slot = self.item_of(head[head.index(c.boi) + 1:head.index(c.eoi)])
        pieces, text_ids, span = [], [], None
        for i in body:
            if i == c.eot:
                break
            if i == c.boi:
                span = []
            elif i == c.eoi and span is not None:
                pieces += [self.tok.decode(text_ids), ("item", self.item_of(span))]
                text_ids, span = [], None
            elif span is not None:
                span.append(i)
            else:
                text_ids.append(i)
        pieces.append(self.tok.decode(text_ids))
        return mode, slot, pieces

    @staticmethod
    def join(pieces, item_text) -> str:
        """parse()'s response as one string, each item span written by item_text(item_id)."""
        return " ".join("".join(p if isinstance(p, str) else item_text(p[1]) for p in pieces).split())


# -----------------------------------------------------------------------------
# batching

def collate(examples: list[tuple[list[int], list[int]]], pad_id: int = 0):
    """Right-pad to the longest example: x (B, T) ids, y (B, T) targets with -1 on padding."""
    T = max(len(ids) for ids, _ in examples)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -1, dtype=torch.long)
    for b, (ids, tg) in enumerate(examples):
        x[b, :len(ids)] = torch.tensor(ids)
        y[b, :len(tg)] = torch.tensor(tg)
    return x, y


def epoch_batches(examples: list, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Deterministic batches of example indices for one epoch (a pure function of seed and epoch, so
    a resumed run sees exactly the batches it would have seen). Examples are grouped by length in
    chunks of 50 batches so that padding stays small, then the batches are shuffled."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    chunk = batch_size * 50
    batches = []
    for c in range(0, len(order), chunk):
        part = sorted(order[c:c + chunk], key=lambda i: len(examples[i][0]))
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches
