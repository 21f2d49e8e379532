"""
Use a trained nanocrs checkpoint: evaluate it, print sample replies, or chat with it.

    python sample.py --ckpt out/synthetic --eval test --json out/synthetic/eval_test.json
    python sample.py --ckpt out/synthetic --num-samples 3
    python sample.py --ckpt out/synthetic --chat                  # /reset starts over, /quit leaves
    echo "I want a scary movie from the 80s" | python sample.py --ckpt out/synthetic --chat
    python sample.py --ckpt out/smol --export-hf out/smol-hf      # a folder transformers can load
    python sample.py --init-from smollm2 --prompt "The capital of France is" --greedy --max-new-tokens 20

Evaluation follows the paper's protocol: one sample per (assistant turn, item it mentions); the mode
is forced from the gold turn, the context is followed by  Assistant:<MODE=REC><BOI>  and a
trie-constrained beam search (width --beam, >= the largest k) gives the ranked list. Reported:
Recall@1/5/10/20/50, NDCG and MRR @5/10/20 on the standard protocol and on the fresh one (gold items
not mentioned earlier in the dialog), the free-mode intent accuracy (the greedy token after
"Assistant:" on every assistant turn), and the same metrics for the popularity and repeat-context
baselines and, on the synthetic world, the generator's oracle, all on the same samples.
"""

import argparse
import json
import os
import sys
import time

import torch
from tqdm import tqdm

from nanocrs import checkpoint
from nanocrs.common import atomic_path, flag_error, init_device, run_script
from nanocrs.data import (MENTION, DataError, Renderer, load_dataset, load_items, rec_samples, training_dialogs,
                          write_json)
from nanocrs.generate import Control, SIDTrie, beam_search_batch, sample
from nanocrs.metrics import (CoOccurrence, Popularity, calibrate_intent, corpus_bleu, distinct_per_sentence,
                             distinct_ratio, format_table, intent_metrics, perplexity, rank_metrics, rank_of, repeat_context,
                             repeat_then_cooccurrence, replace_spans)
from nanocrs.tokenizer import BOI, EOI, MODE_CHAT, MODE_REC, RESP

INTENT_FILE = "intent.json"  # the free-mode REC threshold, chosen on val, beside the checkpoint


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/synthetic", help="checkpoint folder written by train.py")
    p.add_argument("--data", default=None, help="dataset folder (default: the one the checkpoint was trained on)")
    p.add_argument("--eval", default=None, metavar="SPLIT", help="run the recommendation eval on val or test")
    p.add_argument("--json", default=None, help="with --eval: also write the results here")
    p.add_argument("--calibrate", action="store_true",
                   help=f"with --eval val: choose the free-mode REC threshold (best REC F1) and save it as "
                        f"CKPT/{INTENT_FILE}; chat and later evals use it")
    p.add_argument("--beam", type=int, default=50, help="beam width of the item search")
    p.add_argument("--eval-batch", type=int, default=8,
                   help="with --eval: turns per forward and beam search (memory: batch x block x vocab logits)")
    p.add_argument("--rankings", default=None, metavar="FILE",
                   help="with --eval: write each sample's ranked items here, one JSON line per sample")
    p.add_argument("--max-samples", type=int, default=0, help="with --eval: evaluate only the first N dialogs of the split (0: all)")
    p.add_argument("--max-gen", type=int, default=200, help="with --eval: generate responses on about this many turns for BLEU/Distinct (0: none)")
    p.add_argument("--num-samples", type=int, default=0, help="print this many test contexts with gold and generated replies")
    p.add_argument("--chat", action="store_true", help="interactive chat (reads stdin, works with pipes)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default; 1 is faster on a busy machine)")
    p.add_argument("--export-hf", default=None, metavar="DIR", help="write the checkpoint as a Hugging Face folder")
    p.add_argument("--init-from", default=None, help='plain text generation from an unmodified pretrained model ("smollm2" or a folder)')
    p.add_argument("--prompt", default=None, help="with --init-from: the prompt (raw text, no chat template added)")
    a = p.parse_args(argv)
    for flag, low in (("top_k", 1), ("beam", 1), ("max_new_tokens", 1), ("max_samples", 0), ("max_gen", 0), ("num_samples", 0)):
        if getattr(a, flag) < low:
            flag_error(f"--{flag.replace('_', '-')} must be at least {low}, got {getattr(a, flag)}")
    return a


