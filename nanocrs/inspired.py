"""
INSPIRED -> the normalized schema of nanocrs/data.py, and link_titles, which finds catalogue titles in
free text (INSPIRED marks no item spans; the chat links what a user types the same way).

    python data_prep.py --dataset inspired --raw /path/to/inspired --out data/inspired

INSPIRED (--raw DIR): all splits from DIR/unicrs/{train,valid,test}_data_dbpedia.jsonl where present (every
turn's movies annotated), else DIR/{train,dev,test}.tsv. Items are movies keyed by normalized title + year;
titles are located in the text (an annotated movie not found there is kept as the turn's item, and
appended as a mention to a seeker's turn) and enriched from ReDial's id2info.json
(DIR/../redial/metadata/id2info.json or DIR/id2info.json) where title and year match. Problems are
skipped and counted as in nanocrs/datasets.py.
"""

import ast
import csv
import functools
import os
import re

from nanocrs.data import MENTION, SPLITS, DataError
from nanocrs.datasets import (ROLES, VAL_FRACTION, Skip, Skips, _read_id2info, carve_val, clean, make_item, merge_turns,
                              norm_title, read_jsonl_lenient, report, split_stats, split_title, title_slug)
def _core_title(title: str) -> str:
    """The title without a leading article: what the matcher spells out."""
    return re.sub(r"^(the|a|an)\s+", "", title.strip(), flags=re.I)


@functools.lru_cache(maxsize=None)  # the chat links every typed line against the whole catalogue
def _title_regex(title: str, cased_words: bool = False):
    """A pattern finding `title` in free text the way people type it: any case, any punctuation or
    spacing between its letters ("Avengers End Game" for "Avengers: Endgame"), leading article optional.
    cased_words: a one-word title only with its first letter as written ("Looking", never "looking")."""
    core = _core_title(title)
    chars = [c for c in core if c.isalnum()]
    if not chars:
        return None
    if len(chars) <= 3:  # "It", "Up", "Us": only as written or in capitals, or every pronoun becomes a movie
        alts = {re.escape(core), re.escape(core.upper())}
        return re.compile(r"(?<![^\W_])(?:" + "|".join(sorted(alts)) + r")(?![^\W_])")
    if cased_words and not re.search(r"\s", core):
        rest = r"[\W_]*".join(re.escape(c) for c in chars[1:])
        return re.compile(r"(?<![^\W_])" + re.escape(chars[0]) + r"[\W_]*(?i:" + rest + r")(?![^\W_])")
    body = r"[\W_]*".join(re.escape(c) for c in chars)
    return re.compile(r"(?<![^\W_])(?:(?:the|a|an)[\W_]+)?" + body + r"(?![^\W_])", re.I)


def _sentence_start(text: str, at: int) -> bool:
    """Whether text[at] begins a sentence: nothing but spaces and quotes before it since the start or a . ! ?"""
    before = text[:at].rstrip(" \t\"'(")
    return not before or before[-1] in ".!?\n"


def link_titles(text: str, movies: list[tuple[str, str]], cased_words: bool = False) -> tuple[str, int]:
    """Replace each candidate movie's title in `text` by @{id}; movies = [(title, id)]. Returns the
    new text and how many candidates were found. Longest titles first, so "It" cannot eat into
    "It Chapter Two"; found spans become placeholders so that later titles never match inside them.
    cased_words (the chat, which searches the whole catalogue, where "Good" and "Looking" are titles
    too): a one-word title is linked only when typed with its capital and not first in a sentence,
    so an ordinary word is left alone; the dataset readers search each dialog's own annotated movies
    and keep the default."""
    found, slots = 0, []
    text = _SLOT.sub("", text)  # (a private-use character in the input itself is dropped)
    for title, item_id in sorted(movies, key=lambda m: -len(m[0])):
        pat = _title_regex(title, cased_words)
        if pat is None:
            continue
        one_word = cased_words and not re.search(r"\s", _core_title(title))

        def place(m):  # the placeholder is one private-use character: no title's pattern can match inside
            # it (a numbered placeholder once let the movie "2" match the slot number of an earlier title)
            if one_word and _sentence_start(m.string, m.start()):
                return m.group(0)
            return chr(0xF0000 + len(slots))
        new = pat.sub(place, text)
        if new != text:
            found += 1
            slots.append(item_id)
        text = new
    return _SLOT.sub(lambda m: "@{" + slots[ord(m.group(0)) - 0xF0000] + "}", text), found


