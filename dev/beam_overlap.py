"""
How much of the exhaustive ranking does the width-50 beam search find? On the REC turns of a split, the
item list of `beam_search_batch` at --beam against the same search with a beam as wide as the catalogue,
which prunes nothing and so scores every item exactly (the eval's lists are the former).

    python dev/beam_overlap.py --ckpt out/redial-s0 --split val --samples 30

Prints top-1 agreement, the overlap of the two top-10s, and the share of the exhaustive top-50 that the
beam's list holds. The prompt is the eval's (context, "Assistant:<MODE=REC><BOI>"), kept to its last
--context tokens: a catalogue-wide beam holds one cache row per item, and the shorter prompt keeps that
in memory; both searches see the same prompt, so the comparison is of the search alone.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanocrs.data import load_dataset, rec_samples  # noqa: E402
from nanocrs.generate import beam_search_batch  # noqa: E402
from nanocrs.session import Session  # noqa: E402
from nanocrs.tokenizer import BOI, MODE_REC  # noqa: E402


@torch.no_grad()
def overlap(s: Session, dialogs: list[dict], n: int, beam: int, context: int) -> dict:
    turns = list(dict.fromkeys((d["id"], t) for d, t, _, _ in rec_samples(dialogs)))[:n]
    by_id = {d["id"]: d for d in dialogs}
    wide = len(s.trie.item_ids)
    top1 = top10 = top50 = 0.0
    for did, t in turns:
        prompt = s.rd.prompt(by_id[did]["turns"][:t], forced=MODE_REC + BOI)[-context:]
        narrow = [i for i, _ in beam_search_batch(s.model, [prompt], s.trie, s.ctrl, beam)[0]]
        full = [i for i, _ in beam_search_batch(s.model, [prompt], s.trie, s.ctrl, wide)[0]]
        top1 += narrow[0] == full[0]
        top10 += len(set(narrow[:10]) & set(full[:10])) / 10
        top50 += len(set(narrow[:beam]) & set(full[:50])) / 50
    k = max(len(turns), 1)
    return {"turns": len(turns), "top1_agree": top1 / k, "top10_overlap": top10 / k, "top50_found": top50 / k}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", default=None, help="dataset folder (default: the checkpoint's)")
    p.add_argument("--split", default="val")
    p.add_argument("--samples", type=int, default=30, help="REC turns (the first N of the split)")
    p.add_argument("--beam", type=int, default=50)
    p.add_argument("--context", type=int, default=128, help="prompt tokens kept (the last ones)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    s = Session(a.ckpt, "cpu")
    assert s.model.heads is None, "the plain GCRS path: a checkpoint without heads"
    ds = load_dataset(a.data or s.config["data"], splits=(a.split,))
    r = overlap(s, ds[a.split], a.samples, a.beam, a.context)
    print(f"{r['turns']} REC turns of {a.split}, beam {a.beam} against a beam of all {len(s.trie.item_ids)} items: "
          f"top-1 agrees {r['top1_agree']:.3f}, top-10 overlap {r['top10_overlap']:.3f}, "
          f"exhaustive top-50 found {r['top50_found']:.3f}")


if __name__ == "__main__":
    main()
