"""
When does a recommender name again the item the seeker just named? The measurements behind
docs/results.md, "The item the seeker just named": on the data alone, and on a model's rankings.

    python dev/repeat_probe.py --data data/redial
    python sample.py --ckpt out/redial-s0 --eval val --max-gen 0 --rankings out/redial-s0/rankings_val.jsonl
    python dev/repeat_probe.py --data data/redial out/redial-s0/rankings_val.jsonl [more runs ...]

1. Per split, over the eval's samples (one per assistant turn after the first and item in it): the
   share whose gold the dialog named before; and at the "just-named" samples (the turn right before
   is the seeker's and names an item) the share whose gold is that turn's last item.
2. A text probe: a logistic regression on the words and word pairs of that seeker turn and of the
   recommender's turn before it, trained on train's just-named turns (label: the turn names that item
   again; REC turns only), its AUC on --split for a few regularisation strengths. 0.5 is chance.
3. The recommender's habit: the same label by how many items the recommender already repeated in the
   dialog (0, 1, 2+), on train and on --split.
4. Given rankings files of --split (sample.py --rankings; a file is the model's ranked [item, log-prob]
   list per sample), at the just-named samples: the model's mean probability of the latest item
   against how often it is the gold, the same for its best item the dialog has not named, and R@1 if
   the latest item were put first there (a counterfactual: the rankings re-ordered, not a method).
Item-only dialogs (no text) are left out: they never repeat and have no words.
"""
import argparse
import math
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanocrs.data import MENTION, load_dataset, read_jsonl  # noqa: E402

WORD = re.compile(r"[a-z']+|\?|!")
STRENGTHS = (1.0, 10.0, 100.0, 300.0, 1000.0, 3000.0)  # L2 weights of the probe, per training example summed


def words(text: str) -> list[str]:
    w = WORD.findall(MENTION.sub(" item ", text.lower()))
    return w + [a + "_" + b for a, b in zip(w, w[1:])]


def just_named(dialog: dict):
    """For each assistant turn t > 0 that names an item (a REC turn, as the eval's samples) and whose
    previous turn is the seeker's and names one: (t, that turn's last item, the probe's words, the items
    the recommender repeated before t)."""
    turns, out, seen, repeats = dialog["turns"], [], set(), 0
    for t, turn in enumerate(turns):
        if turn["role"] == "assistant" and turn["items"] and t > 0 and turns[t - 1]["role"] == "user" and turns[t - 1]["items"]:
            before = turns[t - 2]["text"] if t > 1 and turns[t - 2]["role"] == "assistant" else ""
            feats = ["u:" + w for w in words(turns[t - 1]["text"])] + ["r:" + w for w in words(before)]
            out.append((t, turns[t - 1]["items"][-1], feats, repeats))
        if turn["role"] == "assistant":
            repeats += sum(i in seen for i in dict.fromkeys(turn["items"]))
        seen.update(turn["items"])
    return out


def split_rates(dialogs: list) -> tuple[int, float, int, float]:
    """(samples, share repeated, just-named samples, share whose gold is the seeker's latest item)."""
    n = rep = jn = latest = 0
    for d in dialogs:
        seen = set()
        for t, turn in enumerate(d["turns"]):
            if turn["role"] == "assistant" and t > 0:
                prev = d["turns"][t - 1]
                for g in dict.fromkeys(turn["items"]):
                    n, rep = n + 1, rep + (g in seen)
                    if prev["role"] == "user" and prev["items"]:
                        jn, latest = jn + 1, latest + (g == prev["items"][-1])
            seen.update(turn["items"])
    return n, rep / max(n, 1), jn, latest / max(jn, 1)


def turn_rows(dialogs: list) -> list[tuple[list[str], int, int]]:
    """(words, repeats before, label) per just-named REC turn."""
    return [(f, r, int(item in d["turns"][t]["items"])) for d in dialogs for t, item, f, r in just_named(d)]