class Session:
    """Everything loaded from a checkpoint, plus the helpers that turn tokens into readable text."""

    def __init__(self, ckpt: str, device: str):
        self.model, self.config, self.tok, self.sids = checkpoint.load(ckpt, device, merge=True)
        self.model.eval()
        self.items = {it["id"]: it for it in load_items(os.path.join(ckpt, "items.jsonl"))}
        self.rd = Renderer(self.tok, self.sids, self.model.config.block_size)
        self.trie = SIDTrie.build(self.sids, self.tok)
        self.ctrl = Control.of(self.tok)
        self.device = device
        self.mode_ids = {self.tok.id(MODE_REC): "REC", self.tok.id(MODE_CHAT): "CHAT"}
        # the free-mode REC threshold chosen on the validation split (sample.py --eval val --calibrate)
        path = os.path.join(ckpt, INTENT_FILE)
        self.rec_threshold = json.load(open(path))["rec_threshold"] if os.path.isfile(path) else None

    def link(self, text: str) -> tuple[str, list[str]]:
        """Typed text with every catalogue title found in it written as an @{id} mention, the way the
        dataset readers link titles (nanocrs/datasets.py), so the model sees a typed title as the item
        it saw in training. Returns (text, linked item ids in order)."""
        from nanocrs.datasets import link_titles
        text, _ = link_titles(text, [(it["title"], i) for i, it in self.items.items()])
        return text, list(dict.fromkeys(MENTION.findall(text)))

    def title(self, item_id: str) -> str:
        it = self.items[item_id]
        year = it.get("metadata", {}).get("year")
        return f"[{it['title']}{f' ({year})' if year else ''}]"

    def show_text(self, text: str) -> str:
        """Dialog text with @{id} mentions shown as titles."""
        return MENTION.sub(lambda m: self.title(m.group(1)), text)

    def read(self, ids: list[int]):
        """Generated ids after "Assistant:" -> (mode "REC"/"CHAT"/None, slot item or None, response),
        where the response is a list of pieces: decoded text strings and ("item", id) for each span."""
        resp = self.tok.id(RESP)
        head, body = (ids[:ids.index(resp)], ids[ids.index(resp) + 1:]) if resp in ids else (ids, [])
        mode = self.mode_ids.get(head[0]) if head else None
        slot = None
        if mode == "REC" and self.ctrl.boi in head and self.ctrl.eoi in head:
            a, b = head.index(self.ctrl.boi), head.index(self.ctrl.eoi)
            slot = self.sids.item_of_tokens([self.tok.token(t) for t in head[a + 1:b]])
        pieces, text_ids, span = [], [], None
        for i in body:
            if i == self.ctrl.eot:
                break
            if i == self.ctrl.boi:
                span = []
            elif i == self.ctrl.eoi and span is not None:
                pieces += [self.tok.decode(text_ids), ("item", self.sids.item_of_tokens([self.tok.token(t) for t in span]))]
                text_ids, span = [], None
            elif span is not None:
                span.append(i)
            else:
                text_ids.append(i)
        pieces.append(self.tok.decode(text_ids))
        return mode, slot, pieces

    @staticmethod
    def join(pieces, item_text) -> str:
        """The response as one string, each item span written by item_text(item_id)."""
        return " ".join("".join(p if isinstance(p, str) else item_text(p[1]) for p in pieces).split())

    def parse(self, ids: list[int]):
        """(mode, slot item, response with item spans shown as titles), for people."""
        mode, slot, pieces = self.read(ids)
        return mode, slot, self.join(pieces, self.title)

    def generated_response(self, ids: list[int]):
        """(slot item, items the response mentions, response with each span as one "<movie>" token),
        for the dialog metrics."""
        _, slot, pieces = self.read(ids)
        return slot, [p[1] for p in pieces if not isinstance(p, str)], self.join(pieces, lambda i: " <movie> ")

    def reply(self, context: list[dict], args, generator) -> list[int]:
        prompt = self.rd.prompt(context)
        if self.rec_threshold is not None:  # choose the mode with the calibrated threshold, then go on
            logits, _ = self.model(torch.tensor([prompt], device=self.device))
            mode_rec, mode_chat = self.tok.id(MODE_REC), self.tok.id(MODE_CHAT)
            p = logits[0, -1, [mode_rec, mode_chat]].float().softmax(-1)[0].item()
            mode = mode_rec if p >= self.rec_threshold else mode_chat
            return [mode] + sample(self.model, prompt + [mode], self.trie, self.ctrl, n=1,
                                   max_new_tokens=args.max_new_tokens - 1, temperature=args.temperature,
                                   top_k=args.top_k, greedy=args.greedy, generator=generator)[0]
        return sample(self.model, prompt, self.trie, self.ctrl, n=1, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_k=args.top_k, greedy=args.greedy, generator=generator)[0]


