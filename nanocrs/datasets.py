"""
Real datasets -> the normalized schema of nanocrs/data.py: ReDial or your own catalogue here, INSPIRED
in nanocrs/inspired.py (which shares the small pieces below).

    python data_prep.py --dataset redial   --raw /path/to/redial   --out data/redial
    python data_prep.py --dataset inspired --raw /path/to/inspired --out data/inspired
    python data_prep.py --dataset redial   --out data/redial     # no --raw: download the official files
    python data_prep.py --dataset custom   --raw my_catalogue/ --out data/mine

Each build_* returns (items, {"train": [...], "val": [...], "test": [...]}, info); info holds the
coverage and skip statistics that data_prep.py stores in dataset.json.

ReDial (--raw DIR): DIR/test_data.jsonl is the official test split, DIR/movies_with_mentions.csv the
catalogue (item id = the ReDial movie id), DIR/metadata/id2info.json (optional) the item metadata.
Every other *.jsonl under DIR (raw ReDial or UniCRS-preprocessed) and every IARD *.json is a train
source; copies of one conversation are deduplicated by conversationId (raw > UniCRS > IARD), and
validation is carved from train with --seed (ReDial has no official validation split).
INSPIRED (--raw DIR): see nanocrs/inspired.py.
custom (--raw DIR): items.jsonl + train/val/test.jsonl already in the schema, validated.

Problems: a dialog that cannot be used (truncated line, unknown item id, empty, no assistant turn,
malformed row) is skipped and counted, with the first file:line per reason; a missing file or column
raises DataError. Without --raw, data_prep.py fetches the official files first (nanocrs/download.py).
"""

import csv
import hashlib
import json
import os
import random
import re
import unicodedata
from collections import Counter

from nanocrs.data import ITEM_ID, MENTION, SPLITS, DataError, load_dialogs, load_items, rec_samples

REDIAL_OFFICIAL_TRAIN = 10006  # dialogs in the official ReDial train split (ReDial datasheet)
VAL_FRACTION = 0.1  # share of the train dialogs carved out as validation when a dataset has none
ROLES = {"SEEKER": "user", "RECOMMENDER": "assistant", "seeker": "user", "recommender": "assistant"}


# -----------------------------------------------------------------------------
# small shared pieces

class Skips:
    """Counts skipped dialogs by reason and remembers where the first few were, so nothing is silent."""

    def __init__(self):
        self.count, self.where = Counter(), {}

    def add(self, reason: str, where: str):
        self.count[reason] += 1
        self.where.setdefault(reason, [])
        if len(self.where[reason]) < 5:
            self.where[reason].append(where)

    def summary(self) -> str:
        parts = [f"{r}: {n} (e.g. {self.where[r][0]})" for r, n in self.count.most_common()]
        return f"skipped {sum(self.count.values())} dialogs" + (": " + "; ".join(parts) if parts else "")

    def info(self) -> dict:
        return {r: {"count": n, "examples": self.where[r]} for r, n in self.count.items()}


class Skip(Exception):
    """Raised while converting one dialog: the dialog is skipped with this reason."""


def clean(text: str) -> str:
    # one line per turn in the rendered prompt, so no newlines; "@{" is reserved for mentions
    if not isinstance(text, str):  # "text": null must not become the word "None"
        raise Skip(f"message text is {type(text).__name__}, not a string")
    return " ".join(str(text).split()).replace("@{", "@ {")


def split_title(name: str):
    """'Glass Orchard  (1995)' -> ('Glass Orchard', 1995); 'Paper Lanterns ' -> ('Paper Lanterns', None)."""
    name = " ".join(name.split())
    m = re.match(r"^(.*?)\s*\((\d{4})\)$", name)
    return (m.group(1).strip(), int(m.group(2))) if m else (name, None)


def norm_title(title: str) -> str:
    """Lower case ASCII words: 'Café Noël & Co.' -> 'cafe noel and co'."""
    t = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode().lower().replace("&", " and ")
    return " ".join(re.sub(r"[^a-z0-9]+", " ", t).split())


