"""
What does each part of the recommendation slot rank on its own? For a checkpoint trained with the
association head (train.py --heads assoc=1 or 2, or a preset), on the fresh samples of a split (gold not named
before): the Recall@10 of the association head alone, of its two query terms alone (the slot
state's a(h_slot) and, with assoc=2, the context items' sum of input rows), and the mean shares
the gate gives the language model's SID path, the copy head and the association head
(nanocrs/heads.py), on the fresh samples and on the repeats (gold named before).

    python dev/heads.py --ckpt out/redial-heads-s0 --data data/redial --split val

A diagnostic, not an eval: the item scores are the head's logits (a(h) + sum_j u_j) . e_n / sqrt(d)
+ c_n, or one query term of them with the bias, ranked over the whole catalogue (context items
included, as the eval does, unless the head was trained with assoc-fresh=1, which leaves them out);
the eval's beam search ranks the whole mixture.
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanocrs import checkpoint  # noqa: E402
from nanocrs.data import Renderer, load_dataset, rec_samples  # noqa: E402
from nanocrs.generate import SIDTrie  # noqa: E402
from nanocrs.heads import find_spans, turn_bucket  # noqa: E402

TOP = 10


@torch.no_grad()
def head_recalls(model, rd: Renderer, trie: SIDTrie, dialogs: list[dict]) -> tuple[dict, list, int]:
    """({query: Recall@10 on the fresh samples}, {"fresh", "repeat": mean gate shares [SID path, copy,
    association]}, {"fresh", "repeat": samples})."""
    ptr, ctrl = model.heads, rd.ctrl
    assert ptr is not None and ptr.items, "needs a checkpoint trained with --heads assoc=1 or 2"
    queries = ("a(h) + sum u", "sum u", "a(h)") if ptr.item_context else ("a(h)",)  # assoc=1: no context rows
    hits = dict.fromkeys(queries, 0)
    shares = {k: torch.zeros(3, dtype=torch.float64) for k in ("fresh", "repeat")}
    n = dict.fromkeys(shares, 0)
    for d, t, gold, fresh in rec_samples(dialogs):
        kind = "fresh" if fresh else "repeat"
        ids, targets = rd.example(d["turns"][:t], d["turns"][t])
        # the slot: the supervised <BOI> right after <MODE=REC>; the prompt ends there
        s0 = next(p for p in range(1, len(ids)) if ids[p] == ctrl.boi and ids[p - 1] == ctrl.mode_rec and targets[p] != -1)
        x = ids[:s0 + 1]
        _, h = model(torch.tensor([x]), return_hidden=True)                       # (1, T, C)
        spans = [(s, e, i) for s, e in find_spans(x, ctrl.boi, ctrl.eoi, s0) if (i := trie.item_index(x[s + 1:e])) is not None]
        item = torch.tensor([[i for *_, i in spans] or [0]])                        # (1, J)
        ok = torch.tensor([[True] * len(spans) or [False]])
        # the spans' turn buckets, as decoding computes them (zero, unused, without copy-turns)
        state = ptr.turn_state(x) if ptr.turns else None
        turn = torch.tensor([[turn_bucket(state, s, s0) if state else 0 for s, *_ in spans] or [0]])
        h_slot = h[0, s0][None]                                                     # (1, C)
        log_g, log_1mg, a, share = ptr.attend(h_slot, h[0, torch.tensor([e for _, e, _ in spans] or [0])][None], ok, turn=turn)
        g = math.exp(float(log_g))
        shares[kind] += torch.tensor([math.exp(float(log_1mg)), float(a.sum()) * g, float(share) * g], dtype=torch.float64)
        n[kind] += 1
        if not fresh:
            continue
        q = ptr.qa(h_slot).float()
        u = (ptr.item_in.float()[item] * ok[..., None]).sum(1) if ptr.item_context else 0.0
        gold_row = trie.index[gold]
        for name, query in zip(queries, (q + u, u, q) if ptr.item_context else (q,)):
            s = (query @ ptr.item_emb.weight.float().T / math.sqrt(ptr.dim) + ptr.item_bias.float())[0]
            if ptr.assoc_fresh:  # the head ranks only the items not yet named
                s[[i for *_, i in spans]] = float("-inf")
            hits[name] += int((s > s[gold_row]).sum()) < TOP
    return ({k: v / max(n["fresh"], 1) for k, v in hits.items()},
            {k: (v / max(n[k], 1)).tolist() for k, v in shares.items()}, n)


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model, config, tok, sids = checkpoint.load(a.ckpt)
    if model.heads is None or not model.heads.items:
        sys.exit(f"error: {a.ckpt}: no association head (trained without --heads assoc=1 or 2); nothing to take apart")
    model.eval()
    rd = Renderer(tok, sids, model.config.block_size)
    recalls, shares, n = head_recalls(model, rd, SIDTrie.build(sids, tok), load_dataset(a.data)[a.split])
    print(f"{a.ckpt}: {n['fresh']} fresh {a.split} samples; Recall@{TOP} of the association head alone: "
          + ", ".join(f"{k} {v:.4f}" for k, v in recalls.items()))
    for k, (gen, copy, assoc) in shares.items():
        print(f"mean gate shares on the {n[k]} {k} samples: SID path {gen:.3f}, copy {copy:.3f}, association {assoc:.3f}")


if __name__ == "__main__":
    main()