# -----------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate(s: Session, ds: dict, split: str, beam: int, max_dialogs: int = 0, max_gen: int = 200,
             max_new_tokens: int = 64, batch: int = 8, rankings: str | None = None) -> dict:
    """The recommendation eval (paper protocol, both protocols, baselines) and the dialog metrics.

    Per assistant turn, ONE forward of  context + "Assistant:" + the gold structured turn  gives:
      - the free-mode intent: the greedy token right after "Assistant:";
      - the perplexity of the gold response (teacher-forced; each <BOI>..<EOI> span counts as one unit);
      - on REC turns, the start of the item beam search: the cache is rewound to just after
        <MODE=REC><BOI>, which is exactly how the gold REC turn begins.
    Turns go `batch` at a time (score_turns), left-padded. Ties between equal scores go by catalogue
    order (nanocrs.generate), so the batch size changes no ranking beyond float rounding.
    With `rankings`, one JSON line per sample: dialog, turn, gold, fresh, rank (1-based, 0 = not
    found) and the model's ranked [item, log-prob] list.
    On every k-th turn (about max_gen turns in all) a response is also generated greedily with the
    gold mode forced, for BLEU / Distinct-n and, on REC turns, the target-prediction accuracy (the
    item the model writes after <BOI>) and faithfulness (the response mentions that same item)."""
    dialogs = ds[split][:max_dialogs] if max_dialogs else ds[split]
    catalogue = [it["id"] for it in ds["items"]]
    # the baselines count what the model was trained on (train, or train+val with --train-splits)
    seen = training_dialogs(ds, s.config["train"].get("train_splits", "train"), bool(s.config["train"].get("item_sequences", 1)))
    pop, cooc = Popularity(seen, catalogue), CoOccurrence(seen, catalogue)
    trained_targets = {i for d in seen for turn in d["turns"] if turn["role"] == "assistant" for i in turn["items"]}
    cold_flags, top_lists = [], {}
    has_oracle = any("oracle" in t for d in dialogs for t in d["turns"])
    methods = ["model", "popularity", "repeat", "cooc", "repeat+cooc"] + (["oracle"] if has_oracle else [])
    ranks = {m: [] for m in methods}
    fresh_flags = []
    golds_by_turn = {}
    for d, t, gold, fresh in rec_samples(dialogs):
        golds_by_turn.setdefault((d["id"], t), []).append((gold, fresh))
    turns = [(d, t) for d in dialogs for t, turn in enumerate(d["turns"]) if turn["role"] == "assistant" and t > 0]
    gen_every = max(1, len(turns) // max_gen) if max_gen else 0
    mode_rec, mode_chat, resp = s.tok.id(MODE_REC), s.tok.id(MODE_CHAT), s.tok.id(RESP)
    p_rec, is_rec = [], []  # free-mode intent: p(REC) / (p(REC) + p(CHAT)) after "Assistant:", and the gold
    nll_total, nll_units, nll_tokens = 0.0, 0, 0
    hyps, refs = [], []
    gen = {"rec_turns": 0, "target_hits": 0, "top1_hits": 0, "faithful": 0}
    examples = {}  # (dialog id, turn) -> (ids, P): P = tokens up to and including "Assistant:"
    for d, t in turns:
        ids, targets = s.rd.example(d["turns"][:t], d["turns"][t])
        examples[(d["id"], t)] = ids, next(i for i, x in enumerate(targets) if x != -1) + 1
    # every turn scored, `batch` at a time: REC and CHAT turns apart (only REC turns search items),
    # each sorted by the length of its prompt so that little padding is needed
    scored = {}  # (dialog id, turn) -> (p(REC) after "Assistant:", log-probs of the response, units, top)
    for rec_turns in (True, False):
        keys = sorted(((d["id"], t) for d, t in turns if bool(d["turns"][t]["items"]) == rec_turns),
                      key=lambda k: examples[k][1])
        for a in tqdm(range(0, len(keys), batch), desc=f"eval {split} ({'REC' if rec_turns else 'CHAT'} turns)",
                      dynamic_ncols=True, file=sys.stderr, mininterval=0.2 if sys.stderr.isatty() else 30):
            chunk = keys[a:a + batch]
            scored.update(zip(chunk, score_turns(s, [examples[k] for k in chunk], beam if rec_turns else 0)))
    ranking_lines = []
    for j, (d, t) in enumerate(tqdm(turns, desc=f"eval {split} (metrics, responses)", dynamic_ncols=True,
                                    file=sys.stderr, mininterval=0.2 if sys.stderr.isatty() else 30)):
        turn, context = d["turns"][t], d["turns"][:t]
        rec_p, logps, units, top = scored[(d["id"], t)]
        p_rec.append(rec_p)
        is_rec.append(bool(turn["items"]))
        for lp in logps:  # perplexity of the response: the tokens after <RESP>, an item span one unit
            nll_total -= lp
        nll_units += units
        nll_tokens += len(logps)
        top1 = None
        if turn["items"]:
            lists = {"model": [i for i, _ in top], "popularity": pop.rank(context), "repeat": repeat_context(context),
                     "cooc": cooc.rank(context), "repeat+cooc": repeat_then_cooccurrence(context, cooc)}
            if has_oracle:
                lists["oracle"] = turn.get("oracle", [])
            for gold, fresh in golds_by_turn[(d["id"], t)]:
                for m in methods:
                    ranks[m].append(rank_of(lists[m], gold))
                fresh_flags.append(fresh)
                cold_flags.append(gold not in trained_targets)
                ranking_lines.append(json.dumps({"dialog": d["id"], "turn": t, "gold": gold, "fresh": fresh,
                                                 "rank": ranks["model"][-1], "top": [[i, lp] for i, lp in top]}))
            for m in methods:
                top_lists.setdefault(m, []).append(lists[m][:10])
            top1 = lists["model"][0] if lists["model"] else None
        if gen_every and j % gen_every == 0:
            forced = MODE_REC if turn["items"] else MODE_CHAT
            prompt = s.rd.prompt(context, forced=forced)
            out = sample(s.model, prompt, s.trie, s.ctrl, max_new_tokens=max_new_tokens, greedy=True)[0]
            target, text_items, text = s.generated_response([mode_rec if turn["items"] else mode_chat] + out)
            hyps.append(text)
            refs.append(replace_spans(turn["text"]))
            if turn["items"]:
                gen["rec_turns"] += 1
                gen["target_hits"] += int(target in turn["items"])
                gen["top1_hits"] += int(top1 in turn["items"])
                gen["faithful"] += int(target is not None and target in text_items)
    if rankings:
        os.makedirs(os.path.dirname(os.path.abspath(rankings)), exist_ok=True)
        with open(rankings + ".tmp", "w") as f:
            f.write("".join(line + "\n" for line in ranking_lines))
        os.replace(rankings + ".tmp", rankings)
    res = {"split": split, "n_samples": len(fresh_flags), "n_fresh": sum(fresh_flags), "beam": beam}
    for m in methods:
        res[m] = rank_metrics(ranks[m])
    res["fresh"] = {m: rank_metrics([r for r, f in zip(ranks[m], fresh_flags) if f]) for m in methods}
    # why a model wins or loses: can it recommend items it never saw as a target, and how many
    # different items does it recommend at all (a model stuck on a few popular IDs shows here)?
    res["diagnostics"] = {
        "cold_share": sum(cold_flags) / max(len(cold_flags), 1),
        "recall@10_cold": {m: rank_metrics([r for r, c in zip(ranks[m], cold_flags) if c])["recall@10"] for m in methods},
        "recall@10_warm": {m: rank_metrics([r for r, c in zip(ranks[m], cold_flags) if not c])["recall@10"] for m in methods},
        "top1_distinct": {m: len({x[0] for x in top_lists.get(m, []) if x}) for m in methods},
        "coverage@10": {m: len({i for x in top_lists.get(m, []) for i in x}) / len(catalogue) for m in methods}}
    res["intent"] = intent_metrics(p_rec, is_rec)  # the plain argmax between the two modes
    if s.rec_threshold is not None:
        res["intent_calibrated"] = intent_metrics(p_rec, is_rec, s.rec_threshold)
    res["intent_best_threshold"] = calibrate_intent(p_rec, is_rec)  # on THIS split: only --calibrate on val uses it
    res["intent_at_best_threshold"] = intent_metrics(p_rec, is_rec, res["intent_best_threshold"])
    res["intent_accuracy"] = res["intent"]["accuracy"]
    res["n_intent_turns"] = len(turns)
    n_rec = max(gen["rec_turns"], 1)
    res["dialog"] = {
        "perplexity": perplexity(nll_total, nll_units), "ppl_units": nll_units,
        "perplexity_per_token": perplexity(nll_total, nll_tokens), "ppl_tokens": nll_tokens,
        "bleu": corpus_bleu(hyps, refs) if hyps else 0.0, "n_generated": len(hyps),
        "distinct_ratio": {n: distinct_ratio(hyps, n) for n in (1, 2, 3, 4)},
        "distinct_per_sentence": {n: distinct_per_sentence(hyps, n) for n in (1, 2, 3, 4)},
        # Distinct-n grows as the corpus shrinks: the gold responses of the same turns are the yardstick
        "gold_distinct_ratio": {n: distinct_ratio(refs, n) for n in (1, 2, 3, 4)},
        "target_accuracy": gen["target_hits"] / n_rec, "beam_top1_accuracy": gen["top1_hits"] / n_rec,
        "faithfulness": gen["faithful"] / n_rec, "n_generated_rec_turns": gen["rec_turns"]}
    return res


@torch.no_grad()
def score_turns(s: Session, examples: list, beam: int = 0) -> list:
    """One left-padded forward of several turns, each (ids of context + "Assistant:" + the gold turn,
    P = tokens up to and including "Assistant:") -> per turn (p(REC) / (p(REC) + p(CHAT)) after "Assistant:",
    log-probs of the response tokens after <RESP>, the response's units with each item span one
    unit, and with beam > 0, REC turns only, the ranked [(item, log-prob)] of the beam search).
    The rows are padded so that every <BOI> (token P + 1) is at the same slot: rewound to just after
    it, the cache holds each row's prompt up to <MODE=REC><BOI>, exactly how the gold REC turn begins,
    and the beam search continues all rows at once. The gold tokens after that slot are simply
    forgotten; causal attention kept them out of everything before it."""
    device, resp = s.device, s.tok.id(RESP)
    A = max(P for _, P in examples) + 1                # the shared slot of <BOI>
    pads = [A - (P + 1) for _, P in examples]
    T = max(p + len(ids) for p, (ids, _) in zip(pads, examples))
    # (B, T); filler on the left is masked (pad), on the right it comes after the row's last token
    x = torch.full((len(examples), T), s.ctrl.eot, dtype=torch.long)
    for r, (p, (ids, _)) in enumerate(zip(pads, examples)):
        x[r, p:p + len(ids)] = torch.tensor(ids)
    pad = torch.tensor(pads, device=device)
    cache = s.model.new_cache(len(examples), T, pad=pad if max(pads) else None)
    logits, _ = s.model(x.to(device), cache=cache)   # (B, T, V)
    out = []
    for r, (p, (ids, P)) in enumerate(zip(pads, examples)):
        row = logits[r, p:p + len(ids)]               # (len(ids), V): this turn's own positions
        k = ids.index(resp, P) + 1
        logps = torch.log_softmax(row[k - 1:-1].float(), -1).gather(
            1, torch.tensor(ids[k:], device=device)[:, None])[:, 0].tolist()
        units, in_span = 0, False
        for tok in ids[k:]:
            in_span = in_span or tok == s.ctrl.boi
            if not in_span or tok == s.ctrl.eoi:
                units += 1
                in_span = False
        two = row[P - 1, [s.tok.id(MODE_REC), s.tok.id(MODE_CHAT)]].float().softmax(-1)  # free-mode intent
        out.append([two[0].item(), logps, units, None])
    if beam:
        for ids, P in examples:
            assert ids[P:P + 2] == [s.tok.id(MODE_REC), s.ctrl.boi]
        cache.pos = A + 1  # rewind to just after <MODE=REC><BOI>
        tops = beam_search_batch(s.model, [ids[:P + 2] for ids, P in examples], s.trie, s.ctrl, beam,
                                 cache=cache, last_logits=logits[:, A])
        for o, top in zip(out, tops):
            o[3] = top
    return out


def print_eval(res: dict):
    keys = ["recall@1", "recall@5", "recall@10", "recall@20", "recall@50", "ndcg@10", "mrr@10"]
    methods = [m for m in ("model", "popularity", "repeat", "cooc", "repeat+cooc", "oracle") if m in res]
    print(f"\nstandard protocol: {res['n_samples']} samples ({res['split']}), beam {res['beam']}")
    print(format_table({m: res[m] for m in methods}, keys))
    print(f"\nfresh protocol (gold not mentioned earlier): {res['n_fresh']} samples")
    print(format_table({m: res["fresh"][m] for m in methods}, keys))
    dg = res["diagnostics"]
    print(f"\ngold items never a training target: {dg['cold_share']:.1%} of samples. "
          "recall@10 on those / on the others, distinct top-1 items, share of the catalogue in some top-10:")
    for m in methods:
        print(f"  {m:<13} {dg['recall@10_cold'][m]:.4f} / {dg['recall@10_warm'][m]:.4f}   "
              f"{dg['top1_distinct'][m]:5d}   {dg['coverage@10'][m]:.4f}")
    dm = res["dialog"]
    for key, what in (("intent", "argmax"), ("intent_calibrated", "threshold from val")):
        if key in res:
            im = res[key]
            print(f"\nfree-mode intent ({what}, p(REC) >= {im['threshold']:.3f}): accuracy {im['accuracy']:.4f}, "
                  f"REC precision {im['rec_precision']:.4f} recall {im['rec_recall']:.4f} "
                  f"over {im['n_turns']} assistant turns ({im['n_rec']} REC)")
    print(f"dialog: perplexity {dm['perplexity']:.3f} with each item span as one unit ({dm['ppl_units']} units), "
          f"{dm['perplexity_per_token']:.3f} per token ({dm['ppl_tokens']} tokens), gold responses")
    print(f"BLEU {dm['bleu']:.2f} (SacreBLEU-compatible, {dm['n_generated']} generated responses, mode forced)")
    print(f"distinct-1..4 ratio (paper) on those {dm['n_generated']} responses: "
          + " ".join(f"{dm['distinct_ratio'][n]:.4f}" for n in (1, 2, 3, 4))
          + " | the gold responses of the same turns: " + " ".join(f"{dm['gold_distinct_ratio'][n]:.4f}" for n in (1, 2, 3, 4))
          + " | per sentence (CRSLab): " + " ".join(f"{dm['distinct_per_sentence'][n]:.3f}" for n in (1, 2, 3, 4)))
    print(f"on {dm['n_generated_rec_turns']} generated REC turns: target-prediction accuracy {dm['target_accuracy']:.4f} "
          f"(greedy item after <BOI>) vs beam top-1 {dm['beam_top1_accuracy']:.4f}; "
          f"faithfulness {dm['faithfulness']:.4f} (response mentions the predicted item)")


# -----------------------------------------------------------------------------
# samples and chat

def show_samples(s: Session, ds: dict, n: int, args, generator):
    dialogs = ds["test"]
    shown = 0
    for d in dialogs:
        # one assistant turn per dialog, the first recommendation if there is one
        turns = [t for t, turn in enumerate(d["turns"]) if turn["role"] == "assistant" and t > 0]
        if not turns:
            continue
        t = next((t for t in turns if d["turns"][t]["items"]), turns[0])
        print(f"=== {d['id']}, turn {t} " + "=" * 40)
        for turn in d["turns"][:t]:
            print(f"{turn['role']:>9}: {s.show_text(turn['text'])}")
        gold = d["turns"][t]
        print(f"     gold: [{'REC' if gold['items'] else 'CHAT'}] {s.show_text(gold['text'])}")
        mode, item, text = s.parse(s.reply(d["turns"][:t], args, generator))
        rec = f" -> {s.title(item)}" if item else ""
        print(f"    model: [{mode or '?'}{rec}] {text}\n")
        shown += 1
        if shown >= n:
            break


def chat(s: Session, args, generator):
    interactive = sys.stdin.isatty()
    if interactive:
        print("nanocrs chat: tell it what you like. /reset starts over, /quit leaves.")
    context = []
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            context = []
            print("(new conversation)")
            continue
        if not line:
            print("(empty message: type something, /reset or /quit)")
            continue
        if not interactive:
            print(f"you> {line}")
        text, linked = s.link(_escape(line))
        if linked:
            print(f"(linked: {', '.join(s.title(i) for i in linked)})")
        context.append({"role": "user", "text": text, "items": linked})
        ids = s.reply(context, args, generator)
        mode, item, text = s.parse(ids)
        rec = f" recommends {s.title(item)}" if item else ""
        print(f"bot> ({mode or '?'}{rec}) {text}")
        # keep the reply in the context as a schema turn: its slot item first, then the items its text mentions,
        # so that it renders back into exactly the structured form the model wrote
        text = _reply_text(s, ids)
        items = ([item] if item else []) + MENTION.findall(text)
        context.append({"role": "assistant", "text": text, "items": list(dict.fromkeys(items))})


def _reply_text(s: Session, ids: list[int]) -> str:
    """The response part of generated ids, written back in the schema's @{id} form."""
    _, _, pieces = s.read(ids)
    return s.join([_escape(p) if isinstance(p, str) else p for p in pieces], lambda i: "@{" + i + "}")


def _escape(text: str) -> str:
    # "@{" in free text would read as an item mention when the turn is rendered again
    return text.replace("@{", "@ {")


@torch.no_grad()
def plain_generate(model, ids: list[int], max_new_tokens: int, greedy: bool, temperature: float, top_k: int,
                   stop: set, generator=None) -> list[int]:
    """Unconstrained decoding with the KV cache, for checking a backbone against other implementations."""
    device = model.embed_tokens.weight.device
    cache = model.new_cache(1, len(ids) + max_new_tokens)
    logits, _ = model(torch.tensor([ids], device=device), cache=cache)
    out = []
    for _ in range(max_new_tokens):
        x = logits[0, -1].float()
        if greedy:
            nxt = int(x.argmax())
        else:
            x = x / max(temperature, 1e-5)
            kth = torch.topk(x, min(top_k, x.numel())).values[-1]
            nxt = int(torch.multinomial(torch.softmax(x.masked_fill(x < kth, float("-inf")), -1), 1, generator=generator))
        out.append(nxt)
        if nxt in stop:
            break
        logits, _ = model(torch.tensor([[nxt]], device=device), cache=cache)
    return out


def main(argv=None):
    args = get_args(argv)
    device = init_device(args.device, args.threads)
    if args.init_from:
        from nanocrs.backbone import load_base
        if args.prompt is None:
            raise ValueError("--init-from needs --prompt")
        model, tok = load_base(args.init_from, device)
        ids = tok.encode(args.prompt)
        stop = {i for i in (tok.tk.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>")) if i is not None}
        g = torch.Generator(device=device).manual_seed(args.seed)
        out = plain_generate(model.eval(), ids, args.max_new_tokens, args.greedy, args.temperature, args.top_k, stop, g)
        print(f"prompt ids: {ids}\ngenerated ids: {out}\n{args.prompt}{tok.decode(out)}")
        return
    s = Session(args.ckpt, device)
    if args.export_hf:
        from nanocrs.hf import export_hf
        export_hf(s.model, s.tok, args.export_hf)
        print(f"wrote {args.export_hf} (config.json, model.safetensors, tokenizer.json)")
        return
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if not (args.eval or args.num_samples or args.chat):
        args.num_samples = 3
    ds = None
    if args.eval or args.num_samples:
        data_dir = args.data or s.config["data"]
        ds = load_dataset(data_dir)
        checkpoint.check_data(s.config, data_dir)
    if args.eval:
        if args.calibrate and args.eval != "val":
            raise ValueError("--calibrate: thresholds are chosen on the validation split (--eval val), never on test")
        if args.eval not in ("train", "val", "test"):
            raise DataError(f"--eval must be train, val or test, got {args.eval!r}")
        if not ds[args.eval]:
            raise DataError(f"{os.path.join(data_dir, args.eval + '.jsonl')}: no dialogs to evaluate")
        if args.eval_batch < 1:
            raise ValueError(f"--eval-batch must be >= 1, got {args.eval_batch}")
        if args.beam < 50:
            print(f"note: beam {args.beam} < 50, so recall@50 counts only the {args.beam} items returned")
        t0 = time.time()
        res = evaluate(s, ds, args.eval, args.beam, args.max_samples, args.max_gen, args.max_new_tokens,
                       args.eval_batch, args.rankings)
        res["seconds"] = round(time.time() - t0, 1)
        print_eval(res)
        print(f"eval took {res['seconds']} s")
        if args.calibrate:
            t = res["intent_best_threshold"]
            write_json(os.path.join(args.ckpt, INTENT_FILE), {"rec_threshold": t, "chosen_on": "val",
                                                              "val": res["intent_at_best_threshold"]})
            print(f"free-mode REC threshold {t:.4f} (best REC F1 on val) saved to {os.path.join(args.ckpt, INTENT_FILE)}")
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with atomic_path(args.json) as tmp, open(tmp, "w") as f:
                json.dump(res, f, indent=1)
            print(f"wrote {args.json}")
        if args.rankings:
            print(f"wrote {args.rankings}")
    if args.num_samples:
        show_samples(s, ds, args.num_samples, args, generator)
    if args.chat:
        chat(s, args, generator)


if __name__ == "__main__":
    run_script(main)