def auc(score: torch.Tensor, y: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = score[y == 1], score[y == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    return float(((pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()).mean())


def probe(train: list, held: list, strength: float, steps: int = 300) -> float:
    """Logistic regression on the words (seen 3 times or more in train); AUC on held."""
    counts = {}
    for f, _, _ in train:
        for w in set(f):
            counts[w] = counts.get(w, 0) + 1
    vocab = {w: i for i, w in enumerate(w for w, c in counts.items() if c >= 3)}

    def matrix(rows):
        x = torch.zeros(len(rows), len(vocab) + 1)
        x[:, -1] = 1.0  # the bias
        for r, (f, _, _) in enumerate(rows):
            for w in f:
                if w in vocab:
                    x[r, vocab[w]] = 1.0
        return x, torch.tensor([y for _, _, y in rows], dtype=torch.float32)

    (x, y), (xh, yh) = matrix(train), matrix(held)
    w = torch.zeros(x.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y, reduction="sum") + strength * (w[:-1] ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return auc((xh @ w).detach(), yh)


def habit(rows: list) -> dict:
    """repeats before (0, 1, 2+) -> (turns, share that repeat the seeker's latest item)."""
    out = {}
    for _, r, y in rows:
        e = out.setdefault(min(r, 2), [0, 0])
        e[0], e[1] = e[0] + 1, e[1] + y
    return {k: (n, pos / n) for k, (n, pos) in sorted(out.items())}


def rankings_check(dialogs: dict, rows: list) -> dict:
    """At the just-named samples of one rankings file: mean probability and gold rate of the latest
    item and of the best new item, and R@1 of the file as is and with the latest item put first."""
    m = {"samples": len(rows), "just_named": 0, "p_latest": 0.0, "gold_latest": 0, "p_new": 0.0, "gold_new": 0,
         "r1": 0, "r1_latest_first": 0}
    for r in rows:
        turns = dialogs[r["dialog"]]["turns"]
        t, top = r["turn"], [(i, math.exp(s)) for i, s in r["top"]]
        first = top[0][0] if top else None
        m["r1"] += first == r["gold"]
        if turns[t - 1]["role"] == "user" and turns[t - 1]["items"]:
            latest, named = turns[t - 1]["items"][-1], {i for turn in turns[:t] for i in turn["items"]}
            new = next(((i, p) for i, p in top if i not in named), (None, 0.0))
            m["just_named"] += 1
            m["p_latest"] += dict(top).get(latest, 0.0)  # 0 if out of the list
            m["gold_latest"] += r["gold"] == latest
            m["p_new"] += new[1]
            m["gold_new"] += r["gold"] == new[0]
            first = latest
        m["r1_latest_first"] += first == r["gold"]
    return m


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a dataset folder written by data_prep.py")
    p.add_argument("--split", default="val", help="the held-out split the probe and the rankings are on")
    p.add_argument("rankings", nargs="*", help="rankings JSONL files of --split (sample.py --rankings)")
    a = p.parse_args(argv)
    ds = load_dataset(a.data)
    real = {s: [d for d in ds[s] if not d.get("items_only")] for s in ("train", "val", "test")}
    print("| split | samples | gold named before | just-named samples | gold = the seeker's latest item |")
    print("|---|---|---|---|---|")
    for s, dialogs in real.items():
        n, rep, jn, latest = split_rates(dialogs)
        print(f"| {s} | {n} | {rep:.3f} | {jn} | {latest:.3f} |")
    train, held = turn_rows(real["train"]), turn_rows(real[a.split])
    if train and held:
        aucs = ", ".join(f"{probe(train, held, c):.3f} (L2 {c:g})" for c in STRENGTHS)
        print(f"text probe, trained on {len(train)} train turns, AUC on {len(held)} {a.split} turns: {aucs}")
        for name, rows in (("train", train), (a.split, held)):
            print(f"repeat rate by the recommender's earlier repeats ({name}): " +
                  ", ".join(f"{k}{'+' if k == 2 else ''}: {v:.3f} of {n}" for k, (n, v) in habit(rows).items()))
    dialogs = {d["id"]: d for d in ds[a.split]}
    for f in a.rankings:
        m = rankings_check(dialogs, [r for _, r in read_jsonl(f)])
        k = max(m["just_named"], 1)
        print(f"{f}: {m['just_named']} just-named of {m['samples']} samples; latest item mean p {m['p_latest'] / k:.3f}, "
              f"gold {m['gold_latest'] / k:.3f}; best new item mean p {m['p_new'] / k:.3f}, gold {m['gold_new'] / k:.3f}; "
              f"R@1 {m['r1'] / m['samples']:.4f}, latest first {m['r1_latest_first'] / m['samples']:.4f} (counterfactual)")


if __name__ == "__main__":
    main()