def title_slug(title: str, year) -> str:
    base = norm_title(title).replace(" ", "_") or "t" + hashlib.sha1(title.encode()).hexdigest()[:8]
    slug = f"{base}_{year}" if year else base
    assert ITEM_ID.match(slug), slug
    return slug


def item_text(title, year=None, genres=(), director=(), cast=(), plot="") -> str:
    """'title: ... | year: ... | genres: a, b | director: ... | cast: ... | plot: ...', empty fields left out."""
    fields = [("title", title), ("year", year or ""), ("genres", ", ".join(genres)), ("director", ", ".join(director)),
              ("cast", ", ".join(cast)), ("plot", " ".join((plot or "").split()))]
    return " | ".join(f"{k}: {v}" for k, v in fields if v)


def make_item(item_id: str, title: str, year, meta: dict | None) -> dict:
    """Schema item; `meta` is an id2info.json entry (name, genre, director, star, plot, imdb_id) or None."""
    meta = meta or {}
    fields = dict(genres=meta.get("genre") or [], director=meta.get("director") or [], cast=meta.get("star") or [],
                  plot=meta.get("plot") or "")
    metadata = {"year": year, **{k: v for k, v in fields.items() if v}, "imdb_id": meta.get("imdb_id")}
    return {"id": item_id, "title": title, "text": item_text(title, year, **fields),
            "metadata": {k: v for k, v in metadata.items() if v is not None}}


def merge_turns(messages, where: str) -> list[dict]:
    """[(role, text with @{id} mentions)] -> schema turns: consecutive same-speaker messages joined with
    a space, empty messages dropped. Raises Skip when the dialog is unusable."""
    turns = []
    for role, text, *extra in messages:  # extra: items annotated on the message but not named in its text
        extra = extra[0] if extra else []
        if not text and not extra:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["text"] = (turns[-1]["text"] + " " + text).strip()
            turns[-1]["extra"] += extra
        else:
            turns.append({"role": role, "text": text, "extra": list(extra)})
    if not turns:
        raise Skip("empty dialog")
    if not any(t["role"] == "assistant" for t in turns):
        raise Skip("no assistant turn")
    for t in turns:
        t["items"] = list(dict.fromkeys(MENTION.findall(t["text"]) + t.pop("extra")))
    return turns


def read_jsonl_lenient(path: str, skips: Skips):
    """Yields (where, object); a line that is not valid JSON (e.g. truncated) is skipped and counted."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                skips.add("line not UTF-8 text", f"{path}:{n}")
                continue
            if line.strip():
                try:
                    yield f"{path}:{n}", json.loads(line)
                except json.JSONDecodeError:
                    skips.add("invalid JSON line", f"{path}:{n}")


def carve_val(train: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic in seed and in the set of dialog ids (not in the order the files were read)."""
    train = sorted(train, key=lambda d: d["id"])
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:round(VAL_FRACTION * len(train))])
    return [d for i, d in enumerate(train) if i not in val_idx], [d for i, d in enumerate(train) if i in val_idx]


def split_stats(items, splits) -> dict:
    stats = {"items": len(items)}
    for s in SPLITS:
        samples = list(rec_samples(splits[s]))
        stats[s] = {"dialogs": len(splits[s]), "turns": sum(len(d["turns"]) for d in splits[s]),
                    "rec_samples": len(samples), "rec_samples_fresh": sum(fresh for *_, fresh in samples)}
    return stats


def report(name: str, info: dict, skips: Skips):
    st = info["stats"]
    print(f"{name}: {st['items']} items; " + ", ".join(
        f"{s} {st[s]['dialogs']} dialogs / {st[s]['rec_samples']} rec samples ({st[s]['rec_samples_fresh']} fresh)"
        for s in SPLITS))
    print(skips.summary())


# -----------------------------------------------------------------------------
# ReDial