_SLOT = re.compile("[\U000F0000-\U000FFFFD]")  # link_titles' placeholders


def _tsv_dialogs(path: str, skips: Skips):
    """Yields (where, dialog id, [(role, text, [movie names])]) from a raw INSPIRED TSV."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None) or []
        for col in ("dialog_id", "speaker", "text", "text_with_placeholder", "movies", "movie_dict"):
            if col not in header:
                raise DataError(f"{path}:1: missing column {col!r}")
        cur, bad, start, msgs = None, None, 0, []
        for n, row in enumerate(rows, 2):
            if len(row) != len(header):
                r = dict(dialog_id=row[0] if row else "", bad=f"malformed row ({len(row)} of {len(header)} fields)")
            else:
                r = dict(zip(header, row))
            if r["dialog_id"] != cur:
                if cur is not None:
                    yield f"{path}:{start}", cur, msgs, bad
                cur, bad, start, msgs = r["dialog_id"], None, n, []
            if "bad" in r:
                bad = bad or (r["bad"], f"{path}:{n}")
                continue
            try:  # a per-dialog title -> index dict, written as a Python literal
                movie_dict = ast.literal_eval(r["movie_dict"]) if r["movie_dict"].strip() else {}
                assert isinstance(movie_dict, dict)
            except (ValueError, SyntaxError, AssertionError):
                bad = bad or ("malformed movie_dict", f"{path}:{n}")
                continue
            by_index = {v: k for k, v in movie_dict.items()}
            names = [m.strip() for m in r["movies"].split(";") if m.strip()]
            names += [by_index[int(i)] for i in re.findall(r"\[MOVIE_TITLE_(\d+)\]", r["text_with_placeholder"])
                      if int(i) in by_index]
            msgs.append((ROLES.get(r["speaker"]), r["text"].replace("QUOTATION_MARK", '"'), names))
        if cur is not None:
            yield f"{path}:{start}", cur, msgs, bad


def _unicrs_dialogs(path: str, split: str, skips: Skips):
    for where, turns in read_jsonl_lenient(path, skips):
        try:
            msgs = [(ROLES.get(t["role"]), t["text"], list(t.get("movie") or [])) for t in turns]
        except (KeyError, TypeError) as e:
            skips.add(f"turn without field {e}", where)
            continue
        yield where, f"{split}-{where.rsplit(':', 1)[1]}", msgs, None


def build_inspired(raw_dir: str, seed: int = 0, redial_metadata_path: str | None = None):
    """(items, splits, info) from a folder of INSPIRED files (layout in the module docstring)."""
    if redial_metadata_path is None:
        redial_metadata_path = next((p for p in (os.path.join(raw_dir, "id2info.json"),
                                                 os.path.join(raw_dir, "..", "redial", "metadata", "id2info.json"))
                                     if os.path.isfile(p)), None)
    id2info = _read_id2info(redial_metadata_path)
    by_title, by_name = {}, {}  # (normalized title, year) / normalized title -> id2info entries
    for meta in id2info.values():
        t, y = split_title(meta.get("name", ""))
        by_title.setdefault((norm_title(t), y), meta)
        by_name.setdefault(norm_title(t), []).append((y, meta))

    def metadata_for(title, year):
        """Exact title + year; else the one entry of that title whose year is off by at most one
        (release vs festival year) or unknown on either side."""
        if (norm_title(title), year) in by_title:
            return by_title[(norm_title(title), year)]
        near = [m for y, m in by_name.get(norm_title(title), []) if y is None or year is None or abs(y - year) <= 1]
        return near[0] if len(near) == 1 else None

    skips, sources, raw_splits = Skips(), {}, {}
    # all splits from one source, so that test is annotated as train was: the UniCRS files (each
    # turn's movies annotated) when train and test are both there, else the raw TSVs
    names = (("train", "train", "train"), ("val", "dev", "valid"), ("test", "test", "test"))
    def unicrs(uni_name):
        return next((p for p in (os.path.join(raw_dir, "unicrs", f"{uni_name}_data_dbpedia.jsonl"),
                                 os.path.join(raw_dir, f"{uni_name}_data_dbpedia.jsonl")) if os.path.isfile(p)), None)
    use_unicrs = unicrs("train") is not None and unicrs("test") is not None
    annotated = {}  # split -> True when its movies are per-turn annotations (UniCRS), not noisy candidates
    for split, tsv_name, uni_name in names:
        tsv, uni = os.path.join(raw_dir, f"{tsv_name}.tsv"), unicrs(uni_name)
        tsv = tsv if os.path.isfile(tsv) else None
        if uni and (use_unicrs or not tsv):
            sources[split], raw_splits[split] = os.path.relpath(uni, raw_dir), list(_unicrs_dialogs(uni, split, skips))
            annotated[split] = True
        elif tsv:
            sources[split], raw_splits[split] = os.path.relpath(tsv, raw_dir), list(_tsv_dialogs(tsv, skips))
            annotated[split] = False
        elif split != "val":
            raise DataError(f"{raw_dir}: no {tsv_name}.tsv nor unicrs/{uni_name}_data_dbpedia.jsonl")

    items, linked, unlocated = {}, 0, 0
    splits = {}
    for split, records in raw_splits.items():
        splits[split] = []
        for where, did, msgs, bad in records:
            try:
                if bad:
                    raise Skip(bad[0])
                if any(role is None for role, _, _ in msgs):
                    raise Skip("unknown speaker")
                out = []
                for role, text, names in msgs:
                    movies = {}
                    for name in names:
                        title, year = split_title(name)
                        if norm_title(title):
                            movies.setdefault(title_slug(title, year), (title, year))
                    text, found = link_titles(clean(text), [(t, i) for i, (t, _) in movies.items()])
                    linked, unlocated = linked + found, unlocated + len(movies) - found
                    # every annotated movie is kept: one the regex did not find in the text (typed
                    # differently, "Queen and Slim") is still the turn's item; in a seeker's turn it is
                    # appended as a mention, so the model sees what the seeker named
                    # (the raw TSVs' candidates are automatic and noisy: there a movie not found is dropped)
                    missing = [i for i in movies if i not in MENTION.findall(text)] if annotated[split] else []
                    if role == "user" and missing:
                        text = (text + " " + " ".join("@{" + i + "}" for i in missing)).strip()
                        missing = []
                    for i in MENTION.findall(text) + missing:
                        items.setdefault(i, movies[i])
                    out.append((role, text, missing))
                splits[split].append({"id": "inspired-" + did.removesuffix(".pkl"), "turns": merge_turns(out, where)})
            except Skip as e:
                skips.add(str(e), bad[1] if bad else where)
    if "val" not in splits:
        splits["train"], splits["val"] = carve_val(splits["train"], seed)
        sources["val"] = f"{VAL_FRACTION:.0%} of train, carved with seed {seed}"

    item_list, enriched = [], set()
    for i, (title, year) in sorted(items.items()):
        meta = metadata_for(title, year)
        if meta:
            enriched.add(i)
        item_list.append(make_item(i, title, year, meta))
    mentions = [i for s in SPLITS for d in splits[s] for t in d["turns"] for i in t["items"]]
    info = {
        "source": os.path.abspath(raw_dir), "split_sources": sources, "redial_metadata": redial_metadata_path,
        "titles_linked_in_text": linked, "titles_not_found_in_text": unlocated,
        "items_with_metadata": len(enriched), "metadata_coverage_items": round(len(enriched) / max(1, len(items)), 4),
        "metadata_coverage_mentions": round(sum(i in enriched for i in mentions) / max(1, len(mentions)), 4),
        "skipped": skips.info(), "stats": split_stats(item_list, splits)}
    print(f"INSPIRED splits from: {', '.join(f'{s}={v}' for s, v in sources.items())}")
    print(f"annotated movies located in the text: {linked}; not located: {unlocated} (kept as the turn's "
          f"items in UniCRS splits, dropped as noisy candidates in TSV splits)")
    print(f"item metadata matched in ReDial's id2info.json by title + year: {len(enriched)}/{len(items)} items "
          f"({info['metadata_coverage_items']:.1%}), {info['metadata_coverage_mentions']:.1%} of mentions"
          + ("" if id2info else " (no id2info.json found)"))
    report("INSPIRED", info, skips)
    return item_list, splits, info
