"""
How well can the free-mode intent (REC or CHAT for the next assistant turn) be told from the dialog
at all? A probe that is not the model: a logistic regression on hashed words of the last two turns
plus where the turn falls in the dialog, trained on the train split, its REC threshold chosen on val
(best REC F1, the rule of sample.py --calibrate), reported on test. If the probe can not reach a
precision either, the model's intent figures are a property of the data's labels, not of the model.

    python dev/intent_probe.py --data data/inspired
    python dev/intent_probe.py --data data/redial --json out/intent_probe_redial.json

The turns are the eval's: every assistant turn with a non-empty context; REC = the turn mentions an item.
"""
import argparse
import os
import re
import sys
import zlib

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanocrs.data import load_dataset, write_json  # noqa: E402
from nanocrs.metrics import calibrate_intent, intent_metrics  # noqa: E402

N_HASH = 1 << 15
WORD = re.compile(r"[a-z']+|\?|!")


def features(turns: list, t: int) -> list[int]:
    """Indices of the active features of assistant turn t: words and word pairs of the last turn
    (usually the seeker's) and of the one before it, each tagged with which turn it came from before
    it is hashed, plus the turn's position and how many items the dialog has mentioned so far."""
    out = []
    for back, tag in ((1, "u"), (2, "a")):
        if t - back < 0:
            continue
        prev = turns[t - back]
        words = WORD.findall(re.sub(r"@\{[^}]*\}|<BOI>.*?<EOI>", " movie ", prev["text"].lower()))
        grams = words + [a + "_" + b for a, b in zip(words, words[1:])]
        out += [zlib.crc32(f"{tag}:{prev['role']}:{g}".encode()) % N_HASH for g in set(grams)]
        out.append(zlib.crc32(f"{tag}:has_item:{bool(prev['items'])}".encode()) % N_HASH)
    seen = sum(len(x["items"]) for x in turns[:t])
    out.append(zlib.crc32(f"pos:{min(t, 20)}".encode()) % N_HASH)
    out.append(zlib.crc32(f"seen:{min(seen, 8)}".encode()) % N_HASH)
    return out


def table(dialogs: list) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """((feature indices, offsets), labels): one bag of active features per turn, kept sparse."""
    rows, labels = [], []
    for d in dialogs:
        if d.get("items_only"):  # no text: nothing to read an intent from
            continue
        for t, turn in enumerate(d["turns"]):
            if turn["role"] == "assistant" and t > 0:
                rows.append(features(d["turns"], t))
                labels.append(float(bool(turn["items"])))
    offsets = torch.tensor([0] + [len(r) for r in rows[:-1]]).cumsum(0)
    return (torch.tensor([i for r in rows for i in r]), offsets), torch.tensor(labels)


def logits(x, w, b):
    idx, offsets = x
    return torch.nn.functional.embedding_bag(idx, w[:, None], offsets, mode="sum")[:, 0] + b


def fit(x, y, l2: float, steps: int):
    w = torch.zeros(N_HASH, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05, weight_decay=l2)
    for _ in range(steps):  # full batch: the tables are small
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(x, w, b), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach(), b.detach()


def precision_at_recall(p_rec: list[float], is_rec: list[bool], recall: float = 0.5) -> float:
    """The best REC precision of any threshold whose REC recall is at least `recall`."""
    tp, best, n_gold = 0, 0.0, max(sum(is_rec), 1)
    for k, (_, y) in enumerate(sorted(zip(p_rec, is_rec), reverse=True), 1):
        tp += y
        if tp / n_gold >= recall:
            best = max(best, tp / k)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--l2", default="1e-4,1e-3,1e-2,1e-1", help="weight decays to try; the best REC F1 on val wins")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--json", default="")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    ds = load_dataset(a.data)
    (xtr, ytr), (xva, yva), (xte, yte) = (table(ds[s]) for s in ("train", "val", "test"))
    is_va, is_te = [bool(v) for v in yva.tolist()], [bool(v) for v in yte.tolist()]
    best = None
    for l2 in (float(v) for v in a.l2.split(",")):
        w, b = fit(xtr, ytr, l2, a.steps)
        p_va = torch.sigmoid(logits(xva, w, b)).tolist()
        thr = calibrate_intent(p_va, is_va)
        f1 = intent_metrics(p_va, is_va, thr)["rec_f1"]
        print(f"l2 {l2:g}: val REC F1 {f1:.3f}")
        if best is None or f1 > best[0]:
            best = (f1, l2, thr, p_va, torch.sigmoid(logits(xte, w, b)).tolist())
    _, l2, thr, p_va, p_te = best
    res = {"data": a.data, "l2": l2, "turns": {"train": len(ytr), "val": len(yva), "test": len(yte)},
           "rec_share": {"train": ytr.mean().item(), "val": yva.mean().item(), "test": yte.mean().item()},
           "val": intent_metrics(p_va, is_va, thr), "test": intent_metrics(p_te, is_te, thr),
           # whether any threshold at all meets 0.5 / 0.5 (on test this one is an oracle's choice)
           "best_precision_at_recall_0.5": {"val": precision_at_recall(p_va, is_va),
                                            "test": precision_at_recall(p_te, is_te)}}
    for split in ("val", "test"):
        m = res[split]
        print(f"{split}: {m['n_turns']} turns ({m['n_rec']} REC, share {res['rec_share'][split]:.3f}), "
              f"p(REC) >= {thr:.3f}: accuracy {m['accuracy']:.3f}, REC precision {m['rec_precision']:.3f} "
              f"recall {m['rec_recall']:.3f}; best precision at recall >= 0.5 on any threshold "
              f"{res['best_precision_at_recall_0.5'][split]:.3f}")
    if a.json:
        write_json(a.json, res)


if __name__ == "__main__":
    main()