def _redial_file_kind(path: str):
    """'raw', 'unicrs' or 'iard' if the file holds ReDial dialogs, else None (it is then ignored)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        if path.endswith(".json"):
            head = f.read(4096)
            return "iard" if '"dialogue_info"' in head or '"accepted_recommendation"' in head else None
        # the first line that parses tells; broken lines before it are skipped and counted when read
        rec = None
        for _, line in zip(range(100), f):
            try:
                rec = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    if not (isinstance(rec, dict) and "conversationId" in rec and isinstance(rec.get("messages"), list)):
        return None
    return "unicrs" if rec["messages"] and "turn_id" in rec["messages"][0] else "raw"


def _redial_records(path: str, kind: str, skips: Skips):
    """Yields (where, conversation id, [(role, raw text)], movieMentions) from one file."""
    if kind == "iard":
        try:
            data = json.load(open(path, encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        for cid, conv in data.items():
            utts = sorted(conv.get("dialogue_info", {}).values(), key=lambda u: u.get("utterance_pos", 0))
            # IARD writes a mention as "@127115 <Hot Fuzz (2007)>": keep the id, drop the title
            msgs = [(ROLES.get(u.get("role")), re.sub(r"@(\d+)\s*<[^>]*>", r"@\1", u["utterance_text"])
                     if isinstance(u.get("utterance_text"), str) else u.get("utterance_text", ""))  # null: clean() skips it
                    for u in utts]
            yield f"{path}:{cid}", str(cid), msgs, {}
        return
    for where, rec in read_jsonl_lenient(path, skips):
        try:
            seeker, recommender = rec["initiatorWorkerId"], rec["respondentWorkerId"]
            msgs = [(("user" if m["senderWorkerId"] == seeker else "assistant" if m["senderWorkerId"] == recommender
                      else None), m["text"]) for m in rec["messages"]]
            yield where, str(rec["conversationId"]), msgs, rec.get("movieMentions") or {}
        except (KeyError, TypeError) as e:
            skips.add(f"record without field {e}", where)


def _read_id2info(path: str) -> dict:
    if not path or not os.path.isfile(path):
        return {}
    try:
        return json.load(open(path, encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


E19_MAP = "ReDID2uID.json"  # ReDial movie id -> the uID of the E19 sequence files beside it


def _e19_sequences(raw_dir: str, skips: Skips) -> dict:
    """{conversation id: [ReDial movie id, ...] in mention order} from every ReDialRnGChrono*.json file
    found beside a ReDID2uID.json under raw_dir (Vachonni's ReDial_E19: item sequences, no text).

    Each record is [conversation id, mentioned so far, genres, still to come], one per step of the
    dialog, so the longest "so far + to come" of a conversation is its whole ordered movie list."""
    seqs = {}
    for root, dirs, files in os.walk(raw_dir):
        dirs.sort()
        if E19_MAP not in files:
            continue
        map_path = os.path.join(root, E19_MAP)
        try:
            uid2id = {int(u): str(mid) for mid, u in json.load(open(map_path, encoding="utf-8")).items()}
        except (json.JSONDecodeError, ValueError, AttributeError) as e:
            raise DataError(f"{map_path}: not a JSON object of movie id -> uID ({e})") from None
        for name in sorted(f for f in files if f.startswith("ReDialRnGChrono") and f.endswith(".json")):
            path = os.path.join(root, name)
            try:
                records = json.load(open(path, encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
            for n, rec in enumerate(records):
                try:
                    cid, movies = str(rec[0]), [uid2id[int(u)] for u, _liked in rec[1] + rec[3]]
                except (KeyError, TypeError, ValueError, IndexError):
                    skips.add("E19 record not [id, [[uID, liked]], genres, [[uID, liked]]] with known uIDs", f"{path}:[{n}]")
                    continue
                if len(movies) > len(seqs.get(cid, [])):
                    seqs[cid] = movies
    return seqs


def item_sequence_dialog(cid: str, movies: list[str]) -> dict | None:
    """A train dialog that has only its ordered item list (no text, no speakers, no liked flags we
    can render honestly): the first item as the seeker's turn, each later item as a recommendation.
    Marked "items_only": the Renderer supervises only <MODE=REC> and the item span of its assistant
    turns, so no made-up text is ever learned as a response (nanocrs/data.py)."""
    movies = list(dict.fromkeys(movies))
    if len(movies) < 2:
        return None
    turns = [{"role": "user" if k == 0 else "assistant", "text": "@{" + m + "}", "items": [m]}
             for k, m in enumerate(movies)]
    return {"id": f"redial-seq-{cid}", "items_only": True, "turns": turns}


def build_redial(raw_dir: str, seed: int = 0, item_sequences: bool = True):
    """(items, splits, info) from a folder of ReDial files (layout in the module docstring). With
    item_sequences, the E19 item sequences of train dialogs that have no text here are added to train."""
    test_path = next((os.path.join(raw_dir, n) for n in ("test_data.jsonl", "test_data")
                      if os.path.isfile(os.path.join(raw_dir, n))), None)
    csv_path = os.path.join(raw_dir, "movies_with_mentions.csv")
    meta_path = os.path.join(raw_dir, "metadata", "id2info.json")
    if test_path is None:
        raise DataError(f"{raw_dir}: no test_data.jsonl (the official ReDial test split)")
    if not os.path.isfile(csv_path):
        raise DataError(f"{csv_path}: file not found (the ReDial movie list)")

    # catalogue: every movie of the official list, titles from the CSV, details from id2info.json
    names = {}
    with open(csv_path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for col in ("movieId", "movieName"):
            if col not in (reader.fieldnames or []):
                raise DataError(f"{csv_path}:1: missing column {col!r}")
        for n, row in enumerate(reader, 2):
            if not (row["movieId"] or "").isdigit() or row["movieName"] is None:
                raise DataError(f"{csv_path}:{n}: malformed row (movieId must be a number)")
            names[row["movieId"]] = row["movieName"]
    id2info = _read_id2info(meta_path)
    skips, added = Skips(), {}

    def convert(where, cid, msgs, mentions) -> dict:
        def link(m):
            mid = m.group(1)
            if mid not in names:
                if mid not in mentions:  # not in the catalogue nor in the dialog's own mention table
                    raise Skip("unknown item id")
                added[mid] = mentions[mid]
            return "@{" + mid + "}"
        if any(role is None for role, _ in msgs):
            raise Skip("message from neither the seeker nor the recommender")
        return {"id": f"redial-{cid}", "turns": merge_turns([(r, re.sub(r"@(\d+)", link, clean(t))) for r, t in msgs], where)}

    def dialogs_of(records) -> list[dict]:
        out = []
        for where, cid, msgs, mentions in records:
            try:
                out.append(convert(where, cid, msgs, mentions))
            except Skip as e:
                skips.add(str(e), where)
        return out

    test_records = list(_redial_records(test_path, "raw", skips))
    test_ids = {cid for _, cid, _, _ in test_records}
    test = dialogs_of(test_records)

    # train sources: every other dialog file under raw_dir, best form first, deduplicated by conversationId
    sources, ignored = [], []
    for root, dirs, files in os.walk(raw_dir):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            if path == test_path or path == meta_path or not (name.endswith((".jsonl", ".json")) or name == "train_data"):
                continue
            if E19_MAP in files:  # item sequences, read by _e19_sequences
                continue
            kind = _redial_file_kind(path)
            (sources if kind else ignored).append((kind, path))
    rank = {"raw": 0, "unicrs": 1, "iard": 2}
    sources.sort(key=lambda s: (rank[s[0]], s[1]))
    chosen, in_test, src_info = {}, 0, []
    for kind, path in sources:
        n = new = 0
        for rec in _redial_records(path, kind, skips):
            n += 1
            if rec[1] in test_ids:
                in_test += 1  # IARD and re-split copies hold some test dialogs: never train on them
            elif rec[1] not in chosen:
                chosen[rec[1]] = rec
                new += 1
        src_info.append({"file": os.path.relpath(path, raw_dir), "format": kind, "dialogs": n, "new": new})
        print(f"  train source {os.path.relpath(path, raw_dir)} ({kind}): {n} dialogs, {new} new")
    if ignored:
        print(f"  ignored (not ReDial dialogs): {', '.join(os.path.relpath(p, raw_dir) for _, p in ignored)}")
    train = dialogs_of(sorted(chosen.values(), key=lambda r: (len(r[1]), r[1])))
    if not train:
        raise DataError(f"{raw_dir}: no usable train dialogs found (any *.jsonl of ReDial dialogs besides the test file)")
    train, val = carve_val(train, seed)
    # item-only sequences, for train dialogs with no text here; never for a dialog that has text
    # (so none of val) nor for a test dialog
    seq_dialogs = []
    if item_sequences:
        for cid, movies in sorted(_e19_sequences(raw_dir, skips).items(), key=lambda kv: (len(kv[0]), kv[0])):
            if cid in chosen or cid in test_ids:
                continue
            if any(m not in names for m in movies):
                skips.add("E19 sequence with an item outside the catalogue", f"E19 conversation {cid}")
                continue
            d = item_sequence_dialog(cid, movies)
            if d:
                seq_dialogs.append(d)
        train += seq_dialogs
        print(f"  item sequences (E19, no text): {len(seq_dialogs)} train dialogs added as items-only sequences")

    items = []
    for mid, name in list(names.items()) + list(added.items()):
        title, year = split_title(name)
        meta = id2info.get(mid)
        if meta and year is None:
            year = split_title(meta.get("name", ""))[1]
        items.append(make_item(mid, title, year, meta))
    splits = {"train": train, "val": val, "test": test}
    has_meta = {it["id"] for it in items if it["id"] in id2info}
    mentions = [i for s in SPLITS for d in splits[s] for t in d["turns"] for i in t["items"]]
    used = len(train) - len(seq_dialogs) + len(val)
    info = {"item_sequence_dialogs": len(seq_dialogs),
        "source": os.path.abspath(raw_dir), "test_file": os.path.relpath(test_path, raw_dir), "train_sources": src_info,
        "official_train_dialogs": REDIAL_OFFICIAL_TRAIN, "official_train_used": used,
        "official_train_used_fraction": round(used / REDIAL_OFFICIAL_TRAIN, 4),
        "train_copies_of_test_dialogs_dropped": in_test, "val": f"{VAL_FRACTION:.0%} of train, carved with seed {seed}",
        "items_from_movieMentions_only": len(added), "items_with_metadata": len(has_meta),
        "metadata_coverage_items": round(len(has_meta) / len(items), 4),
        "metadata_coverage_mentions": round(sum(i in has_meta for i in mentions) / max(1, len(mentions)), 4),
        "skipped": skips.info(), "stats": split_stats(items, splits)}
    print(f"ReDial train: {used} of the {REDIAL_OFFICIAL_TRAIN} official train dialogs used with text "
          f"({used / REDIAL_OFFICIAL_TRAIN:.1%}), {len(seq_dialogs)} more as item sequences; "
          f"val = {len(val)} carved from the ones with text, seed {seed}")
    print(f"item metadata (id2info.json): {len(has_meta)}/{len(items)} items ({info['metadata_coverage_items']:.1%}), "
          f"{info['metadata_coverage_mentions']:.1%} of mentions; the rest have title and year only")
    report("ReDial", info, skips)
    return items, splits, info


# -----------------------------------------------------------------------------
# your own catalogue, already in the schema

def build_custom(raw_dir: str):
    """(items, splits, info) from DIR/items.jsonl and DIR/{train,val,test}.jsonl, validated."""
    items = load_items(os.path.join(raw_dir, "items.jsonl"))
    ids = {it["id"] for it in items}
    splits = {s: load_dialogs(os.path.join(raw_dir, f"{s}.jsonl"), ids) for s in SPLITS}
    for s in SPLITS:
        for d in splits[s]:
            if not any(t["role"] == "assistant" for t in d["turns"]):
                raise DataError(f"{raw_dir}/{s}.jsonl: dialog {d['id']} has no assistant turn")
    info = {"source": os.path.abspath(raw_dir), "stats": split_stats(items, splits)}
    report("custom", info, Skips())
    return items, splits, info
